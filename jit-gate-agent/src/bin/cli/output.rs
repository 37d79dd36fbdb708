//! Printing results: full tables for one agent, one row per agent for
//! several, or a JSON array of per-agent rows.

use comfy_table::{Table, presets};
use jit_gate_agent::proto::{
    AccessResponse, Event, Grant, ListConnectionsResponse, ListGrantsResponse, Policy,
    RevokeGrantResponse, Status,
};
use serde_json::{Value, json};

use crate::{
    connect::{Agent, CallError, Reply},
    convert,
};

/// How a call's result is shown.
pub(crate) trait Render {
    fn json(&self) -> Value;
    /// One line, for the row of its agent when a command ran on several.
    fn summary(&self) -> String;
    /// Everything, for a command that ran on one agent.
    fn detail(&self) -> String {
        format!("{}\n", self.summary())
    }
}

/// Prints the replies in the requested form, with a summary line when
/// there are several (on stderr with `--json`, so stdout stays one JSON
/// document); true if every agent succeeded.
pub(crate) fn report<T: Render>(replies: &[Reply<T>], json: bool) -> bool {
    if json {
        let rows: Vec<Value> = replies
            .iter()
            .map(|reply| {
                let mut row = json_row(&reply.agent, &reply.result);
                row["latency_ms"] = json!(milliseconds(reply.latency));
                row
            })
            .collect();
        println!("{}", pretty(&Value::Array(rows)));
    } else if let [only] = replies {
        match &only.result {
            Ok(result) => print!("{}", result.detail()),
            Err(error) => eprintln!("{}", error_line(&only.agent, error)),
        }
    } else {
        let mut table = table(&["AGENT", "RESULT", "LATENCY", "SUMMARY"]);
        for reply in replies {
            let (result, summary) = match &reply.result {
                Ok(result) => ("ok", result.summary()),
                Err(_) if reply.timed_out() => ("timed out", String::new()),
                Err(error) => ("error", error.to_string()),
            };
            table.add_row(vec![
                reply.agent.to_string(),
                result.into(),
                format!("{:.1} ms", milliseconds(reply.latency)),
                summary,
            ]);
        }
        println!("{table}");
    }
    if replies.len() > 1 {
        let line = fleet_summary(replies);
        if json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
    replies.iter().all(|r| r.result.is_ok())
}

fn milliseconds(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// "summary: 50 agents: 47 ok, 2 failed, 1 timed out; latency p50 3.1 ms,
/// p99 40.2 ms" — latency over the agents that answered (ok or failed).
pub(crate) fn fleet_summary<T>(replies: &[Reply<T>]) -> String {
    let ok = replies.iter().filter(|r| r.result.is_ok()).count();
    let timed_out = replies.iter().filter(|r| r.timed_out()).count();
    let failed = replies.len() - ok - timed_out;
    let mut answered: Vec<_> = replies
        .iter()
        .filter(|r| !r.timed_out())
        .map(|r| r.latency)
        .collect();
    answered.sort();
    // Nearest rank.
    let percentile = |p: usize| {
        answered
            .get((answered.len() * p).div_ceil(100).saturating_sub(1))
            .map_or_else(|| "-".to_owned(), |d| format!("{:.1} ms", milliseconds(*d)))
    };
    format!(
        "summary: {} agents: {ok} ok, {failed} failed, {timed_out} timed out; latency p50 {}, p99 {}",
        replies.len(),
        percentile(50),
        percentile(99)
    )
}

/// One result on one line, for streams: a compact JSON row (the shape of a
/// fan-out row), or the summary, after the agent's name if `tagged`.
/// Failures go to stderr in text mode.
pub(crate) fn print_line<T: Render>(
    agent: &Agent,
    result: &Result<T, CallError>,
    json: bool,
    tagged: bool,
) {
    match result {
        _ if json => println!("{}", json_row(agent, result)),
        Ok(result) if tagged => println!("{agent}  {}", result.summary()),
        Ok(result) => println!("{}", result.summary()),
        Err(error) => eprintln!("{}", error_line(agent, error)),
    }
}

fn json_row<T: Render>(agent: &Agent, result: &Result<T, CallError>) -> Value {
    let agent = agent.to_string();
    match result {
        Ok(result) => json!({ "agent": agent, "ok": true, "result": result.json() }),
        Err(error) => json!({ "agent": agent, "ok": false, "error": error_json(error) }),
    }
}

fn error_json(error: &CallError) -> Value {
    json!({ "code": error.code_name(), "message": error.message })
}

fn error_line(agent: &impl std::fmt::Display, error: &CallError) -> String {
    format!("error: {agent}: {error}")
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).expect("JSON values always serialize")
}

/// Text from an agent as it may reach a terminal: control characters
/// (escape sequences, newlines) escaped, so a record cannot move the cursor,
/// recolour or clear the screen, or fake a line.
pub(crate) fn printable(text: &str) -> String {
    if text.chars().any(char::is_control) {
        text.chars()
            .flat_map(|c| {
                let escaped: Vec<char> = if c.is_control() {
                    c.escape_debug().collect()
                } else {
                    vec![c]
                };
                escaped
            })
            .collect()
    } else {
        text.to_owned()
    }
}

/// A borderless table with a header: easy to read and to grep.
pub(crate) fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_header(header.to_vec());
    table
}

