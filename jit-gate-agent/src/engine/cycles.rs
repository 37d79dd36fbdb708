//! Reconciliation cycles, one per layer (`enforce::Layer`), each on its
//! own timer so that a slow nftables read never delays the XDP check: a
//! cycle repairs its layer's structure at once, reads its grant entries on
//! a thread of its own (sent back as a command), then compares the
//! snapshot with the active grants in steps between commands. The next
//! cycle of a layer starts so that it ends about one `reconcile_interval`
//! after the last one started (drift is repaired within one interval while
//! a cycle takes at most two fifths of it), and never sooner than half the
//! last cycle's duration after it ended (at most half the time spent
//! reconciling).

use std::time::{Duration, Instant};

use super::{Command, Engine};
use crate::enforce::{KernelSnapshot, Layer, Pass};

/// Time the engine spends comparing a snapshot before it looks at its
/// commands again.
const RECONCILE_STEP: Duration = Duration::from_millis(5);

/// A layer's cycle rests at least this share of its own duration.
const REST_PER_CYCLE: u32 = 2;

/// Each layer's cycle: when the next starts, and the one under way.
pub(super) struct Cycles {
    next_start: [Instant; 2],
    running: [Option<Cycle>; 2],
    /// The layer whose snapshot was compared last (they take turns).
    last_stepped: usize,
}

/// A cycle under way: its read pending, then its snapshot compared.
struct Cycle {
    started: Instant,
    read_pending: bool,
    pass: Option<Pass>,
}

impl Cycles {
    pub(super) fn new(interval: Duration) -> Cycles {
        let first = Instant::now() + interval;
        Cycles {
            next_start: [first; 2],
            running: [None, None],
            last_stepped: 0,
        }
    }
}

impl Engine {
    /// When the engine must next look at reconciliation: a cycle due, or
    /// now if a snapshot waits to be compared.
    pub(super) fn next_reconcile(&self) -> Instant {
        let cycles = &self.cycles;
        if cycles.running.iter().flatten().any(|c| c.pass.is_some()) {
            return Instant::now();
        }
        Layer::BOTH
            .iter()
            .filter(|layer| cycles.running[**layer as usize].is_none())
            .map(|layer| cycles.next_start[*layer as usize])
            .min()
            .unwrap_or_else(|| Instant::now() + self.config.reconcile_interval)
    }

    /// Starts the cycles due and compares one step of a waiting snapshot.
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
        let (repairs, reader) = match begun {
            Ok(begun) => begun,
            Err(e) => {
                self.enforcement.end_reconcile(layer);
                tracing::error!("reconciling: {e:#}");
                return;
            }
        };
        let read_pending = reader.parts() > 0;
        if read_pending {
            let results = self.read_results.clone();
            let spawned = results.map(|results| {
                std::thread::Builder::new()
                    .name("jit-gate-read".into())
                    .spawn(move || {
                        reader.read(|read| {
                            let _ = results.send(Command::KernelRead(layer, Box::new(read)));
                        });
                    })
            });
            if !matches!(spawned, Some(Ok(_))) {
                self.enforcement.end_reconcile(layer);
                tracing::error!("reconciling: the kernel reader did not start");
                self.log_failure("recording drift", |e| e.record_drift(&repairs));
                return;
            }
        }
        self.cycles.running[i] = Some(Cycle {
            started,
            read_pending,
            pass: None,
        });
        self.log_failure("recording drift", |e| e.record_drift(&repairs));
        if !read_pending {
            self.end_cycle(layer);
        }
    }

    /// A layer's snapshot from its reader arrived: its comparison is queued.
    pub(super) fn kernel_read(&mut self, layer: Layer, read: anyhow::Result<KernelSnapshot>) {
        let Some(cycle) = &mut self.cycles.running[layer as usize] else {
            return;
        };
        cycle.read_pending = false;
        match read {
            Ok(snapshot) => cycle.pass = Some(Pass::new(snapshot)),
            Err(e) => {
                tracing::error!("reconciling: reading the kernel: {e:#}");
                self.end_cycle(layer);
            }
        }
    }

    /// Compares the next part of one waiting snapshot (the layers take
    /// turns), and ends its cycle once it is done.
    fn step_cycles(&mut self) {
        let Some(layer) = (1..=2)
            .map(|k| (self.cycles.last_stepped + k) % 2)
            .find(|&i| {
                self.cycles.running[i]
                    .as_ref()
                    .is_some_and(|c| c.pass.is_some())
            })
            .map(|i| Layer::BOTH[i])
        else {
            return;
        };
        let i = layer as usize;
        self.cycles.last_stepped = i;
        let mut pass = self.cycles.running[i]
            .as_mut()
            .and_then(|c| c.pass.take())
            .expect("found above");
        let stepped = self.enforcement.reconcile_step(
            layer,
            &mut pass,
            &self.active,
            &self.policy.protected(),
            RECONCILE_STEP,
        );
        match stepped {
            Ok(None) => {
                if let Some(cycle) = &mut self.cycles.running[i] {
                    cycle.pass = Some(pass);
                }
            }
            Ok(Some(repairs)) => {
                self.log_failure("recording drift", |e| e.record_drift(&repairs));
                self.end_cycle(layer);
            }
            // This snapshot is given up; the next cycle compares again.
            Err(e) => {
                tracing::error!("reconciling: {e:#}");
                self.end_cycle(layer);
            }
        }
    }

    /// Ends a layer's cycle and sets when the next one starts.
    fn end_cycle(&mut self, layer: Layer) {
        let i = layer as usize;
        self.enforcement.end_reconcile(layer);
        let Some(cycle) = self.cycles.running[i].take() else {
            return;
        };
        let now = Instant::now();
        let took = now - cycle.started;
        tracing::debug!("reconciled {layer:?} in {took:?}");
        self.reconcile_durations.observe(took.as_secs_f64());
        let interval = self.config.reconcile_interval;
        self.cycles.next_start[i] =
            (cycle.started + interval.saturating_sub(took)).max(now + took / REST_PER_CYCLE);
    }
}
