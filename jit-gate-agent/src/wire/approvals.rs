//! Approval requests on the wire: held requests with their decisions, the
//! request as its requester sent it, and the listing filter.

use tonic::Status;

use super::{grant, timestamp};
use crate::{
    approvals::{ApprovalRequest, ApprovalState, RequestFilter},
    proto,
    request::{AccessRequest, Lifetime, RequestedProtocol},
};

impl From<ApprovalState> for proto::ApprovalState {
    fn from(state: ApprovalState) -> Self {
        match state {
            ApprovalState::Pending => proto::ApprovalState::Pending,
            ApprovalState::Approved => proto::ApprovalState::Approved,
            ApprovalState::Denied => proto::ApprovalState::Denied,
            ApprovalState::Expired => proto::ApprovalState::Expired,
            ApprovalState::Refused => proto::ApprovalState::Refused,
        }
    }
}

/// The request as the requester sent it (the inverse of `access_request`).
pub fn access_request_to_wire(request: &AccessRequest) -> proto::AccessRequest {
    let lifetime = match request.lifetime {
        Lifetime::Missing => None,
        Lifetime::For { seconds, nanos } => Some(proto::access_request::Lifetime::Duration(
            prost_types::Duration { seconds, nanos },
        )),
        Lifetime::Until { seconds, nanos } => Some(proto::access_request::Lifetime::EndTime(
            prost_types::Timestamp { seconds, nanos },
        )),
    };
    proto::AccessRequest {
        request_id: request.request_id.clone(),
        ports: request
            .ports
            .iter()
            .map(|p| proto::PortAccess {
                port: p.port,
                protocol: match p.protocol {
                    RequestedProtocol::Covered => proto::Protocol::Unspecified as i32,
                    RequestedProtocol::Only(protocol) => proto::Protocol::from(protocol) as i32,
                    RequestedProtocol::Both => proto::Protocol::Both as i32,
                    RequestedProtocol::Unknown(value) => value,
                },
                source: p.source.clone(),
            })
            .collect(),
        lifetime,
        requester: request.requester.clone(),
        justification: request.justification.clone(),
        ticket: request.ticket.clone(),
        max_connections: request.max_connections,
    }
}

pub fn approval_request(held: &ApprovalRequest) -> proto::ApprovalRequest {
    proto::ApprovalRequest {
        id: held.id,
        state: proto::ApprovalState::from(held.state) as i32,
        request: Some(access_request_to_wire(&held.request)),
        principal: held.principal.clone(),
        approvals_needed: u32::from(held.needed),
        decisions: held
            .decisions
            .iter()
            .map(|d| proto::ApprovalDecision {
                principal: d.principal.clone(),
                approved: d.approved,
                comment: d.comment.clone(),
                at: Some(timestamp(d.at)),
            })
            .collect(),
        created_at: Some(timestamp(held.created_at)),
        expires_at: (held.state == ApprovalState::Pending).then(|| timestamp(held.expires_at)),
        decided_at: held.decided_at.map(timestamp),
        reason: held.reason.clone(),
        grants: held.grants.iter().map(grant).collect(),
    }
}

/// The listing filter; unknown values are refused.
pub fn request_filter(value: i32) -> Result<RequestFilter, Status> {
    match proto::RequestFilter::try_from(value) {
        Ok(proto::RequestFilter::Pending) => Ok(RequestFilter::Pending),
        Ok(proto::RequestFilter::Decided) => Ok(RequestFilter::Decided),
        Ok(proto::RequestFilter::All) => Ok(RequestFilter::All),
        Err(_) => Err(Status::invalid_argument(format!(
            "unknown request filter {value}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::access_request;

    #[test]
    fn held_requests_go_back_to_the_wire_as_sent() {
        let sent = proto::AccessRequest {
            request_id: "r1".into(),
            ports: vec![
                proto::PortAccess {
                    port: 22,
                    protocol: proto::Protocol::Unspecified as i32,
                    source: "192.0.2.7".into(),
                },
                proto::PortAccess {
                    port: 53,
                    protocol: proto::Protocol::Udp as i32,
                    source: "2001:db8::/64".into(),
                },
            ],
            lifetime: Some(proto::access_request::Lifetime::EndTime(
                prost_types::Timestamp {
                    seconds: 2_000_000_000,
                    nanos: 5,
                },
            )),
            requester: "alice".into(),
            justification: "deploy".into(),
            ticket: "T-1".into(),
            max_connections: 2,
        };
        assert_eq!(access_request_to_wire(&access_request(sent.clone())), sent);
        assert!(request_filter(7).is_err());
        assert_eq!(request_filter(2).unwrap(), RequestFilter::All);
    }
}
