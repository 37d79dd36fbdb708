//! The engine's side of a streamed reconciliation (see `kernel_read`): it
//! compares each chunk the reader sends with the active grants in bounded
//! steps between commands, repairs what differs at once (an entry wrong or
//! without a grant, a stray element), and notes each active target found
//! right (`Seen`). Once the read is complete, a walk of the active targets
//! writes those it did not find. A target the engine writes after the read
//! began is skipped (the read may predate the write, and the write made it
//! right); the next pass checks it.
//!
//! A dump of nftables overlapping a set's hash resize can miss elements
//! without the kernel saying so: a target the first dump did not find is
//! written only if a second dump of the set that should hold it, asked for
//! then, does not find it either.

use std::{
    collections::{BTreeSet, HashSet, VecDeque},
    sync::mpsc,
    time::{Duration, Instant},
};

use super::{
    Layer,
    kernel_read::{CREDITS, Go, KernelRead, KernelReader, NftChunk},
    nft::NftGate,
    reconcile::{NFT_EARLIER_TOLERANCE, NFT_LATER_TOLERANCE, write_xdp_entry},
    seen::Seen,
    xdp::{GrantEntry, XdpGate},
};
use crate::{
    clock::Deadline,
    grants::ActiveGrants,
    net::{GrantTarget, Protocol},
};

/// Entries compared between two looks at the clock.
const CLOCK_EVERY: usize = 256;

/// A layer's reader and the pass it feeds.
pub type Reading = (KernelReader, Pass);

/// One reconciliation of a layer's grant entries, fed by its reader.
pub struct Pass {
    layer: Layer,
    /// To the reader; dropped once the pass needs nothing more of it.
    credits: Option<mpsc::Sender<Go>>,
    /// Parts received and not yet compared, the first perhaps in part.
    queue: VecDeque<KernelRead>,
    /// The next item of the part at the front of the queue.
    next_item: usize,
    phase: Phase,
    seen: Seen,
    /// nftables: the dumps whose end arrived.
    dumps: u8,
    /// nftables: the targets the first dump did not find.
    unfound: Vec<GrantTarget>,
    /// nftables: the ports the table protected, as the last dump saw them.
    protected: Option<BTreeSet<(Protocol, u16)>>,
    /// The engine's time in this pass.
    busy: Duration,
    xdp_written: usize,
    xdp_removed: usize,
    /// Granted exact sources whose bit the source filter had lost.
    xdp_bits_missing: usize,
    nft_written: usize,
    nft_removed: usize,
    /// Stray elements removed, the first of them described.
    nft_strays: Option<(usize, String)>,
}

#[derive(Clone, Copy)]
enum Phase {
    /// Comparing the reader's parts as they come.
    Reading,
    /// The read is complete: walking the active targets after the one
    /// given, for those it did not find.
    Walking(Option<GrantTarget>),
    /// nftables, after the second dump: writing the targets neither dump
    /// found, from this index of `unfound`.
    Writing(usize),
    Done,
}

impl Pass {
    /// A pass over `layer` and the reader that feeds it.
    pub(super) fn new(
        layer: Layer,
        active: &ActiveGrants,
        reader: impl FnOnce(mpsc::Receiver<Go>) -> KernelReader,
    ) -> Reading {
        let (credits, receiver) = mpsc::channel();
        for _ in 0..CREDITS {
            credits.send(Go::Chunk).expect("the receiver is here");
        }
        let pass = Pass {
            layer,
            credits: Some(credits),
            queue: VecDeque::new(),
            next_item: 0,
            phase: Phase::Reading,
            seen: Seen::new(active),
            dumps: 0,
            unfound: Vec::new(),
            protected: None,
            busy: Duration::ZERO,
            xdp_written: 0,
            xdp_removed: 0,
            xdp_bits_missing: 0,
            nft_written: 0,
            nft_removed: 0,
            nft_strays: None,
        };
        (reader(receiver), pass)
    }

