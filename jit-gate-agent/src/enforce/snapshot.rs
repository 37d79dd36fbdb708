//! Reconciling the grant entries without making the engine wait for the
//! kernel: a `KernelReader` (the grant maps' duplicated descriptors, a
//! netlink socket of its own) reads every layer's entries on another
//! thread into a `KernelSnapshot`; the engine then compares the snapshot
//! with the active grants in bounded steps (`Pass::step`) between
//! commands, and repairs what differs. A target the engine writes after
//! the read began is skipped (the snapshot may predate the write, and the
//! write made it right); the next pass checks it.

use std::{
    collections::{BTreeSet, HashSet},
    time::{Duration, Instant},
};

use super::{
    nft::{NftGate, StrayElement},
    reconcile::{NFT_EARLIER_TOLERANCE, NFT_LATER_TOLERANCE, write_xdp_entry},
    xdp::{GrantEntry, GrantReader, XdpGate},
};
use crate::{
    clock::Deadline,
    grants::ActiveGrants,
    net::{GrantTarget, Protocol},
};

/// Entries compared between two looks at the clock.
const CLOCK_EVERY: usize = 256;

/// Reads what reconciliation compares, on any thread.
pub struct KernelReader {
    xdp: Option<GrantReader>,
    nft: Option<NftGate>,
}

/// Grant entries of one layer or more, each sorted by target.
pub struct KernelSnapshot {
    xdp: Option<Vec<GrantEntry>>,
    nft: Option<NftElements>,
}

/// The nftables elements with the time each had left, read (two dumps
/// merged) between `from` and `until` on the boot clock.
struct NftElements {
    protected: BTreeSet<(Protocol, u16)>,
    allowed: Vec<(GrantTarget, Duration)>,
    strays: Vec<StrayElement>,
    from: Deadline,
    until: Deadline,
}

impl KernelReader {
    pub(super) fn new(xdp: Option<&XdpGate>, nft: Option<&NftGate>) -> anyhow::Result<Self> {
        Ok(KernelReader {
            xdp: xdp.map(XdpGate::grant_reader).transpose()?,
            nft: nft.cloned(),
        })
    }

    /// How many snapshots `read` makes: one per layer in use.
    pub fn parts(&self) -> usize {
        usize::from(self.xdp.is_some()) + usize::from(self.nft.is_some())
    }

    /// Reads each layer it holds into a snapshot of its own (a
    /// reconciliation cycle's reader holds one layer: see `Layer`).
    pub fn read(&self, mut each: impl FnMut(anyhow::Result<KernelSnapshot>)) {
        if let Some(reader) = &self.xdp {
            each(reader.entries().map_err(Into::into).map(|mut entries| {
                entries.sort_unstable_by_key(|e| e.target);
                KernelSnapshot {
                    xdp: Some(entries),
                    nft: None,
                }
            }));
        }
        if let Some(nft) = &self.nft {
            each(read_nft(nft).map(|elements| KernelSnapshot {
                xdp: None,
                nft: Some(elements),
            }));
        }
    }
}

fn read_nft(nft: &NftGate) -> anyhow::Result<NftElements> {
    let from = Deadline::now();
    let read = nft
        .read_merged()?
        .ok_or_else(|| anyhow::anyhow!("table {} vanished while read", nft.table()))?;
    Ok(NftElements {
        protected: read.protected,
        allowed: read.allowed,
        strays: read.strays,
        from,
        until: Deadline::now(),
    })
}

/// Where a pass stands: each layer's two walks (active targets against
/// the snapshot, then the snapshot against the active targets).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Walk {
    XdpGranted,
    XdpKernel,
    NftGranted,
    NftKernel,
    Done,
}

