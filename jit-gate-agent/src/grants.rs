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
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    ops::Bound,
    time::{Duration, SystemTime},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{
    clock::Deadline,
    net::{GrantTarget, Protocol},
};

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

/// Active grants, kept compact (a million fill it) and indexed so that
/// what a call touches stays small:
/// - every grant's few fields once, in a vector sorted by id (ids grow: a
///   new grant is pushed; a removed one leaves a gap until gaps are half
///   the vector, which is then compacted);
/// - per (protocol, port), the targets: exact IPv4 sources by address,
///   exact IPv6 sources, and the prefixes apart, as they are few and are
///   all that a prefix's XDP entry, its dependents and `covering` walk;
/// - the grants by expiry, and the limited ones (few) apart.
#[derive(Debug, Default)]
pub struct ActiveGrants {
    slots: Vec<Slot>,
    gaps: usize,
    ports: BTreeMap<(Protocol, u16), PortTargets>,
    by_expiry: BTreeSet<(Deadline, u64)>,
    /// Grants with a limit on their connections.
    limited: BTreeSet<u64>,
    /// Limited grants whose connections the kernel reports all opened.
    used_up: HashSet<u64>,
}

/// A grant as the index keeps it (`live` false: a gap left by a removal).
#[derive(Clone, Copy, Debug)]
struct Slot {
    id: u64,
    deadline: Deadline,
    max_connections: u32,
    live: bool,
    target: GrantTarget,
}

/// The index of the slot of grant `id` in `slots` (sorted by id). Ids
/// grow by one a grant and gaps are compacted once they are half the
/// slots, so the slot lies near where its id would be if the ids were
/// spread evenly: from that guess, steps doubling in length find the
/// stretch that holds it, then a binary search of that stretch. A few
/// probes where a binary search of a million slots takes twenty, each a
/// cache miss (the reconciliation's lookups spent 60 % of the engine's
/// time there at a million grants, `perf`).
fn position(slots: &[Slot], id: u64) -> Option<usize> {
    let (first, last) = (slots.first()?.id, slots.last()?.id);
    if id < first || id > last {
        return None;
    }
    let spread = u128::from(last - first).max(1);
    let guess = u128::from(id - first) * (slots.len() as u128 - 1) / spread;
    let guess = usize::try_from(guess).expect("at most the last index");
    let (mut lo, mut hi) = (guess, guess + 1);
    let mut step = 1;
    if slots[guess].id < id {
        // Forward: `id` lies past `lo`; `hi` moves until its slot is not before it.
        while hi < slots.len() && slots[hi - 1].id < id {
            lo = hi;
            hi = (hi + step).min(slots.len());
            step *= 2;
        }
    } else {
        // Back: `id` lies before `hi`; `lo` moves until its slot is not after it.
        while lo > 0 && slots[lo].id > id {
            hi = lo;
            lo = lo.saturating_sub(step);
            step *= 2;
        }
    }
    slots[lo..hi]
        .binary_search_by_key(&id, |s| s.id)
        .ok()
        .map(|i| lo + i)
}

/// Compaction waits for at least this many gaps (and half the slots).
const MIN_GAPS_COMPACTED: usize = 1024;

/// The sources granted on one (protocol, port), each with one of its
/// grants; a source with several keeps the others in `more`.
#[derive(Debug, Default)]
struct PortTargets {
    exact_v4: BTreeMap<u32, u64>,
    exact_v6: BTreeMap<u128, u64>,
    prefixes: BTreeMap<IpNet, u64>,
    more: HashMap<IpNet, Vec<u64>>,
    /// Grants on the port (a status asks for it; counting would take a
    /// walk of them all).
    grants: usize,
}

/// A source as `PortTargets` keys it.
enum SourceKey {
    ExactV4(u32),
    ExactV6(u128),
    Prefix(IpNet),
}

impl SourceKey {
    fn of(source: &IpNet) -> SourceKey {
        match source {
            IpNet::V4(net) if net.prefix_len() == 32 => SourceKey::ExactV4(net.addr().to_bits()),
            IpNet::V6(net) if net.prefix_len() == 128 => SourceKey::ExactV6(net.addr().to_bits()),
            net => SourceKey::Prefix(*net),
        }
    }

