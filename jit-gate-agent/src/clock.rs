//! Time as the gate keeps it: a grant's end is a deadline on
//! `CLOCK_BOOTTIME` (the clock the XDP program compares against), fixed
//! when the grant is created. Boot time keeps counting during suspend and
//! never jumps, so no wall-clock step can stretch or cut a grant; wall-clock
//! instants are derived from deadlines for display only. A reboot restarts
//! the boot clock, so a deadline is valid only on the boot that set it
//! (`boot_id`); `carry_across_reboot` moves one to the next boot without
//! ever making it later.

use std::time::{Duration, SystemTime};

/// Where the kernel publishes this boot's random id.
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// Nanoseconds since boot (`CLOCK_BOOTTIME`), as `bpf_ktime_get_boot_ns` sees it.
pub fn boot_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// This boot's id: it changes with every boot, so a stored deadline can
/// tell whether it was set on the boot clock now running.
pub fn boot_id() -> std::io::Result<String> {
    Ok(std::fs::read_to_string(BOOT_ID_PATH)?.trim().to_owned())
}

/// An instant on this boot's `CLOCK_BOOTTIME`, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(u64);

impl Deadline {
    pub const fn from_boot_ns(ns: u64) -> Self {
        Deadline(ns)
    }

    /// The boot clock now.
    pub fn now() -> Self {
        Deadline(boot_now_ns())
    }

    /// `duration` from now.
    pub fn after(duration: Duration) -> Self {
        Deadline::now().plus(duration)
    }

    /// `duration` after this instant.
    pub fn plus(self, duration: Duration) -> Self {
        Deadline(self.0.saturating_add(duration_ns(duration)))
    }

    pub const fn boot_ns(self) -> u64 {
        self.0
    }

    /// Time left until the deadline (zero once it has passed).
    pub fn remaining(self) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(boot_now_ns()))
    }

    pub fn has_passed(self) -> bool {
        self.0 <= boot_now_ns()
    }

    /// The wall-clock instant that shows this deadline to a person: now on
    /// the wall clock plus the time left (or minus the time since).
    pub fn to_wall(self) -> SystemTime {
        boot_to_wall(self.0)
    }

    /// `to_wall`, but `recorded` (the same deadline shown earlier) if that
    /// is within `DISPLAY_SNAP` of it: the two clock readings behind each
    /// conversion differ by a few microseconds, which must not make the same
    /// deadline show as two instants. A wall-clock step shows at once.
    pub fn to_wall_near(self, recorded: SystemTime) -> SystemTime {
        let derived = self.to_wall();
        let apart = match derived.duration_since(recorded) {
            Ok(d) => d,
            Err(e) => e.duration(),
        };
        if apart <= DISPLAY_SNAP {
            recorded
        } else {
            derived
        }
    }
}

/// See `Deadline::to_wall_near`.
const DISPLAY_SNAP: Duration = Duration::from_millis(10);

/// The last boot-clock reading the agent recorded on a boot: proof that the
/// boot clock of `boot_id` got at least that far.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootWitness {
    pub boot_id: String,
    pub boot_ns: u64,
}

impl BootWitness {
    /// This boot, now.
    pub fn now(boot_id: &str) -> Self {
        BootWitness {
            boot_id: boot_id.to_owned(),
            boot_ns: boot_now_ns(),
        }
    }
}

/// What is known of a deadline set on an earlier boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EarlierBoot {
    /// The deadline on that boot's clock.
    pub deadline: Deadline,
    /// How long the grant was given for.
    pub granted: Duration,
    /// The last reading of that boot's clock, if one was recorded.
    pub witnessed_ns: Option<u64>,
    /// The deadline on the wall clock, as shown when it was last stored.
    pub wall_deadline: SystemTime,
}

