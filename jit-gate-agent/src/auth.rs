//! Who is calling and what they may do, independent of the transport: an
//! `Identity` the transport vouches for (a Unix socket peer's uid today,
//! `SO_PEERCRED`, never the request) maps to a `Principal` — a name and a
//! role — and every call's role check is `Principal::require`.

use serde::Deserialize;

use crate::refusal::{Refusal, RefusalKind};

/// Roles, each allowed everything the ones below it are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read-only: status, policy, grants, connections, events, audit.
    Auditor,
    /// Requests access, and revokes its own grants.
    Broker,
    /// Approves or denies other principals' access requests (a broker too).
    Approver,
    /// Changes the policy, revokes any grant.
    Admin,
}

/// A configured non-root Unix user and its role.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UidRole {
    pub uid: u32,
    pub role: Role,
}

/// Who the transport says is calling.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// The peer of a Unix socket.
    UnixUid(u32),
}

impl Identity {
    /// How audit records and idempotency keys name the caller ("uid:0").
    pub fn name(&self) -> String {
        match self {
            Identity::UnixUid(uid) => format!("uid:{uid}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
}

impl Principal {
    /// The principal for a caller (`None`: the transport could not say
    /// who it is): root is admin, other uids only as configured.
    pub fn resolve(identity: Option<&Identity>, uids: &[UidRole]) -> Result<Principal, Refusal> {
        let identity = identity.ok_or_else(|| {
            Refusal::new(
                RefusalKind::Unauthenticated,
                "peer credentials unavailable on this connection",
            )
        })?;
        let role = match identity {
            Identity::UnixUid(0) => Role::Admin,
            Identity::UnixUid(uid) => uids
                .iter()
                .find(|p| p.uid == *uid)
                .map(|p| p.role)
                .ok_or_else(|| {
                    Refusal::new(
                        RefusalKind::PermissionDenied,
                        format!("uid {uid} is not a configured principal"),
                    )
                })?,
        };
        Ok(Principal {
            name: identity.name(),
            role,
        })
    }

    /// Refuses unless the principal's role is at least `needed`.
    pub fn require(&self, needed: Role) -> Result<(), Refusal> {
        if self.role >= needed {
            Ok(())
        } else {
            Err(Refusal::new(
                RefusalKind::PermissionDenied,
                format!(
                    "{} has role {:?}; this call needs {needed:?}",
                    self.name, self.role
                ),
            ))
        }
    }

    /// Refuses unless the principal may end a grant that `owner` asked
    /// for: its own, or any as admin.
    pub fn require_owner_or_admin(&self, owner: &str, grant_id: u64) -> Result<(), Refusal> {
        if self.name == owner || self.role >= Role::Admin {
            Ok(())
        } else {
            Err(Refusal::new(
                RefusalKind::PermissionDenied,
                format!(
                    "grant {grant_id} belongs to {owner}; revoking another principal's grant needs Admin"
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_come_from_the_identity_only() {
        let configured = [UidRole {
            uid: 1001,
            role: Role::Auditor,
        }];
        let resolve =
            |uid: Option<u32>| Principal::resolve(uid.map(Identity::UnixUid).as_ref(), &configured);
        let root = resolve(Some(0)).unwrap();
        root.require(Role::Admin).unwrap();
        let auditor = resolve(Some(1001)).unwrap();
        assert_eq!(auditor.name, "uid:1001");
        auditor.require(Role::Auditor).unwrap();
        assert_eq!(
            auditor.require(Role::Broker).unwrap_err().kind,
            RefusalKind::PermissionDenied
        );
        assert_eq!(
            resolve(Some(1002)).unwrap_err().kind,
            RefusalKind::PermissionDenied
        );
        assert_eq!(
            resolve(None).unwrap_err().kind,
            RefusalKind::Unauthenticated
        );
    }

    #[test]
    fn only_owners_and_admins_end_grants() {
        let broker = Principal {
            name: "uid:1001".into(),
            role: Role::Broker,
        };
        broker.require_owner_or_admin("uid:1001", 1).unwrap();
        let err = broker.require_owner_or_admin("uid:1002", 1).unwrap_err();
        assert!(err.message.contains("belongs to uid:1002"), "{err}");
        let admin = Principal {
            name: "uid:0".into(),
            role: Role::Admin,
        };
        admin.require_owner_or_admin("uid:1002", 1).unwrap();
    }
}
