//! Grants: the records (persisted by `store`) and the in-memory index of
//! active grants from which the enforcers' desired state is computed.
//!
//! Several grants may cover the same target; the kernel keeps one entry per
//! target, carrying the latest expiry among them. The XDP program looks up a
//! CIDR source by longest prefix only, so a CIDR entry also carries the
//! latest expiry of every broader grant covering it on the same port:
//! otherwise an expired narrow entry would hide a live broad one.
//!
//! A grant may limit the connections opened under it (`max_connections`);
//! the kernel counts them per grant id. The entry for a target carries the
//! grant it is attributed to, and with it that grant's limit: a grant
//! without a limit is preferred (it grants more), then the latest expiry.
//! A limited grant the kernel reports used up no longer counts for any
//! entry, so the next grant takes over, or the entry goes (its
//! connections continue: the kernel honours tracked flows on their own).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, btree_map::Entry as BTreeEntry},
    fmt,
    ops::Bound,
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
    /// Connections it may open in all; 0: no limit.
    pub max_connections: u32,
    /// A limited grant that opened every connection it may, as the agent
    /// last read the kernel's count (not stored: the kernel keeps it).
    pub used_up: bool,
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
            max_connections: self.max_connections,
        }
    }
}

/// What enforcement needs of an active grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActiveGrant {
    pub id: u64,
    pub target: GrantTarget,
    pub deadline: Deadline,
    /// Connections it may open in all; 0: no limit.
    pub max_connections: u32,
}

/// The entry an enforcer should hold for one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub deadline: Deadline,
    /// The grant the entry is attributed to (see the module comment).
    pub grant_id: u64,
    /// That grant's limit on connections opened; 0: none.
    pub max_connections: u32,
}

/// Active grants, indexed by target (where each grant is kept), by id and
/// by expiry. Kept compact, as a million grants fill it: the by-target
/// map holds each grant's few fields inline, and the id index only the
/// target.
#[derive(Debug, Default)]
pub struct ActiveGrants {
    by_target: BTreeMap<GrantTarget, Holders>,
    by_id: HashMap<u64, GrantTarget>,
    by_expiry: BTreeSet<(Deadline, u64)>,
    /// Limited grants whose connections the kernel reports all opened.
    used_up: HashSet<u64>,
}

/// A grant as the by-target index keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Holder {
    deadline: Deadline,
    id: u64,
    max_connections: u32,
}

/// The grants on one target, ordered by (expiry, id): the last is the one
/// the kernel entry carries. Usually one, kept inline (a Vec would cost
/// an allocation per target).
#[derive(Debug)]
enum Holders {
    One(Holder),
    Many(Vec<Holder>),
}

impl Holders {
    fn as_slice(&self) -> &[Holder] {
        match self {
            Holders::One(one) => std::slice::from_ref(one),
            Holders::Many(many) => many,
        }
    }

    fn add(&mut self, holder: Holder) {
        let mut many = self.as_slice().to_vec();
        let position = many.partition_point(|h| (h.deadline, h.id) < (holder.deadline, holder.id));
        many.insert(position, holder);
        *self = Holders::Many(many);
    }

    /// Removes grant `id`; returns whether none is left.
    fn remove(&mut self, id: u64) -> bool {
        match self {
            Holders::One(one) => one.id == id,
            Holders::Many(many) => {
                many.retain(|h| h.id != id);
                match many.as_slice() {
                    [] => true,
                    [one] => {
                        *self = Holders::One(*one);
                        false
                    }
                    _ => false,
                }
            }
        }
    }
}

impl ActiveGrants {
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn get(&self, id: u64) -> Option<ActiveGrant> {
        let target = self.by_id.get(&id)?;
        let holders = self.by_target.get(target)?;
        holders
            .as_slice()
            .iter()
            .find(|h| h.id == id)
            .map(|h| active_grant(*target, h))
    }