/// One comparison of a snapshot with the active grants, in steps.
pub struct Pass {
    snapshot: KernelSnapshot,
    walk: Walk,
    /// The last active target compared in the current walk.
    after_target: Option<GrantTarget>,
    /// The next snapshot entry to compare in the current walk.
    next_entry: usize,
    xdp_written: usize,
    xdp_removed: usize,
    /// Granted exact sources whose bit the source filter had lost.
    xdp_bits_missing: usize,
    nft_written: usize,
    nft_removed: usize,
    /// Stray elements removed, the first of them described.
    nft_strays: Option<(usize, String)>,
}

impl Pass {
    pub fn new(snapshot: KernelSnapshot) -> Pass {
        let walk = if snapshot.xdp.is_some() {
            Walk::XdpGranted
        } else if snapshot.nft.is_some() {
            Walk::NftGranted
        } else {
            Walk::Done
        };
        Pass {
            snapshot,
            walk,
            after_target: None,
            next_entry: 0,
            xdp_written: 0,
            xdp_removed: 0,
            xdp_bits_missing: 0,
            nft_written: 0,
            nft_removed: 0,
            nft_strays: None,
        }
    }

    pub fn is_done(&self) -> bool {
        self.walk == Walk::Done
    }

    fn next_walk(&mut self) {
        self.walk = match self.walk {
            Walk::XdpGranted => Walk::XdpKernel,
            Walk::XdpKernel if self.snapshot.nft.is_some() => Walk::NftGranted,
            Walk::NftGranted => Walk::NftKernel,
            _ => Walk::Done,
        };
        self.after_target = None;
        self.next_entry = 0;
    }

    /// Compares and repairs until `budget` is spent or the pass is done;
    /// targets in `touched` (written since the read began) are skipped.
    pub(super) fn step(
        &mut self,
        mut xdp: Option<&mut XdpGate>,
        nft: Option<&NftGate>,
        active: &ActiveGrants,
        touched: &HashSet<GrantTarget>,
        budget: Duration,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        while !self.is_done() {
            let finished = match self.walk {
                Walk::XdpGranted | Walk::XdpKernel => match xdp.as_deref_mut() {
                    Some(gate) => self.xdp_step(gate, active, touched, started, budget)?,
                    None => true,
                },
                Walk::NftGranted | Walk::NftKernel => match nft {
                    Some(gate) => self.nft_step(gate, active, touched, started, budget)?,
                    None => true,
                },
                Walk::Done => true,
            };
            if finished {
                self.next_walk();
            } else {
                return Ok(());
            }
        }
        Ok(())
    }

