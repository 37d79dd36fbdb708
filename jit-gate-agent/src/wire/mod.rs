//! Conversions between the wire types (`proto`) and the agent's own, in
//! one place for the server and the CLI (`From`/`TryFrom` where the
//! conversion is total or fails with a message). Approval requests are in
//! `approvals`.

mod approvals;

use std::time::{Duration, SystemTime};

use tonic::{Code, Status};

use crate::{
    audit::{AuditRecord, Kind},
    checkpoint::Checkpoint,
    engine::{
        AccessOutcome, ConnectionInfo, FlowTableReport, InterfaceMode, InterfaceStatus,
        LayerHealth, PortReport, Repair, StatusReport,
    },
    grants::{Grant, GrantState},
    net::Protocol,
    policy::{DEFAULT_MAX_DURATION, Policy, PortRule, RuleProtocol},
    proto,
    refusal::{Refusal, RefusalKind},
    request::{AccessRequest, Lifetime, PortAccess, RequestedProtocol},
};

pub use approvals::{access_request_to_wire, approval_request, request_filter};

pub fn status(refusal: Refusal) -> Status {
    let code = match refusal.kind {
        RefusalKind::InvalidArgument => Code::InvalidArgument,
        RefusalKind::NotFound => Code::NotFound,
        RefusalKind::AlreadyExists => Code::AlreadyExists,
        RefusalKind::PermissionDenied => Code::PermissionDenied,
        RefusalKind::Unauthenticated => Code::Unauthenticated,
        RefusalKind::FailedPrecondition => Code::FailedPrecondition,
        RefusalKind::ResourceExhausted => Code::ResourceExhausted,
        RefusalKind::Unavailable => Code::Unavailable,
        RefusalKind::Internal => Code::Internal,
    };
    Status::new(code, refusal.message)
}

fn invalid(message: String) -> Status {
    Status::invalid_argument(message)
}

pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    t.into()
}

/// A duration on the wire; saturates at protobuf's maximum (about 10,000 years).
pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or(prost_types::Duration {
        seconds: 315_576_000_000,
        nanos: 0,
    })
}

impl From<Protocol> for proto::Protocol {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::Tcp => proto::Protocol::Tcp,
            Protocol::Udp => proto::Protocol::Udp,
        }
    }
}

impl From<RuleProtocol> for proto::Protocol {
    fn from(p: RuleProtocol) -> Self {
        match p {
            RuleProtocol::Tcp => proto::Protocol::Tcp,
            RuleProtocol::Udp => proto::Protocol::Udp,
            RuleProtocol::Both => proto::Protocol::Both,
        }
    }
}

fn rule_protocol_from_wire(value: i32, field: &str) -> Result<RuleProtocol, Status> {
    match proto::Protocol::try_from(value) {
        Ok(proto::Protocol::Tcp) => Ok(RuleProtocol::Tcp),
        Ok(proto::Protocol::Udp) => Ok(RuleProtocol::Udp),
        Ok(proto::Protocol::Both) => Ok(RuleProtocol::Both),
        _ => Err(invalid(format!(
            "{field}: protocol must be TCP, UDP or BOTH"
        ))),
    }
}

/// A request's protocol: unspecified means "every covered one"; BOTH and
/// unknown values are left for validation to refuse (and audit).
fn access_protocol_from_wire(value: i32) -> RequestedProtocol {
    match proto::Protocol::try_from(value) {
        Ok(proto::Protocol::Unspecified) => RequestedProtocol::Covered,
        Ok(proto::Protocol::Both) => RequestedProtocol::Both,
        Ok(proto::Protocol::Tcp) => RequestedProtocol::Only(Protocol::Tcp),
        Ok(proto::Protocol::Udp) => RequestedProtocol::Only(Protocol::Udp),
        Err(_) => RequestedProtocol::Unknown(value),
    }
}

pub fn port(value: u32, field: &str) -> Result<u16, Status> {
    crate::validate::port(value).map_err(|e| invalid(format!("{field}: {e}")))
}

pub fn rule_key(key: &proto::RuleKey) -> Result<(u16, RuleProtocol), Status> {
    Ok((
        port(key.port, "remove_rule")?,
        rule_protocol_from_wire(key.protocol, "remove_rule")?,
    ))
}