/// A time for people: RFC 3339 to the second, "-" if unset.
pub(crate) fn time(at: Option<&prost_types::Timestamp>) -> String {
    at.map_or_else(
        || "-".into(),
        |t| {
            prost_types::Timestamp {
                seconds: t.seconds,
                nanos: 0,
            }
            .to_string()
        },
    )
}

pub(crate) fn port(port: u32, protocol: i32) -> String {
    format!("{port}/{}", convert::protocol(protocol))
}

pub(crate) fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The grants table shared by request, revoke and grants.
pub(crate) fn grants_table(grants: &[Grant]) -> Table {
    let mut table = table(&[
        "ID",
        "PORT",
        "SOURCE",
        "REQUESTER",
        "STATE",
        "MAX CONN",
        "EXPIRES",
        "ENDED",
    ]);
    for g in grants {
        table.add_row(vec![
            g.id.to_string(),
            port(g.port, g.protocol),
            printable(&g.source),
            printable(&g.requester),
            convert::grant_state(g.state),
            connection_limit(g),
            time(g.expires_at.as_ref()),
            time(g.ended_at.as_ref()),
        ]);
    }
    table
}

/// Who the latest grant on a port was for, and who asked ("-": none yet).
fn last_access_by(p: &jit_gate_agent::proto::PortStatus) -> String {
    if p.last_access_requester.is_empty() {
        return "-".into();
    }
    format!(
        "{} (by {})",
        printable(&p.last_access_requester),
        printable(&p.last_access_principal)
    )
}

/// A grant's limit on connections: "-" without one, "N (used up)" once
/// the kernel admits no more.
fn connection_limit(g: &Grant) -> String {
    match (g.max_connections, g.used_up) {
        (0, _) => "-".into(),
        (n, false) => n.to_string(),
        (n, true) => format!("{n} (used up)"),
    }
}

/// A layer's state in one line: inactive, or its health.
/// The fleet link in `status` (fleet mode only).
fn fleet_line(f: &jit_gate_agent::proto::FleetStatus) -> String {
    let link = if f.connected {
        "connected".to_owned()
    } else {
        format!("ETCD UNREACHABLE ({})", printable(&f.last_error))
    };
    format!(
        "fleet:            {link} as {}, since {}, revision {}, {} applied, {} refused\n",
        printable(&f.host),
        time(f.since.as_ref()),
        f.applied_revision,
        f.grants_applied,
        f.grants_refused
    )
}

fn layer(layer: Option<&jit_gate_agent::proto::LayerHealth>) -> String {
    match layer {
        Some(l) if l.active => health(&l.problem, l.last_repair.as_ref()),
        _ => "not active".into(),
    }
}

/// The flow table's line of the status: usage against capacity, the
/// per-grant quota, and new connections refused by why.
fn flow_table(flows: Option<&jit_gate_agent::proto::FlowTable>) -> String {
    match flows {
        Some(f) => format!(
            "flow table:       {} of {} tracked, {} per grant; refused: {} over quota, \
             {} opens exhausted, {} table full\n",
            f.tracked,
            f.capacity,
            f.per_grant_quota,
            f.refused_quota,
            f.refused_opens_exhausted,
            f.refused_table_full
        ),
        None => "flow table:       none (XDP not active)\n".into(),
    }
}

/// "ok", or what is wrong; with the last repair, if any.
fn health(problem: &str, last_repair: Option<&jit_gate_agent::proto::Repair>) -> String {
    let now = if problem.is_empty() {
        "ok".to_owned()
    } else {
        format!("DEGRADED: {problem}")
    };
    match last_repair {
        Some(r) => format!("{now} (repaired {}: {})", time(r.at.as_ref()), r.what),
        None => now,
    }
}