    /// The order of the kinds in a port's walk.
    fn kind(&self) -> u8 {
        match self {
            SourceKey::ExactV4(_) => 0,
            SourceKey::ExactV6(_) => 1,
            SourceKey::Prefix(_) => 2,
        }
    }
}

fn exact_v4(bits: u32) -> IpNet {
    IpNet::V4(Ipv4Net::from(Ipv4Addr::from_bits(bits)))
}

fn exact_v6(bits: u128) -> IpNet {
    IpNet::V6(Ipv6Net::from(Ipv6Addr::from_bits(bits)))
}

impl PortTargets {
    fn first(&self, source: &IpNet) -> Option<u64> {
        match SourceKey::of(source) {
            SourceKey::ExactV4(bits) => self.exact_v4.get(&bits),
            SourceKey::ExactV6(bits) => self.exact_v6.get(&bits),
            SourceKey::Prefix(net) => self.prefixes.get(&net),
        }
        .copied()
    }

    /// Sets (`Some`) or removes (`None`) the first grant of `source`.
    fn set_first(&mut self, source: &IpNet, id: Option<u64>) {
        let _previous = match (SourceKey::of(source), id) {
            (SourceKey::ExactV4(bits), Some(id)) => self.exact_v4.insert(bits, id),
            (SourceKey::ExactV4(bits), None) => self.exact_v4.remove(&bits),
            (SourceKey::ExactV6(bits), Some(id)) => self.exact_v6.insert(bits, id),
            (SourceKey::ExactV6(bits), None) => self.exact_v6.remove(&bits),
            (SourceKey::Prefix(net), Some(id)) => self.prefixes.insert(net, id),
            (SourceKey::Prefix(net), None) => self.prefixes.remove(&net),
        };
    }

    /// The ids of every grant on `source`.
    fn ids(&self, source: &IpNet) -> impl Iterator<Item = u64> + '_ {
        let more = self.more.get(source).map(Vec::as_slice).unwrap_or_default();
        self.first(source).into_iter().chain(more.iter().copied())
    }

    fn add(&mut self, source: &IpNet, id: u64) {
        self.grants += 1;
        if self.first(source).is_some() {
            self.more.entry(*source).or_default().push(id);
        } else {
            self.set_first(source, Some(id));
        }
    }

    /// Removes grant `id`, which holds `source`.
    fn remove(&mut self, source: &IpNet, id: u64) {
        debug_assert!(self.grants > 0, "removing from a port without grants");
        self.grants = self.grants.saturating_sub(1);
        let first = self.first(source);
        let Some(more) = self.more.get_mut(source) else {
            if first == Some(id) {
                self.set_first(source, None);
            }
            return;
        };
        let next = if first == Some(id) {
            more.pop()
        } else {
            more.retain(|other| *other != id);
            first
        };
        if more.is_empty() {
            self.more.remove(source);
        }
        self.set_first(source, next);
    }

    fn is_empty(&self) -> bool {
        self.exact_v4.is_empty() && self.exact_v6.is_empty() && self.prefixes.is_empty()
    }

    /// The sources after `after` (all if `None`), in the walk's order:
    /// exact IPv4, exact IPv6, then prefixes, each in address order; each
    /// with the first of its grants.
    fn sources_after(&self, after: Option<&IpNet>) -> impl Iterator<Item = (IpNet, u64)> + '_ {
        let after = after.map(SourceKey::of);
        // A cursor of a later kind leaves nothing of the earlier ones.
        let past = |kind: u8| after.as_ref().is_some_and(|key| key.kind() > kind);
        let (mut v4, mut v6, mut prefix) = (Bound::Unbounded, Bound::Unbounded, Bound::Unbounded);
        match after {
            Some(SourceKey::ExactV4(bits)) => v4 = Bound::Excluded(bits),
            Some(SourceKey::ExactV6(bits)) => v6 = Bound::Excluded(bits),
            Some(SourceKey::Prefix(net)) => prefix = Bound::Excluded(net),
            None => {}
        }
        let v4 = (!past(0)).then_some(v4);
        let v6 = (!past(1)).then_some(v6);
        v4.into_iter()
            .flat_map(|start| self.exact_v4.range((start, Bound::Unbounded)))
            .map(|(bits, id)| (exact_v4(*bits), *id))
            .chain(
                v6.into_iter()
                    .flat_map(|start| self.exact_v6.range((start, Bound::Unbounded)))
                    .map(|(bits, id)| (exact_v6(*bits), *id)),
            )
            .chain(
                self.prefixes
                    .range((prefix, Bound::Unbounded))
                    .map(|(net, id)| (*net, *id)),
            )
    }
}