    fn xdp_step(
        &mut self,
        xdp: &mut XdpGate,
        active: &ActiveGrants,
        touched: &HashSet<GrantTarget>,
        started: Instant,
        budget: Duration,
    ) -> anyhow::Result<bool> {
        let entries = self.snapshot.xdp.as_deref().unwrap_or_default();
        if self.walk == Walk::XdpGranted {
            loop {
                let (chunk, last) = granted_chunk(&mut self.after_target, active);
                for target in chunk.iter().filter(|t| !touched.contains(*t)) {
                    let Some(entry) = active.xdp_entry(target) else {
                        continue;
                    };
                    let kernel = entries
                        .binary_search_by_key(target, |e| e.target)
                        .ok()
                        .map(|i| &entries[i]);
                    let right = kernel.is_some_and(|k| {
                        k.grant_id == entry.grant_id
                            && k.expires_at_boot_ns == entry.deadline.boot_ns()
                            && k.limits.max_opens == entry.max_connections
                    });
                    if !right {
                        write_xdp_entry(xdp, target, active)?;
                        self.xdp_written += 1;
                    }
                }
                if last || started.elapsed() >= budget {
                    return Ok(last);
                }
            }
        }
        while let Some(entry) = entries.get(self.next_entry) {
            self.next_entry += 1;
            // A target written since the read may have lost its entry
            // (and, after a rebuild, its source's bit) on purpose.
            if !touched.contains(&entry.target) {
                if active.xdp_entry(&entry.target).is_none() {
                    xdp.remove_grant(&entry.target)?;
                    self.xdp_removed += 1;
                } else if entry.target.is_exact() {
                    self.xdp_bits_missing += xdp.repair_source_bit(entry.target.source.addr())?;
                }
            }
            if self.next_entry.is_multiple_of(CLOCK_EVERY) && started.elapsed() >= budget {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn nft_step(
        &mut self,
        nft: &NftGate,
        active: &ActiveGrants,
        touched: &HashSet<GrantTarget>,
        started: Instant,
        budget: Duration,
    ) -> anyhow::Result<bool> {
        let Some(elements) = &self.snapshot.nft else {
            return Ok(true);
        };
        let now = Deadline::now();
        if self.walk == Walk::NftGranted && self.after_target.is_none() {
            // Before the missing elements are added: a stray may share
            // its key with one of them (an element without a timeout).
            let strays: Vec<StrayElement> = elements
                .strays
                .iter()
                .filter(|s| s.target.is_none_or(|t| !touched.contains(&t)))
                .cloned()
                .collect();
            nft.remove_strays(&strays)?;
            if let Some(first) = strays.first() {
                self.nft_strays = Some((strays.len(), first.to_string()));
            }
        }
        if self.walk == Walk::NftGranted {
            let mut stale = Vec::new();
            let last = loop {
                let (chunk, last) = granted_chunk(&mut self.after_target, active);
                for target in chunk.iter().filter(|t| !touched.contains(*t)) {
                    let Some(deadline) = active.own_entry(target).map(|e| e.deadline) else {
                        continue;
                    };
                    let have = elements
                        .allowed
                        .binary_search_by_key(target, |(t, _)| *t)
                        .ok()
                        .map(|i| elements.allowed[i].1);
                    let left = deadline.boot_ns().saturating_sub(now.boot_ns());
                    if left > 0 && !have.is_some_and(|have| element_fits(elements, have, deadline))
                    {
                        stale.push((*target, Duration::from_nanos(left)));
                    }
                }
                if last || started.elapsed() >= budget {
                    break last;
                }
            };
            nft.add_allowed(&stale)?;
            self.nft_written += stale.len();
            return Ok(last);
        }
        let mut extra = Vec::new();
        let mut finished = true;
        while let Some((target, _)) = elements.allowed.get(self.next_entry) {
            self.next_entry += 1;
            if !touched.contains(target) && active.own_entry(target).is_none() {
                extra.push(*target);
            }
            if self.next_entry.is_multiple_of(CLOCK_EVERY) && started.elapsed() >= budget {
                finished = false;
                break;
            }
        }
        nft.remove_allowed(&extra)?;
        self.nft_removed += extra.len();
        Ok(finished)
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

    /// The ports the nftables table protected when read.
    pub(super) fn nft_protected(&self) -> Option<&BTreeSet<(Protocol, u16)>> {
        self.snapshot.nft.as_ref().map(|n| &n.protected)
    }
}

/// The next few active targets after `cursor` (moved past them), and
/// whether they are the last.
fn granted_chunk(
    cursor: &mut Option<GrantTarget>,
    active: &ActiveGrants,
) -> (Vec<GrantTarget>, bool) {
    let chunk: Vec<_> = active
        .targets_after(cursor.as_ref())
        .take(CLOCK_EVERY)
        .collect();
    *cursor = chunk.last().copied();
    let last = chunk.len() < CLOCK_EVERY;
    (chunk, last)
}

/// Whether an element with `have` left when read ends close enough to
/// `deadline`: it was read at some instant between the dump's start and
/// end, so it ends between `from + have` and `until + have`.
fn element_fits(elements: &NftElements, have: Duration, deadline: Deadline) -> bool {
    let have = have.as_nanos() as u64;
    let earliest_end = elements.from.boot_ns().saturating_add(have);
    let latest_end = elements.until.boot_ns().saturating_add(have);
    let deadline = deadline.boot_ns();
    earliest_end <= deadline.saturating_add(NFT_LATER_TOLERANCE.as_nanos() as u64)
        && latest_end.saturating_add(NFT_EARLIER_TOLERANCE.as_nanos() as u64) >= deadline
}
