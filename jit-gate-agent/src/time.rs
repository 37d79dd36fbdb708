//! Wall-clock instants as the store, the audit log and the API carry them:
//! whole milliseconds since the Unix epoch (boot-time deadlines are in
//! `clock`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the epoch (negative before it), saturating.
pub fn to_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

pub fn from_ms(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

/// `t` at the store's millisecond precision, so memory and disk agree.
pub fn truncate_ms(t: SystemTime) -> SystemTime {
    from_ms(to_ms(t))
}

/// Now, at the store's millisecond precision.
pub fn now_ms() -> SystemTime {
    truncate_ms(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_round_trip_on_both_sides_of_the_epoch() {
        for ms in [-1_500, 0, 1_700_000_000_123] {
            assert_eq!(to_ms(from_ms(ms)), ms);
        }
        let t = UNIX_EPOCH + Duration::from_nanos(1_234_567_891);
        assert_eq!(truncate_ms(t), UNIX_EPOCH + Duration::from_millis(1_234));
    }
}
