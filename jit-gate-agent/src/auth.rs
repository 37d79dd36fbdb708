//! Who is calling and what they may do. On the Unix socket the principal is
//! the peer's uid, read from the socket (`SO_PEERCRED`), never from the
//! request: root is `admin`, other uids only as configured.

use serde::Deserialize;

use crate::{
    config::Principal as ConfiguredPrincipal,
    refusal::{Refusal, RefusalKind},
};

/// Roles, each allowed everything the ones below it are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read-only: status, policy, grants, connections, events.
    Auditor,
    /// Requests and revokes access.
    Broker,
    /// Changes the policy.
    Admin,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// How audit records name the caller ("uid:0").
    pub name: String,
    pub role: Role,
}

impl Principal {
    /// The principal for a peer uid (`None`: credentials unavailable).
    pub fn from_uid(
        uid: Option<u32>,
        configured: &[ConfiguredPrincipal],
    ) -> Result<Principal, Refusal> {
        let uid = uid.ok_or_else(|| {
            Refusal::new(
                RefusalKind::Unauthenticated,
                "peer credentials unavailable on this connection",
            )
        })?;
        let role = if uid == 0 {
            Role::Admin
        } else {
            configured
                .iter()
                .find(|p| p.uid == uid)
                .map(|p| p.role)
                .ok_or_else(|| {
                    Refusal::new(
                        RefusalKind::PermissionDenied,
                        format!("uid {uid} is not a configured principal"),
                    )
                })?
        };
        Ok(Principal {
            name: format!("uid:{uid}"),
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_come_from_uid_only() {
        let configured = [ConfiguredPrincipal {
            uid: 1001,
            role: Role::Auditor,
        }];
        let root = Principal::from_uid(Some(0), &configured).unwrap();
        root.require(Role::Admin).unwrap();
        let auditor = Principal::from_uid(Some(1001), &configured).unwrap();
        auditor.require(Role::Auditor).unwrap();
        assert_eq!(
            auditor.require(Role::Broker).unwrap_err().kind,
            RefusalKind::PermissionDenied
        );
        assert_eq!(
            Principal::from_uid(Some(1002), &configured)
                .unwrap_err()
                .kind,
            RefusalKind::PermissionDenied
        );
        assert_eq!(
            Principal::from_uid(None, &configured).unwrap_err().kind,
            RefusalKind::Unauthenticated
        );
    }
}