    pub fn iter(&self) -> impl Iterator<Item = ActiveGrant> + '_ {
        self.by_target.iter().flat_map(|(target, holders)| {
            holders.as_slice().iter().map(|h| active_grant(*target, h))
        })
    }

    pub fn insert(&mut self, grant: ActiveGrant) {
        self.remove_indexed(grant.id);
        let holder = Holder {
            deadline: grant.deadline,
            id: grant.id,
            max_connections: grant.max_connections,
        };
        self.by_id.insert(grant.id, grant.target);
        match self.by_target.entry(grant.target) {
            BTreeEntry::Vacant(vacant) => {
                vacant.insert(Holders::One(holder));
            }
            BTreeEntry::Occupied(mut occupied) => occupied.get_mut().add(holder),
        }
        self.by_expiry.insert((grant.deadline, grant.id));
    }

    pub fn remove(&mut self, id: u64) -> Option<ActiveGrant> {
        let grant = self.remove_indexed(id)?;
        self.used_up.remove(&id);
        Some(grant)
    }

    /// Takes grant `id` out of every index but `used_up`.
    fn remove_indexed(&mut self, id: u64) -> Option<ActiveGrant> {
        let target = self.by_id.remove(&id)?;
        let BTreeEntry::Occupied(mut holders) = self.by_target.entry(target) else {
            return None;
        };
        let grant = holders
            .get()
            .as_slice()
            .iter()
            .find(|h| h.id == id)
            .map(|h| active_grant(target, h))?;
        if holders.get_mut().remove(id) {
            holders.remove();
        }
        self.by_expiry.remove(&(grant.deadline, id));
        Some(grant)
    }

    /// Notes that the limited grant `id` has opened all its connections;
    /// returns its target if this is news (its entries must be recomputed).
    pub fn mark_used_up(&mut self, id: u64) -> Option<GrantTarget> {
        let grant = self.get(id).filter(|g| g.max_connections != 0)?;
        self.used_up.insert(id).then_some(grant.target)
    }

    /// Whether the grant has opened every connection it may.
    pub fn is_used_up(&self, id: u64) -> bool {
        self.used_up.contains(&id)
    }

    /// The entry attributed to the best of `grants` still able to open
    /// connections: no limit before a limit, then the latest expiry.
    fn attributed<'a>(&self, grants: impl Iterator<Item = &'a Holder>) -> Option<Entry> {
        grants
            .filter(|h| !self.used_up.contains(&h.id))
            .map(|h| (h.max_connections == 0, h.deadline, h.id, h.max_connections))
            .max()
            .map(|(_, deadline, grant_id, max_connections)| Entry {
                deadline,
                grant_id,
                max_connections,
            })
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
            .flat_map(|(_, holders)| holders.as_slice().iter().map(|h| h.id))
            .collect()
    }

    fn same_port<'a>(
        &'a self,
        target: &'a GrantTarget,
    ) -> impl Iterator<Item = (&'a GrantTarget, &'a Holders)> + 'a {
        self.by_target
            .iter()
            .filter(move |(t, _)| t.protocol == target.protocol && t.port == target.port)
    }

    /// The nftables entry for `target`: its own grants only (nftables
    /// matches every covering element, not just the longest prefix).
    pub fn own_entry(&self, target: &GrantTarget) -> Option<Entry> {
        self.attributed(self.by_target.get(target)?.as_slice().iter())
    }

    /// The XDP entry for `target`: for an exact source its own grants; for a
    /// prefix also those of broader prefixes covering it on the same port.
    pub fn xdp_entry(&self, target: &GrantTarget) -> Option<Entry> {
        let own = self.own_entry(target);
        if target.is_exact() || own.is_none() {
            return own;
        }
        self.attributed(
            self.same_port(target)
                .filter(|(t, _)| !t.is_exact() && t.source.contains(&target.source))
                .flat_map(|(_, holders)| holders.as_slice().iter()),
        )
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

    /// The targets with an active grant after `after` (all if `None`), in
    /// order: a walk that can stop and resume.
    pub fn targets_after(&self, after: Option<&GrantTarget>) -> impl Iterator<Item = &GrantTarget> {
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.by_target
            .range::<GrantTarget, _>((start, Bound::Unbounded))
            .map(|(target, _)| target)
    }
}