impl Render for Status {
    fn json(&self) -> Value {
        convert::status(self)
    }

    fn summary(&self) -> String {
        let modes: Vec<String> = self
            .interfaces
            .iter()
            .map(|i| format!("{} {}", i.name, convert::enforcement_mode(i.mode)))
            .collect();
        format!(
            "{}, {}, {}, {}, policy revision {}",
            self.configured_mode,
            if modes.is_empty() {
                "no interfaces".into()
            } else {
                modes.join(", ")
            },
            plural(self.ports.len(), "port", "ports"),
            plural(self.active_grants as usize, "active grant", "active grants"),
            self.policy_revision
        )
    }

    fn detail(&self) -> String {
        let audit = if self.audit_chain_intact {
            "intact at start".to_owned()
        } else {
            format!("BROKEN: {}", printable(&self.audit_problem))
        };
        let header = format!(
            "version:          {}\n\
             started:          {}\n\
             configured mode:  {}\n\
             health:           {}\n\
             XDP:              {}\n\
             nftables:         {}\n\
             active grants:    {}\n\
             pending requests: {}\n\
             policy revision:  {}\n\
             audit chain:      {audit}\n{}",
            self.version,
            time(self.started_at.as_ref()),
            self.configured_mode,
            if self.healthy { "ok" } else { "DEGRADED" },
            layer(self.xdp.as_ref()),
            layer(self.nftables.as_ref()),
            self.active_grants,
            self.pending_approvals,
            self.policy_revision,
            self.fleet.as_ref().map(fleet_line).unwrap_or_default()
        );
        let mut interfaces = table(&["INTERFACE", "KIND", "ENFORCEMENT", "REASON", "HEALTH"]);
        for i in &self.interfaces {
            interfaces.add_row(vec![
                printable(&i.name),
                printable(&i.kind),
                convert::enforcement_mode(i.mode),
                printable(&i.reason),
                health(&i.problem, i.last_repair.as_ref()),
            ]);
        }
        let mut ports = table(&[
            "PORT",
            "ACTIVE GRANTS",
            "CONNECTIONS",
            "GRANTS (7 DAYS)",
            "LAST ACCESS",
            "BY",
            "PASSED",
            "DROPPED",
            "REFUSED",
        ]);
        for p in &self.ports {
            ports.add_row(vec![
                port(p.port, p.protocol),
                p.active_grants.to_string(),
                p.connections.to_string(),
                p.grants_last_7_days.to_string(),
                time(p.last_access.as_ref()),
                last_access_by(p),
                p.passed_packets.to_string(),
                p.dropped_packets.to_string(),
                p.refused_connections.to_string(),
            ]);
        }
        format!(
            "{header}{}\n{interfaces}\n\n{ports}\n",
            flow_table(self.flows.as_ref())
        )
    }
}

impl Render for Policy {
    fn json(&self) -> Value {
        convert::policy(self)
    }

    fn summary(&self) -> String {
        let ports: Vec<String> = self
            .rules
            .iter()
            .map(|r| port(r.port, r.protocol))
            .collect();
        format!(
            "revision {}, {}: {}",
            self.revision,
            plural(self.rules.len(), "rule", "rules"),
            ports.join(" ")
        )
    }

    fn detail(&self) -> String {
        let mut rules = table(&[
            "PORT",
            "ALLOWED SOURCES",
            "MAX DURATION",
            "JUSTIFICATION",
            "TICKET",
            "APPROVALS",
        ]);
        for r in &self.rules {
            rules.add_row(vec![
                port(r.port, r.protocol),
                if r.allowed_source_prefixes.is_empty() {
                    "any".into()
                } else {
                    r.allowed_source_prefixes.join(" ")
                },
                r.max_duration
                    .as_ref()
                    .map_or_else(|| "3h (default)".into(), convert::duration_text),
                if r.require_justification {
                    "required"
                } else {
                    "-"
                }
                .into(),
                if r.require_ticket { "required" } else { "-" }.into(),
                match r.approvals {
                    0 => "-".into(),
                    n => n.to_string(),
                },
            ]);
        }
        format!("policy revision {}\n\n{rules}\n", self.revision)
    }
}

impl Render for AccessResponse {
    fn json(&self) -> Value {
        convert::access(self)
    }

