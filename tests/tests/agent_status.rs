//! `jit-gate status` as an operator reads it: per protected port the
//! kernel's counters (packets passed and dropped, new connections refused),
//! the grants of the last 7 days, and the last access with who it was for
//! and who asked; checked against traffic the test sent and the kernel's
//! verdicts on it.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::net::SocketAddr;

use jit_gate_tests::{
    agent::{Agent, AgentFiles},
    cli::Cli,
    netns::{CLIENT_V4, GATED_V4, Topology},
    traffic::{TcpEcho, round_trip, tcp_connect},
};
use serde_json::Value;

/// Port 22's row of `jit-gate --json status`.
fn ssh_row(cli: &Cli) -> Value {
    let status = cli.json(&["status"]);
    status["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["port"] == 22 && p["protocol"] == "tcp")
        .unwrap_or_else(|| panic!("no 22/tcp row: {status}"))
        .clone()
}

fn count(row: &Value, field: &str) -> u64 {
    row[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field}: {row}"))
}

#[test]
fn status_shows_per_port_counters_and_who_had_the_last_access() {
    let topo = Topology::new();
    let files = AgentFiles::new(&topo.gated);
    files.write_config(&[&topo.gated_if], "mode = \"xdp+nftables\"");
    let agent = Agent::start(&files);
    let cli = Cli::new(&files);
    let ssh = SocketAddr::new(GATED_V4.into(), 22);
    let _server = TcpEcho::start(&topo.gated, ssh);

    let before = ssh_row(&cli);
    assert_eq!(before["last_access"], Value::Null, "{before}");
    assert_eq!(before["last_access_requester"], "", "{before}");
    assert_eq!(before["grants_last_7_days"], 0, "{before}");

    // Without a grant: the SYNs are dropped by the kernel, and counted.
    tcp_connect(&topo.client, CLIENT_V4.into(), ssh).expect_timed_out("no grant");
    let denied = ssh_row(&cli);
    assert!(count(&denied, "dropped_packets") >= 1, "{denied}");
    assert_eq!(count(&denied, "passed_packets"), 0, "{denied}");

    // A single-use grant for bob, asked for by root: one connection passes,
    // the next is refused by the grant's limit.
    let out = cli.run(&[
        "request",
        "22",
        "--source",
        &CLIENT_V4.to_string(),
        "--duration",
        "10m",
        "--requester",
        "bob",
        "--max-connections",
        "1",
    ]);
    assert!(out.status.success(), "{out:?}");
    let mut session = tcp_connect(&topo.client, CLIENT_V4.into(), ssh).expect_connected("granted");
    round_trip(&mut session, b"counted").expect("echo under the grant");
    tcp_connect(&topo.client, CLIENT_V4.into(), ssh).expect_timed_out("limit reached");

    let after = ssh_row(&cli);
    // SYN, ACK, the data and its acknowledgement at least.
    assert!(count(&after, "passed_packets") >= 3, "{after}");
    assert!(
        count(&after, "dropped_packets") > count(&denied, "dropped_packets"),
        "{after}"
    );
    assert!(count(&after, "refused_connections") >= 1, "{after}");
    assert_eq!(after["grants_last_7_days"], 1, "{after}");
    assert_eq!(after["last_access_requester"], "bob", "{after}");
    assert_eq!(after["last_access_principal"], "uid:0", "{after}");
    assert!(after["last_access"].is_string(), "{after}");

    let text = cli.text(&["status"]);
    assert!(
        text.contains("bob (by uid:0)") && text.contains("REFUSED"),
        "{text}"
    );

    // The history survives a restart: read back from the store.
    drop(session);
    assert!(agent.stop().success(), "the agent stops cleanly");
    let _agent = Agent::start(&files);
    let restarted = ssh_row(&cli);
    for field in [
        "grants_last_7_days",
        "last_access",
        "last_access_requester",
        "last_access_principal",
    ] {
        assert_eq!(restarted[field], after[field], "{field}: {restarted}");
    }
}
