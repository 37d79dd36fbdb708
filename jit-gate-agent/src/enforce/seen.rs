//! The active targets a streamed reconciliation found right in the kernel
//! (`compare::Pass`), so that its closing walk writes only the others. A
//! set of targets would cost tens of megabytes at a million grants; an
//! exact source's target is noted instead by the id of the grant its entry
//! is attributed to (a grant names one target), one bit in a range that
//! starts at the lowest active id: ids grow, so the range is dense. Ids
//! past the range (grants newer than the pass, which writes them anyway)
//! and prefixes (a prefix's XDP entry may carry a broader prefix's grant,
//! so the id does not name it; there are at most 65,536) are kept apart.

use std::collections::HashSet;

use fixedbitset::FixedBitSet;

use crate::{grants::ActiveGrants, net::GrantTarget};

/// Bits in the range per active grant: room for ids left unused by grants
/// that have ended, however many.
const BITS_PER_GRANT: usize = 8;

/// The smallest range, so that a pass over few grants needs no spill.
const MIN_BITS: usize = 1024;

pub(super) struct Seen {
    base: u64,
    bits: FixedBitSet,
    far: HashSet<u64>,
    prefixes: HashSet<GrantTarget>,
}

impl Seen {
    pub(super) fn new(active: &ActiveGrants) -> Seen {
        Seen {
            base: active.lowest_id().unwrap_or(0),
            bits: FixedBitSet::with_capacity(
                active.len().saturating_mul(BITS_PER_GRANT).max(MIN_BITS),
            ),
            far: HashSet::new(),
            prefixes: HashSet::new(),
        }
    }

    /// Notes `target`, whose entry is attributed to grant `grant_id`.
    pub(super) fn insert(&mut self, target: &GrantTarget, grant_id: u64) {
        if !target.is_exact() {
            self.prefixes.insert(*target);
        } else if let Some(bit) = self.bit(grant_id) {
            self.bits.insert(bit);
        } else {
            self.far.insert(grant_id);
        }
    }

    pub(super) fn contains(&self, target: &GrantTarget, grant_id: u64) -> bool {
        if !target.is_exact() {
            self.prefixes.contains(target)
        } else if let Some(bit) = self.bit(grant_id) {
            self.bits.contains(bit)
        } else {
            self.far.contains(&grant_id)
        }
    }

    fn bit(&self, grant_id: u64) -> Option<usize> {
        grant_id
            .checked_sub(self.base)
            .and_then(|offset| usize::try_from(offset).ok())
            .filter(|&offset| offset < self.bits.len())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{clock::Deadline, grants::ActiveGrant, net::Protocol};

    fn target(source: &str) -> GrantTarget {
        GrantTarget {
            source: source.parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 22,
        }
    }

    fn active(ids: &[u64]) -> ActiveGrants {
        ids.iter()
            .map(|&id| ActiveGrant {
                id,
                target: target(&format!("10.0.{}.{}/32", id / 256, id % 256)),
                deadline: Deadline::after(Duration::from_mins(1)),
                max_connections: 0,
            })
            .collect()
    }

    #[test]
    fn exact_targets_are_noted_by_grant_id_in_range_and_beyond() {
        let mut seen = Seen::new(&active(&[500, 501, 502]));
        let exact = target("10.0.0.1/32");
        for id in [
            500,
            500 + MIN_BITS as u64 - 1,
            500 + MIN_BITS as u64,
            u64::MAX,
        ] {
            assert!(!seen.contains(&exact, id));
            seen.insert(&exact, id);
            assert!(seen.contains(&exact, id), "id {id}");
        }
        // Below the lowest active id: kept apart too.
        seen.insert(&exact, 3);
        assert!(seen.contains(&exact, 3));
        assert!(!seen.contains(&exact, 501));
        assert_eq!(seen.far.len(), 3);
    }

    #[test]
    fn prefixes_are_noted_by_target_not_by_the_grant_they_carry() {
        let mut seen = Seen::new(&active(&[1]));
        seen.insert(&target("10.0.0.0/16"), 1);
        assert!(seen.contains(&target("10.0.0.0/16"), 1));
        // A narrower prefix whose entry carries the same (broader) grant.
        assert!(!seen.contains(&target("10.0.1.0/24"), 1));
        assert!(!seen.contains(&target("10.0.0.1/32"), 1));
    }
}