impl FromIterator<ActiveGrant> for ActiveGrants {
    /// Indexes many grants at once (ids in any order: they are sorted
    /// first, where inserting one by one could shift the slots each time).
    fn from_iter<I: IntoIterator<Item = ActiveGrant>>(grants: I) -> Self {
        let mut sorted: Vec<ActiveGrant> = grants.into_iter().collect();
        sorted.sort_unstable_by_key(|g| g.id);
        let mut active = ActiveGrants::default();
        active.slots.reserve_exact(sorted.len());
        for grant in sorted {
            active.insert(grant);
        }
        active
    }
}

impl ActiveGrants {
    pub fn len(&self) -> usize {
        self.slots.len() - self.gaps
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The lowest id of an active grant (ids grow, so most lie above it).
    pub fn lowest_id(&self) -> Option<u64> {
        self.slots.iter().find(|slot| slot.live).map(|slot| slot.id)
    }

    fn slot(&self, id: u64) -> Option<&Slot> {
        let i = position(&self.slots, id)?;
        Some(&self.slots[i]).filter(|s| s.live)
    }

    pub fn get(&self, id: u64) -> Option<ActiveGrant> {
        self.slot(id).map(Slot::active)
    }

    /// Every active grant, by id.
    pub fn iter(&self) -> impl Iterator<Item = ActiveGrant> + '_ {
        self.slots.iter().filter(|s| s.live).map(Slot::active)
    }

    /// Inserts or replaces grant `grant.id`: O(log n) for an id above every
    /// other (a new grant), O(n) for one below that is not indexed (use
    /// `collect` for many).
    pub fn insert(&mut self, grant: ActiveGrant) {
        self.remove_indexed(grant.id);
        let slot = Slot {
            id: grant.id,
            deadline: grant.deadline,
            max_connections: grant.max_connections,
            live: true,
            target: grant.target,
        };
        if self.slots.last().is_none_or(|last| last.id < grant.id) {
            self.slots.push(slot);
        } else {
            match self.slots.binary_search_by_key(&grant.id, |s| s.id) {
                Ok(gap) => {
                    self.slots[gap] = slot;
                    self.gaps -= 1;
                }
                Err(position) => self.slots.insert(position, slot),
            }
        }
        let target = grant.target;
        self.ports
            .entry((target.protocol, target.port))
            .or_default()
            .add(&target.source, grant.id);
        self.by_expiry.insert((grant.deadline, grant.id));
        if grant.max_connections != 0 {
            self.limited.insert(grant.id);
        }
    }

    pub fn remove(&mut self, id: u64) -> Option<ActiveGrant> {
        let grant = self.remove_indexed(id)?;
        self.used_up.remove(&id);
        Some(grant)
    }

