//! The nftables enforcer: one `inet` table, owned by the agent and touching
//! nothing else, that drops traffic to protected ports unless it belongs to
//! an established connection or comes from a granted source. Defence in
//! depth behind XDP, and the only enforcer where XDP cannot attach.
//!
//! # Design
//!
//! - `protected`: a hash set of `protocol . port`. The input chain jumps to
//!   `gate` for packets to these ports only; other traffic is never touched.
//! - `gate` accepts `ct state established,related`, then tries `allow`, then
//!   counts and drops.
//! - Grants live in hash sets with `flags timeout`, keyed by `masked source
//!   . protocol . port`: one group per (address family, source prefix
//!   length) in use, each of `shards::SHARDS` sets `allow_v4_<len>_<k>`,
//!   the key's `jhash` choosing `k` (so reading a set back, quadratic in
//!   its size in the kernel, stays cheap at a million grants). Each element
//!   carries its own timeout, so the kernel expires it even if the agent is
//!   dead. `allow` has one rule per group, hashing the packet's key and
//!   jumping through the constant map `allow_v4_<len>` to chain
//!   `allow_v4_<len>_<k>`, whose rule accepts what set `k` holds; all of it
//!   is added when the prefix length is first used. A source is allowed if
//!   any live element of any length covers it, so prefixes may overlap
//!   freely (10.0.0.0/16, 10.0.0.0/24 and 10.0.0.5/32 on one port, each
//!   with its own timeout) — which interval sets, rejecting overlapping
//!   elements, could not hold. A packet costs one hash, one map lookup and
//!   one set lookup per prefix length in use.
//! - Every change is one netlink batch, i.e. one kernel transaction: it
//!   applies whole or not at all, and the drop rule is never missing for a
//!   protected port. `install` replaces the table within its batch.
//! - Sources are stored masked to their prefix (`10.0.0.5/24` is kept, and
//!   read back, as `10.0.0.0/24`). Timeouts are whole milliseconds, rounded
//!   up; a zero timeout is refused, because the kernel would read it as
//!   "never expires".
//!
//! Needs Linux 6.3 for `NFT_MSG_DESTROYSETELEM` (removing absent elements
//! is not an error), which also lets `add_allowed` replace an element with
//! its new timeout in one transaction; tested on 6.18. All operations act
//! on the network namespace of the calling thread.

mod elements;
mod keys;
mod netlink;
mod ruleset;
mod sets;
mod shards;
mod structure;

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    fmt, io,
    sync::Mutex,
    time::Duration,
};

use keys::{AllowSet, PROTECTED_SET};
use netlink::{Batch, Socket};
use ruleset::GateTable;
use sets::{ElementOp, Set, c_name};

use crate::net::{GrantTarget, Protocol};

/// The production table name (`table inet jit_gate`).
pub const DEFAULT_TABLE: &str = "jit_gate";

/// What the table enforces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NftState {
    pub protected: BTreeSet<(Protocol, u16)>,
    /// Allowed targets with the time left until the kernel expires each element.
    pub allowed: BTreeMap<GrantTarget, Duration>,
}

/// The table as read back: what it enforces, and the allow-set elements
/// the agent never writes where they lie.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NftRead {
    pub state: NftState,
    pub strays: Vec<StrayElement>,
}

/// The table as one dump saw it: the protected set, the allowed targets
/// sorted (each once: a set holds a key once, and the key spells the
/// set's prefix length), the strays.
#[derive(Debug, Default)]
struct ElementsRead {
    protected: BTreeSet<(Protocol, u16)>,
    allowed: Vec<(GrantTarget, Duration)>,
    strays: Vec<StrayElement>,
}

/// One element of the table as a dump streams it (`NftGate::stream`).
#[derive(Debug)]
pub enum ElementRead {
    /// A port of the protected set.
    Protected((Protocol, u16)),
    /// An element of an allow set, with the time it had left.
    Allowed(GrantTarget, Duration),
    Stray(StrayElement),
}

impl ElementsRead {
    fn into_read(self) -> NftRead {
        NftRead {
            state: NftState {
                protected: self.protected,
                allowed: self.allowed.into_iter().collect(),
            },
            strays: self.strays,
        }
    }
}

