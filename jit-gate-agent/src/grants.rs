//! Grants: the records (persisted by `store`) and the in-memory index of
//! active grants from which the enforcers' desired state is computed.
//!
//! Several grants may cover the same target; the kernel keeps one entry per
//! target, carrying the latest expiry among them. The XDP program looks up a
//! CIDR source by longest prefix only, so a CIDR entry also carries the
//! latest expiry of every broader grant covering it on the same port:
//! otherwise an expired narrow entry would hide a live broad one.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    time::{Duration, SystemTime},
};

use crate::{clock::Deadline, net::GrantTarget};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GrantState {
    Active,
    Expired,
    Revoked,
    /// Its port rule was removed from the policy.
    EndedByPolicy,
}

impl GrantState {
    pub const fn name(self) -> &'static str {
        match self {
            GrantState::Active => "active",
            GrantState::Expired => "expired",
            GrantState::Revoked => "revoked",
            GrantState::EndedByPolicy => "ended-by-policy",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            GrantState::Active,
            GrantState::Expired,
            GrantState::Revoked,
            GrantState::EndedByPolicy,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }
}

impl fmt::Display for GrantState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A grant as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub id: u64,
    pub request_id: String,
    pub target: GrantTarget,
    pub requester: String,
    pub justification: String,
    pub ticket: String,
    /// The API principal that asked for it.
    pub principal: String,
    pub created_at: SystemTime,
    /// How long it was given for.
    pub granted: Duration,
    /// When it ends: the one deadline every layer derives its expiry from.
    pub deadline: Deadline,
    /// The boot whose clock `deadline` is on (empty: unknown, from a
    /// database that predates boot-time deadlines).
    pub boot_id: String,
    /// `deadline` on the wall clock, as last shown; for display only.
    pub expires_at: SystemTime,
    pub state: GrantState,
    pub ended_at: Option<SystemTime>,
}

impl Grant {
    /// Time left of an active grant, from its deadline.
    pub fn remaining(&self) -> Duration {
        match self.state {
            GrantState::Active => self.deadline.remaining(),
            _ => Duration::ZERO,
        }
    }

    /// Derives `expires_at` from the deadline again (an active grant's end
    /// moves on the wall clock when the wall clock is stepped).
    pub fn refresh_display(&mut self) {
        if self.state == GrantState::Active {
            self.expires_at = self.deadline.to_wall_near(self.expires_at);
        }
    }

    pub fn active(&self) -> ActiveGrant {
        ActiveGrant {
            id: self.id,
            target: self.target,
            deadline: self.deadline,
        }
    }
}

/// What enforcement needs of an active grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActiveGrant {
    pub id: u64,
    pub target: GrantTarget,
    pub deadline: Deadline,
}

/// The entry an enforcer should hold for one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub deadline: Deadline,
    /// The grant the entry is attributed to (the latest-expiring one).
    pub grant_id: u64,
}

/// Active grants, indexed by id, by target and by expiry.
#[derive(Debug, Default)]
pub struct ActiveGrants {
    by_id: HashMap<u64, ActiveGrant>,
    /// For each target, its grants ordered by (expiry, id): the last is the
    /// one the kernel entry carries. A Vec, not a set: there is usually one
    /// grant per target, and a set would cost a B-tree node each.
    by_target: BTreeMap<GrantTarget, Vec<(Deadline, u64)>>,
    by_expiry: BTreeSet<(Deadline, u64)>,
}

impl ActiveGrants {
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn get(&self, id: u64) -> Option<&ActiveGrant> {
        self.by_id.get(&id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &ActiveGrant> {
        self.by_id.values()
    }

    pub fn insert(&mut self, grant: ActiveGrant) {
        let at = (grant.deadline, grant.id);
        if let Some(old) = self.by_id.insert(grant.id, grant) {
            self.unindex(&old);
        }
        let grants = self.by_target.entry(grant.target).or_default();
        let position = grants.partition_point(|g| *g < at);
        grants.insert(position, at);
        self.by_expiry.insert(at);
    }

    pub fn remove(&mut self, id: u64) -> Option<ActiveGrant> {
        let grant = self.by_id.remove(&id)?;
        self.unindex(&grant);
        Some(grant)
    }

    fn unindex(&mut self, grant: &ActiveGrant) {
        let at = (grant.deadline, grant.id);
        self.by_expiry.remove(&at);
        if let Some(set) = self.by_target.get_mut(&grant.target) {
            set.retain(|g| *g != at);
            if set.is_empty() {
                self.by_target.remove(&grant.target);
            }
        }
    }

    /// The earliest deadline among active grants.
    pub fn next_deadline(&self) -> Option<Deadline> {
        self.by_expiry.first().map(|(at, _)| *at)
    }

    /// Ids of grants whose deadline has passed (at `now` on the boot clock).
    pub fn due(&self, now: Deadline) -> Vec<u64> {
        self.by_expiry
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, id)| *id)
            .collect()
    }

