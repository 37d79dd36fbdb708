//! Conversion between wall-clock time and `CLOCK_BOOTTIME`, the clock the XDP
//! program compares grant expiries against. Boot time keeps counting during
//! suspend and never jumps, so a grant cannot be stretched by changing the
//! wall clock after it was written.

use std::time::{Duration, SystemTime};

/// Nanoseconds since boot (`CLOCK_BOOTTIME`), as `bpf_ktime_get_boot_ns` sees it.
pub fn boot_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The boot-clock instant matching wall-clock `at`: boot now plus the time
/// from now until `at` (zero-clamped for instants in the past).
pub fn wall_to_boot_ns(at: SystemTime) -> u64 {
    let boot_now = boot_now_ns();
    match at.duration_since(SystemTime::now()) {
        Ok(ahead) => boot_now.saturating_add(duration_ns(ahead)),
        Err(behind) => boot_now.saturating_sub(duration_ns(behind.duration())),
    }
}

/// The wall-clock instant matching boot-clock `boot_ns`.
pub fn boot_to_wall(boot_ns: u64) -> SystemTime {
    let boot_now = boot_now_ns();
    let now = SystemTime::now();
    if boot_ns <= boot_now {
        now - Duration::from_nanos(boot_now - boot_ns)
    } else {
        now + Duration::from_nanos(boot_ns - boot_now)
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn future_instants_map_that_far_ahead_of_boot_now() {
        let boot = wall_to_boot_ns(SystemTime::now() + Duration::from_secs(3600));
        let ahead = boot - boot_now_ns();
        assert!(
            ahead > 3_599_000_000_000 && ahead <= 3_600_000_000_000,
            "{ahead}"
        );
    }

    #[test]
    fn boot_to_wall_inverts_wall_to_boot() {
        let at = SystemTime::now() + Duration::from_secs(60);
        let back = boot_to_wall(wall_to_boot_ns(at));
        let diff = match back.duration_since(at) {
            Ok(d) => d,
            Err(e) => e.duration(),
        };
        assert!(diff < Duration::from_millis(10), "{diff:?}");
    }

    #[test]
    fn past_instants_map_before_now() {
        let boot = wall_to_boot_ns(SystemTime::now() - Duration::from_secs(5));
        assert!(boot < boot_now_ns());
    }
}
