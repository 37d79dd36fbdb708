//! Publishing boot time to the program (`maps::published_clock`), and how
//! long a flow stamped on that clock has at least been idle. A thread
//! writes the slot every period while the gate is open; the ageing side
//! reads what it published and when, so a stalled publisher (or none)
//! only keeps flows longer, never ages one out early.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        mpsc::{self, RecvTimeoutError},
    },
    thread,
    time::Duration,
};

use aya::maps::{Array, MapData};
use jit_gate_common::maps::{names, published_clock};

use super::{Result, XdpError, map_err};
use crate::clock::boot_now_ns;

/// `Publishing::continuous_since` when every stamp is on the kernel's
/// clock or published: boot time never reads 0 once anything runs.
const SINCE_BOOT: u64 = 1;

/// What the publisher has done, in boot-time nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Publishing {
    /// Since when it has published with no gap longer than
    /// `published_clock::MAX_GAP_NS` (0: never).
    continuous_since: u64,
    /// The value it last wrote (0: none yet).
    last_published: u64,
}

impl Publishing {
    /// How long a flow last stamped at `last_seen` has at least been idle
    /// at boot time `now`. A packet seen after `continuous_since` stamped
    /// a value no older than the longest gap since then (the current one,
    /// `now - last_published`, included) plus the stamp's granularity; a
    /// packet seen before it is older than `continuous_since` itself.
    pub(super) fn idle_at_least(&self, last_seen: u64, now: u64) -> Duration {
        let gap = published_clock::MAX_GAP_NS.max(now.saturating_sub(self.last_published));
        let since_stamp = now
            .saturating_sub(last_seen)
            .saturating_sub(gap + published_clock::STAMP_GRANULARITY_NS);
        let since_continuous = if self.continuous_since == 0 {
            0
        } else {
            now.saturating_sub(self.continuous_since)
        };
        Duration::from_nanos(since_stamp.min(since_continuous))
    }

    /// Records the publication of `value`, whose write had landed by
    /// `landed`. Until it landed the slot held the previous value, so the
    /// gap runs from that value to `landed`; a first publication, or one
    /// after too long a gap, starts a new run once it has landed.
    fn published(&mut self, value: u64, landed: u64) {
        if self.continuous_since == 0
            || landed.saturating_sub(self.last_published) > published_clock::MAX_GAP_NS
        {
            self.continuous_since = landed;
        }
        self.last_published = value;
    }
}

/// The thread that publishes boot time while the gate is open; stopped
/// and joined on drop.
pub(super) struct ClockPublisher {
    state: Arc<Mutex<Publishing>>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ClockPublisher {
    /// Publishes once now (so the slot is current before the gate is
    /// used), then every period from a thread of its own. A slot still at
    /// 0 (fresh maps) means every stamp so far came from the kernel's own
    /// clock: publishing then counts as continuous since boot.
    pub(super) fn start(mut slot: Array<MapData, u64>) -> Result<Self> {
        let state = Arc::new(Mutex::new(Publishing::default()));
        let never_published = slot.get(&0, 0).map_err(map_err(names::PUBLISHED_CLOCK))? == 0;
        publish(&mut slot, &state)?;
        if never_published {
            state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .continuous_since = SINCE_BOOT;
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let thread_state = Arc::clone(&state);
        let thread = thread::Builder::new()
            .name("clock-publisher".into())
            .spawn(move || {
                let period = Duration::from_nanos(published_clock::PERIOD_NS);
                // Failed writes in a row: logged when they start and when
                // they end, not four times a second.
                let mut failing = 0u64;
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(period) {
                    // A failed write leaves the slot as it was: flows then
                    // look idle longer than they are, which ageing allows for.
                    match publish(&mut slot, &thread_state) {
                        Ok(()) if failing > 0 => {
                            tracing::info!(
                                "publishing boot time to the XDP program again, after {failing} failed writes"
                            );
                            failing = 0;
                        }
                        Ok(()) => {}
                        Err(e) => {
                            if failing == 0 {
                                tracing::warn!(
                                    "publishing boot time to the XDP program: {e} (idle flows are kept until it recovers)"
                                );
                            }
                            failing += 1;
                        }
                    }
                }
            })
            .map_err(XdpError::ClockThread)?;
        Ok(ClockPublisher {
            state,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub(super) fn publishing(&self) -> Publishing {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for ClockPublisher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Writes boot time to the slot, and records it once written: until
/// then, readers count the gap from the previous value.
fn publish(slot: &mut Array<MapData, u64>, state: &Mutex<Publishing>) -> Result<()> {
    let now = boot_now_ns();
    slot.set(0, now, 0)
        .map_err(map_err(names::PUBLISHED_CLOCK))?;
    let landed = boot_now_ns();
    state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .published(now, landed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn published_at(times: &[u64]) -> Publishing {
        let mut p = Publishing::default();
        for &now in times {
            p.published(now, now);
        }
        p
    }

    #[test]
    fn idle_allows_for_the_gap_and_the_granularity() {
        // Every second from 100 s to 399 s.
        let every_second: Vec<u64> = (100..400).map(|t| t * S).collect();
        let p = published_at(&every_second);
        assert_eq!(p.continuous_since, 100 * S);
        // Stamped at 101 s, now 400 s: idle at least 400 - 101 - 2 - 1 s.
        assert_eq!(p.idle_at_least(101 * S, 400 * S), Duration::from_secs(296));
    }

    #[test]
    fn a_stopped_publisher_keeps_flows() {
        let p = published_at(&[100 * S]);
        // Nothing published since 100 s: a flow stamped then may have had
        // packets until now.
        assert_eq!(p.idle_at_least(100 * S, 1_000 * S), Duration::ZERO);
    }

    #[test]
    fn a_gap_restarts_the_run_and_flows_stamped_before_wait_for_it() {
        let p = published_at(&[100 * S, 500 * S]);
        assert_eq!(p.continuous_since, 500 * S);
        // Stamped at 100 s (packets may have come until 500 s): idle at
        // least since the run began.
        assert_eq!(p.idle_at_least(100 * S, 501 * S), Duration::from_secs(1));
    }

    #[test]
    fn a_write_that_lands_late_breaks_the_run() {
        let mut p = published_at(&[100 * S, 101 * S]);
        // Boot time read at 102 s, written at 104 s: the slot held 101 s
        // for 3 s.
        p.published(102 * S, 104 * S);
        assert_eq!(p.continuous_since, 104 * S);
        assert_eq!(p.last_published, 102 * S);
    }

    #[test]
    fn never_published_is_never_idle() {
        assert_eq!(
            Publishing::default().idle_at_least(0, 1_000 * S),
            Duration::ZERO
        );
    }
}