/// An allow-set element of a shape the agent never writes (a key it does
/// not parse, a shard its hash does not select, no timeout): someone
/// else's. Reads leave it out of the state, so one such element cannot
/// blind reconciliation, which removes it instead.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct StrayElement {
    set: String,
    key: Vec<u8>,
    /// The grant target the key spells, if it spells one.
    pub target: Option<GrantTarget>,
}

impl fmt::Display for StrayElement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Some(target) => write!(f, "{target} in set {}", self.set),
            None => write!(f, "key {:02x?} in set {}", self.key, self.set),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("invalid nftables table name {0:?}: 1 to 255 bytes, no NUL")]
    InvalidTableName(String),
    #[error("netfilter netlink socket: {what}: {source}")]
    Socket {
        what: &'static str,
        source: io::Error,
    },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("the kernel rejected {what}: {source}")]
    Rejected { what: String, source: io::Error },
    #[error("the kernel did not confirm {what}; the batch may not have been applied")]
    Unconfirmed { what: String },
    #[error("the table kept changing while it was being read")]
    Interrupted,
    #[error("table inet {table} does not exist: install it first")]
    NotInstalled { table: String },
    #[error("{target}: a zero timeout, which the kernel would read as \"never expires\"")]
    ZeroTimeout { target: GrantTarget },
    #[error("table inet {table} holds {what}, which the gate did not write")]
    Unexpected { table: String, what: String },
}

impl NftError {
    /// Whether the kernel said the object does not exist.
    fn is_not_found(&self) -> bool {
        self.rejected_with(libc::ENOENT)
    }

    /// Whether the kernel said an object to create exists already.
    fn is_already_there(&self) -> bool {
        self.rejected_with(libc::EEXIST)
    }

    fn rejected_with(&self, errno: i32) -> bool {
        matches!(self, NftError::Rejected { source, .. } if source.raw_os_error() == Some(errno))
    }
}

type Result<T, E = NftError> = std::result::Result<T, E>;

/// How often a dump starts over when the kernel flags it as interrupted,
/// and how many more dumps `read` takes to find two that agree.
const READ_ATTEMPTS: usize = 3;

/// The agent's nftables table.
pub struct NftGate {
    table: String,
    /// The netlink socket of the last successful call, reused: closing a
    /// netfilter socket waits for an RCU grace period (10-20 ms here).
    socket: Mutex<Option<Socket>>,
    /// The structure `install` creates, for the allow sets it was built
    /// for: building it takes a while, and it rarely changes.
    wanted: Mutex<Option<(Vec<AllowSet>, structure::Structure)>>,
    /// The allow groups the table holds, as this gate last read or wrote
    /// them (`None`: unknown, read on the next write), so that a write
    /// does not first dump the table's sets (65 per group).
    groups: Mutex<Option<BTreeSet<AllowSet>>>,
}

impl Clone for NftGate {
    fn clone(&self) -> Self {
        NftGate::new(self.table.clone())
    }
}

impl fmt::Debug for NftGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NftGate")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

/// A socket lent out of `NftGate::socket` for one call. It goes back only
/// through `done` with a success: after an error, answers may be queued
/// in it, so it is closed instead.
struct Lease<'a> {
    slot: &'a Mutex<Option<Socket>>,
    socket: Socket,
}

impl Lease<'_> {
    fn done<T>(self, result: Result<T>) -> Result<T> {
        if result.is_ok() {
            *self
                .slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(self.socket);
        }
        result
    }
}

impl std::ops::Deref for Lease<'_> {
    type Target = Socket;
    fn deref(&self) -> &Socket {
        &self.socket
    }
}

impl std::ops::DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut Socket {
        &mut self.socket
    }
}