    /// Queues a part from the reader.
    pub fn receive(&mut self, read: KernelRead) {
        self.queue.push_back(read);
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Whether a step would do something now (else it waits for the reader).
    pub fn has_work(&self) -> bool {
        match self.phase {
            Phase::Reading => !self.queue.is_empty(),
            Phase::Walking(_) | Phase::Writing(_) => true,
            Phase::Done => false,
        }
    }

    /// The engine's time spent in the pass's steps.
    pub fn busy(&self) -> Duration {
        self.busy
    }

    /// Compares and repairs until `budget` is spent, the pass waits for
    /// the reader, or it is done; targets in `touched` (written since the
    /// read began) are skipped.
    pub(super) fn step(
        &mut self,
        xdp: Option<&mut XdpGate>,
        nft: Option<&NftGate>,
        active: &ActiveGrants,
        touched: &HashSet<GrantTarget>,
        budget: Duration,
    ) -> anyhow::Result<()> {
        let mut gate = match (self.layer, xdp, nft) {
            (Layer::Xdp, Some(xdp), _) => Gate::Xdp(xdp),
            (Layer::Nftables, _, Some(nft)) => Gate::Nft(nft),
            // A layer no longer in use has nothing to compare.
            _ => {
                self.finish();
                return Ok(());
            }
        };
        let clock = Clock {
            started: Instant::now(),
            budget,
        };
        let stepped = (|| {
            while !clock.spent() && self.advance(&mut gate, active, touched, &clock)? {}
            anyhow::Ok(())
        })();
        self.busy += clock.started.elapsed();
        stepped
    }

    /// One stretch of the pass; false when there is nothing to do now.
    fn advance(
        &mut self,
        gate: &mut Gate<'_>,
        active: &ActiveGrants,
        touched: &HashSet<GrantTarget>,
        clock: &Clock,
    ) -> anyhow::Result<bool> {
        match self.phase {
            Phase::Done => return Ok(false),
            Phase::Reading => {
                let part = match self.queue.pop_front() {
                    None => return Ok(false),
                    Some(KernelRead::End(protected)) => {
                        self.read_ended(protected);
                        return Ok(true);
                    }
                    Some(part) => part,
                };
                let whole = match (&part, gate) {
                    (KernelRead::Xdp(entries), Gate::Xdp(xdp)) => {
                        self.compare_xdp(xdp, entries, active, touched, clock)?
                    }
                    (KernelRead::Nft(chunk), Gate::Nft(nft)) => {
                        self.compare_nft(nft, chunk, active, touched, clock)?
                    }
                    _ => anyhow::bail!("the reader sent a part of the other layer"),
                };
                if whole {
                    self.chunk_done();
                } else {
                    self.queue.push_front(part);
                }
            }
            Phase::Walking(mut after) => {
                let (unseen, last) = self.unseen_chunk(&mut after, active, touched);
                self.phase = Phase::Walking(after);
                match gate {
                    Gate::Xdp(xdp) => {
                        self.write_unseen_xdp(xdp, &unseen, active)?;
                        if last {
                            self.finish();
                        }
                    }
                    Gate::Nft(_) => {
                        self.note_unseen_nft(&unseen, active);
                        if last {
                            self.walked_nft();
                        }
                    }
                }
            }
            Phase::Writing(next) => match gate {
                Gate::Nft(nft) => self.write_unfound(nft, next, active, touched)?,
                Gate::Xdp(_) => anyhow::bail!("XDP has no second read"),
            },
        }
        Ok(true)
    }

    /// A read (for nftables, a dump) is complete: the walk follows, or,
    /// after a second dump, the writing of what neither dump found.
    fn read_ended(&mut self, protected: Option<BTreeSet<(Protocol, u16)>>) {
        if protected.is_some() {
            self.protected = protected;
        }
        self.dumps += 1;
        self.phase = if self.dumps == 1 {
            Phase::Walking(None)
        } else {
            Phase::Writing(0)
        };
    }

    /// Writes the XDP entries of the `unseen` targets that the read did
    /// not find right.
    fn write_unseen_xdp(
        &mut self,
        xdp: &mut XdpGate,
        unseen: &[GrantTarget],
        active: &ActiveGrants,
    ) -> anyhow::Result<()> {
        for target in unseen {
            let Some(entry) = active.xdp_entry(target) else {
                continue;
            };
            if !self.seen.contains(target, entry.grant_id) {
                write_xdp_entry(xdp, target, active)?;
                self.xdp_written += 1;
            }
        }
        Ok(())
    }

    /// Notes the `unseen` targets that the first nftables dump did not
    /// find and that should have an element.
    fn note_unseen_nft(&mut self, unseen: &[GrantTarget], active: &ActiveGrants) {
        let now = Deadline::now();
        for target in unseen {
            if let Some(entry) = active.own_entry(target)
                && entry.deadline > now
                && !self.seen.contains(target, entry.grant_id)
            {
                self.unfound.push(*target);
            }
        }
    }

    /// Adds the elements, from index `next` of `unfound` on, that neither
    /// dump found.
    fn write_unfound(
        &mut self,
        nft: &NftGate,
        next: usize,
        active: &ActiveGrants,
        touched: &HashSet<GrantTarget>,
    ) -> anyhow::Result<()> {
        let end = (next + CLOCK_EVERY).min(self.unfound.len());
        let now = Deadline::now();
        let missing: Vec<(GrantTarget, Duration)> = self.unfound[next..end]
            .iter()
            .filter(|t| !touched.contains(*t))
            .filter_map(|target| {
                let entry = active.own_entry(target)?;
                let left = entry.deadline.boot_ns().checked_sub(now.boot_ns())?;
                (left > 0 && !self.seen.contains(target, entry.grant_id))
                    .then(|| (*target, Duration::from_nanos(left)))
            })
            .collect();
        nft.add_allowed(&missing)?;
        self.nft_written += missing.len();
        self.phase = Phase::Writing(end);
        if end == self.unfound.len() {
            self.finish();
        }
        Ok(())
    }

    /// Compares `entries` from `next_item` on; true once all are.
    fn compare_xdp(
        &mut self,
        xdp: &mut XdpGate,
        entries: &[GrantEntry],
        active: &ActiveGrants,
        touched: &HashSet<GrantTarget>,
        clock: &Clock,
    ) -> anyhow::Result<bool> {
        while let Some(kernel) = entries.get(self.next_item) {
            self.next_item += 1;
            // A target written since the read may have lost its entry
            // (and, after a rebuild, its source's bit) on purpose.
            if !touched.contains(&kernel.target) {
                let entry = active
                    .sole_entry(&kernel.target, kernel.grant_id)
                    .or_else(|| active.xdp_entry(&kernel.target));
                match entry {
                    None => {
                        xdp.remove_grant(&kernel.target)?;
                        self.xdp_removed += 1;
                    }
                    Some(entry) => {
                        let right = kernel.grant_id == entry.grant_id
                            && kernel.expires_at_boot_ns == entry.deadline.boot_ns()
                            && kernel.limits.max_opens == entry.max_connections;
                        if !right {
                            write_xdp_entry(xdp, &kernel.target, active)?;
                            self.xdp_written += 1;
                        } else if kernel.target.is_exact() {
                            self.xdp_bits_missing +=
                                xdp.repair_source_bit(kernel.target.source.addr())?;
                        }
                        self.seen.insert(&kernel.target, entry.grant_id);
                    }
                }
            }
            if self.next_item.is_multiple_of(CLOCK_EVERY) && clock.spent() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// After the first dump's walk: done if it found every target, else a
    /// second dump is asked for, of the sets that should hold those it
    /// did not find (one of 64 shards for one missing element).
    fn walked_nft(&mut self) {
        if self.unfound.is_empty() {
            return self.finish();
        }
        self.phase = Phase::Reading;
        if let Some(credits) = &self.credits {
            let sets = self.unfound.iter().map(NftGate::set_holding).collect();
            // A reader gone shows as its channel closed, ending the cycle.
            let _ = credits.send(Go::SecondDump(sets));
            for _ in 0..CREDITS {
                let _ = credits.send(Go::Chunk);
            }
        }
    }

    /// Compares `chunk` from `next_item` on; true once all of it is.
    fn compare_nft(
        &mut self,
        nft: &NftGate,
        chunk: &NftChunk,
        active: &ActiveGrants,
        touched: &HashSet<GrantTarget>,
        clock: &Clock,
    ) -> anyhow::Result<bool> {
        if self.next_item == 0 {
            // Before any missing element is added: a stray may share its
            // key with one of them (an element without a timeout).
            let strays: Vec<_> = chunk
                .strays
                .iter()
                .filter(|s| s.target.is_none_or(|t| !touched.contains(&t)))
                .cloned()
                .collect();
            nft.remove_strays(&strays)?;
            if let Some(first) = strays.first() {
                let (count, _) = self
                    .nft_strays
                    .get_or_insert_with(|| (0, first.to_string()));
                *count += strays.len();
            }
        }
        let now = Deadline::now();
        let (mut stale, mut extra) = (Vec::new(), Vec::new());
        let mut finished = true;
        while let Some((target, have)) = chunk.allowed.get(self.next_item) {
            self.next_item += 1;
            if !touched.contains(target) {
                match active.own_entry(target) {
                    None => extra.push(*target),
                    Some(entry) => {
                        let left = entry.deadline.boot_ns().saturating_sub(now.boot_ns());
                        if left > 0 && !element_fits(chunk, *have, entry.deadline) {
                            stale.push((*target, Duration::from_nanos(left)));
                        }
                        self.seen.insert(target, entry.grant_id);
                    }
                }
            }
            if self.next_item.is_multiple_of(CLOCK_EVERY) && clock.spent() {
                finished = false;
                break;
            }
        }
        nft.add_allowed(&stale)?;
        self.nft_written += stale.len();
        nft.remove_allowed(&extra)?;
        self.nft_removed += extra.len();
        Ok(finished)
    }

    /// Of the next few active targets after `cursor` (moved past them),
    /// those not written since the read began and not noted by their
    /// first grant (the others need a closer look); and whether they were
    /// the last.
    fn unseen_chunk(
        &self,
        cursor: &mut Option<GrantTarget>,
        active: &ActiveGrants,
        touched: &HashSet<GrantTarget>,
    ) -> (Vec<GrantTarget>, bool) {
        let (from, mut walked) = (*cursor, 0);
        let mut unseen = Vec::new();
        for (target, first) in active.first_grants_after(from.as_ref()).take(CLOCK_EVERY) {
            walked += 1;
            *cursor = Some(target);
            if !self.seen.contains(&target, first) && !touched.contains(&target) {
                unseen.push(target);
            }
        }
        (unseen, walked < CLOCK_EVERY)
    }

    /// The part at the front is compared: the reader may send another.
    fn chunk_done(&mut self) {
        self.next_item = 0;
        if let Some(credits) = &self.credits {
            let _ = credits.send(Go::Chunk);
        }
    }

    fn finish(&mut self) {
        self.phase = Phase::Done;
        self.credits = None;
        self.queue.clear();
        self.unfound = Vec::new();
    }

    /// What the pass repaired, per layer (XDP, nftables).
    pub(super) fn repairs(&self) -> (Vec<String>, Option<String>) {
        let entries = (self.xdp_written + self.xdp_removed > 0).then(|| {
            format!(
                "XDP: {} grant entries missing or wrong, {} without a grant",
                self.xdp_written, self.xdp_removed
            )
        });
        let bits = (self.xdp_bits_missing > 0).then(|| {
            format!(
                "XDP: source filter missing {} granted sources' bits; set again",
                self.xdp_bits_missing
            )
        });
        let xdp = entries.into_iter().chain(bits).collect();
        let elements = (self.nft_written + self.nft_removed > 0).then(|| {
            format!(
                "{} elements missing or wrong, {} without a grant",
                self.nft_written, self.nft_removed
            )
        });
        let strays = self
            .nft_strays
            .as_ref()
            .map(|(count, first)| format!("{count} stray elements removed (first: {first})"));
        let nft = match (elements, strays) {
            (None, None) => None,
            (Some(one), None) | (None, Some(one)) => Some(format!("nftables: {one}")),
            (Some(elements), Some(strays)) => Some(format!("nftables: {elements}; {strays}")),
        };
        (xdp, nft)
    }

    /// The ports the nftables table protected when last read.
    pub(super) fn nft_protected(&self) -> Option<&BTreeSet<(Protocol, u16)>> {
        self.protected.as_ref()
    }
}

/// The gate of the layer a pass compares.
enum Gate<'a> {
    Xdp(&'a mut XdpGate),
    Nft(&'a NftGate),
}

/// A step's time: when it started and how long it may take.
struct Clock {
    started: Instant,
    budget: Duration,
}

impl Clock {
    fn spent(&self) -> bool {
        self.started.elapsed() >= self.budget
    }
}

/// Whether an element with `have` left when read ends close enough to
/// `deadline`: it was read at some instant between the chunk's `from` and
/// `until`, so it ends between `from + have` and `until + have`.
fn element_fits(chunk: &NftChunk, have: Duration, deadline: Deadline) -> bool {
    let have = have.as_nanos() as u64;
    let earliest_end = chunk.from.boot_ns().saturating_add(have);
    let latest_end = chunk.until.boot_ns().saturating_add(have);
    let deadline = deadline.boot_ns();
    earliest_end <= deadline.saturating_add(NFT_LATER_TOLERANCE.as_nanos() as u64)
        && latest_end.saturating_add(NFT_EARLIER_TOLERANCE.as_nanos() as u64) >= deadline
}