    /// Takes grant `id` out of every index but `used_up`.
    fn remove_indexed(&mut self, id: u64) -> Option<ActiveGrant> {
        let i = position(&self.slots, id)?;
        let slot = &mut self.slots[i];
        if !slot.live {
            return None;
        }
        slot.live = false;
        let grant = slot.active();
        self.gaps += 1;
        let target = grant.target;
        let port = (target.protocol, target.port);
        if let Some(targets) = self.ports.get_mut(&port) {
            targets.remove(&target.source, id);
            if targets.is_empty() {
                self.ports.remove(&port);
            }
        }
        self.by_expiry.remove(&(grant.deadline, id));
        self.limited.remove(&id);
        if self.gaps >= MIN_GAPS_COMPACTED && self.gaps * 2 >= self.slots.len() {
            self.slots.retain(|s| s.live);
            self.gaps = 0;
        }
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

    /// The limited grants not yet used up, with their limits.
    pub fn limited_in_use(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.limited
            .iter()
            .filter(|id| !self.used_up.contains(id))
            .filter_map(|id| self.slot(*id))
            .map(|s| (s.id, s.max_connections))
    }

    /// The entry attributed to the best of grants `ids` still able to open
    /// connections: no limit before a limit, then the latest expiry.
    fn attributed(&self, ids: impl Iterator<Item = u64>) -> Option<Entry> {
        ids.filter(|id| !self.used_up.contains(id))
            .filter_map(|id| self.slot(id))
            .map(|s| (s.max_connections == 0, s.deadline, s.id, s.max_connections))
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

    /// How many active grants there are on (`protocol`, `port`).
    pub fn count_on(&self, protocol: Protocol, port: u16) -> usize {
        self.ports.get(&(protocol, port)).map_or(0, |p| p.grants)
    }

    fn port(&self, target: &GrantTarget) -> Option<&PortTargets> {
        self.ports.get(&(target.protocol, target.port))
    }

    /// The prefixes on `target`'s port containing `target`'s source.
    fn covering_prefixes<'a>(
        &'a self,
        target: &'a GrantTarget,
    ) -> impl Iterator<Item = (&'a IpNet, &'a PortTargets)> + 'a {
        self.port(target).into_iter().flat_map(move |port| {
            port.prefixes
                .keys()
                .filter(move |prefix| prefix.contains(&target.source))
                .map(move |prefix| (prefix, port))
        })
    }

    /// Ids of active grants on (protocol, port) covering `source`.
    pub fn covering(&self, target: &GrantTarget) -> Vec<u64> {
        let own = target
            .is_exact()
            .then(|| self.port(target))
            .flatten()
            .into_iter()
            .flat_map(|port| port.ids(&target.source));
        own.chain(
            self.covering_prefixes(target)
                .flat_map(|(prefix, port)| port.ids(prefix)),
        )
        .collect()
    }

    /// The nftables entry for `target`: its own grants only (nftables
    /// matches every covering element, not just the longest prefix).
    pub fn own_entry(&self, target: &GrantTarget) -> Option<Entry> {
        self.attributed(self.port(target)?.ids(&target.source))
    }

    /// `xdp_entry(target)` when an entry attributed to grant `grant_id`
    /// can tell it cheaply: an exact target whose only grant that is (and
    /// not used up), found by id without the port's source B-tree. `None`
    /// for anything else: ask `xdp_entry`.
    pub fn sole_entry(&self, target: &GrantTarget, grant_id: u64) -> Option<Entry> {
        let slot = self.slot(grant_id)?;
        let sole = target.is_exact()
            && slot.target == *target
            && !self.used_up.contains(&grant_id)
            && !self.port(target)?.more.contains_key(&target.source);
        sole.then_some(Entry {
            deadline: slot.deadline,
            grant_id,
            max_connections: slot.max_connections,
        })
    }

    /// The XDP entry for `target`: for an exact source its own grants; for a
    /// prefix also those of broader prefixes covering it on the same port.
    pub fn xdp_entry(&self, target: &GrantTarget) -> Option<Entry> {
        let own = self.own_entry(target);
        if target.is_exact() || own.is_none() {
            return own;
        }
        self.attributed(
            self.covering_prefixes(target)
                .flat_map(|(prefix, port)| port.ids(prefix)),
        )
    }

    /// Targets whose XDP entry depends on grants for `target`: the target
    /// itself and, for a prefix, the narrower prefixes inside it.
    pub fn dependents(&self, target: &GrantTarget) -> Vec<GrantTarget> {
        let mut out = vec![*target];
        if let Some(port) = self.port(target).filter(|_| !target.is_exact()) {
            out.extend(
                port.prefixes
                    .keys()
                    .filter(|prefix| **prefix != target.source && target.source.contains(*prefix))
                    .map(|prefix| GrantTarget {
                        source: *prefix,
                        ..*target
                    }),
            );
        }
        out
    }