impl NftGate {
    pub fn new(table: impl Into<String>) -> Self {
        NftGate {
            table: table.into(),
            socket: Mutex::new(None),
            wanted: Mutex::new(None),
            groups: Mutex::new(None),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// The name of the set that holds `target` (its group's shard for the
    /// target's key), as `nft` commands name it.
    pub fn set_holding(target: &GrantTarget) -> String {
        let allow = AllowSet::of(target);
        allow.shard_name(shards::shard_of(&AllowSet::key(target)))
    }

    fn open(&self) -> Result<(GateTable, Lease<'_>)> {
        let name = CString::new(self.table.as_str())
            .ok()
            .filter(|n| (1..=255).contains(&n.as_bytes().len()))
            .ok_or_else(|| NftError::InvalidTableName(self.table.clone()))?;
        let cached = self
            .socket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let socket = match cached {
            Some(socket) => socket,
            None => Socket::open()?,
        };
        Ok((
            GateTable::new(&name),
            Lease {
                slot: &self.socket,
                socket,
            },
        ))
    }

    /// Atomically (one netlink batch) replaces the table with exactly
    /// `state`; no instant without the drop rule for protected ports.
    pub fn install(&self, state: &NftState) -> Result<()> {
        let (table, mut socket) = self.open()?;
        let allowed = Allowed::with_timeouts(&table, &state.allowed)?;
        let mut batch = Batch::new();
        table.push_fresh(&mut batch);
        push_protected(&table, &mut batch, &state.protected);
        for set in allowed.sets() {
            table.push_allow_set(&mut batch, set);
        }
        allowed.push(&table, &mut batch, ElementOp::Add);
        let result = socket.commit(batch);
        self.note_groups(result.is_ok().then(|| allowed.sets().collect()));
        socket.done(result)
    }

    /// Atomically changes the protected set, keeping allowed elements.
    pub fn set_protected(&self, protected: &BTreeSet<(Protocol, u16)>) -> Result<()> {
        let (table, mut socket) = self.open()?;
        let mut batch = Batch::new();
        Set::named(table.name(), &c_name(PROTECTED_SET))
            .push_flush(&mut batch, table.what("flush set protected"));
        push_protected(&table, &mut batch, protected);
        let result = socket.commit(batch);
        socket.done(result)
    }

    /// One batch: adds elements, or refreshes the timeout of ones already
    /// present (to the new value, shorter or longer). The same target given
    /// twice keeps its last timeout.
    pub fn add_allowed(&self, entries: &[(GrantTarget, Duration)]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        self.with_known_groups(|table, socket, existing| {
            let existing = existing.ok_or_else(|| NftError::NotInstalled {
                table: self.table.clone(),
            })?;
            let allowed = Allowed::with_timeouts(table, entries.iter().map(|(t, d)| (t, d)))?;
            let created: Vec<AllowSet> = allowed.sets().filter(|s| !existing.contains(s)).collect();
            let batch_of = |ops: &[ElementOp]| {
                let mut batch = Batch::new();
                for &set in &created {
                    table.push_allow_set(&mut batch, set);
                }
                for &op in ops {
                    allowed.push(table, &mut batch, op);
                }
                batch
            };
            // Most elements are new: created alone, they cost the kernel one
            // insert each. If any exists, the transaction fails whole and is
            // sent again replacing them: destroying then adding sets the new
            // timeout on every kernel (a plain re-add only updates it since
            // Linux 6.12; older ones silently keep the old one).
            match socket.commit(batch_of(&[ElementOp::Create])) {
                Err(e) if e.is_already_there() => {
                    socket.commit(batch_of(&[ElementOp::Destroy, ElementOp::Add]))?;
                }
                result => result?,
            }
            Ok(Some(existing.iter().copied().chain(created).collect()))
        })
    }

    /// One batch: removes elements; absent ones (or an absent table) are not
    /// an error.
    pub fn remove_allowed(&self, targets: &[GrantTarget]) -> Result<()> {
        if targets.is_empty() {
            return Ok(());
        }
        self.with_known_groups(|table, socket, existing| {
            let Some(existing) = existing else {
                return Ok(None);
            };
            let mut allowed = Allowed::new(table, targets.iter().map(|t| (*t, None)));
            allowed.0.retain(|(set, _), _| existing.contains(set));
            let mut batch = Batch::new();
            allowed.push(table, &mut batch, ElementOp::Destroy);
            if !batch.is_empty() {
                socket.commit(batch)?;
            }
            Ok(Some(existing.clone()))
        })
    }

    /// Runs a write given the allow groups the table holds (`None`: no
    /// table), which returns the groups it leaves. The groups come from the
    /// cache when known; a write that fails on cached groups is tried once
    /// more on groups read from the kernel, since someone may have changed
    /// the table behind the gate (deleted it, or a group). A failed write
    /// leaves the groups unknown.
    fn with_known_groups(
        &self,
        write: impl Fn(
            &GateTable,
            &mut Socket,
            Option<&BTreeSet<AllowSet>>,
        ) -> Result<Option<BTreeSet<AllowSet>>>,
    ) -> Result<()> {
        let cached = self
            .groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(cached) = cached {
            let (table, mut socket) = self.open()?;
            let result = write(&table, &mut socket, Some(&cached));
            if let Ok(groups) = &result {
                self.note_groups(groups.clone());
                return socket.done(result.map(drop));
            }
            self.note_groups(None);
        }
        let (table, mut socket) = self.open()?;
        let result = allow_sets(&table, &mut socket)
            .and_then(|existing| write(&table, &mut socket, existing.as_ref()));
        self.note_groups(result.as_ref().ok().cloned().flatten());
        socket.done(result.map(drop))
    }

    /// Remembers the allow groups the table holds (`None`: unknown).
    fn note_groups(&self, groups: Option<BTreeSet<AllowSet>>) {
        *self
            .groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = groups;
    }

    /// Removes elements reads found stray (absent ones are ignored).
    pub fn remove_strays(&self, strays: &[StrayElement]) -> Result<()> {
        if strays.is_empty() {
            return Ok(());
        }
        let (table, mut socket) = self.open()?;
        let mut batch = Batch::new();
        for stray in strays {
            let mut set = Set::named(table.name(), &c_name(&stray.set));
            set.add_element(&stray.key, None);
            set.push_elements(
                &mut batch,
                ElementOp::Destroy,
                &table.what(&format!("destroy stray {stray}")),
            );
        }
        let result = socket.commit(batch);
        socket.done(result)
    }

    /// Reads the table back (netlink dump): protected set and live elements
    /// with remaining timeouts; `Ok(None)` if the table does not exist.
    ///
    /// A dump that overlaps the kernel resizing a set's hash table (after
    /// many elements came or went) can miss elements without flagging the
    /// dump as interrupted, so the state is taken from two consecutive
    /// dumps that agree on what the table holds.
    pub fn read(&self) -> Result<Option<NftRead>> {
        let mut previous = self.read_dump()?.map(ElementsRead::into_read);
        for _ in 0..READ_ATTEMPTS {
            let next = self.read_dump()?.map(ElementsRead::into_read);
            if same_contents(previous.as_ref(), next.as_ref()) {
                return Ok(next);
            }
            previous = next;
        }
        Err(NftError::Interrupted)
    }

    /// Reads the table back while the agent may write it, in one dump
    /// (of the protected set and the allow sets named in `only`, if
    /// given): calls `each` with every element as the dump's answers
    /// arrive (an element again if an interrupted dump starts over).
    /// Returns whether the table exists. A dump overlapping a hash resize
    /// can miss elements (see `read`): a caller that finds one missing
    /// reads the set holding it again.
    pub fn stream(
        &self,
        only: Option<&BTreeSet<String>>,
        mut each: impl FnMut(ElementRead),
    ) -> Result<bool> {
        let mut attempts = 1;
        loop {
            // An interrupted dump leaves answers queued: the lease closes
            // that socket and the next attempt opens a fresh one.
            let (table, mut socket) = self.open()?;
            match self.read_once(&table, &mut socket, only, &mut each) {
                Err(NftError::Interrupted) if attempts < READ_ATTEMPTS => attempts += 1,
                result => return socket.done(result),
            }
        }
    }

    /// One dump of the table, sorted, started again if the kernel flags it
    /// as interrupted by a change.
    fn read_dump(&self) -> Result<Option<ElementsRead>> {
        let mut read = ElementsRead::default();
        let exists = self.stream(None, |element| match element {
            ElementRead::Protected(service) => {
                read.protected.insert(service);
            }
            ElementRead::Allowed(target, left) => read.allowed.push((target, left)),
            ElementRead::Stray(stray) => read.strays.push(stray),
        })?;
        read.allowed.sort_unstable_by_key(|(t, _)| *t);
        read.allowed.dedup_by_key(|(t, _)| *t);
        read.strays.sort_unstable();
        read.strays.dedup();
        Ok(exists.then_some(read))
    }

    /// One dump: every element of the table (of the protected set and the
    /// sets in `only`, if given) to `each`; false if the table does not
    /// exist.
    fn read_once(
        &self,
        table: &GateTable,
        socket: &mut Socket,
        only: Option<&BTreeSet<String>>,
        each: &mut impl FnMut(ElementRead),
    ) -> Result<bool> {
        let Some(mut names) = set_names(table, socket)? else {
            return Ok(false);
        };
        if let Some(only) = only {
            names.retain(|name| name == PROTECTED_SET || only.contains(name));
        }
        let unexpected = |what: String| NftError::Unexpected {
            table: self.table.clone(),
            what,
        };
        for name in names {
            if name == PROTECTED_SET {
                let mut unparsed = None;
                dump_elements(
                    table,
                    socket,
                    &name,
                    |key, _| match keys::parse_service_key(key) {
                        Some(service) => each(ElementRead::Protected(service)),
                        None => unparsed = unparsed.take().or_else(|| Some(key.to_vec())),
                    },
                )?;
                if let Some(key) = unparsed {
                    return Err(unexpected(format!("a key {key:?} in set {name}")));
                }
            } else if let Some((set, shard)) = AllowSet::parse_shard_name(&name) {
                dump_elements(table, socket, &name, |key, expires_in| {
                    let target = set.parse_key(key);
                    // A key in a shard its hash does not select is never
                    // looked up there: it grants nothing, but is not ours.
                    let ours = target
                        .zip(expires_in)
                        .filter(|_| shards::shard_of(key) == shard);
                    each(match ours {
                        Some((target, left)) => ElementRead::Allowed(target, left),
                        None => ElementRead::Stray(StrayElement {
                            set: name.clone(),
                            key: key.to_vec(),
                            target,
                        }),
                    });
                })?;
            } else if AllowSet::parse_name(&name).is_none() {
                return Err(unexpected(format!("a set named {name}")));
            }
            // A group's dispatch map is constant once its rule binds it
            // (the kernel refuses element changes): `check_structure`
            // compares it with what `install` creates.
        }
        Ok(true)
    }

    /// What differs between the table's structure in the kernel (table
    /// flags, chains with hooks, priorities and policies, rules by content,
    /// set definitions) and what `install` creates; `None` if nothing does.
    pub fn check_structure(&self) -> Result<Option<String>> {
        let (table, mut socket) = self.open()?;
        let result = structure::Structure::read(&table, &mut socket);
        let have = socket.done(result)?;
        let allow_sets: Vec<AllowSet> = have.allow_sets().collect();
        let mut cached = self
            .wanted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cached.as_ref().is_none_or(|(sets, _)| *sets != allow_sets) {
            let wanted = structure::wanted(&table, allow_sets.iter().copied());
            *cached = Some((allow_sets, wanted));
        }
        let (_, wanted) = cached.as_ref().expect("just filled");
        let differences = have.differences(wanted);
        Ok((!differences.is_empty()).then(|| differences.join("; ")))
    }

    /// Packets and bytes the table dropped since it was installed (its drop
    /// rule's counter); `None` if the table does not exist.
    pub fn dropped(&self) -> Result<Option<(u64, u64)>> {
        let (table, mut socket) = self.open()?;
        let result = structure::drop_counter(&table, &mut socket);
        socket.done(result)
    }

    /// Deletes the table; returns whether it existed.
    pub fn remove(&self) -> Result<bool> {
        let (table, mut socket) = self.open()?;
        let mut batch = Batch::new();
        table.push_delete(&mut batch);
        self.note_groups(None);
        let result = match socket.commit(batch) {
            Ok(()) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        };
        socket.done(result)
    }
}

/// Whether two reads saw the same protected set and the same elements
/// (timeouts count down between them, so they are not compared).
fn same_contents(a: Option<&NftRead>, b: Option<&NftRead>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            a.state.protected == b.state.protected
                && a.state.allowed.keys().eq(b.state.allowed.keys())
                && a.strays == b.strays
        }
        (None, None) => true,
        _ => false,
    }
}

