//! The agent end to end with real OpenSSH, driven through the operator CLI
//! `jit-gate` as an operator would: an ssh session outlives its grant while
//! new logins are dropped, `revoke --terminate` cuts a live session, the
//! CLI's JSON, and one command fanned out to several agents.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::time::{Duration, SystemTime};

use jit_gate_tests::{
    agent::{Agent, AgentFiles},
    cli::{Cli, time},
    netns::{CLIENT_V4, GATED_V4, Topology},
    ssh::SshServer,
};
use serde_json::{Value, json};

/// How long the agent may take to record what the kernel already enforces.
const SETTLE: Duration = Duration::from_secs(5);

/// A gated namespace with a running agent, and the CLI on its socket.
/// Fields drop in order: the agent stops before its files and namespaces go.
struct Gate {
    cli: Cli,
    _agent: Agent,
    files: AgentFiles,
    topo: Topology,
}

impl Gate {
    fn start() -> Self {
        let topo = Topology::new();
        let files = AgentFiles::new(&topo.gated);
        files.write_config(&[&topo.gated_if], "");
        Gate {
            cli: Cli::new(&files),
            _agent: Agent::start(&files),
            files,
            topo,
        }
    }

    /// `jit-gate --json request 22` for the client: the one grant created.
    fn request(&self, request_id: &str, duration: &str) -> Value {
        let result = self.cli.json(&[
            "request",
            "22",
            "--source",
            &CLIENT_V4.to_string(),
            "--duration",
            duration,
            "--requester",
            "alice",
            "--justification",
            "maintenance",
            "--request-id",
            request_id,
        ]);
        assert_eq!(result["replayed"], false, "{result}");
        let [grant] = result["grants"].as_array().expect("grants").as_slice() else {
            panic!("one grant expected: {result}")
        };
        grant.clone()
    }
}

fn grant_id(grant: &Value) -> u64 {
    grant["id"].as_u64().expect("grant id")
}

#[test]
fn ssh_session_survives_expiry_while_new_logins_are_dropped() {
    let gate = Gate::start();
    let sshd = SshServer::start(&gate.topo.gated, GATED_V4);
    let client = sshd.client(&gate.topo.client, CLIENT_V4);
    client.login().expect_timed_out("before any grant");

    let before = SystemTime::now();
    let grant = gate.request("ssh-expiry", "4s");
    let mut session = client.session();

    // `jit-gate --json grants`, whole: one row for the one agent, the grant
    // with every field.
    let out = gate.cli.run(&["--json", "grants"]);
    assert!(out.status.success(), "{out:?}");
    let mut rows: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    let latency = rows[0]
        .as_object_mut()
        .and_then(|row| row.remove("latency_ms"));
    assert!(latency.is_some_and(|l| l.is_f64()), "{rows}");
    // The time left changes from one answer to the next: checked, then
    // left out of the comparisons.
    let remaining = rows[0]["result"]["grants"][0]
        .as_object_mut()
        .and_then(|g| g.remove("remaining"))
        .expect("remaining is listed");
    let left = remaining
        .as_str()
        .and_then(|r| humantime::parse_duration(r).ok())
        .unwrap_or_else(|| panic!("remaining {remaining} is not a duration"));
    assert!(
        left <= Duration::from_secs(4),
        "{remaining} left of a 4 s grant"
    );
    let mut grant = grant;
    grant.as_object_mut().map(|g| g.remove("remaining"));
    let listed = &rows[0]["result"]["grants"][0];
    assert!(grant_id(listed) > 0, "{listed}");
    let created = time(&listed["created_at"]);
    let expires = time(&listed["expires_at"]);
    assert!(
        before <= created && created <= SystemTime::now(),
        "{listed}"
    );
    assert_eq!(
        expires.duration_since(created).ok(),
        Some(Duration::from_secs(4))
    );
    assert_eq!(
        rows,
        json!([{
            "agent": gate.files.socket().display().to_string(),
            "ok": true,
            "result": { "grants": [{
                "id": listed["id"],
                "request_id": "ssh-expiry",
                "port": 22,
                "protocol": "tcp",
                "source": format!("{CLIENT_V4}/32"),
                "requester": "alice",
                "justification": "maintenance",
                "ticket": "",
                "principal": "uid:0",
                "state": "active",
                "created_at": listed["created_at"],
                "expires_at": listed["expires_at"],
                "ended_at": null,
                "max_connections": 0,
                "used_up": false,
            }], "more": false },
        }])
    );
    assert_eq!(*listed, grant, "request and grants disagree");

    std::thread::sleep(
        expires
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    );
    session.clock_after(expires, SETTLE);
    client.login().expect_timed_out("after expiry");
    let expired = gate.cli.wait_for_state(grant_id(&grant), "expired", SETTLE);
    assert!(time(&expired["ended_at"]) >= expires, "{expired}");
    assert_eq!(gate.cli.grants(false), Vec::<Value>::new());
    // Still alive after all that.
    session.clock_after(SystemTime::now(), SETTLE);
}

