//! The agent's configuration file end to end: a bad file stops the agent
//! before it touches the kernel, SIGHUP applies a valid file live and keeps
//! the running configuration on a broken one, and a restart on an unchanged
//! file leaves the policy made over the API alone.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{fmt::Write as _, net::SocketAddr};

use jit_gate_agent::proto::{self, update_policy_request::Change};
use jit_gate_tests::{
    agent::{Agent, AgentFiles, client, events_until, policy},
    netns::{CLIENT_V4, GATED_V4, Topology},
    traffic::{TcpEcho, tcp_connect},
};

/// Protected only once a configuration adds it.
const APP: u16 = 8022;

/// `[[policy]]` tables protecting `ports` over TCP with the defaults.
fn policy_toml(ports: &[u16]) -> String {
    ports.iter().fold(String::new(), |mut toml, port| {
        let _ = write!(toml, "[[policy]]\nport = {port}\nprotocol = \"tcp\"\n");
        toml
    })
}

fn rule_ports(policy: &proto::Policy) -> Vec<u32> {
    policy.rules.iter().map(|r| r.port).collect()
}

#[test]
fn a_bad_configuration_stops_the_agent_before_it_attaches_anything() {
    let topo = Topology::new();
    let gated_if = topo.gated_if.as_str();
    let too_long = "[[policy]]\nport = 22\nprotocol = \"tcp\"\nmax_duration = \"25h\"";
    let cases: [(&str, &str, &[&str]); 4] = [
        (gated_if, "colour = \"blue\"", &["unknown field `colour`"]),
        (
            gated_if,
            "mode = \"ebpf\"",
            &["mode = \"ebpf\"", "unknown variant `ebpf`"],
        ),
        (
            gated_if,
            too_long,
            &["field `policy`: rule 22/tcp: max_duration 1day 1h is outside 1m..=24h"],
        ),
        (
            "nosuch0",
            "",
            &["field `interfaces[0]`: no interface named \"nosuch0\""],
        ),
    ];
    for (interface, extra, needles) in cases {
        let files = AgentFiles::new(&topo.gated);
        files.write_config(&[interface], extra);
        let out = files.run_to_end(&[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let what = format!("{extra:?} on {interface}");
        assert!(!out.status.success(), "{what}: {:?}", out.status);
        assert!(
            stderr.contains(&files.config_path().display().to_string()),
            "{what}: {stderr}"
        );
        for needle in needles {
            assert!(stderr.contains(needle), "{what}: no {needle:?} in {stderr}");
        }
        assert!(!files.pins.path.exists(), "{what}: pinned something");
        assert!(files.nft_table().is_none(), "{what}: nftables table");
        assert!(!files.socket().exists(), "{what}: socket");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_valid_file_live_and_keeps_running_on_a_broken_one() {
    let topo = Topology::new();
    let files = AgentFiles::new(&topo.gated);
    let interfaces = [topo.gated_if.as_str()];
    let defaults = [22, 3389, 5985, 5986];
    files.write_config(&interfaces, &policy_toml(&defaults));
    let agent = Agent::start(&files);
    let mut api = client(&files).await;
    let _app = TcpEcho::start(&topo.gated, SocketAddr::new(GATED_V4.into(), APP));
    let app = SocketAddr::new(GATED_V4.into(), APP);
    let before = policy(&mut api).await;
    tcp_connect(&topo.client, CLIENT_V4.into(), app).expect_connected("APP before the reload");

    let with_app = [22, 3389, 5985, 5986, APP];
    files.write_config(&interfaces, &policy_toml(&with_app));
    agent.signal(libc::SIGHUP);
    events_until(&mut api, &[proto::EventKind::ConfigReloaded], |events| {
        !events.is_empty()
    })
    .await;
    let reloaded = policy(&mut api).await;
    assert_eq!(rule_ports(&reloaded), with_app.map(u32::from));
    assert_eq!(reloaded.revision, before.revision + 1);
    tcp_connect(&topo.client, CLIENT_V4.into(), app).expect_timed_out("APP after the reload");

    // A broken file: refused, said why, the running configuration stays.
    files.write_config(
        &interfaces,
        &format!(
            "{}[[policy]]\nport = 9000\nprotocol = \"tcp\"\nmax_duration = \"25h\"\n",
            policy_toml(&with_app)
        ),
    );
    agent.signal(libc::SIGHUP);
    agent.wait_for_log(&[
        "reload refused, running configuration kept",
        "field `policy`",
        "rule 9000/tcp: max_duration 1day 1h is outside 1m..=24h",
    ]);
    assert_eq!(policy(&mut api).await, reloaded);
    api.get_status(proto::GetStatusRequest {})
        .await
        .expect("still serving");
    tcp_connect(&topo.client, CLIENT_V4.into(), app).expect_timed_out("APP still protected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_an_unchanged_file_keeps_policy_changes_made_over_the_api() {
    let topo = Topology::new();
    let files = AgentFiles::new(&topo.gated);
    files.write_config(&[&topo.gated_if], &policy_toml(&[22, 3389]));
    let agent = Agent::start(&files);
    let mut api = client(&files).await;
    let changed = api
        .update_policy(proto::UpdatePolicyRequest {
            change: Some(Change::UpsertRule(proto::PortRule {
                port: APP.into(),
                protocol: proto::Protocol::Tcp as i32,
                ..Default::default()
            })),
            expected_revision: 0,
        })
        .await
        .expect("add a rule over the API")
        .into_inner();
    assert_eq!(rule_ports(&changed), [22, 3389, u32::from(APP)]);
    drop(api);
    assert!(agent.stop().success(), "graceful stop");

    let _agent = Agent::start(&files);
    let mut api = client(&files).await;
    assert_eq!(policy(&mut api).await, changed);
}
