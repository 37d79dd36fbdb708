//! The source filter in front of the exact-grant maps (see
//! `jit_gate_common::maps::source_filter`): a source's bit is set before its
//! grant entry is written; bits are cleared only by rebuilding the bitmap
//! from the entries, at open and once removals have left many stale bits.
//! A stale bit costs the program a lookup; a missing one would refuse a
//! granted source, so nothing but a rebuild ever clears one.

use std::net::IpAddr;

use aya::maps::MapError;
use jit_gate_common::{
    family,
    maps::{names, source_filter},
};

use super::{Result, XdpGate, map_err};

/// Removals of exact entries that trigger a rebuild, at least.
const REBUILD_AFTER_REMOVALS: usize = 4_096;

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

impl XdpGate {
    /// Sets the bit of `source`.
    pub(super) fn admit_source(&mut self, source: IpAddr) -> Result<()> {
        let bit = bit_of(source);
        let index = source_filter::word(bit);
        let word = self.filter_word(index)?;
        if word & source_filter::mask(bit) == 0 {
            self.maps
                .source_filter
                .set(index, word | source_filter::mask(bit), 0)
                .map_err(map_err(names::SOURCE_FILTER))?;
        }
        Ok(())
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
    /// other clear. Words are written only where they change, setting bits
    /// before clearing any.
    pub(super) fn rebuild_source_filter(&mut self) -> Result<()> {
        let mut wanted = vec![0u64; source_filter::WORDS as usize];
        let mut sources = Vec::new();
        for key in self.maps.grants_v4.keys() {
            sources.push(IpAddr::from(key.map_err(map_err(names::GRANTS_V4))?.addr));
        }
        for key in self.maps.grants_v6.keys() {
            sources.push(IpAddr::from(key.map_err(map_err(names::GRANTS_V6))?.addr));
        }
        for source in &sources {
            let bit = bit_of(*source);
            wanted[source_filter::word(bit) as usize] |= source_filter::mask(bit);
        }
        for (index, want) in (0..).zip(wanted) {
            let have = self.filter_word(index)?;
            if have != want {
                // A word only ever gains the bits it must keep.
                if have | want != have {
                    self.write_filter_word(index, have | want)?;
                }
                self.write_filter_word(index, want)?;
            }
        }
        self.filter_removals_left = sources.len().max(REBUILD_AFTER_REMOVALS);
        Ok(())
    }

    fn filter_word(&self, index: u32) -> Result<u64> {
        match self.maps.source_filter.get(&index, 0) {
            Ok(word) => Ok(word),
            Err(MapError::KeyNotFound) => Ok(0),
            Err(e) => Err(map_err(names::SOURCE_FILTER)(e)),
        }
    }

    fn write_filter_word(&mut self, index: u32, word: u64) -> Result<()> {
        self.maps
            .source_filter
            .set(index, word, 0)
            .map_err(map_err(names::SOURCE_FILTER))
    }
}
