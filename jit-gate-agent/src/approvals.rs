//! Access requests held for approval: their states, the decisions of
//! approvers, and the rules of who may decide (never the principal that
//! asked; each approver once). Pure data; the engine stores and acts on it.

use std::{fmt, time::SystemTime};

use crate::{
    auth::Principal,
    grants::Grant,
    policy::Policy,
    refusal::{Refusal, RefusalKind},
    request::{AccessRequest, GrantSpec},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApprovalState {
    Pending,
    /// Every approval it needed landed; its grants were created then.
    Approved,
    Denied,
    /// Not decided within `approvals.pending_timeout`.
    Expired,
    /// Fully approved, but the policy at that moment refused it.
    Refused,
}

impl ApprovalState {
    pub const ALL: [ApprovalState; 5] = [
        ApprovalState::Pending,
        ApprovalState::Approved,
        ApprovalState::Denied,
        ApprovalState::Expired,
        ApprovalState::Refused,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            ApprovalState::Pending => "pending",
            ApprovalState::Approved => "approved",
            ApprovalState::Denied => "denied",
            ApprovalState::Expired => "expired",
            ApprovalState::Refused => "refused",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl fmt::Display for ApprovalState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which requests a listing shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestFilter {
    Pending,
    Decided,
    All,
}

/// One approver's approval or denial.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub principal: String,
    pub approved: bool,
    /// The approval's comment or the denial's reason.
    pub comment: String,
    pub at: SystemTime,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalRequest {
    pub id: u64,
    /// The API principal that asked.
    pub principal: String,
    pub request: AccessRequest,
    pub fingerprint: String,
    pub needed: u8,
    pub state: ApprovalState,
    pub created_at: SystemTime,
    /// When it expires if still pending (wall clock).
    pub expires_at: SystemTime,
    pub decided_at: Option<SystemTime>,
    /// Why it was denied, expired or refused.
    pub reason: String,
    pub decisions: Vec<Decision>,
    /// The grants its last approval created (filled when read).
    pub grants: Vec<Grant>,
}

impl ApprovalRequest {
    pub fn approvals(&self) -> usize {
        self.decisions.iter().filter(|d| d.approved).count()
    }

    /// Whether `caller` may decide this request now: it is pending, the
    /// caller did not ask for it and has not decided it before.
    pub fn check_decider(&self, caller: &Principal) -> Result<(), Refusal> {
        if caller.name == self.principal {
            return Err(Refusal::new(
                RefusalKind::PermissionDenied,
                format!(
                    "request {} was made by {}: a principal never decides its own request",
                    self.id, caller.name
                ),
            ));
        }
        if self.state != ApprovalState::Pending {
            return Err(Refusal::new(
                RefusalKind::FailedPrecondition,
                format!("request {} is no longer pending ({})", self.id, self.state),
            ));
        }
        if self.decisions.iter().any(|d| d.principal == caller.name) {
            return Err(Refusal::new(
                RefusalKind::FailedPrecondition,
                format!(
                    "{} already approved request {}: each approval must come from a distinct approver",
                    caller.name, self.id
                ),
            ));
        }
        Ok(())
    }
}

/// Approvals a request needs: the most any of its ports' rules asks for.
pub fn approvals_needed(policy: &Policy, specs: &[GrantSpec]) -> u8 {
    specs
        .iter()
        .filter_map(|s| policy.rule_for(s.target.protocol, s.target.port))
        .map(|r| r.approvals)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        auth::Role,
        net::{GrantTarget, Protocol},
        policy::{PortRule, RuleProtocol},
        request::Lifetime,
    };

    fn pending(decided_by: &[&str]) -> ApprovalRequest {
        let now = SystemTime::now();
        ApprovalRequest {
            id: 7,
            principal: "uid:1001".into(),
            request: AccessRequest {
                request_id: "r".into(),
                ports: Vec::new(),
                lifetime: Lifetime::Missing,
                requester: "alice".into(),
                justification: String::new(),
                ticket: String::new(),
                max_connections: 0,
            },
            fingerprint: "fp".into(),
            needed: 2,
            state: ApprovalState::Pending,
            created_at: now,
            expires_at: now,
            decided_at: None,
            reason: String::new(),
            decisions: decided_by
                .iter()
                .map(|p| Decision {
                    principal: (*p).into(),
                    approved: true,
                    comment: String::new(),
                    at: now,
                })
                .collect(),
            grants: Vec::new(),
        }
    }

    fn approver(name: &str) -> Principal {
        Principal {
            name: name.into(),
            role: Role::Approver,
        }
    }

    #[test]
    fn requesters_never_decide_and_approvers_decide_once() {
        let request = pending(&["uid:1002"]);
        let own = request.check_decider(&approver("uid:1001")).unwrap_err();
        assert_eq!(own.kind, RefusalKind::PermissionDenied);
        let twice = request.check_decider(&approver("uid:1002")).unwrap_err();
        assert_eq!(twice.kind, RefusalKind::FailedPrecondition);
        assert!(twice.message.contains("distinct"), "{twice}");
        request.check_decider(&approver("uid:1003")).unwrap();
        let decided = ApprovalRequest {
            state: ApprovalState::Denied,
            ..pending(&[])
        };
        let late = decided.check_decider(&approver("uid:1003")).unwrap_err();
        assert_eq!(late.kind, RefusalKind::FailedPrecondition);
        assert_eq!(request.approvals(), 1);
    }

    #[test]
    fn the_strictest_port_sets_the_approvals_needed() {
        let mut ssh = PortRule::open(22, RuleProtocol::Tcp);
        ssh.approvals = 2;
        let policy = Policy {
            rules: vec![ssh, PortRule::open(3389, RuleProtocol::Tcp)],
            revision: 1,
        };
        let spec = |port| GrantSpec {
            target: GrantTarget {
                source: "192.0.2.7/32".parse().unwrap(),
                protocol: Protocol::Tcp,
                port,
            },
            duration: std::time::Duration::from_mins(1),
        };
        assert_eq!(approvals_needed(&policy, &[spec(3389)]), 0);
        assert_eq!(approvals_needed(&policy, &[spec(3389), spec(22)]), 2);
        for state in ApprovalState::ALL {
            assert_eq!(ApprovalState::from_name(state.name()), Some(state));
        }
    }
}
