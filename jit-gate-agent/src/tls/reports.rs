//! Refused TLS clients reported without letting them flood anything: per
//! reason at most one log line every `LOG_EVERY`, per (principal, reason)
//! at most one audit record every `AUDIT_EVERY`, each carrying the count of
//! the refusals it stands for; the table of principals is bounded.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

const LOG_EVERY: Duration = Duration::from_secs(10);
const AUDIT_EVERY: Duration = Duration::from_mins(1);
/// Principals tracked at once; a certificate beyond them is logged only.
const MAX_AUDITED: usize = 1024;

struct Slot {
    last: Instant,
    suppressed: u64,
}

/// Admits a report for `key` if none was made within `every`; returns the
/// number of refusals since the last report that were not reported.
fn admit<K: std::hash::Hash + Eq>(
    slots: &mut HashMap<K, Slot>,
    key: K,
    every: Duration,
    now: Instant,
) -> Option<u64> {
    match slots.get_mut(&key) {
        Some(slot) if now.duration_since(slot.last) < every => {
            slot.suppressed += 1;
            None
        }
        Some(slot) => {
            let suppressed = std::mem::take(&mut slot.suppressed);
            slot.last = now;
            Some(suppressed)
        }
        None => {
            slots.insert(
                key,
                Slot {
                    last: now,
                    suppressed: 0,
                },
            );
            Some(0)
        }
    }
}

#[derive(Default)]
pub(super) struct Reports {
    logged: HashMap<&'static str, Slot>,
    audited: HashMap<(String, &'static str), Slot>,
}

impl Reports {
    /// Whether to log a refusal of kind `code` now; `Some(n)`: yes, and `n`
    /// similar ones went unlogged since the last line.
    pub(super) fn log(&mut self, code: &'static str, now: Instant) -> Option<u64> {
        admit(&mut self.logged, code, LOG_EVERY, now)
    }

    /// Whether to audit a refusal of kind `code` for `principal` now.
    pub(super) fn audit(
        &mut self,
        principal: &str,
        code: &'static str,
        now: Instant,
    ) -> Option<u64> {
        if self.audited.len() >= MAX_AUDITED {
            self.audited
                .retain(|_, slot| now.duration_since(slot.last) < AUDIT_EVERY);
            if self.audited.len() >= MAX_AUDITED
                && !self.audited.contains_key(&(principal.to_owned(), code))
            {
                return None;
            }
        }
        admit(
            &mut self.audited,
            (principal.to_owned(), code),
            AUDIT_EVERY,
            now,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_report_per_interval_with_the_count_of_the_others() {
        let mut reports = Reports::default();
        let start = Instant::now();
        assert_eq!(reports.audit("uri:a", "expired", start), Some(0));
        assert_eq!(reports.audit("uri:a", "expired", start), None);
        assert_eq!(reports.audit("uri:a", "expired", start), None);
        // Another principal or reason has its own interval.
        assert_eq!(reports.audit("uri:b", "expired", start), Some(0));
        assert_eq!(reports.audit("uri:a", "revoked", start), Some(0));
        assert_eq!(
            reports.audit("uri:a", "expired", start + AUDIT_EVERY),
            Some(2)
        );
        assert_eq!(reports.log("handshake", start), Some(0));
        assert_eq!(reports.log("handshake", start + LOG_EVERY / 2), None);
        assert_eq!(reports.log("handshake", start + LOG_EVERY), Some(1));
    }

    #[test]
    fn the_principal_table_is_bounded() {
        let mut reports = Reports::default();
        let start = Instant::now();
        for i in 0..MAX_AUDITED {
            assert_eq!(
                reports.audit(&format!("uri:{i}"), "revoked", start),
                Some(0)
            );
        }
        assert_eq!(reports.audit("uri:new", "revoked", start), None);
        assert_eq!(reports.audit("uri:0", "revoked", start), None);
        // Once the old entries are stale, they make room.
        let later = start + AUDIT_EVERY;
        assert_eq!(reports.audit("uri:new", "revoked", later), Some(0));
        assert_eq!(reports.audited.len(), 1);
    }
}