/// Appends the elements of the protected set.
fn push_protected(table: &GateTable, batch: &mut Batch, protected: &BTreeSet<(Protocol, u16)>) {
    let mut set = Set::named(table.name(), &c_name(PROTECTED_SET));
    for &(protocol, port) in protected {
        set.add_element(&keys::service_key(protocol, port), None);
    }
    set.push_elements(
        batch,
        ElementOp::Add,
        &table.what("add elements to set protected"),
    );
}

/// Targets grouped by the shard set that holds them, each group an nftnl
/// set carrying its elements.
struct Allowed(BTreeMap<(AllowSet, u32), Set>);

impl Allowed {
    /// Groups targets, with optional timeouts in milliseconds; a target
    /// given twice keeps the last one.
    fn new(
        table: &GateTable,
        entries: impl IntoIterator<Item = (GrantTarget, Option<u64>)>,
    ) -> Self {
        let unique: BTreeMap<GrantTarget, Option<u64>> = entries
            .into_iter()
            .map(|(target, ms)| {
                let source = target.source.trunc();
                (GrantTarget { source, ..target }, ms)
            })
            .collect();
        let mut sets = BTreeMap::new();
        for (target, timeout_ms) in unique {
            let allow = AllowSet::of(&target);
            let key = AllowSet::key(&target);
            let shard = shards::shard_of(&key);
            sets.entry((allow, shard))
                .or_insert_with(|| Set::named(table.name(), &c_name(&allow.shard_name(shard))))
                .add_element(&key, timeout_ms);
        }
        Allowed(sets)
    }