#[test]
fn revoke_terminate_through_the_cli_ends_a_live_ssh_session() {
    let gate = Gate::start();
    let sshd = SshServer::start(&gate.topo.gated, GATED_V4);
    let client = sshd.client(&gate.topo.client, CLIENT_V4);
    let grant = gate.request("ssh-revoke", "60s");
    let mut session = client.session();

    let id = grant_id(&grant).to_string();
    let revoked = gate
        .cli
        .json(&["revoke", &id, "--terminate", "--reason", "incident"]);
    assert_eq!(revoked["connections_terminated"], 1, "{revoked}");
    assert_eq!(revoked["grant"]["state"], "revoked", "{revoked}");
    assert!(revoked["grant"]["ended_at"].is_string(), "{revoked}");

    let ended = session
        .ended(SETTLE)
        .expect("the session survived revoke --terminate");
    // 255: ssh's own error (the connection was reset), not the remote command's status.
    assert_eq!(ended.status.code(), Some(255), "{ended:?}");
    client.login().expect_timed_out("after the revoke");
}

#[test]
fn fan_out_to_two_agents_reports_one_row_each_and_fails_if_one_fails() {
    let gate = Gate::start();
    let socket = gate.files.socket().display().to_string();
    let missing = gate.files.dir.path().join("run/missing.sock");
    let missing = missing.display().to_string();
    let both = || {
        let mut command = gate.cli.command();
        command.args(["--agent", &missing]);
        command
    };

    let out = both().arg("status").output().expect("run jit-gate");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let lines: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines.len(),
        4,
        "a header, one row per agent, a summary:\n{text}"
    );
    assert_eq!(
        lines[0],
        ["AGENT", "RESULT", "LATENCY", "SUMMARY"],
        "{text}"
    );
    assert_eq!(lines[1][..2], [&socket, "ok"], "{text}");
    assert_eq!(lines[1][3..5], ["ms", "xdp+nftables,"], "{text}");
    assert_eq!(lines[2][..2], [&missing, "error"], "{text}");
    assert_eq!(
        lines[3][..6],
        ["summary:", "2", "agents:", "1", "ok,", "1"],
        "{text}"
    );

    let out = both()
        .args(["--json", "grants"])
        .output()
        .expect("run jit-gate");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let mut rows: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    for row in rows.as_array_mut().expect("rows") {
        let latency = row.as_object_mut().and_then(|r| r.remove("latency_ms"));
        assert!(latency.is_some_and(|l| l.is_f64()), "{row}");
    }
    assert_eq!(
        rows[0],
        json!({ "agent": socket, "ok": true, "result": { "grants": [], "more": false } })
    );
    assert_eq!(rows[1]["agent"], missing, "{rows}");
    assert_eq!(rows[1]["ok"], false, "{rows}");
    assert_eq!(rows[1]["error"]["code"], "Unavailable", "{rows}");
    assert_eq!(rows.as_array().map(Vec::len), Some(2), "{rows}");
}