    /// Every target with an active grant.
    pub fn targets(&self) -> impl Iterator<Item = GrantTarget> + '_ {
        self.targets_after(None)
    }

    /// The targets with an active grant after `after` (all if `None`), in
    /// the index's order (by port, then exact IPv4, exact IPv6 and prefix
    /// sources): a walk that can stop and resume.
    pub fn targets_after<'a>(
        &'a self,
        after: Option<&'a GrantTarget>,
    ) -> impl Iterator<Item = GrantTarget> + 'a {
        self.first_grants_after(after).map(|(target, _)| target)
    }

    /// `targets_after`, each target with the first of its grants (the one
    /// its entry carries unless it has others: a walk can skip the
    /// lookups of `xdp_entry` for a target noted by that grant).
    pub fn first_grants_after<'a>(
        &'a self,
        after: Option<&'a GrantTarget>,
    ) -> impl Iterator<Item = (GrantTarget, u64)> + 'a {
        let start = after.map_or(Bound::Unbounded, |t| Bound::Included((t.protocol, t.port)));
        self.ports
            .range((start, Bound::Unbounded))
            .flat_map(move |(&(protocol, port), targets)| {
                let resume = after
                    .filter(|t| (t.protocol, t.port) == (protocol, port))
                    .map(|t| &t.source);
                targets.sources_after(resume).map(move |(source, id)| {
                    let target = GrantTarget {
                        source,
                        protocol,
                        port,
                    };
                    (target, id)
                })
            })
    }
}

