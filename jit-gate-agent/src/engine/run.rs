//! The engine's thread: the command channel and the handles API handlers
//! hold, the loop that applies commands in order and runs the timed work
//! between them (expiry, observation, pruning, checkpoints,
//! reconciliation), and the interface watcher that wakes it.

use std::{
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::Context;
use tokio::sync::{broadcast, oneshot};

use super::{Command, Engine, Reply, restore::WITNESS_EVERY};
use crate::{
    audit::AuditRecord,
    refusal::{Refusal, RefusalKind},
};

/// What API handlers hold: the command channel and the audit feed. The
/// engine stops when the last handle is dropped.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<AuditRecord>,
    _stop: std::sync::Arc<StopOnDrop>,
}

/// Tells the engine to stop when dropped: the link watcher holds a sender
/// too, so the channel alone would never close.
struct StopOnDrop(mpsc::Sender<Command>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(Command::Stop);
    }
}

impl EngineHandle {
    /// Sends the command built around a reply channel and awaits the answer.
    pub async fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, Refusal> {
        let (reply, answer) = oneshot::channel();
        let stopped = || Refusal::new(RefusalKind::Internal, "the agent is shutting down");
        self.commands.send(command(reply)).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Audit records from now on, as they are committed.
    pub fn subscribe(&self) -> broadcast::Receiver<AuditRecord> {
        self.events.subscribe()
    }
}

/// Commands applied together at most (one store transaction).
const MAX_BATCH: usize = 1024;

/// How often new flows are audited and deny events collected.
const OBSERVE_EVERY: Duration = Duration::from_secs(1);

/// How often flows of ended connections are forgotten.
const FORGET_FLOWS_EVERY: Duration = Duration::from_secs(10);

/// Old `ACCESS_DENIED` payloads are pruned every half retention, at most
/// this often and at least every `PRUNE_EVERY_MAX`, this many at once.
const PRUNE_EVERY_MIN: Duration = Duration::from_secs(1);

const PRUNE_EVERY_MAX: Duration = Duration::from_mins(1);

/// Watches the namespace's interfaces on a thread of its own and tells the
/// engine of every change, so that a new interface is gated at once (the
/// reconciliation would find it too, later).
fn spawn_link_watcher(commands: mpsc::Sender<Command>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("jit-gate-links".into())
        .spawn(move || {
            let watched =
                crate::enforce::watch_links(|| commands.send(Command::LinksChanged).is_ok());
            if let Err(e) = watched {
                tracing::error!(
                    "watching interfaces stopped (reconciliation still finds new ones): {e}"
                );
            }
        })
        .context("starting the interface watcher")?;
    Ok(())
}

impl Engine {
    /// Runs until every handle is dropped.
    pub fn spawn(mut self) -> anyhow::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
        let (commands, receiver) = mpsc::channel();
        self.read_results = Some(commands.clone());
        let handle = EngineHandle {
            commands: commands.clone(),
            events: self.events.clone(),
            _stop: std::sync::Arc::new(StopOnDrop(commands.clone())),
        };
        if self.config.mode.uses_xdp() {
            spawn_link_watcher(commands)?;
        }
        let thread = std::thread::Builder::new()
            .name("jit-gate-engine".into())
            .spawn(move || self.run(&receiver))
            .context("starting the engine thread")?;
        Ok((handle, thread))
    }

