//! Reconciliation cycles, one per layer (`enforce::Layer`), each on its
//! own timer so that a slow nftables read never delays the XDP check: a
//! cycle repairs its layer's structure at once, starts a reader of its
//! grant entries on a thread of its own (its parts sent back as commands),
//! and compares the parts with the active grants in steps between
//! commands as they arrive. The next cycle of a layer starts so that it
//! ends about one `reconcile_interval` after the last one started (drift is
//! repaired within about one interval), and never sooner than half the
//! engine's time in the last cycle after it ended (a layer's comparisons
//! take at most two thirds of the engine's time).

use std::time::{Duration, Instant};

use super::{Command, Engine};
use crate::enforce::{KernelRead, Layer, Pass};

/// Time the engine spends comparing before it looks at its commands again.
const RECONCILE_STEP: Duration = Duration::from_millis(5);

/// A layer's cycle rests at least this share of the engine's time in it.
const REST_PER_CYCLE: u32 = 2;

/// Each layer's cycle: when the next starts, and the one under way.
pub(super) struct Cycles {
    next_start: [Instant; 2],
    running: [Option<Cycle>; 2],
    /// The layer compared last (they take turns).
    last_stepped: usize,
    /// The number of the last cycle started, which its reader's parts carry.
    last_number: u64,
}

/// A cycle under way: its pass, fed by its reader.
struct Cycle {
    number: u64,
    started: Instant,
    /// The engine's time in the cycle's structural check.
    begun_in: Duration,
    pass: Pass,
}

impl Cycles {
    pub(super) fn new(interval: Duration) -> Cycles {
        let first = Instant::now() + interval;
        Cycles {
            next_start: [first; 2],
            running: [None, None],
            last_stepped: 0,
            last_number: 0,
        }
    }
}

impl Engine {
    /// When the engine must next look at reconciliation: a cycle due, or
    /// now if a pass has parts to compare.
    pub(super) fn next_reconcile(&self) -> Instant {
        let cycles = &self.cycles;
        if cycles.running.iter().flatten().any(|c| c.pass.has_work()) {
            return Instant::now();
        }
        Layer::BOTH
            .iter()
            .filter(|layer| cycles.running[**layer as usize].is_none())
            .map(|layer| cycles.next_start[*layer as usize])
            .min()
            .unwrap_or_else(|| Instant::now() + self.config.reconcile_interval)
    }

    /// Starts the cycles due and compares one step of a pass with work.
    pub(super) fn reconcile_due(&mut self) {
        let now = Instant::now();
        for layer in Layer::BOTH {
            let i = layer as usize;
            if self.cycles.running[i].is_none() && now >= self.cycles.next_start[i] {
                if layer == Layer::Xdp {
                    self.log_failure("expiring pending requests", Engine::expire_pending);
                }
                self.start_cycle(layer);
            }
        }
        self.step_cycles();
    }

    fn start_cycle(&mut self, layer: Layer) {
        let i = layer as usize;
        let started = Instant::now();
        // A failed start is retried one interval later.
        self.cycles.next_start[i] = started + self.config.reconcile_interval;
        let begun = self
            .enforcement
            .begin_reconcile(layer, &self.active, &self.policy.protected());
        let (repairs, reading) = match begun {
            Ok(begun) => begun,
            Err(e) => {
                self.enforcement.end_reconcile(layer);
                tracing::error!("reconciling: {e:#}");
                return;
            }
        };
        self.log_failure("recording drift", |e| e.record_drift(&repairs));
        let Some((reader, pass)) = reading else {
            self.enforcement.end_reconcile(layer);
            return;
        };
        self.cycles.last_number += 1;
        let number = self.cycles.last_number;
        let results = self.read_results.clone();
        let spawned = results.map(|results| {
            std::thread::Builder::new()
                .name("jit-gate-read".into())
                .spawn(move || {
                    reader.read(|read| {
                        results
                            .send(Command::KernelRead {
                                layer,
                                cycle: number,
                                read: Box::new(read),
                            })
                            .is_ok()
                    });
                })
        });
        if !matches!(spawned, Some(Ok(_))) {
            self.enforcement.end_reconcile(layer);
            tracing::error!("reconciling: the kernel reader did not start");
            return;
        }
        self.cycles.running[i] = Some(Cycle {
            number,
            started,
            begun_in: started.elapsed(),
            pass,
        });
    }

    /// A part of a layer from its cycle's reader arrived: queued for
    /// comparison (a part of a cycle already ended is dropped).
    pub(super) fn kernel_read(
        &mut self,
        layer: Layer,
        number: u64,
        read: anyhow::Result<KernelRead>,
    ) {
        let Some(cycle) = self.cycles.running[layer as usize]
            .as_mut()
            .filter(|c| c.number == number)
        else {
            return;
        };
        match read {
            Ok(part) => cycle.pass.receive(part),
            Err(e) => {
                tracing::error!("reconciling: reading the kernel: {e:#}");
                self.end_cycle(layer);
            }
        }
    }

    /// Compares the next part of one pass with work (the layers take
    /// turns), and ends its cycle once it is done.
    fn step_cycles(&mut self) {
        let Some(i) = (1..=2)
            .map(|k| (self.cycles.last_stepped + k) % 2)
            .find(|&i| {
                self.cycles.running[i]
                    .as_ref()
                    .is_some_and(|c| c.pass.has_work())
            })
        else {
            return;
        };
        let layer = Layer::BOTH[i];
        self.cycles.last_stepped = i;
        let protected = self.policy.protected();
        let Some(cycle) = self.cycles.running[i].as_mut() else {
            return;
        };
        let stepped = self.enforcement.reconcile_step(
            layer,
            &mut cycle.pass,
            &self.active,
            &protected,
            RECONCILE_STEP,
        );
        match stepped {
            Ok(None) => {}
            Ok(Some(repairs)) => {
                self.log_failure("recording drift", |e| e.record_drift(&repairs));
                self.end_cycle(layer);
            }
            // This pass is given up; the next cycle compares again.
            Err(e) => {
                tracing::error!("reconciling: {e:#}");
                self.end_cycle(layer);
            }
        }
    }

    /// Ends a layer's cycle (its reader stops once it sees its pass gone)
    /// and sets when the next one starts.
    fn end_cycle(&mut self, layer: Layer) {
        let i = layer as usize;
        self.enforcement.end_reconcile(layer);
        let Some(cycle) = self.cycles.running[i].take() else {
            return;
        };
        let now = Instant::now();
        let took = now - cycle.started;
        let busy = cycle.begun_in + cycle.pass.busy();
        tracing::debug!(
            ?layer,
            took_ms = took.as_millis(),
            engine_ms = busy.as_millis(),
            "reconciled"
        );
        self.reconcile_durations.observe(took.as_secs_f64());
        let interval = self.config.reconcile_interval;
        self.cycles.next_start[i] =
            (cycle.started + interval.saturating_sub(took)).max(now + busy / REST_PER_CYCLE);
    }
}