/// Time left, on the new boot, of a grant whose deadline was set on an
/// earlier boot. How long the host was down is unknown: the old boot clock
/// only proves a lower bound of the time that passed (up to its last
/// recorded reading; the whole grant if none), and the wall clock is
/// trusted only to shorten what that leaves, never to lengthen it. The
/// result is therefore never more than the real time left.
pub fn carry_across_reboot(earlier: &EarlierBoot, wall_now: SystemTime) -> Duration {
    let by_boot_clock = match earlier.witnessed_ns {
        Some(seen) => Duration::from_nanos(earlier.deadline.boot_ns().saturating_sub(seen)),
        None => earlier.granted,
    }
    .min(earlier.granted);
    let by_wall_clock = earlier
        .wall_deadline
        .duration_since(wall_now)
        .unwrap_or_default();
    by_boot_clock.min(by_wall_clock)
}

/// The boot-clock instant matching wall-clock `at`: boot now plus the time
/// from now until `at` (zero-clamped for instants in the past). Only for
/// data that predates boot-time deadlines, and for tests.
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
        let boot = wall_to_boot_ns(SystemTime::now() + Duration::from_hours(1));
        let ahead = boot - boot_now_ns();
        assert!(
            ahead > 3_599_000_000_000 && ahead <= 3_600_000_000_000,
            "{ahead}"
        );
    }

    #[test]
    fn boot_to_wall_inverts_wall_to_boot() {
        let at = SystemTime::now() + Duration::from_mins(1);
        let back = boot_to_wall(wall_to_boot_ns(at));
        let diff = match back.duration_since(at) {
            Ok(d) => d,
            Err(e) => e.duration(),
        };
        assert!(diff < Duration::from_millis(10), "{diff:?}");
    }

    #[test]
    fn deadlines_count_down_on_the_boot_clock() {
        let deadline = Deadline::after(Duration::from_mins(1));
        let left = deadline.remaining();
        assert!(left <= Duration::from_mins(1) && left > Duration::from_secs(59));
        assert!(!deadline.has_passed());
        assert!(Deadline::from_boot_ns(1).has_passed());
        assert_eq!(Deadline::from_boot_ns(1).remaining(), Duration::ZERO);
    }

    #[test]
    fn display_keeps_the_recorded_instant_unless_the_wall_clock_moved() {
        let deadline = Deadline::after(Duration::from_mins(1));
        let recorded = deadline.to_wall() + Duration::from_millis(3);
        assert_eq!(deadline.to_wall_near(recorded), recorded);
        // As if the wall clock had been stepped back an hour since.
        let stepped = recorded + Duration::from_hours(1);
        let shown = deadline.to_wall_near(stepped);
        assert!(shown < recorded + Duration::from_millis(20), "{shown:?}");
    }

    #[test]
    fn a_reboot_never_lengthens_a_grant() {
        let wall_now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let minute = Duration::from_mins(1);
        let earlier = EarlierBoot {
            deadline: Deadline::from_boot_ns(100 * 1_000_000_000),
            granted: 10 * minute,
            witnessed_ns: Some(70 * 1_000_000_000),
            // The wall clock says 20 minutes are left (stepped back while down).
            wall_deadline: wall_now + 20 * minute,
        };
        // The old boot clock had seen all but 30 s of the grant.
        assert_eq!(
            carry_across_reboot(&earlier, wall_now),
            Duration::from_secs(30)
        );
        // An honest wall clock that saw 10 s of downtime shortens it.
        let honest = EarlierBoot {
            wall_deadline: wall_now + Duration::from_secs(20),
            ..earlier
        };
        assert_eq!(
            carry_across_reboot(&honest, wall_now),
            Duration::from_secs(20)
        );
        // Without a reading of the old clock, at most the granted duration.
        let unwitnessed = EarlierBoot {
            witnessed_ns: None,
            ..earlier
        };
        assert_eq!(carry_across_reboot(&unwitnessed, wall_now), 10 * minute);
        // A witness past the deadline, or a wall deadline past: nothing left.
        let late = EarlierBoot {
            witnessed_ns: Some(101 * 1_000_000_000),
            ..earlier
        };
        assert_eq!(carry_across_reboot(&late, wall_now), Duration::ZERO);
        let past = EarlierBoot {
            wall_deadline: wall_now - minute,
            ..earlier
        };
        assert_eq!(carry_across_reboot(&past, wall_now), Duration::ZERO);
    }
}