pub fn rule_from_wire(rule: &proto::PortRule, field: &str) -> Result<PortRule, Status> {
    let allowed_sources = rule
        .allowed_source_prefixes
        .iter()
        .map(|p| {
            p.parse().map_err(|_| {
                invalid(format!(
                    "{field}: \"{}\" is not an IPv4/IPv6 prefix",
                    crate::validate::excerpt(p)
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    let max_duration = match &rule.max_duration {
        None => DEFAULT_MAX_DURATION,
        Some(d) => Duration::try_from(*d)
            .map_err(|_| invalid(format!("{field}: max_duration is negative")))?,
    };
    Ok(PortRule {
        port: port(rule.port, field)?,
        protocol: rule_protocol_from_wire(rule.protocol, field)?,
        allowed_sources,
        max_duration,
        require_justification: rule.require_justification,
        require_ticket: rule.require_ticket,
        // Anything past a u8 is refused as over the maximum by validation.
        approvals: u8::try_from(rule.approvals).unwrap_or(u8::MAX),
    })
}

pub fn rules_from_wire(policy: &proto::Policy) -> Result<Vec<PortRule>, Status> {
    policy
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| rule_from_wire(r, &format!("rules[{i}]")))
        .collect()
}

impl From<&PortRule> for proto::PortRule {
    fn from(r: &PortRule) -> Self {
        proto::PortRule {
            port: u32::from(r.port),
            protocol: proto::Protocol::from(r.protocol) as i32,
            allowed_source_prefixes: r.allowed_sources.iter().map(ToString::to_string).collect(),
            max_duration: Some(duration(r.max_duration)),
            require_justification: r.require_justification,
            require_ticket: r.require_ticket,
            approvals: u32::from(r.approvals),
        }
    }
}

pub fn policy_to_wire(policy: &Policy) -> proto::Policy {
    proto::Policy {
        rules: policy.rules.iter().map(proto::PortRule::from).collect(),
        revision: policy.revision,
    }
}

pub fn access_request(request: proto::AccessRequest) -> AccessRequest {
    let lifetime = match request.lifetime {
        None => Lifetime::Missing,
        Some(proto::access_request::Lifetime::Duration(d)) => Lifetime::For {
            seconds: d.seconds,
            nanos: d.nanos,
        },
        Some(proto::access_request::Lifetime::EndTime(t)) => Lifetime::Until {
            seconds: t.seconds,
            nanos: t.nanos,
        },
    };
    let ports = request
        .ports
        .into_iter()
        .map(|p| PortAccess {
            port: p.port,
            protocol: access_protocol_from_wire(p.protocol),
            source: p.source,
        })
        .collect();
    AccessRequest {
        request_id: request.request_id,
        ports,
        lifetime,
        requester: request.requester,
        justification: request.justification,
        ticket: request.ticket,
        max_connections: request.max_connections,
    }
}

pub fn access_response(outcome: &AccessOutcome) -> proto::AccessResponse {
    proto::AccessResponse {
        grants: outcome.grants.iter().map(grant).collect(),
        replayed: outcome.replayed,
        approval: outcome.approval.as_ref().map(approval_request),
    }
}

/// One request's answer within a batch: what `RequestAccess` would have
/// answered, its refusal as the status code and message.
pub fn access_result(outcome: Result<AccessOutcome, Refusal>) -> proto::AccessResult {
    use proto::access_result::Outcome;
    let outcome = match outcome {
        Ok(outcome) => Outcome::Response(access_response(&outcome)),
        Err(refusal) => {
            let status = status(refusal);
            Outcome::Refusal(proto::AccessRefusal {
                code: status.code() as u32,
                message: status.message().to_owned(),
            })
        }
    };
    proto::AccessResult {
        outcome: Some(outcome),
    }
}

pub fn grant(grant: &Grant) -> proto::Grant {
    let state = match grant.state {
        GrantState::Active => proto::GrantState::Active,
        GrantState::Expired => proto::GrantState::Expired,
        GrantState::Revoked => proto::GrantState::Revoked,
        GrantState::EndedByPolicy => proto::GrantState::EndedByPolicy,
    };
    proto::Grant {
        id: grant.id,
        request_id: grant.request_id.clone(),
        port: u32::from(grant.target.port),
        protocol: proto::Protocol::from(grant.target.protocol) as i32,
        source: grant.target.source.to_string(),
        requester: grant.requester.clone(),
        justification: grant.justification.clone(),
        ticket: grant.ticket.clone(),
        principal: grant.principal.clone(),
        created_at: Some(timestamp(grant.created_at)),
        expires_at: Some(timestamp(grant.expires_at)),
        state: state as i32,
        ended_at: grant.ended_at.map(timestamp),
        remaining: Some(duration(grant.remaining())),
        max_connections: grant.max_connections,
        used_up: grant.used_up,
    }
}

pub fn connection(info: &ConnectionInfo) -> proto::Connection {
    proto::Connection {
        protocol: proto::Protocol::from(info.connection.protocol) as i32,
        remote: info.connection.remote.to_string(),
        local: info.connection.local.to_string(),
        grant_id: info.grant_id,
        opened_at: info.opened_at.map(timestamp),
    }
}

fn interface(status: &InterfaceStatus) -> proto::InterfaceStatus {
    let mode = match status.mode {
        InterfaceMode::XdpNative => proto::EnforcementMode::XdpNative,
        InterfaceMode::XdpGeneric => proto::EnforcementMode::XdpGeneric,
        InterfaceMode::NftablesOnly => proto::EnforcementMode::NftablesOnly,
        InterfaceMode::Unsupported => proto::EnforcementMode::Unsupported,
        InterfaceMode::Uncovered => proto::EnforcementMode::Uncovered,
    };
    proto::InterfaceStatus {
        name: status.name.clone(),
        mode: mode as i32,
        reason: status.reason.clone(),
        kind: status.kind.clone(),
        problem: status.problem.clone().unwrap_or_default(),
        last_repair: status.last_repair.as_ref().map(repair),
    }
}

fn repair(repair: &Repair) -> proto::Repair {
    proto::Repair {
        at: Some(timestamp(repair.at)),
        what: repair.what.clone(),
    }
}

fn layer(active: bool, health: &LayerHealth) -> proto::LayerHealth {
    proto::LayerHealth {
        active,
        problem: health.problem.clone().unwrap_or_default(),
        last_repair: health.last_repair.as_ref().map(repair),
    }
}

fn port_status(report: &PortReport) -> proto::PortStatus {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    proto::PortStatus {
        port: u32::from(report.port),
        protocol: proto::Protocol::from(report.protocol) as i32,
        active_grants: count(report.active_grants),
        connections: count(report.connections),
        grants_last_7_days: report.grants_last_7_days,
        last_access: report.last_access.as_ref().map(|l| timestamp(l.at)),
        dropped_packets: report.dropped,
        refused_connections: report.refused_connections,
        passed_packets: report.passed,
        last_access_requester: report
            .last_access
            .as_ref()
            .map(|l| l.requester.clone())
            .unwrap_or_default(),
        last_access_principal: report
            .last_access
            .as_ref()
            .map(|l| l.principal.clone())
            .unwrap_or_default(),
    }
}

fn flow_table(report: &FlowTableReport) -> proto::FlowTable {
    proto::FlowTable {
        capacity: report.capacity,
        tracked: u32::try_from(report.tracked).unwrap_or(u32::MAX),
        per_grant_quota: report.per_grant_quota,
        refused_quota: report.refused_quota,
        refused_opens_exhausted: report.refused_opens_exhausted,
        refused_table_full: report.refused_table_full,
    }
}

pub fn status_report(report: &StatusReport) -> proto::Status {
    let enforcement = &report.enforcement;
    proto::Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at: Some(timestamp(report.started_at)),
        configured_mode: report.configured_mode.name().to_owned(),
        nftables_active: report.nftables_active,
        interfaces: enforcement.interfaces.iter().map(interface).collect(),
        ports: report.ports.iter().map(port_status).collect(),
        active_grants: u32::try_from(report.active_grants).unwrap_or(u32::MAX),
        policy_revision: report.policy_revision,
        flows: report.flows.as_ref().map(flow_table),
        audit_chain_intact: report.audit.broken.is_none(),
        audit_problem: report
            .audit
            .broken
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        xdp: Some(layer(report.xdp_active, &enforcement.xdp)),
        nftables: Some(layer(report.nftables_active, &enforcement.nftables)),
        healthy: enforcement.healthy(),
        pending_approvals: report.pending_approvals,
        fleet: report.fleet.as_ref().map(fleet_status),
    }
}

fn fleet_status(report: &crate::engine::FleetReport) -> proto::FleetStatus {
    proto::FleetStatus {
        host: report.host.clone(),
        connected: report.connected,
        since: Some(timestamp(report.since)),
        last_error: report.last_error.clone(),
        applied_revision: report.applied_revision,
        grants_applied: report.grants_applied,
        grants_refused: report.grants_refused,
    }
}

pub fn event_kind(kind: Kind) -> proto::EventKind {
    match kind {
        Kind::GrantCreated => proto::EventKind::GrantCreated,
        Kind::RequestRefused => proto::EventKind::RequestRefused,
        Kind::GrantRevoked => proto::EventKind::GrantRevoked,
        Kind::GrantExpired => proto::EventKind::GrantExpired,
        Kind::GrantEndedByPolicy => proto::EventKind::GrantEndedByPolicy,
        Kind::PolicyChanged => proto::EventKind::PolicyChanged,
        Kind::AccessDenied => proto::EventKind::AccessDenied,
        Kind::AgentStarted => proto::EventKind::AgentStarted,
        Kind::ConfigReloaded => proto::EventKind::ConfigReloaded,
        Kind::DriftRepaired => proto::EventKind::DriftRepaired,
        Kind::ConnectionOpened => proto::EventKind::ConnectionOpened,
        Kind::ConnectionsTerminated => proto::EventKind::ConnectionsTerminated,
        Kind::CallRefused => proto::EventKind::CallRefused,
        Kind::AuditChainBroken => proto::EventKind::AuditChainBroken,
        Kind::DatabaseReinitialized => proto::EventKind::DatabaseReinitialized,
        Kind::GrantUsedUp => proto::EventKind::GrantUsedUp,
        Kind::RequestPending => proto::EventKind::RequestPending,
        Kind::RequestApproved => proto::EventKind::RequestApproved,
        Kind::RequestDenied => proto::EventKind::RequestDenied,
        Kind::RequestExpired => proto::EventKind::RequestExpired,
        Kind::DecisionRefused => proto::EventKind::DecisionRefused,
        Kind::FleetConnected => proto::EventKind::FleetConnected,
        Kind::FleetDisconnected => proto::EventKind::FleetDisconnected,
        Kind::FleetResynchronized => proto::EventKind::FleetResynchronized,
    }
}

/// The agent's kind for a wire kind (`None` for UNSPECIFIED or unknown).
pub fn kind_from_wire(value: i32) -> Option<Kind> {
    let wire = proto::EventKind::try_from(value).ok()?;
    Kind::ALL.iter().copied().find(|k| event_kind(*k) == wire)
}

pub fn checkpoint(checkpoint: &Checkpoint, public_key: &str) -> proto::AuditCheckpoint {
    proto::AuditCheckpoint {
        sequence: checkpoint.sequence,
        hash: checkpoint.hash.clone(),
        at: Some(timestamp(crate::time::from_ms(checkpoint.at_ms))),
        signature: checkpoint.signature.clone(),
        public_key: public_key.to_owned(),
    }
}

impl TryFrom<&proto::AuditCheckpoint> for Checkpoint {
    type Error = Status;
    fn try_from(c: &proto::AuditCheckpoint) -> Result<Self, Status> {
        let at =
            c.at.and_then(|t| SystemTime::try_from(t).ok())
                .ok_or_else(|| invalid(format!("checkpoint {}: no valid time", c.sequence)))?;
        Ok(Checkpoint {
            sequence: c.sequence,
            hash: c.hash.clone(),
            at_ms: crate::time::to_ms(at),
            signature: c.signature.clone(),
        })
    }
}

pub fn event(record: &AuditRecord) -> proto::Event {
    let (message, details_json) = record
        .payload
        .as_ref()
        .map(|p| (p.message.clone(), p.details.clone()))
        .unwrap_or_default();
    proto::Event {
        sequence: record.sequence,
        at: Some(timestamp(record.at())),
        kind: event_kind(record.kind) as i32,
        principal: record.principal.clone(),
        grant_id: record.grant_id,
        message,
        details_json,
        hash: record.hash.clone(),
        payload_sha256: record.payload_sha256.clone(),
        pruned: record.payload.is_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_kind_has_a_wire_value() {
        let mut seen = std::collections::BTreeSet::new();
        for kind in Kind::ALL {
            let wire = event_kind(*kind);
            assert_ne!(wire, proto::EventKind::Unspecified);
            assert!(seen.insert(wire as i32), "{kind:?} shares a wire value");
        }
    }

    #[test]
    fn request_protocols_and_lifetimes_convert() {
        let request = proto::AccessRequest {
            request_id: "r".into(),
            ports: vec![proto::PortAccess {
                port: 22,
                protocol: 7,
                source: "192.0.2.1".into(),
            }],
            ..Default::default()
        };
        assert_eq!(
            access_request(request).ports[0].protocol,
            RequestedProtocol::Unknown(7)
        );
        let ok = access_request(proto::AccessRequest {
            lifetime: Some(proto::access_request::Lifetime::Duration(
                prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                },
            )),
            ..Default::default()
        });
        assert_eq!(
            ok.lifetime,
            Lifetime::For {
                seconds: -1,
                nanos: 0
            }
        );
    }

    #[test]
    fn rules_round_trip() {
        let policy = Policy::default();
        let wire = policy_to_wire(&policy);
        assert_eq!(rules_from_wire(&wire).unwrap(), policy.rules);
        let mut bad = wire.clone();
        bad.rules[0].protocol = 0;
        assert!(
            rules_from_wire(&bad)
                .unwrap_err()
                .message()
                .contains("rules[0]")
        );
    }
}