    fn with_timeouts<'a>(
        table: &GateTable,
        entries: impl IntoIterator<Item = (&'a GrantTarget, &'a Duration)>,
    ) -> Result<Self> {
        let entries = entries
            .into_iter()
            .map(|(&target, &timeout)| Ok((target, Some(timeout_ms(target, timeout)?))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Allowed::new(table, entries))
    }

    /// The allow groups the targets belong to.
    fn sets(&self) -> impl Iterator<Item = AllowSet> + '_ {
        self.0
            .keys()
            .map(|&(allow, _)| allow)
            .collect::<BTreeSet<_>>()
            .into_iter()
    }

    fn push(&self, table: &GateTable, batch: &mut Batch, op: ElementOp) {
        let verb = match op {
            ElementOp::Add | ElementOp::Create => "add elements to",
            ElementOp::Destroy => "destroy elements of",
        };
        for (&(allow, shard), set) in &self.0 {
            set.push_elements(
                batch,
                op,
                &table.what(&format!("{verb} set {}", allow.shard_name(shard))),
            );
        }
    }
}

/// A timeout in whole milliseconds, rounded up so it is never cut short.
fn timeout_ms(target: GrantTarget, timeout: Duration) -> Result<u64> {
    match timeout.as_nanos().div_ceil(1_000_000) {
        0 => Err(NftError::ZeroTimeout { target }),
        ms => Ok(u64::try_from(ms).unwrap_or(u64::MAX)),
    }
}

