//! API messages as JSON values and display names. prost types do not
//! implement Serialize, and the JSON should read well: timestamps in
//! RFC 3339, durations as humantime strings, enums by lowercase name.

use jit_gate_agent::proto::{
    AccessResponse, ApprovalState, Connection, EnforcementMode, Event, EventKind, FleetStatus,
    FlowTable, Grant, GrantState, InterfaceStatus, LayerHealth, ListConnectionsResponse,
    ListGrantsResponse, Policy, PortRule, PortStatus, Protocol, Repair, RevokeGrantResponse,
    Status,
};
use serde_json::{Value, json};

/// The name of a proto enum value without its type prefix, lowercase with
/// dashes: `ENFORCEMENT_MODE_XDP_NATIVE` is "xdp-native".
fn enum_name<E: TryFrom<i32>>(
    raw: i32,
    prefix: &str,
    as_str_name: fn(&E) -> &'static str,
) -> String {
    match E::try_from(raw) {
        Ok(value) => {
            let name = as_str_name(&value);
            name.strip_prefix(prefix)
                .unwrap_or(name)
                .to_ascii_lowercase()
                .replace('_', "-")
        }
        Err(_) => format!("unknown({raw})"),
    }
}

pub(crate) fn protocol(raw: i32) -> String {
    enum_name(raw, "PROTOCOL_", Protocol::as_str_name)
}

pub(crate) fn grant_state(raw: i32) -> String {
    enum_name(raw, "GRANT_STATE_", GrantState::as_str_name)
}

pub(crate) fn enforcement_mode(raw: i32) -> String {
    enum_name(raw, "ENFORCEMENT_MODE_", EnforcementMode::as_str_name)
}

pub(crate) fn approval_state(raw: i32) -> String {
    enum_name(raw, "APPROVAL_STATE_", ApprovalState::as_str_name)
}

pub(crate) fn event_kind(raw: i32) -> String {
    enum_name(raw, "EVENT_KIND_", EventKind::as_str_name)
}

pub(crate) fn timestamp(at: Option<&prost_types::Timestamp>) -> Value {
    at.map_or(Value::Null, |t| Value::String(t.to_string()))
}

pub(crate) fn duration(d: Option<&prost_types::Duration>) -> Value {
    d.map_or(Value::Null, |d| Value::String(duration_text(d)))
}

pub(crate) fn duration_text(d: &prost_types::Duration) -> String {
    match std::time::Duration::try_from(*d) {
        Ok(d) => humantime::format_duration(d).to_string(),
        // Negative: not a valid answer, but show it rather than hide it.
        Err(_) => d.to_string(),
    }
}

/// Zero stands for "none" in id fields of the API.
fn id(value: u64) -> Value {
    if value == 0 {
        Value::Null
    } else {
        json!(value)
    }
}

pub(crate) fn status(s: &Status) -> Value {
    json!({
        "version": s.version,
        "started_at": timestamp(s.started_at.as_ref()),
        "configured_mode": s.configured_mode,
        "nftables_active": s.nftables_active,
        "interfaces": s.interfaces.iter().map(interface).collect::<Vec<_>>(),
        "ports": s.ports.iter().map(port_status).collect::<Vec<_>>(),
        "active_grants": s.active_grants,
        "policy_revision": s.policy_revision,
        "audit_chain_intact": s.audit_chain_intact,
        "audit_problem": s.audit_problem,
        "healthy": s.healthy,
        "xdp": s.xdp.as_ref().map(layer),
        "nftables": s.nftables.as_ref().map(layer),
        "flows": s.flows.as_ref().map(flow_table),
        "pending_approvals": s.pending_approvals,
        "fleet": s.fleet.as_ref().map(fleet),
    })
}

fn fleet(f: &FleetStatus) -> Value {
    json!({
        "host": f.host,
        "connected": f.connected,
        "since": timestamp(f.since.as_ref()),
        "last_error": f.last_error,
        "applied_revision": f.applied_revision,
        "grants_applied": f.grants_applied,
        "grants_refused": f.grants_refused,
    })
}