impl Slot {
    fn active(&self) -> ActiveGrant {
        ActiveGrant {
            id: self.id,
            target: self.target,
            deadline: self.deadline,
            max_connections: self.max_connections,
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn a_sole_entry_is_the_xdp_entry_or_nothing() {
        let mut grants: ActiveGrants = [
            (1, "10.0.0.1/32", 0),
            (2, "10.0.0.2/32", 0),
            (3, "10.0.0.2/32", 0),
            (4, "10.0.0.3/32", 5),
            (5, "10.0.0.0/24", 0),
            (6, "10.0.0.4/32", 0),
        ]
        .into_iter()
        .map(|(id, source, max_connections)| ActiveGrant {
            id,
            target: target(source),
            deadline: at(id),
            max_connections,
        })
        .collect();
        grants.mark_used_up(4);
        grants.remove(6);
        let cases = [
            ("10.0.0.1/32", 1, true),  // its only grant
            ("10.0.0.2/32", 2, false), // one of two
            ("10.0.0.2/32", 3, false),
            ("10.0.0.3/32", 4, false), // used up: no entry
            ("10.0.0.0/24", 5, false), // a prefix
            ("10.0.0.1/32", 2, false), // another target's grant
            ("10.0.0.4/32", 6, false), // ended
            ("10.0.0.9/32", 7, false), // never granted
        ];
        for (source, id, sole) in cases {
            let t = target(source);
            let found = grants.sole_entry(&t, id);
            assert_eq!(found.is_some(), sole, "{source} by grant {id}");
            if let Some(entry) = found {
                assert_eq!(Some(entry), grants.xdp_entry(&t), "{source}");
            }
        }
    }

    #[test]
    fn each_port_counts_its_grants_as_they_come_and_go() {
        let on = |port, protocol| GrantTarget {
            protocol,
            port,
            ..target("10.0.0.1/32")
        };
        let mut grants: ActiveGrants = [
            (1, target("10.0.0.1/32")),
            (2, target("10.0.0.1/32")),
            (3, target("10.0.0.0/24")),
            (4, on(3389, Protocol::Tcp)),
            (5, on(22, Protocol::Udp)),
        ]
        .into_iter()
        .map(|(id, target)| ActiveGrant {
            id,
            target,
            deadline: at(id),
            max_connections: 0,
        })
        .collect();
        let counts = |g: &ActiveGrants| {
            [
                (Protocol::Tcp, 22),
                (Protocol::Tcp, 3389),
                (Protocol::Udp, 22),
                (Protocol::Udp, 3389),
            ]
            .map(|(protocol, port)| g.count_on(protocol, port))
        };
        assert_eq!(counts(&grants), [3, 1, 1, 0]);
        for (id, expected) in [(1, [2, 1, 1, 0]), (4, [2, 0, 1, 0]), (1, [2, 0, 1, 0])] {
            grants.remove(id);
            assert_eq!(counts(&grants), expected, "after removing {id}");
        }
        grants.insert(grant(6, "10.0.0.1/32", 6));
        assert_eq!(counts(&grants), [3, 0, 1, 0]);
        for (protocol, port) in [(Protocol::Tcp, 22), (Protocol::Udp, 22)] {
            let walked = grants
                .iter()
                .filter(|g| (g.target.protocol, g.target.port) == (protocol, port))
                .count();
            assert_eq!(grants.count_on(protocol, port), walked);
        }
    }

    #[test]
    fn a_slot_is_found_by_id_wherever_the_gaps_lie() {
        let mut random = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..200 {
            let len = random.random_range(1..2_000);
            let mut id = random.random_range(0..1_000);
            let slots: Vec<Slot> = (0..len)
                .map(|_| {
                    // Mostly dense, now and then a long run of ids gone.
                    id += if random.random_bool(0.05) {
                        random.random_range(1..100_000)
                    } else {
                        random.random_range(1..3)
                    };
                    Slot {
                        id,
                        deadline: at(1),
                        max_connections: 0,
                        live: true,
                        target: target("192.0.2.1/32"),
                    }
                })
                .collect();
            let last = slots[len - 1].id;
            for probe in (0..=last + 2).step_by(1 + (last / 3_000) as usize) {
                assert_eq!(
                    position(&slots, probe),
                    slots.binary_search_by_key(&probe, |s| s.id).ok(),
                    "round {round}, id {probe}"
                );
            }
            for (i, slot) in slots.iter().enumerate() {
                assert_eq!(position(&slots, slot.id), Some(i), "round {round}");
            }
        }
    }

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
    fn a_grant_costs_one_slot_and_its_sole_target_no_allocation_of_its_own() {
        // What a million grants cost: one slot each, and an exact IPv4
        // source keyed by its address with one grant id beside it.
        assert!(size_of::<Slot>() <= 48, "{}", size_of::<Slot>());
        let mut grants = ActiveGrants::default();
        grants.insert(grant(1, "192.0.2.7/32", 100));
        grants.insert(grant(2, "192.0.2.8/32", 100));
        let port = grants.ports.values().next().unwrap();
        assert_eq!(port.exact_v4.len(), 2);
        assert!(port.more.is_empty() && port.prefixes.is_empty());
    }

    #[test]
    fn removals_leave_gaps_that_are_compacted_without_losing_a_grant() {
        let many = MIN_GAPS_COMPACTED as u64 * 3;
        let mut grants: ActiveGrants = (1..=many)
            .rev()
            .map(|id| grant(id, &format!("10.0.{}.{}/32", id / 256, id % 256), many + id))
            .collect();
        assert_eq!(grants.len(), many as usize);
        for id in (1..=many).filter(|id| id % 3 != 0) {
            assert_eq!(grants.remove(id).map(|g| g.id), Some(id));
        }
        assert!(grants.gaps < MIN_GAPS_COMPACTED, "compacted");
        assert_eq!(grants.len(), many as usize / 3);
        for id in 1..=many {
            assert_eq!(grants.get(id).is_some(), id % 3 == 0, "grant {id}");
        }
        // An id below the others that was never indexed still goes in.
        grants.insert(grant(1, "10.9.9.9/32", 7));
        assert_eq!(grants.get(1), Some(grant(1, "10.9.9.9/32", 7)));
        assert_eq!(grants.due(at(7)), vec![1]);
    }

    #[test]
    fn a_walk_resumes_after_any_kind_of_target_on_any_port() {
        let mut grants = ActiveGrants::default();
        let sources = [
            "198.51.100.0/24",
            "192.0.2.9/32",
            "2001:db8::1/128",
            "2001:db8::/64",
        ];
        let mut id = 0;
        for port in [22, 443] {
            for source in sources {
                id += 1;
                grants.insert(ActiveGrant {
                    target: GrantTarget {
                        port,
                        ..target(source)
                    },
                    ..grant(id, source, 100)
                });
            }
        }
        let all: Vec<GrantTarget> = grants.targets().collect();
        assert_eq!(all.len(), 8);
        for (i, cursor) in all.iter().enumerate() {
            let rest: Vec<GrantTarget> = grants.targets_after(Some(cursor)).collect();
            assert_eq!(rest, all[i + 1..], "after {cursor:?}");
        }
        // A cursor whose target went meanwhile resumes where it was.
        grants.remove(2);
        let rest: Vec<GrantTarget> = grants.targets_after(Some(&all[1])).collect();
        assert_eq!(rest, all[2..]);
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
