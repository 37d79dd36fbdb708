//! The source filter in front of the exact-grant maps (see
//! `jit_gate_common::maps::source_filter`), mapped into the agent's memory:
//! a source's bit is set before its grant entry is written. A rebuild
//! writes the bitmap, sized to the entries, into the region not in use and
//! then switches the shape word, so the program never sees a partial one;
//! it happens at open, when the entries outgrow the bitmap, and once
//! removals have left many stale bits. A stale bit costs the program a
//! lookup; a missing one would refuse a granted source, so nothing but a
//! rebuild ever clears one. Reconciliation sets again any granted source's
//! bit found missing, and rebuilds a shape word found scribbled over (the
//! pinned map written behind the agent's back).

use std::{
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{IterableMap, Map, MapData};
use jit_gate_common::maps::{
    GrantKeyV4, GrantKeyV6, names,
    source_filter::{self, Shape},
};

use super::{Result, XdpError, XdpGate, reader::lookup_batches};
use crate::net::map_address;

/// Removals of exact entries that trigger a rebuild, at least.
const REBUILD_AFTER_REMOVALS: usize = 4_096;
const BYTES: usize = source_filter::WORDS as usize * 8;

/// The bitmap array, mapped shared with the kernel.
pub(super) struct SourceFilter {
    words: NonNull<AtomicU64>,
    /// Keeps the map (and so the mapping's object) alive.
    _map: MapData,
}

// SAFETY: the mapping is plain shared memory, accessed only through atomics.
unsafe impl Send for SourceFilter {}

impl SourceFilter {
    pub(super) fn map(map: Map) -> Result<Self> {
        let Map::Array(map) = map else {
            return Err(XdpError::MissingMap(names::SOURCE_FILTER));
        };
        // SAFETY: a shared read-write mapping of the whole array of a
        // BPF_F_MMAPABLE map; the kernel keeps it valid until munmap.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(XdpError::MapMemory {
                map: names::SOURCE_FILTER,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(SourceFilter {
            words: NonNull::new(ptr.cast()).expect("mmap returned a mapping"),
            _map: map,
        })
    }

    fn word(&self, index: u32) -> &AtomicU64 {
        assert!(index < source_filter::WORDS);
        // SAFETY: within the mapping, which lives as long as `self`.
        unsafe { &*self.words.as_ptr().add(index as usize) }
    }

    /// The bitmap in use; none if the shape word does not decode.
    fn shape(&self) -> Option<Shape> {
        Shape::decode(self.word(source_filter::SHAPE_WORD).load(Ordering::SeqCst))
    }

    /// Writes `bits` (a bitmap of `shape`) into its region, then makes it
    /// the one in use.
    fn install(&self, shape: Shape, bits: &[u64]) {
        for (index, want) in (0..).zip(bits) {
            self.word(shape.word_index(index * 64))
                .store(*want, Ordering::SeqCst);
        }
        self.word(source_filter::SHAPE_WORD)
            .store(shape.encode(), Ordering::SeqCst);
    }
}

impl Drop for SourceFilter {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of that length.
        unsafe { libc::munmap(self.words.as_ptr().cast(), BYTES) };
    }
}

fn hash_of(addr: IpAddr) -> u32 {
    let address = map_address(addr);
    source_filter::hash(&address.bytes, address.family)
}

/// The bitmap of `shape` with the bits of `sources` set.
fn bitmap(shape: Shape, sources: &[IpAddr]) -> Vec<u64> {
    let mut bits = vec![0u64; shape.words() as usize];
    for source in sources {
        let bit = shape.bit(hash_of(*source));
        bits[(bit >> 6) as usize] |= source_filter::mask(bit);
    }
    bits
}

impl XdpGate {
    /// Sets the bit of `source`, whose exact entry is about to be written;
    /// rebuilds the filter at a larger size first if the entries outgrow it.
    pub(super) fn admit_source(&mut self, source: IpAddr) -> Result<()> {
        self.filter_entries += 1;
        match self.source_filter.shape() {
            Some(shape)
                if Shape::for_entries(self.filter_entries, shape.region).bits_log2
                    <= shape.bits_log2 =>
            {
                let bit = shape.bit(hash_of(source));
                self.source_filter
                    .word(shape.word_index(bit))
                    .fetch_or(source_filter::mask(bit), Ordering::SeqCst);
                Ok(())
            }
            _ => self.rebuild_source_filter_with(Some(source)),
        }
    }

    /// Counts the removal of an exact entry; rebuilds the filter once the
    /// removals reach the number of entries it was built from (or a floor),
    /// which keeps the cost of rebuilding constant per removal.
    pub(super) fn source_removed(&mut self) -> Result<()> {
        self.filter_entries = self.filter_entries.saturating_sub(1);
        self.filter_removals_left = self.filter_removals_left.saturating_sub(1);
        if self.filter_removals_left == 0 {
            self.rebuild_source_filter()?;
        }
        Ok(())
    }

    /// Rewrites the filter from the exact entries, sized to them.
    pub(super) fn rebuild_source_filter(&mut self) -> Result<()> {
        self.rebuild_source_filter_with(None)
    }

    /// Rewrites the filter from the exact entries and `extra` (an entry
    /// about to be written), in the region not in use, and switches to it.
    fn rebuild_source_filter_with(&mut self, extra: Option<IpAddr>) -> Result<()> {
        let mut sources = self.exact_sources()?;
        sources.extend(extra);
        let entries = sources.len() as u64;
        let shape = match self.source_filter.shape() {
            Some(current) => current.next(entries),
            None => Shape::for_entries(entries, 0),
        };
        self.source_filter.install(shape, &bitmap(shape, &sources));
        self.filter_entries = entries;
        self.filter_removals_left = sources.len().max(REBUILD_AFTER_REMOVALS);
        Ok(())
    }

    /// Sets again the bit of `source` (a granted exact source, as read)
    /// if it is missing from the filter (someone wrote the pinned map: the
    /// program would drop that source), and rebuilds a filter whose shape
    /// word no longer decodes (the program then looks every source up);
    /// returns how many granted sources' bits were missing: 0 or 1, or
    /// every exact entry's after a rebuild. Called per entry as
    /// reconciliation walks them, so no step checks them all at once.
    /// Stale bits are left to the next rebuild: they cost a lookup, never
    /// a grant.
    pub fn repair_source_bit(&mut self, source: IpAddr) -> Result<usize> {
        let Some(shape) = self.source_filter.shape() else {
            self.rebuild_source_filter()?;
            return Ok(usize::try_from(self.filter_entries).unwrap_or(usize::MAX));
        };
        let bit = shape.bit(hash_of(source));
        let mask = source_filter::mask(bit);
        let word = self.source_filter.word(shape.word_index(bit));
        if word.load(Ordering::SeqCst) & mask != 0 {
            return Ok(0);
        }
        word.fetch_or(mask, Ordering::SeqCst);
        Ok(1)
    }

    /// The source of every exact entry, read in batches (a million
    /// entries read key by key take seconds of the engine's time).
    fn exact_sources(&self) -> Result<Vec<IpAddr>> {
        let mut sources = Vec::new();
        lookup_batches::<GrantKeyV4>(self.maps.grants_v4.map(), names::GRANTS_V4, |key, _| {
            sources.push(IpAddr::from(key.addr));
        })?;
        lookup_batches::<GrantKeyV6>(self.maps.grants_v6.map(), names::GRANTS_V6, |key, _| {
            sources.push(IpAddr::from(key.addr));
        })?;
        Ok(sources)
    }
}
