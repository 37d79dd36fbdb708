//! Single-use grants end to end, driven through the operator CLI: with
//! `--max-connections 1` the first SSH login of a grant succeeds and lasts,
//! the second is dropped long before the grant expires, the agent then takes
//! the nftables element away and audits it; with the agent killed, the
//! kernel alone keeps a fresh single-use grant to one TCP connection. Where
//! XDP does not gate (mode "nftables") such a request is refused.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use jit_gate_tests::{
    agent::{Agent, AgentFiles},
    cli::Cli,
    netns::{CLIENT_V4, GATED_V4, Topology},
    ssh::SshServer,
    traffic::{TcpEcho, round_trip, tcp_connect},
};
use serde_json::Value;

/// How long the agent may take to note what the kernel already enforces.
const SETTLE: Duration = Duration::from_secs(5);

/// The grants of these tests last far longer than the test: every refusal
/// seen is the connection limit's, not the expiry's.
const LONG: &str = "10m";

/// A gated namespace with a running agent in `mode`, and the CLI on its
/// socket. Fields drop in order: the agent stops before its files and
/// namespaces go.
struct Gate {
    cli: Cli,
    agent: Option<Agent>,
    files: AgentFiles,
    topo: Topology,
}

impl Gate {
    fn start(mode: &str) -> Self {
        let topo = Topology::new();
        let files = AgentFiles::new(&topo.gated);
        files.write_config(&[&topo.gated_if], &format!("mode = \"{mode}\""));
        Gate {
            cli: Cli::new(&files),
            agent: Some(Agent::start(&files)),
            files,
            topo,
        }
    }

    /// `jit-gate request 22 --max-connections <max>` for the client.
    fn request(&self, request_id: &str, max: &str) -> std::process::Output {
        self.cli.run(&[
            "--json",
            "request",
            "22",
            "--source",
            &CLIENT_V4.to_string(),
            "--duration",
            LONG,
            "--requester",
            "alice",
            "--request-id",
            request_id,
            "--max-connections",
            max,
        ])
    }

    /// The one grant a successful single-use request created.
    fn single_use(&self, request_id: &str) -> Value {
        let out = self.request(request_id, "1");
        assert!(out.status.success(), "{out:?}");
        let rows: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
        let grant = rows[0]["result"]["grants"][0].clone();
        assert_eq!(grant["max_connections"], 1, "{rows}");
        assert_eq!(grant["used_up"], false, "{rows}");
        grant
    }

    /// Waits until `jit-gate grants` shows grant `id` used up.
    fn wait_used_up(&self, id: &Value) -> Value {
        let deadline = Instant::now() + SETTLE;
        loop {
            let grants = self.cli.grants(false);
            let grant = grants.iter().find(|g| g["id"] == *id).expect("listed");
            if grant["used_up"] == true {
                return grant.clone();
            }
            assert!(Instant::now() < deadline, "never used up: {grant}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn a_single_use_grant_admits_one_ssh_login_which_lasts() {
    let gate = Gate::start("xdp+nftables");
    let sshd = SshServer::start(&gate.topo.gated, GATED_V4);
    let client = sshd.client(&gate.topo.client, CLIENT_V4);

    let grant = gate.single_use("single-ssh");
    assert_eq!(gate.files.nft_granted().len(), 1, "nftables holds it");
    let mut session = client.session();
    client
        .login()
        .expect_timed_out("second login under a single-use grant");

    // The agent learns it from the kernel's count: the grant is shown used
    // up, still active, and nftables no longer admits its source.
    let used = gate.wait_used_up(&grant["id"]);
    assert_eq!(used["state"], "active", "{used}");
    let deadline = Instant::now() + SETTLE;
    while !gate.files.nft_granted().is_empty() {
        assert!(Instant::now() < deadline, "the nftables element stayed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = gate.cli.text(&["grants"]);
    assert!(
        text.contains("MAX CONN") && text.contains("1 (used up)"),
        "{text}"
    );

    // Audited: the grant with its limit, and its being used up.
    let export = |kind: &str| {
        gate.cli
            .text(&["audit", "export", "--format", "json", "--kind", kind])
    };
    let used_up = export("grant-used-up");
    assert!(
        used_up.contains(&format!("grant {} for", grant["id"]))
            && used_up.contains("opened its 1 connections"),
        "{used_up}"
    );
    let created = export("grant-created");
    assert!(created.contains("at most 1 connections"), "{created}");

    // The first login's session carries on; new ones still do not.
    session.clock_after(std::time::SystemTime::now(), SETTLE);
    client.login().expect_timed_out("a third login");
}

#[test]
fn with_the_agent_killed_the_kernel_alone_keeps_a_grant_to_one_connection() {
    let mut gate = Gate::start("xdp+nftables");
    let ssh = SocketAddr::new(GATED_V4.into(), 22);
    let _server = TcpEcho::start(&gate.topo.gated, ssh);
    gate.single_use("single-tcp");
    gate.agent.take().expect("running").kill();

    let mut first =
        tcp_connect(&gate.topo.client, CLIENT_V4.into(), ssh).expect_connected("first connection");
    round_trip(&mut first, b"one").expect("echo on the first connection");
    tcp_connect(&gate.topo.client, CLIENT_V4.into(), ssh)
        .expect_timed_out("second connection, agent dead");
    // nftables still holds the element (the agent never saw it used up):
    // the XDP program alone refused the second connection.
    assert_eq!(gate.files.nft_granted().len(), 1);
    round_trip(&mut first, b"still").expect("the first connection continues");
}

#[test]
fn limits_are_bounded_and_refused_where_nftables_alone_gates() {
    let gate = Gate::start("nftables");
    let out = gate.request("nft-only", "1");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let rows: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(rows[0]["ok"], false, "{rows}");
    let error = &rows[0]["error"];
    assert_eq!(error["code"], "FailedPrecondition", "{rows}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_connections needs the XDP gate")),
        "{rows}"
    );
    assert!(gate.cli.grants(true).is_empty(), "nothing granted");

    // The CLI refuses what the agent would: 0 (say "no limit" by leaving
    // the option out) and more than the bound.
    for (max, says) in [
        ("0", "leave --max-connections out"),
        ("1001", "above the limit of 1000"),
    ] {
        let out = gate.request("bad-limit", max);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{max}: {stderr}");
    }
}