/// Names of the table's sets; `None` if the table does not exist.
fn set_names(table: &GateTable, socket: &mut Socket) -> Result<Option<Vec<String>>> {
    let request = Set::any_of(table.name());
    let mut names = Vec::new();
    let listed = socket.dump(&table.what("the sets"), &request.list_request(), |msg| {
        let name = Set::parse(msg)
            .and_then(|set| set.name())
            .ok_or_else(|| NftError::Io {
                what: table.what("parsing a set"),
                source: io::ErrorKind::InvalidData.into(),
            })?;
        names.push(name);
        Ok(())
    });
    match listed {
        Ok(()) => Ok(Some(names)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// The table's allow sets; `None` if the table does not exist.
fn allow_sets(table: &GateTable, socket: &mut Socket) -> Result<Option<BTreeSet<AllowSet>>> {
    Ok(set_names(table, socket)?.map(|names| {
        names
            .iter()
            .filter_map(|name| AllowSet::parse_name(name))
            .collect()
    }))
}

/// The live elements of set `name`.
/// Calls `each` with the key and time left of every element of set
/// `name`, as the dump's answers arrive.
fn dump_elements(
    table: &GateTable,
    socket: &mut Socket,
    name: &str,
    mut each: impl FnMut(&[u8], Option<Duration>),
) -> Result<()> {
    let request = Set::named(table.name(), &c_name(name));
    let what = table.what(&format!("the elements of set {name}"));
    socket.dump(&what, &request.elements_request(), |msg| {
        if elements::parse(msg.bytes(), &mut each) {
            Ok(())
        } else {
            Err(NftError::Io {
                what: format!("parsing {what}"),
                source: io::ErrorKind::InvalidData.into(),
            })
        }
    })
}
