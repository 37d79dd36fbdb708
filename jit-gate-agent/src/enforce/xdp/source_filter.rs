//! The source filter in front of the exact-grant maps (see
//! `jit_gate_common::maps::source_filter`), mapped into the agent's memory:
//! a source's bit is set before its grant entry is written; bits are
//! cleared only by rebuilding the bitmap from the entries, at open and once
//! removals have left many stale bits. A stale bit costs the program a
//! lookup; a missing one would refuse a granted source, so nothing but a
//! rebuild ever clears one, and a rebuild sets before it clears.
//! Reconciliation sets again any granted source's bit found missing (the
//! pinned map written behind the agent's back).

use std::{
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{Map, MapData};
use jit_gate_common::{
    family,
    maps::{names, source_filter},
};

use super::{Result, XdpError, XdpGate, map_err};

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
}

impl Drop for SourceFilter {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of that length.
        unsafe { libc::munmap(self.words.as_ptr().cast(), BYTES) };
    }
}

fn bit_of(addr: IpAddr) -> u32 {
    let (bytes, fam) = match addr {
        IpAddr::V4(v4) => {
            let mut bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            (bytes, family::V4)
        }
        IpAddr::V6(v6) => (v6.octets(), family::V6),
    };
    source_filter::bit(&bytes, fam)
}

/// Sets the bit of `source` in a bitmap being built.
fn want(wanted: &mut [u64], source: IpAddr) {
    let bit = bit_of(source);
    wanted[source_filter::word(bit) as usize] |= source_filter::mask(bit);
}

impl XdpGate {
    /// Sets the bit of `source`.
    pub(super) fn admit_source(&mut self, source: IpAddr) {
        let bit = bit_of(source);
        self.source_filter
            .word(source_filter::word(bit))
            .fetch_or(source_filter::mask(bit), Ordering::SeqCst);
    }

    /// Counts the removal of an exact entry; rebuilds the filter once the
    /// removals reach the number of entries it was built from (or a floor),
    /// which keeps the cost of rebuilding constant per removal.
    pub(super) fn source_removed(&mut self) -> Result<()> {
        self.filter_removals_left = self.filter_removals_left.saturating_sub(1);
        if self.filter_removals_left == 0 {
            self.rebuild_source_filter()?;
        }
        Ok(())
    }

    /// Rewrites the filter from the exact entries: their bits set, every
    /// other clear, setting missing bits before clearing stale ones.
    pub(super) fn rebuild_source_filter(&mut self) -> Result<()> {
        let (wanted, sources) = self.wanted_source_bits()?;
        for (index, want) in (0..).zip(wanted) {
            let word = self.source_filter.word(index);
            word.fetch_or(want, Ordering::SeqCst);
            word.store(want, Ordering::SeqCst);
        }
        self.filter_removals_left = sources.max(REBUILD_AFTER_REMOVALS);
        Ok(())
    }

    /// Sets again the bits of `sources` (the granted exact sources, as
    /// read) that are missing from the filter (someone wrote the pinned
    /// map: the program would drop those sources); returns how many bits
    /// were missing. Stale bits are left to the next rebuild: they cost a
    /// lookup, never a grant.
    pub fn repair_source_filter(&mut self, sources: impl Iterator<Item = IpAddr>) -> usize {
        let mut wanted = vec![0u64; source_filter::WORDS as usize];
        for source in sources {
            want(&mut wanted, source);
        }
        let mut missing = 0;
        for (index, want) in (0..).zip(wanted) {
            let word = self.source_filter.word(index);
            let lost = want & !word.load(Ordering::SeqCst);
            if lost != 0 {
                word.fetch_or(lost, Ordering::SeqCst);
                missing += lost.count_ones() as usize;
            }
        }
        missing
    }

    /// The bitmap the exact entries call for, and how many entries there
    /// are.
    fn wanted_source_bits(&self) -> Result<(Vec<u64>, usize)> {
        let mut wanted = vec![0u64; source_filter::WORDS as usize];
        let mut sources = 0;
        let mut note = |source: IpAddr| {
            want(&mut wanted, source);
            sources += 1;
        };
        for key in self.maps.grants_v4.keys() {
            note(IpAddr::from(key.map_err(map_err(names::GRANTS_V4))?.addr));
        }
        for key in self.maps.grants_v6.keys() {
            note(IpAddr::from(key.map_err(map_err(names::GRANTS_V6))?.addr));
        }
        Ok((wanted, sources))
    }
}