    fn summary(&self) -> String {
        if let Some(held) = self.approval.as_ref().filter(|_| self.grants.is_empty()) {
            return format!(
                "{}{}",
                held.summary(),
                if self.replayed { " (replayed)" } else { "" }
            );
        }
        let grants: Vec<String> = self
            .grants
            .iter()
            .map(|g| format!("#{} {}", g.id, port(g.port, g.protocol)))
            .collect();
        let expires = self
            .grants
            .iter()
            .filter_map(|g| g.expires_at)
            .max_by_key(|t| (t.seconds, t.nanos));
        format!(
            "{}{}: {}, until {}",
            plural(self.grants.len(), "grant", "grants"),
            if self.replayed { " (replayed)" } else { "" },
            grants.join(", "),
            time(expires.as_ref())
        )
    }

    fn detail(&self) -> String {
        if let Some(held) = self.approval.as_ref().filter(|_| self.grants.is_empty()) {
            return held.detail();
        }
        let request = self.grants.first().map_or("", |g| g.request_id.as_str());
        let note = if self.replayed {
            " (seen before: these are the grants it created)"
        } else {
            ""
        };
        format!(
            "request {request}{note}\n\n{}\n",
            grants_table(&self.grants)
        )
    }
}

impl Render for RevokeGrantResponse {
    fn json(&self) -> Value {
        convert::revoke(self)
    }

    fn summary(&self) -> String {
        let state = self.grant.as_ref().map_or_else(
            || "grant".into(),
            |g| format!("grant #{} {}", g.id, convert::grant_state(g.state)),
        );
        format!(
            "{state}, {} terminated",
            plural(
                self.connections_terminated as usize,
                "connection",
                "connections"
            )
        )
    }

    fn detail(&self) -> String {
        let grants = grants_table(self.grant.as_slice());
        format!("{grants}\n\n{}\n", self.summary())
    }
}

impl Render for ListGrantsResponse {
    fn json(&self) -> Value {
        convert::grant_list(self)
    }

    fn summary(&self) -> String {
        let active = self
            .grants
            .iter()
            .filter(|g| g.state == jit_gate_agent::proto::GrantState::Active as i32)
            .count();
        format!(
            "{} ({active} active)",
            plural(self.grants.len(), "grant", "grants")
        )
    }

    fn detail(&self) -> String {
        let more = if self.next_page_token.is_empty() {
            String::new()
        } else {
            format!("(more grants follow; shown: {})\n", self.grants.len())
        };
        format!("{}\n{more}", grants_table(&self.grants))
    }
}

impl Render for Event {
    fn json(&self) -> Value {
        convert::event(self)
    }

    fn summary(&self) -> String {
        let grant = match self.grant_id {
            0 => String::new(),
            id => format!(" grant #{id}"),
        };
        let message = if self.pruned {
            "(payload pruned by retention)".to_owned()
        } else {
            printable(&self.message)
        };
        format!(
            "{}  #{}  {}  {}{grant}  {message}",
            time(self.at.as_ref()),
            self.sequence,
            convert::event_kind(self.kind),
            printable(&self.principal),
        )
    }
}

impl Render for ListConnectionsResponse {
    fn json(&self) -> Value {
        convert::connection_list(self)
    }

    fn summary(&self) -> String {
        plural(self.connections.len(), "connection", "connections")
    }

    fn detail(&self) -> String {
        let mut table = table(&["PROTO", "REMOTE", "LOCAL", "GRANT", "OPENED"]);
        for c in &self.connections {
            table.add_row(vec![
                convert::protocol(c.protocol),
                c.remote.clone(),
                c.local.clone(),
                match c.grant_id {
                    0 => "(pre-existing)".into(),
                    id => id.to_string(),
                },
                time(c.opened_at.as_ref()),
            ]);
        }
        format!("{table}\n")
    }
}

#[cfg(test)]
mod tests {
    use jit_gate_agent::proto::{GrantState, Protocol};
    use tonic::Code;

    use super::*;
    use crate::connect::Agent;

    fn grant(id: u64, port: u32) -> Grant {
        Grant {
            id,
            request_id: "req-1".into(),
            port,
            protocol: Protocol::Tcp as i32,
            source: "198.51.100.7".into(),
            requester: "alice".into(),
            state: GrantState::Active as i32,
            expires_at: Some(prost_types::Timestamp {
                seconds: 1_900_000_000,
                nanos: 250,
            }),
            ..Default::default()
        }
    }

    fn reply<T>(agent: &str, result: Result<T, CallError>, ms: u64) -> Reply<T> {
        Reply {
            agent: agent.parse().unwrap(),
            result,
            latency: std::time::Duration::from_millis(ms),
        }
    }