fn flow_table(f: &FlowTable) -> Value {
    json!({
        "capacity": f.capacity,
        "tracked": f.tracked,
        "per_grant_quota": f.per_grant_quota,
        "refused_quota": f.refused_quota,
        "refused_opens_exhausted": f.refused_opens_exhausted,
        "refused_table_full": f.refused_table_full,
    })
}

fn interface(i: &InterfaceStatus) -> Value {
    json!({
        "name": i.name,
        "kind": i.kind,
        "mode": enforcement_mode(i.mode),
        "reason": i.reason,
        "problem": i.problem,
        "last_repair": i.last_repair.as_ref().map(repair),
    })
}

fn layer(l: &LayerHealth) -> Value {
    json!({
        "active": l.active,
        "problem": l.problem,
        "last_repair": l.last_repair.as_ref().map(repair),
    })
}

fn repair(r: &Repair) -> Value {
    json!({ "at": timestamp(r.at.as_ref()), "what": r.what })
}

fn port_status(p: &PortStatus) -> Value {
    json!({
        "port": p.port,
        "protocol": protocol(p.protocol),
        "active_grants": p.active_grants,
        "connections": p.connections,
        "grants_last_7_days": p.grants_last_7_days,
        "last_access": timestamp(p.last_access.as_ref()),
        "last_access_requester": p.last_access_requester,
        "last_access_principal": p.last_access_principal,
        "passed_packets": p.passed_packets,
        "dropped_packets": p.dropped_packets,
        "refused_connections": p.refused_connections,
    })
}

pub(crate) fn policy(p: &Policy) -> Value {
    json!({
        "revision": p.revision,
        "rules": p.rules.iter().map(rule).collect::<Vec<_>>(),
    })
}

fn rule(r: &PortRule) -> Value {
    json!({
        "port": r.port,
        "protocol": protocol(r.protocol),
        "allowed_sources": r.allowed_source_prefixes,
        "max_duration": duration(r.max_duration.as_ref()),
        "require_justification": r.require_justification,
        "require_ticket": r.require_ticket,
        "approvals": r.approvals,
    })
}

fn grant(g: &Grant) -> Value {
    json!({
        "id": g.id,
        "request_id": g.request_id,
        "port": g.port,
        "protocol": protocol(g.protocol),
        "source": g.source,
        "requester": g.requester,
        "justification": g.justification,
        "ticket": g.ticket,
        "principal": g.principal,
        "state": grant_state(g.state),
        "created_at": timestamp(g.created_at.as_ref()),
        "expires_at": timestamp(g.expires_at.as_ref()),
        "ended_at": timestamp(g.ended_at.as_ref()),
        "remaining": g.remaining.as_ref().map(|d| duration_text(&prost_types::Duration {
            seconds: d.seconds,
            nanos: 0,
        })),
        "max_connections": g.max_connections,
        "used_up": g.used_up,
    })
}

pub(crate) fn grants(list: &[Grant]) -> Vec<Value> {
    list.iter().map(grant).collect()
}

pub(crate) fn access(r: &AccessResponse) -> Value {
    json!({
        "grants": grants(&r.grants),
        "replayed": r.replayed,
        "approval": r.approval.as_ref().map_or(Value::Null, crate::approvals::json),
    })
}

pub(crate) fn revoke(r: &RevokeGrantResponse) -> Value {
    json!({
        "grant": r.grant.as_ref().map_or(Value::Null, grant),
        "connections_terminated": r.connections_terminated,
    })
}

pub(crate) fn grant_list(r: &ListGrantsResponse) -> Value {
    json!({
        "grants": grants(&r.grants),
        "more": !r.next_page_token.is_empty(),
    })
}

fn connection(c: &Connection) -> Value {
    json!({
        "protocol": protocol(c.protocol),
        "remote": c.remote,
        "local": c.local,
        "grant_id": id(c.grant_id),
        "opened_at": timestamp(c.opened_at.as_ref()),
    })
}

pub(crate) fn connection_list(r: &ListConnectionsResponse) -> Value {
    json!({ "connections": r.connections.iter().map(connection).collect::<Vec<_>>() })
}

