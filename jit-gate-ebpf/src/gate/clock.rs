//! The program's clocks: boot time read from the kernel at most once per
//! frame and only when asked (a grant's expiry, a flow's age, a deny
//! event's time), and the coarse clock the deny budget's window runs on.

use core::cell::Cell;

use aya_ebpf::helpers::{bpf_ktime_get_boot_ns, bpf_ktime_get_coarse_ns};
use jit_gate_common::verdict::BootClock;

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
/// costs a clock read, precise enough for a window of deny events.
#[inline(always)]
pub fn coarse_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}