    fn failure(code: Code) -> CallError {
        CallError {
            code,
            message: "uid 1000 has no role".into(),
        }
    }

    #[test]
    fn json_rows_for_success_and_failure() {
        let replies = [
            reply("/run/a.sock", Ok(ListConnectionsResponse::default()), 1),
            reply(
                "unix:///run/b.sock",
                Err(failure(Code::PermissionDenied)),
                2,
            ),
        ];
        let rows: Vec<Value> = replies
            .iter()
            .map(|r| json_row(&r.agent, &r.result))
            .collect();
        assert_eq!(
            Value::Array(rows),
            json!([
                { "agent": "/run/a.sock", "ok": true, "result": { "connections": [] } },
                { "agent": "/run/b.sock", "ok": false,
                  "error": { "code": "PermissionDenied", "message": "uid 1000 has no role" } },
            ])
        );
    }

    #[test]
    fn fleet_summary_counts_and_percentiles() {
        let mut replies: Vec<Reply<ListConnectionsResponse>> = (1..=97)
            .map(|ms| reply("https://a:7443", Ok(ListConnectionsResponse::default()), ms))
            .collect();
        replies.push(reply(
            "https://b:7443",
            Err(failure(Code::Unavailable)),
            500,
        ));
        replies.push(reply(
            "https://c:7443",
            Err(failure(Code::DeadlineExceeded)),
            3000,
        ));
        replies.push(reply(
            "/run/d.sock",
            Err(failure(Code::DeadlineExceeded)),
            3000,
        ));
        // 98 answered (97 ok, 1 failed): p50 is the 49th, p99 the 98th.
        assert_eq!(
            fleet_summary(&replies),
            "summary: 100 agents: 97 ok, 1 failed, 2 timed out; latency p50 49.0 ms, p99 500.0 ms"
        );
        let none: Vec<Reply<ListConnectionsResponse>> = vec![reply(
            "/run/d.sock",
            Err(failure(Code::DeadlineExceeded)),
            3000,
        )];
        assert!(fleet_summary(&none).ends_with("latency p50 -, p99 -"));
    }

    #[test]
    fn text_from_agents_cannot_reach_the_terminal_raw() {
        assert_eq!(printable("plain"), "plain");
        assert_eq!(printable("a\u{1b}[2Jb\nc"), "a\\u{1b}[2Jb\\nc");
        let event = Event {
            message: "x\u{1b}]0;owned\u{7}".into(),
            principal: "uid:0".into(),
            ..Default::default()
        };
        assert!(
            !event.summary().chars().any(char::is_control),
            "{}",
            event.summary()
        );
    }

    #[test]
    fn error_line_names_agent_and_code() {
        let error = CallError {
            code: Code::InvalidArgument,
            message: "port 0 cannot be protected".into(),
        };
        assert_eq!(
            error_line(&"/run/a.sock".parse::<Agent>().unwrap(), &error),
            "error: /run/a.sock: InvalidArgument: port 0 cannot be protected"
        );
    }

    #[test]
    fn access_summary_and_detail() {
        let response = AccessResponse {
            grants: vec![grant(12, 22), grant(13, 3389)],
            replayed: true,
            approval: None,
        };
        assert_eq!(
            response.summary(),
            "2 grants (replayed): #12 22/tcp, #13 3389/tcp, until 2030-03-17T17:46:40Z"
        );
        let detail = response.detail();
        assert!(detail.starts_with("request req-1 (seen before"), "{detail}");
        assert!(detail.contains("3389/tcp"), "{detail}");
        assert!(detail.contains("2030-03-17T17:46:40Z"), "{detail}");
    }

    #[test]
    fn one_line_summaries() {
        let grants = ListGrantsResponse {
            next_page_token: String::new(),
            grants: vec![
                grant(1, 22),
                Grant {
                    state: GrantState::Expired as i32,
                    ..grant(2, 22)
                },
            ],
        };
        assert_eq!(grants.summary(), "2 grants (1 active)");
        let revoke = RevokeGrantResponse {
            grant: Some(Grant {
                state: GrantState::Revoked as i32,
                ..grant(7, 22)
            }),
            connections_terminated: 1,
        };
        assert_eq!(
            revoke.summary(),
            "grant #7 revoked, 1 connection terminated"
        );
        let status = Status {
            configured_mode: "nftables".into(),
            active_grants: 1,
            policy_revision: 3,
            ..Default::default()
        };
        assert_eq!(
            status.summary(),
            "nftables, no interfaces, 0 ports, 1 active grant, policy revision 3"
        );
    }
}
