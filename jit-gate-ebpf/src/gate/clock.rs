//! The program's clocks: boot time read from the kernel at most once per
//! frame and only when asked (a grant's expiry, a handshake's age, a deny
//! event's time or window), the coarse clock that lets a spent deny
//! budget skip boot time until its window may have ended, and the clock
//! the agent publishes, which stamps a tracked flow's last-seen time.

use core::cell::Cell;

use aya_ebpf::helpers::{bpf_ktime_get_boot_ns, bpf_ktime_get_coarse_ns};
use jit_gate_common::verdict::BootClock;

use super::PUBLISHED_CLOCK;

/// How far the coarse clock may lag the precise one: it moves once a tick
/// (4 ms at this kernel's 250 Hz; 10 ms at the slowest 100 Hz), doubled
/// for margin. Too small a bound would only renew a window late.
const COARSE_LAG_NS: u64 = 20_000_000;

/// Boot time, read on first use and then kept for the rest of the frame.
pub struct LazyBootClock {
    /// 0 until read: boot time is never 0 once a program runs.
    read: Cell<u64>,
}

impl LazyBootClock {
    #[inline(always)]
    pub fn new() -> Self {
        LazyBootClock { read: Cell::new(0) }
    }
}

impl BootClock for LazyBootClock {
    #[inline(always)]
    fn boot_ns(&self) -> u64 {
        let mut now = self.read.get();
        if now == 0 {
            // SAFETY: a helper without arguments.
            now = unsafe { bpf_ktime_get_boot_ns() };
            self.read.set(now);
        }
        now
    }
}

/// Monotonic time at the last tick: a few nanoseconds where boot time
/// costs a clock read.
#[inline(always)]
pub fn coarse_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Whether a window of `window_ns` that began at coarse time
/// `start_coarse_ns` may have ended: `false` is certain (less than the
/// window has passed even allowing for the coarse clock's lag at both
/// ends), `true` means "ask boot time". Windows shorter than the lag
/// always ask, so they renew exactly.
#[inline(always)]
pub fn window_may_have_ended(start_coarse_ns: u64, window_ns: u64) -> bool {
    coarse_ns()
        .wrapping_sub(start_coarse_ns)
        .saturating_add(COARSE_LAG_NS)
        >= window_ns
}

/// The time a packet of a tracked flow stamps as its last-seen time: boot
/// time as the agent last published it (a read of a map slot where the
/// kernel's clock costs a helper call), or boot time itself while the slot
/// holds nothing (no agent has published). See `maps::published_clock`.
#[inline(always)]
pub fn stamp_ns(clock: &LazyBootClock) -> u64 {
    match PUBLISHED_CLOCK.get(0) {
        Some(&published) if published != 0 => published,
        _ => clock.boot_ns(),
    }
}