    /// Ids of active grants on (protocol, port) covering `source`.
    pub fn covering(&self, target: &GrantTarget) -> Vec<u64> {
        self.same_port(target)
            .filter(|(t, _)| t.source.contains(&target.source))
            .flat_map(|(_, set)| set.iter().map(|(_, id)| *id))
            .collect()
    }

    fn same_port<'a>(
        &'a self,
        target: &'a GrantTarget,
    ) -> impl Iterator<Item = (&'a GrantTarget, &'a Vec<(Deadline, u64)>)> + 'a {
        self.by_target
            .iter()
            .filter(move |(t, _)| t.protocol == target.protocol && t.port == target.port)
    }

    /// The nftables entry for `target`: its own grants only (nftables
    /// matches every covering element, not just the longest prefix).
    pub fn own_entry(&self, target: &GrantTarget) -> Option<Entry> {
        self.by_target
            .get(target)
            .and_then(|set| set.last())
            .map(|(deadline, grant_id)| Entry {
                deadline: *deadline,
                grant_id: *grant_id,
            })
    }

    /// The XDP entry for `target`: for an exact source its own grants; for a
    /// prefix also those of broader prefixes covering it on the same port.
    pub fn xdp_entry(&self, target: &GrantTarget) -> Option<Entry> {
        let own = self.own_entry(target);
        if target.is_exact() || own.is_none() {
            return own;
        }
        self.same_port(target)
            .filter(|(t, _)| !t.is_exact() && t.source.contains(&target.source))
            .filter_map(|(_, set)| set.last())
            .max()
            .map(|(deadline, grant_id)| Entry {
                deadline: *deadline,
                grant_id: *grant_id,
            })
    }

    /// Targets whose XDP entry depends on grants for `target`: the target
    /// itself and, for a prefix, the narrower prefixes inside it.
    pub fn dependents(&self, target: &GrantTarget) -> Vec<GrantTarget> {
        let mut out = vec![*target];
        if !target.is_exact() {
            out.extend(
                self.same_port(target)
                    .map(|(t, _)| *t)
                    .filter(|t| t != target && !t.is_exact() && target.source.contains(&t.source)),
            );
        }
        out
    }

    /// Every target with an active grant.
    pub fn targets(&self) -> impl Iterator<Item = &GrantTarget> {
        self.by_target.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Protocol;

    fn target(source: &str) -> GrantTarget {
        GrantTarget {
            source: source.parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 22,
        }
    }

    fn at(secs: u64) -> Deadline {
        Deadline::from_boot_ns(secs * 1_000_000_000)
    }

    fn grant(id: u64, source: &str, expires: u64) -> ActiveGrant {
        ActiveGrant {
            id,
            target: target(source),
            deadline: at(expires),
        }
    }

    #[test]
    fn overlapping_grants_keep_the_latest_expiry_and_survive_each_other() {
        let mut grants = ActiveGrants::default();
        grants.insert(grant(1, "192.0.2.7/32", 100));
        grants.insert(grant(2, "192.0.2.7/32", 200));
        let t = target("192.0.2.7/32");
        assert_eq!(grants.own_entry(&t).unwrap().grant_id, 2);
        grants.remove(2);
        assert_eq!(
            grants.own_entry(&t),
            Some(Entry {
                deadline: at(100),
                grant_id: 1
            })
        );
        grants.remove(1);
        assert_eq!(grants.own_entry(&t), None);
        assert!(grants.is_empty());
        assert_eq!(grants.targets().count(), 0);
    }

    #[test]
    fn narrow_prefix_entries_carry_broader_expiries() {
        let mut grants = ActiveGrants::default();
        grants.insert(grant(1, "198.51.0.0/16", 500));
        grants.insert(grant(2, "198.51.100.0/24", 100));
        grants.insert(grant(3, "198.51.100.9/32", 50));
        let narrow = target("198.51.100.0/24");
        assert_eq!(grants.xdp_entry(&narrow).unwrap().deadline, at(500));
        assert_eq!(grants.own_entry(&narrow).unwrap().deadline, at(100));
        // Exact entries fall through to the trie in the kernel.
        let exact = target("198.51.100.9/32");
        assert_eq!(grants.xdp_entry(&exact).unwrap().deadline, at(50));
        let broad = target("198.51.0.0/16");
        let deps = grants.dependents(&broad);
        assert_eq!(deps, vec![broad, narrow]);
        assert_eq!(grants.covering(&exact).len(), 3);
    }

    #[test]
    fn expiry_order() {
        let mut grants = ActiveGrants::default();
        grants.insert(grant(1, "192.0.2.1/32", 30));
        grants.insert(grant(2, "192.0.2.2/32", 10));
        grants.insert(grant(3, "192.0.2.3/32", 20));
        assert_eq!(grants.next_deadline(), Some(at(10)));
        assert_eq!(grants.due(at(20)), vec![2, 3]);
        assert_eq!(grants.due(at(5)), Vec::<u64>::new());
    }
}