pub(crate) fn event(e: &Event) -> Value {
    // The details are a JSON object on the wire; embed it as such, and keep
    // the text if an agent ever sends something else.
    let details = match e.details_json.as_str() {
        "" => Value::Null,
        text => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned())),
    };
    json!({
        "sequence": e.sequence,
        "at": timestamp(e.at.as_ref()),
        "kind": event_kind(e.kind),
        "principal": e.principal,
        "grant_id": id(e.grant_id),
        "message": e.message,
        "details": details,
        "payload_sha256": e.payload_sha256,
        "pruned": e.pruned,
        "hash": e.hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    #[test]
    fn enum_names() {
        assert_eq!(protocol(Protocol::Tcp as i32), "tcp");
        assert_eq!(protocol(Protocol::Both as i32), "both");
        assert_eq!(
            grant_state(GrantState::EndedByPolicy as i32),
            "ended-by-policy"
        );
        assert_eq!(
            enforcement_mode(EnforcementMode::XdpNative as i32),
            "xdp-native"
        );
        assert_eq!(
            enforcement_mode(EnforcementMode::NftablesOnly as i32),
            "nftables-only"
        );
        assert_eq!(
            event_kind(EventKind::ConnectionsTerminated as i32),
            "connections-terminated"
        );
        assert_eq!(protocol(42), "unknown(42)");
    }

    #[test]
    fn grant_json() {
        let g = Grant {
            id: 12,
            request_id: "r-1".into(),
            port: 22,
            protocol: Protocol::Tcp as i32,
            source: "198.51.100.0/24".into(),
            requester: "alice".into(),
            justification: "patching".into(),
            ticket: "OPS-1".into(),
            principal: "uid:0".into(),
            created_at: at(1_900_000_000),
            expires_at: Some(prost_types::Timestamp {
                seconds: 1_900_010_800,
                nanos: 500_000_000,
            }),
            state: GrantState::Active as i32,
            ended_at: None,
            remaining: Some(prost_types::Duration {
                seconds: 90,
                nanos: 0,
            }),
            max_connections: 0,
            used_up: false,
        };
        assert_eq!(
            grant(&g),
            json!({
                "id": 12,
                "request_id": "r-1",
                "port": 22,
                "protocol": "tcp",
                "source": "198.51.100.0/24",
                "requester": "alice",
                "justification": "patching",
                "ticket": "OPS-1",
                "principal": "uid:0",
                "state": "active",
                "created_at": "2030-03-17T17:46:40Z",
                "expires_at": "2030-03-17T20:46:40.500Z",
                "ended_at": null,
                "remaining": "1m 30s",
                "max_connections": 0,
                "used_up": false,
            })
        );
    }

    #[test]
    fn status_and_policy_json() {
        let s = Status {
            version: "0.1.0".into(),
            started_at: at(0),
            configured_mode: "xdp+nftables".into(),
            nftables_active: true,
            interfaces: vec![InterfaceStatus {
                name: "eth0".into(),
                mode: EnforcementMode::XdpGeneric as i32,
                reason: "driver has no native XDP".into(),
                kind: "veth".into(),
                problem: "no XDP program runs on it".into(),
                last_repair: None,
            }],
            ports: vec![PortStatus {
                port: 22,
                protocol: Protocol::Tcp as i32,
                active_grants: 2,
                connections: 1,
                grants_last_7_days: 9,
                last_access: None,
                last_access_requester: "alice".into(),
                last_access_principal: "uid:0".into(),
                passed_packets: 120,
                dropped_packets: 40,
                refused_connections: 3,
            }],
            active_grants: 2,
            policy_revision: 4,
            audit_chain_intact: true,
            audit_problem: String::new(),
            xdp: Some(LayerHealth {
                active: true,
                problem: String::new(),
                last_repair: Some(Repair {
                    at: at(60),
                    what: "XDP: pins missing".into(),
                }),
            }),
            nftables: None,
            healthy: false,
            flows: Some(FlowTable {
                capacity: 262_144,
                tracked: 5,
                per_grant_quota: 64,
                refused_quota: 1,
                refused_opens_exhausted: 2,
                refused_table_full: 0,
            }),
            pending_approvals: 3,
            fleet: Some(FleetStatus {
                host: "db-7".into(),
                connected: false,
                since: at(120),
                last_error: "connecting to etcd: refused".into(),
                applied_revision: 42,
                grants_applied: 3,
                grants_refused: 1,
            }),
        };
        let v = status(&s);
        assert_eq!(
            v["fleet"],
            json!({
                "host": "db-7", "connected": false, "since": "1970-01-01T00:02:00Z",
                "last_error": "connecting to etcd: refused", "applied_revision": 42,
                "grants_applied": 3, "grants_refused": 1,
            })
        );

        assert_eq!(v["healthy"], false);
        assert_eq!(v["pending_approvals"], 3);
        assert_eq!(v["interfaces"][0]["problem"], "no XDP program runs on it");
        assert_eq!(v["xdp"]["last_repair"]["what"], "XDP: pins missing");
        assert_eq!(v["xdp"]["last_repair"]["at"], "1970-01-01T00:01:00Z");
        assert_eq!(v["started_at"], "1970-01-01T00:00:00Z");
        assert_eq!(v["interfaces"][0]["mode"], "xdp-generic");
        assert_eq!(
            v["ports"][0],
            json!({
                "port": 22, "protocol": "tcp", "active_grants": 2, "connections": 1,
                "grants_last_7_days": 9, "last_access": null,
                "last_access_requester": "alice", "last_access_principal": "uid:0",
                "passed_packets": 120, "dropped_packets": 40, "refused_connections": 3,
            })
        );
        assert_eq!(
            v["flows"],
            json!({
                "capacity": 262_144, "tracked": 5, "per_grant_quota": 64, "refused_quota": 1,
                "refused_opens_exhausted": 2, "refused_table_full": 0,
            })
        );
        assert_eq!(status(&Status::default())["flows"], Value::Null);
        assert_eq!(v["policy_revision"], 4);

        let p = Policy {
            rules: vec![PortRule {
                port: 500,
                protocol: Protocol::Both as i32,
                allowed_source_prefixes: vec!["10.0.0.0/8".into()],
                max_duration: Some(prost_types::Duration {
                    seconds: 5400,
                    nanos: 0,
                }),
                require_justification: true,
                require_ticket: false,
                approvals: 2,
            }],
            revision: 3,
        };
        assert_eq!(
            policy(&p),
            json!({
                "revision": 3,
                "rules": [{
                    "port": 500, "protocol": "both", "allowed_sources": ["10.0.0.0/8"],
                    "max_duration": "1h 30m", "require_justification": true,
                    "require_ticket": false, "approvals": 2,
                }],
            })
        );
    }

    #[test]
    fn event_json_embeds_details_and_nulls_absent_ids() {
        let mut e = Event {
            sequence: 7,
            at: at(60),
            kind: EventKind::AccessDenied as i32,
            principal: "agent".into(),
            grant_id: 0,
            message: "denied 203.0.113.9 -> 22/tcp".into(),
            details_json: r#"{"count":3}"#.into(),
            hash: "ab".into(),
            payload_sha256: "cd".into(),
            pruned: false,
        };
        let v = event(&e);
        assert_eq!(v["kind"], "access-denied");
        assert_eq!(v["grant_id"], Value::Null);
        assert_eq!(v["details"], json!({ "count": 3 }));
        e.details_json = "not json".into();
        assert_eq!(event(&e)["details"], "not json");
        e.details_json.clear();
        assert_eq!(event(&e)["details"], Value::Null);
    }

    #[test]
    fn connections_and_revoke_json() {
        let c = Connection {
            protocol: Protocol::Udp as i32,
            remote: "[2001:db8::7]:5353".into(),
            local: "[2001:db8::1]:53".into(),
            grant_id: 0,
            opened_at: None,
        };
        assert_eq!(
            connection_list(&ListConnectionsResponse {
                connections: vec![c]
            }),
            json!({ "connections": [{
                "protocol": "udp", "remote": "[2001:db8::7]:5353", "local": "[2001:db8::1]:53",
                "grant_id": null, "opened_at": null,
            }]})
        );
        let r = RevokeGrantResponse {
            grant: None,
            connections_terminated: 2,
        };
        assert_eq!(
            revoke(&r),
            json!({ "grant": null, "connections_terminated": 2 })
        );
    }
}