    pub(super) fn run(mut self, commands: &mpsc::Receiver<Command>) {
        let mut next_observe = Instant::now() + OBSERVE_EVERY;
        let mut next_forget = Instant::now() + FORGET_FLOWS_EVERY;
        let mut next_prune = Instant::now();
        let mut next_checkpoint = Instant::now() + self.config.audit.checkpoint_interval;
        loop {
            let wake = [
                next_observe,
                next_forget,
                self.next_reconcile(),
                next_prune,
                next_checkpoint,
            ]
            .into_iter()
            .chain(self.next_expiry_instant())
            .min()
            .expect("at least one timer");
            match commands.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(Command::Stop) => {
                    self.log_failure("recording the boot clock", Engine::witness_boot_clock);
                    return;
                }
                Ok(first) => {
                    let mut batch = vec![first];
                    batch.extend(commands.try_iter().take(MAX_BATCH - 1));
                    self.handle(batch);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.log_failure("recording the boot clock", Engine::witness_boot_clock);
                    return;
                }
            }
            self.log_failure("expiring grants", Engine::expire_due);
            let now = Instant::now();
            if now >= next_observe {
                self.log_failure("observing flows and denials", Engine::observe);
                self.log_failure("noting used-up grants", Engine::note_used_up);
                next_observe = now + OBSERVE_EVERY;
            }
            if now >= next_forget {
                self.log_failure("forgetting dead flows", Engine::forget_dead_flows);
                next_forget = now + FORGET_FLOWS_EVERY;
            }
            if now >= next_prune {
                self.log_failure("pruning old denial records", Engine::prune_denied);
                next_prune = now
                    + (self.config.audit.denied_retention / 2)
                        .clamp(PRUNE_EVERY_MIN, PRUNE_EVERY_MAX);
            }
            let due = self.last_checkpoint.as_ref().map_or(0, |c| c.sequence)
                + self.config.audit.checkpoint_every_records;
            if now >= next_checkpoint || self.store.audit_head().0 >= due {
                self.log_failure("signing an audit checkpoint", |e| e.checkpoint().map(drop));
                next_checkpoint = now + self.config.audit.checkpoint_interval;
            }
            // Cycles due start; a snapshot waiting is compared one step.
            self.reconcile_due();
            if self.witnessed_at.elapsed() >= WITNESS_EVERY {
                self.log_failure("recording the boot clock", Engine::witness_boot_clock);
            }
        }
    }

    pub(super) fn log_failure(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Self) -> anyhow::Result<()>,
    ) {
        if let Err(e) = f(self) {
            tracing::error!("{what}: {e:#}");
        }
    }

    /// When the next grant ends, on the monotonic clock the engine sleeps
    /// on; it wakes then and checks the boot clock.
    pub(super) fn next_expiry_instant(&self) -> Option<Instant> {
        Some(Instant::now() + self.active.next_deadline()?.remaining())
    }

    /// Applies commands in arrival order; consecutive requests share one
    /// store transaction.
    /// A burst of interface changes (creating one interface announces it
    /// several times) is scanned for once, after the batch.
    pub(super) fn handle(&mut self, batch: Vec<Command>) {
        let mut requests = Vec::new();
        let mut links_changed = false;
        for command in batch {
            match command {
                Command::RequestAccess {
                    principal,
                    request,
                    reply,
                } => requests.push((principal, request, reply)),
                Command::LinksChanged => links_changed = true,
                other => {
                    self.request_access(std::mem::take(&mut requests));
                    self.handle_one(other);
                }
            }
        }
        self.request_access(requests);
        if links_changed {
            self.handle_one(Command::LinksChanged);
        }
    }

    pub(super) fn handle_one(&mut self, command: Command) {
        match command {
            Command::RequestAccess {
                principal,
                request,
                reply,
            } => self.request_access(vec![(principal, request, reply)]),
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Policy(reply) => {
                let _ = reply.send(Ok(self.policy.clone()));
            }
            Command::UpdatePolicy {
                principal,
                change,
                expected_revision,
                reply,
            } => {
                let _ = reply.send(self.update_policy(&principal.name, change, expected_revision));
            }
            Command::Revoke {
                principal,
                grant_id,
                terminate,
                reason,
                reply,
            } => {
                let _ = reply.send(self.revoke(&principal, grant_id, terminate, &reason));
            }
            Command::ListGrants {
                include_ended,
                port,
                before,
                limit,
                reply,
            } => {
                let listed = self
                    .store
                    .list_grants(include_ended, port, before, limit)
                    .map(|mut grants| {
                        for grant in &mut grants {
                            grant.refresh_display();
                            grant.used_up = self.active.is_used_up(grant.id);
                        }
                        grants
                    })
                    .map_err(|e| Refusal::unavailable("listing grants", e));
                let _ = reply.send(listed);
            }
            Command::ListConnections(reply) => {
                let listed = self
                    .enforcement
                    .connections(&self.policy.protected(), &self.active)
                    .map_err(|e| Refusal::internal("listing connections", e));
                let _ = reply.send(listed);
            }
            Command::Decide {
                principal,
                id,
                approve,
                comment,
                reply,
            } => {
                let _ = reply.send(self.decide(&principal, id, approve, &comment));
            }
            Command::ListRequests {
                filter,
                before,
                limit,
                reply,
            } => {
                let listed = self
                    .store
                    .list_requests(filter, before, limit)
                    .map_err(|e| Refusal::unavailable("listing requests", e));
                let _ = reply.send(listed);
            }
            Command::Record { event, reply } => {
                let recorded = self
                    .commit_events(vec![event])
                    .map_err(|e| Refusal::unavailable("recording the event", format!("{e:#}")));
                let _ = reply.send(recorded);
            }
            Command::Checkpoint(reply) => {
                let signed = self
                    .checkpoint()
                    .map_err(|e| Refusal::unavailable("signing a checkpoint", format!("{e:#}")));
                let _ = reply.send(signed);
            }
            Command::Reload { config, reply } => {
                let _ = reply.send(self.reload(*config));
            }
            Command::KernelRead { layer, cycle, read } => self.kernel_read(layer, cycle, *read),
            Command::Fleet(command) => self.fleet(command),
            Command::LinksChanged => {
                self.log_failure("gating new interfaces", |e| {
                    let repairs = e.enforcement.scan_interfaces()?;
                    e.record_drift(&repairs)
                });
            }
            // Seen by the loop itself.
            Command::Stop => {}
        }
    }
}