fn active_grant(target: GrantTarget, holder: &Holder) -> ActiveGrant {
    ActiveGrant {
        id: holder.id,
        target,
        deadline: holder.deadline,
        max_connections: holder.max_connections,
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
            max_connections: 0,
        }
    }

    fn limited(id: u64, source: &str, expires: u64, max_connections: u32) -> ActiveGrant {
        ActiveGrant {
            max_connections,
            ..grant(id, source, expires)
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
                grant_id: 1,
                max_connections: 0,
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
    fn limited_grants_yield_to_unlimited_ones_and_leave_once_used_up() {
        let mut grants = ActiveGrants::default();
        let t = target("192.0.2.7/32");
        grants.insert(limited(1, "192.0.2.7/32", 300, 1));
        assert_eq!(grants.own_entry(&t).unwrap().max_connections, 1);
        // An unlimited grant ending sooner still takes the entry: while it
        // lasts, connections are not limited.
        grants.insert(grant(2, "192.0.2.7/32", 100));
        assert_eq!(grants.own_entry(&t).unwrap().grant_id, 2);
        grants.remove(2);
        assert_eq!(grants.own_entry(&t).unwrap().grant_id, 1);
        // Used up: the entry goes (a second limited grant would take over).
        assert_eq!(grants.mark_used_up(1), Some(t));
        assert_eq!(grants.mark_used_up(1), None, "news once");
        assert!(grants.is_used_up(1));
        assert_eq!(grants.own_entry(&t), None);
        assert_eq!(grants.xdp_entry(&t), None);
        grants.insert(limited(3, "192.0.2.7/32", 200, 2));
        assert_eq!(grants.own_entry(&t).unwrap().grant_id, 3);
        // Unlimited grants are never used up.
        grants.insert(grant(4, "192.0.2.8/32", 100));
        assert_eq!(grants.mark_used_up(4), None);
        grants.remove(1);
        assert!(!grants.is_used_up(1));
    }

    #[test]
    fn broader_limited_grants_count_for_narrow_prefixes_until_used_up() {
        let mut grants = ActiveGrants::default();
        grants.insert(limited(1, "198.51.0.0/16", 500, 1));
        grants.insert(grant(2, "198.51.100.0/24", 100));
        let narrow = target("198.51.100.0/24");
        assert_eq!(grants.xdp_entry(&narrow).unwrap().grant_id, 2);
        grants.remove(2);
        grants.insert(limited(2, "198.51.100.0/24", 100, 3));
        assert_eq!(grants.xdp_entry(&narrow).unwrap().grant_id, 1);
        grants.mark_used_up(1);
        assert_eq!(grants.xdp_entry(&narrow).unwrap().grant_id, 2);
    }

    #[test]
    fn grants_sharing_a_target_are_found_by_id_as_they_come_and_go() {
        let mut grants = ActiveGrants::default();
        let t = target("192.0.2.7/32");
        grants.insert(grant(1, "192.0.2.7/32", 100));
        grants.insert(grant(2, "192.0.2.7/32", 300));
        grants.insert(limited(3, "192.0.2.7/32", 200, 4));
        assert_eq!(grants.get(3), Some(limited(3, "192.0.2.7/32", 200, 4)));
        // Inserted again with a new deadline: moved, not doubled.
        grants.insert(grant(1, "192.0.2.7/32", 400));
        assert_eq!(grants.len(), 3);
        assert_eq!(grants.own_entry(&t).unwrap().grant_id, 1);
        assert_eq!(grants.due(at(399)), vec![3, 2]);
        assert_eq!(grants.remove(2), Some(grant(2, "192.0.2.7/32", 300)));
        assert_eq!(grants.remove(2), None);
        assert_eq!(grants.remove(1), Some(grant(1, "192.0.2.7/32", 400)));
        assert_eq!(grants.own_entry(&t).unwrap().grant_id, 3);
        assert_eq!(
            grants.iter().collect::<Vec<_>>(),
            vec![limited(3, "192.0.2.7/32", 200, 4)]
        );
        grants.remove(3);
        assert!(grants.is_empty());
        assert_eq!(grants.targets().count(), 0);
        assert_eq!(grants.get(3), None);
    }

    #[test]
    fn a_target_with_one_grant_costs_no_allocation_of_its_own() {
        // What a million grants cost: the by-target map keeps each grant
        // inline beside its target (a Vec would add an allocation each).
        assert!(size_of::<Holders>() <= 32, "{}", size_of::<Holders>());
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
