//! The agent's log: every audit record (grant, refusal, revoke, expiry,
//! drift repair) also as a log line with its kind and sequence number;
//! `--log-format json` gives one JSON object per line; no colour codes when
//! the log is not a terminal; TOML errors laid out over several lines as
//! the parser formats them.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::time::{Duration, Instant};

use jit_gate_agent::{config::Mode, proto};
use jit_gate_tests::{
    agent::{Agent, AgentHost, request},
    netns::CLIENT_V4,
};
use serde_json::Value;

const SSH: u16 = 22;
const UNPROTECTED: u16 = 2222;

/// The JSON log lines, each of which must parse.
fn json_lines(agent: &Agent) -> Vec<Value> {
    agent
        .log_text()
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
        })
        .collect()
}

/// Waits for an audit line of `kind` (for `grant_id`, if not 0) and returns it.
fn audit_line(agent: &Agent, kind: &str, grant_id: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found = json_lines(agent).into_iter().find(|line| {
            line["target"] == "jit_gate::audit"
                && line["fields"]["kind"] == kind
                && (grant_id == 0 || line["fields"]["grant_id"] == grant_id)
        });
        if let Some(line) = found {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no {kind} line for grant {grant_id}:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An agent gating SSH that logs JSON lines.
fn json_logging_agent() -> (AgentHost, Agent) {
    let host = AgentHost::new(
        Mode::XdpAndNftables,
        &format!("[[policy]]\nport = {SSH}\nprotocol = \"tcp\"\n"),
    );
    let agent = Agent::start_command(
        &host.files,
        host.files.command_via(&[], &["--log-format", "json"]),
    );
    (host, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_audit_record_is_a_json_log_line() {
    let (host, agent) = json_logging_agent();
    let mut api = jit_gate_tests::agent::Api::connect(&host.files).await;

    let grant = api
        .grant("logs-1", SSH, proto::Protocol::Tcp, CLIENT_V4, 600)
        .await;
    let created = audit_line(&agent, "grant-created", grant.id);
    assert_eq!(created["level"], "INFO");
    assert_eq!(created["fields"]["principal"], "uid:0");
    assert!(
        created["fields"]["sequence"]
            .as_u64()
            .is_some_and(|s| s > 0),
        "{created}"
    );
    assert!(
        created["fields"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{created}"
    );

    let refused = api
        .client
        .request_access(request(
            "logs-2",
            UNPROTECTED,
            proto::Protocol::Tcp,
            CLIENT_V4,
            600,
        ))
        .await;
    assert!(refused.is_err(), "an unprotected port is refused");
    let line = audit_line(&agent, "request-refused", 0);
    assert!(
        line["fields"]["details"]
            .as_str()
            .is_some_and(|d| d.contains("logs-2")),
        "{line}"
    );

    api.revoke(grant.id, false).await;
    audit_line(&agent, "grant-revoked", grant.id);

    // Drift: the table deleted behind the agent's back is repaired, and
    // the repair is a warning.
    host.nft(&["delete", "table", "inet", "jit_gate"]);
    let drift = audit_line(&agent, "drift-repaired", 0);
    assert_eq!(drift["level"], "WARN");

    assert!(
        !agent.log_text().contains('\u{1b}'),
        "colour codes in a file"
    );
}

/// Grants a broker loads in bulk (requests in flight together, committed
/// together) are each an INFO line or counted in one: none goes missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_committed_together_are_counted_in_one_line_each_batch() {
    const GRANTS: usize = 300;
    let (host, agent) = json_logging_agent();
    let api = jit_gate_tests::agent::Api::connect(&host.files).await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..GRANTS {
        let mut client = api.client.clone();
        calls.spawn(async move {
            let source = std::net::Ipv4Addr::from(0x0a09_0000 + i as u32);
            client
                .request_access(request(
                    &format!("bulk-{i}"),
                    SSH,
                    proto::Protocol::Tcp,
                    source,
                    600,
                ))
                .await
                .expect("bulk grant")
                .into_inner()
                .grants
                .len()
        });
    }
    let granted: usize = calls.join_all().await.into_iter().sum();
    assert_eq!(granted, GRANTS);

    // Lines alone, plus the grant-created counts of "committed together"
    // lines, add up to every grant; a count is "grant-created: N".
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (mut alone, mut counted, mut summaries) = (0, 0, 0);
        for line in json_lines(&agent) {
            let fields = &line["fields"];
            if line["target"] != "jit_gate::audit" || line["level"] != "INFO" {
                continue;
            }
            if fields["kind"] == "grant-created" {
                alone += 1;
            } else if let Some(kinds) = fields["kinds"].as_str() {
                summaries += 1;
                counted += kinds
                    .split(", ")
                    .filter_map(|k| k.strip_prefix("grant-created: "))
                    .map(|n| n.parse::<usize>().expect("a count"))
                    .sum::<usize>();
            }
        }
        if alone + counted == GRANTS {
            eprintln!("{alone} grant lines alone, {counted} in {summaries} batch lines");
            break;
        }
        assert!(
            alone + counted < GRANTS && Instant::now() < deadline,
            "{alone} alone + {counted} counted, expected {GRANTS}:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_carry_no_colour_codes_off_a_terminal() {
    let host = AgentHost::new(
        Mode::XdpAndNftables,
        &format!("[[policy]]\nport = {SSH}\nprotocol = \"tcp\"\n"),
    );
    let (agent, mut api) = host.start().await;
    let grant = api
        .grant("logs-3", SSH, proto::Protocol::Tcp, CLIENT_V4, 600)
        .await;
    agent.wait_for_log(&[
        "jit_gate::audit",
        "kind=\"grant-created\"",
        &format!("grant_id={}", grant.id),
    ]);
    let text = agent.log_text();
    assert!(!text.contains('\u{1b}'), "colour codes in a file:\n{text}");
}

#[test]
fn toml_errors_keep_the_parsers_layout() {
    let host = AgentHost::new(Mode::XdpAndNftables, "");
    std::fs::write(
        host.files.config_path(),
        "mode = \"xdp\"\ninterfaces = [\"eth0\"\nflows.capacity = 1\n",
    )
    .expect("write");
    let out = host.files.run_to_end(&["check-config"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TOML parse error at line"), "{stderr}");
    // The offending line and a caret under it, each on its own line.
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.len() >= 4, "{stderr}");
    assert!(
        lines
            .iter()
            .any(|l| l.trim_start().starts_with('|') || l.contains(" | ")),
        "{stderr}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.trim_end().ends_with('^') || l.contains('^')),
        "{stderr}"
    );
}
