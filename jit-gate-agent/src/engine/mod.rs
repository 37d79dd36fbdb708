//! The engine: the one writer of grants and policy. API calls arrive as
//! commands on a channel and are applied in order on a dedicated thread:
//! policy check → store (one transaction) → enforcers → audit watchers.
//! Between commands the same thread expires grants on time, audits new
//! flows and denied sources, and reconciles the enforcers.

mod connections;
mod denials;
mod enforcement;
mod interfaces;
mod lifecycle;
mod restore;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::mpsc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use tokio::sync::{broadcast, oneshot};

pub use connections::ConnectionInfo;
pub use enforcement::{EnforcementStatus, LayerHealth};
pub use interfaces::{InterfaceMode, InterfaceStatus, Repair};
use jit_gate_common::verdict::Reason;

use crate::{
    audit::{AGENT, AuditRecord, Broken, Event, Kind},
    auth::Principal,
    checkpoint::{Checkpoint, CheckpointKey},
    config::{Config, Mode},
    enforce::xdp::Counters,
    grants::{ActiveGrants, Grant},
    net::{GrantTarget, Protocol},
    policy::{Policy, PortRule, RuleProtocol},
    refusal::{Refusal, RefusalKind},
    request::AccessRequest,
    store::Store,
};
use connections::FlowWatch;
use denials::{CounterSnapshot, Denials};
use enforcement::Enforcers;
use restore::{WITNESS_EVERY, restore_grants};

pub type Reply<T> = oneshot::Sender<Result<T, Refusal>>;

pub enum PolicyChange {
    Replace(Vec<PortRule>),
    Upsert(PortRule),
    Remove { port: u16, protocol: RuleProtocol },
}

pub struct AccessOutcome {
    pub grants: Vec<Grant>,
    pub replayed: bool,
}

pub struct RevokeOutcome {
    pub grant: Grant,
    pub connections_terminated: usize,
}

pub struct PortReport {
    pub protocol: Protocol,
    pub port: u16,
    pub active_grants: usize,
    pub connections: usize,
    pub grants_last_7_days: u32,
    pub last_access: Option<SystemTime>,
    /// Packets the XDP gate passed since its state was created.
    pub passed: u64,
    /// Packets the XDP gate dropped since its state was created.
    pub dropped: u64,
    /// Of those, new connections refused by a grant's limits or a full
    /// flow table.
    pub refused_connections: u64,
}

/// The XDP flow table.
pub struct FlowTableReport {
    pub capacity: u32,
    pub tracked: usize,
    pub per_grant_quota: u32,
    /// New connections refused since the gate's state was created, by why.
    pub refused_quota: u64,
    pub refused_opens_exhausted: u64,
    pub refused_table_full: u64,
}

/// Whether the audit chain verified at start (and the problem if not).
#[derive(Clone, Debug, Default)]
pub struct AuditHealth {
    pub broken: Option<Broken>,
}

pub struct StatusReport {
    pub audit: AuditHealth,
    pub started_at: SystemTime,
    pub configured_mode: Mode,
    pub nftables_active: bool,
    pub xdp_active: bool,
    pub enforcement: EnforcementStatus,
    pub ports: Vec<PortReport>,
    pub active_grants: usize,
    pub policy_revision: u64,
    /// `None` without XDP.
    pub flows: Option<FlowTableReport>,
    /// Packets the XDP gate decided since its state was created, by reason
    /// (empty without XDP).
    pub xdp_reasons: BTreeMap<Reason, u64>,
}

pub enum Command {
    Status(Reply<StatusReport>),
    Policy(Reply<Policy>),
    UpdatePolicy {
        principal: Principal,
        change: PolicyChange,
        expected_revision: u64,
        reply: Reply<Policy>,
    },
    RequestAccess {
        principal: Principal,
        request: AccessRequest,
        reply: Reply<AccessOutcome>,
    },
    Revoke {
        principal: Principal,
        grant_id: u64,
        terminate: bool,
        reason: String,
        reply: Reply<RevokeOutcome>,
    },
    ListGrants {
        include_ended: bool,
        port: Option<u16>,
        /// Only grants with a smaller id (the page token).
        before: Option<u64>,
        limit: u32,
        reply: Reply<Vec<Grant>>,
    },
    ListConnections(Reply<Vec<ConnectionInfo>>),
    /// Records an event the API saw (a refused call).
    Record {
        event: Event,
        reply: Reply<()>,
    },
    /// Signs a checkpoint of the current head if the last one is older.
    Checkpoint(Reply<Checkpoint>),
    Reload {
        config: Box<Config>,
        reply: Reply<()>,
    },
    /// The kernel announced a change to the namespace's interfaces.
    LinksChanged,
    /// Every handle is gone: stop.
    Stop,
}

/// Whether events a failed commit leaves behind are kept for the next one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Recorded {
    /// Kept: nothing else would record them.
    Once,
    /// Dropped: they are made again from the kernel's state next time.
    AgainIfLost,
}

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
/// Reconciliation takes at most 1/20 of the engine's time.
const RECONCILE_TIME_SHARE_INVERSE: u32 = 20;
/// Audit records kept in the broadcast buffer for slow watchers.
const EVENT_BUFFER: usize = 1024;
const CONFIG_POLICY_KEY: &str = "config_policy_digest";
/// Old `ACCESS_DENIED` payloads are pruned every half retention, at most
/// this often and at least every `PRUNE_EVERY_MAX`, this many at once.
const PRUNE_EVERY_MIN: Duration = Duration::from_secs(1);
const PRUNE_EVERY_MAX: Duration = Duration::from_mins(1);
const PRUNE_BATCH: u32 = 10_000;
/// Events whose commit failed, kept for the next attempt, at most (the
/// oldest are never dropped: new ones are refused with an error log).
const MAX_UNRECORDED: usize = 100_000;
/// Wall-clock milliseconds before which every flow opened under a grant has
/// been audited, so that a restarted agent does not audit them again.
const FLOWS_AUDITED_KEY: &str = "flows_audited_until_ms";
/// The kernel's drop counters as of the last stored denial summaries.
const DENIALS_SUMMARIZED_KEY: &str = "denial_counters_summarized";

pub struct Engine {
    /// This boot's id: every deadline the engine holds is on its clock.
    boot_id: String,
    /// When the boot clock was last recorded in the store.
    witnessed_at: Instant,
    config: Config,
    store: Store,
    policy: Policy,
    active: ActiveGrants,
    enforcers: Enforcers,
    flow_watch: FlowWatch,
    denials: Denials,
    events: broadcast::Sender<AuditRecord>,
    started_at: SystemTime,
    audit: AuditHealth,
    key: CheckpointKey,
    last_checkpoint: Option<Checkpoint>,
    /// Events whose commit failed (disk full), retried first next time.
    unrecorded: Vec<Event>,
}

/// What start-up checked and opened before anything is attached.
pub struct Prepared {
    pub store: Store,
    pub key: CheckpointKey,
    /// The audit chain's verification at start.
    pub chain: Result<(), Broken>,
    /// Set when the database was created anew although enforcement state
    /// existed (the recovery flag): what was found.
    pub reinitialized: Option<String>,
}

/// A time with the store's millisecond precision, so memory and disk agree.
fn now_ms() -> SystemTime {
    crate::time::now_ms()
}

impl Engine {
    /// Opens the store, restores policy and grants, programs the enforcers
    /// and attaches to the interfaces. Nothing is attached if this fails
    /// before the enforcers are opened.
    pub fn start(config: Config, prepared: Prepared) -> anyhow::Result<Engine> {
        let Prepared {
            mut store,
            key,
            chain,
            reinitialized,
        } = prepared;
        let mut first_events = Vec::new();
        if let Some(found) = reinitialized {
            first_events.push(
                Event::new(
                    Kind::DatabaseReinitialized,
                    AGENT,
                    0,
                    format!("database re-initialised with --reinitialize: a new audit chain starts here; found: {found}"),
                )
                .with_details(serde_json::json!({ "found": found })),
            );
        }
        if let Err(broken) = &chain {
            tracing::error!("AUDIT CHAIN BROKEN at {broken}; the agent runs, status reports it");
            first_events.push(
                Event::new(
                    Kind::AuditChainBroken,
                    AGENT,
                    0,
                    format!("the audit chain does not verify at start: {broken}"),
                )
                .with_details(serde_json::json!({
                    "sequence": broken.sequence,
                    "problem": broken.problem,
                })),
            );
        }
        if !first_events.is_empty() {
            let mut batch = store.batch()?;
            for event in first_events {
                batch.audit(event, SystemTime::now())?;
            }
            batch.commit()?;
        }
        let last_checkpoint = store.checkpoints()?.pop();
        let policy = match store.policy()? {
            Some(policy) => policy,
            None => initial_policy(&mut store, &config)?,
        };
        if let Some(tls) = &config.api.tls {
            // A policy changed over the API before the listener was configured.
            tls.check_policy(&policy.rules).map_err(|refusal| {
                anyhow::anyhow!(
                    "the stored policy (changed over the API): {}; remove that rule first \
                     (`jit-gate policy remove-port`, with api.tls unset meanwhile)",
                    refusal.message
                )
            })?;
        }
        let boot_id = crate::clock::boot_id().context("reading this boot's id")?;
        let restored = restore_grants(&store, &boot_id)?;
        let mut active = ActiveGrants::default();
        for grant in &restored.live {
            active.insert(grant.active());
        }
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let enforcers = Enforcers::open(&config);
        let summarized: Option<CounterSnapshot> = store
            .meta(DENIALS_SUMMARIZED_KEY)?
            .and_then(|json| serde_json::from_str(&json).ok());
        let denials = Denials::resume(
            config.denials.summary_interval,
            summarized,
            drop_counters(&enforcers, &policy.protected())?,
        );
        let mut engine = Engine {
            boot_id,
            witnessed_at: Instant::now(),
            enforcers,
            config,
            store,
            policy,
            active,
            flow_watch: FlowWatch::default(),
            denials,
            events,
            started_at: SystemTime::now(),
            audit: AuditHealth {
                broken: chain.err(),
            },
            key,
            last_checkpoint,
            unrecorded: Vec::new(),
        };
        engine.record_restored(&restored)?;
        let protected = engine.policy.protected();
        let mut rebuilt = None;
        if let Some(xdp) = engine.enforcers.xdp_mut() {
            if let Some(why) = xdp.rebuilt() {
                tracing::warn!("kernel state rebuilt from the store: {why}");
                rebuilt = Some(why.to_owned());
            }
            xdp.set_protected_ports(&protected)?;
            let seeded = connections::seed(xdp, &protected)?;
            tracing::info!("{seeded} established connections kept open");
        }
        if let Some(xdp) = engine.enforcers.xdp() {
            let audited = engine
                .store
                .meta(FLOWS_AUDITED_KEY)?
                .and_then(|ms| ms.parse().ok())
                .map(crate::time::from_ms);
            engine.flow_watch = FlowWatch::resume(xdp, audited)?;
        }
        // Grants go into the maps before the program attaches (in the same
        // reconciliation), so granted sources are never dropped during
        // start-up; nftables goes in after, where an interface needs it.
        let repairs = engine.enforcers.reconcile(&engine.active, &protected)?;
        if rebuilt.is_some()
            && let Some(xdp) = engine.enforcers.xdp_mut()
        {
            // Connections opened under the previous program, into its maps,
            // while the new maps were being filled.
            connections::seed(xdp, &protected)?;
        }
        engine.apply_config_policy()?;
        let interfaces: Vec<String> = engine
            .enforcers
            .status()
            .interfaces
            .iter()
            .map(|i| format!("{}: {:?} {}", i.name, i.mode, i.reason))
            .collect();
        engine.commit_events(vec![
            Event::new(
                Kind::AgentStarted,
                AGENT,
                0,
                format!(
                    "agent started in mode {} with {} active grants",
                    engine.config.mode.name(),
                    engine.active.len()
                ),
            )
            .with_details(serde_json::json!({
                "interfaces": interfaces,
                "restored": repairs,
                "kernel_state_rebuilt": rebuilt,
                "carried_across_reboot": restored.carried_summary(),
            })),
        ])?;
        Ok(engine)
    }

    /// Runs until every handle is dropped.
    pub fn spawn(self) -> anyhow::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
        let (commands, receiver) = mpsc::channel();
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

    fn run(mut self, commands: &mpsc::Receiver<Command>) {
        let mut next_observe = Instant::now() + OBSERVE_EVERY;
        let mut next_forget = Instant::now() + FORGET_FLOWS_EVERY;
        let mut next_reconcile = Instant::now() + self.config.reconcile_interval;
        let mut next_prune = Instant::now();
        let mut next_checkpoint = Instant::now() + self.config.audit.checkpoint_interval;
        loop {
            let wake = [
                next_observe,
                next_forget,
                next_reconcile,
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
            if now >= next_reconcile {
                let started = Instant::now();
                self.log_failure("reconciling", Engine::reconcile);
                // Reading every kernel entry back takes time in proportion
                // to the grants: keep it under a fixed share of the
                // engine's time.
                let took = started.elapsed();
                tracing::debug!("reconciled in {took:?}");
                next_reconcile = Instant::now()
                    + self
                        .config
                        .reconcile_interval
                        .max(took * RECONCILE_TIME_SHARE_INVERSE);
                release_free_memory();
            }
            if self.witnessed_at.elapsed() >= WITNESS_EVERY {
                self.log_failure("recording the boot clock", Engine::witness_boot_clock);
            }
        }
    }

    fn log_failure(&mut self, what: &str, f: impl FnOnce(&mut Self) -> anyhow::Result<()>) {
        if let Err(e) = f(self) {
            tracing::error!("{what}: {e:#}");
        }
    }

    /// When the next grant ends, on the monotonic clock the engine sleeps
    /// on; it wakes then and checks the boot clock.
    fn next_expiry_instant(&self) -> Option<Instant> {
        Some(Instant::now() + self.active.next_deadline()?.remaining())
    }

    /// Applies commands in arrival order; consecutive requests share one
    /// store transaction.
    /// A burst of interface changes (creating one interface announces it
    /// several times) is scanned for once, after the batch.
    fn handle(&mut self, batch: Vec<Command>) {
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

    fn handle_one(&mut self, command: Command) {
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
                        grants.iter_mut().for_each(Grant::refresh_display);
                        grants
                    })
                    .map_err(|e| Refusal::unavailable("listing grants", e));
                let _ = reply.send(listed);
            }
            Command::ListConnections(reply) => {
                let listed =
                    connections::list(self.enforcers.xdp(), &self.policy.protected(), &self.active)
                        .map_err(|e| Refusal::internal("listing connections", e));
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
            Command::LinksChanged => {
                self.log_failure("gating new interfaces", |e| {
                    let repairs = e.enforcers.scan_interfaces()?;
                    e.record_drift(&repairs)
                });
            }
            // Seen by the loop itself.
            Command::Stop => {}
        }
    }

    /// Commits `events` in one transaction and publishes them.
    fn commit_events(&mut self, events: Vec<Event>) -> anyhow::Result<()> {
        self.commit_events_and_meta(events, &[], Recorded::Once)
    }

    /// `commit_events`, also setting meta values in the same transaction.
    /// Events that cannot be committed (disk full) are kept and committed
    /// first next time, so none is lost while the agent runs; events made
    /// again from the kernel's state next time are not kept (they would be
    /// recorded twice).
    fn commit_events_and_meta(
        &mut self,
        events: Vec<Event>,
        meta: &[(&str, String)],
        recorded: Recorded,
    ) -> anyhow::Result<()> {
        let mut pending = std::mem::take(&mut self.unrecorded);
        let kept = pending.len();
        pending.extend(events);
        if pending.is_empty() && meta.is_empty() {
            return Ok(());
        }
        let attempt = (|| -> anyhow::Result<Vec<AuditRecord>> {
            let mut batch = self.store.batch()?;
            let at = SystemTime::now();
            for event in &pending {
                batch.audit(event.clone(), at)?;
            }
            for (key, value) in meta {
                batch.set_meta(key, value)?;
            }
            Ok(batch.commit()?)
        })();
        match attempt {
            Ok(records) => {
                self.publish(records);
                Ok(())
            }
            Err(e) => {
                if recorded == Recorded::AgainIfLost {
                    pending.truncate(kept);
                }
                if pending.len() > MAX_UNRECORDED {
                    tracing::error!(
                        "{} audit events wait for the store; dropping the newest {} of them",
                        pending.len(),
                        pending.len() - MAX_UNRECORDED
                    );
                    pending.truncate(MAX_UNRECORDED);
                }
                self.unrecorded = pending;
                Err(e)
            }
        }
    }

    /// Signs the current head unless the last checkpoint already covers it;
    /// stores it and writes it to the log.
    fn checkpoint(&mut self) -> anyhow::Result<Checkpoint> {
        let (sequence, hash) = self.store.audit_head();
        if let Some(last) = &self.last_checkpoint
            && last.sequence == sequence
        {
            return Ok(last.clone());
        }
        let checkpoint = self
            .key
            .sign(sequence, &hash, crate::time::to_ms(SystemTime::now()));
        self.store.save_checkpoint(&checkpoint)?;
        tracing::info!(
            sequence = checkpoint.sequence,
            hash = %checkpoint.hash,
            at_ms = checkpoint.at_ms,
            signature = %checkpoint.signature,
            public_key = %self.key.public_hex(),
            "audit checkpoint"
        );
        self.last_checkpoint = Some(checkpoint.clone());
        Ok(checkpoint)
    }

    /// Drops the payload of `ACCESS_DENIED` records past their retention.
    fn prune_denied(&mut self) -> anyhow::Result<()> {
        let before = SystemTime::now()
            .checked_sub(self.config.audit.denied_retention)
            .unwrap_or(std::time::UNIX_EPOCH);
        let pruned = self.store.prune_denied(before, PRUNE_BATCH)?;
        if pruned > 0 {
            tracing::info!("pruned the payload of {pruned} access-denied records past retention");
        }
        Ok(())
    }

    fn publish(&self, records: Vec<AuditRecord>) {
        for record in records {
            record.log();
            // No watcher is not an error.
            let _ = self.events.send(record);
        }
    }

    fn status(&self) -> Result<StatusReport, Refusal> {
        let week_ago = SystemTime::now() - Duration::from_hours(168);
        let activity = self
            .store
            .port_activity(week_ago)
            .map_err(|e| Refusal::unavailable("reading grant history", e))?;
        let protected = self.policy.protected();
        let connections = connections::list(self.enforcers.xdp(), &protected, &self.active)
            .map_err(|e| Refusal::internal("listing connections", e))?;
        let (counters, flows) = match self.enforcers.xdp() {
            Some(xdp) => {
                let read = || -> anyhow::Result<_> {
                    let counters = xdp.counters(&protected)?;
                    let refused = |reason| counters.by_reason.get(&reason).copied().unwrap_or(0);
                    let flows = FlowTableReport {
                        capacity: xdp.flow_capacity(),
                        tracked: xdp.flows()?.len(),
                        per_grant_quota: xdp.options().flow_quota,
                        refused_quota: refused(Reason::DropFlowQuota),
                        refused_opens_exhausted: refused(Reason::DropOpensExhausted),
                        refused_table_full: refused(Reason::DropFlowTableFull),
                    };
                    Ok((counters, Some(flows)))
                };
                // Like the layers' health, a failed read shows, and fails nothing.
                read().unwrap_or_else(|e| {
                    tracing::warn!("reading the XDP counters for the status: {e:#}");
                    (Counters::default(), None)
                })
            }
            None => (Counters::default(), None),
        };
        let ports = protected
            .iter()
            .map(|&(protocol, port)| {
                let history = activity
                    .iter()
                    .find(|(p, pr, _, _)| *p == port && *pr == protocol);
                PortReport {
                    protocol,
                    port,
                    active_grants: self
                        .active
                        .iter()
                        .filter(|g| g.target.protocol == protocol && g.target.port == port)
                        .count(),
                    connections: connections
                        .iter()
                        .filter(|c| {
                            c.connection.protocol == protocol && c.connection.local.port() == port
                        })
                        .count(),
                    grants_last_7_days: history.map_or(0, |h| h.2),
                    last_access: history.map(|h| h.3),
                    passed: counters
                        .by_port
                        .get(&(protocol, port))
                        .map_or(0, |c| c.passed),
                    dropped: counters
                        .by_port
                        .get(&(protocol, port))
                        .map_or(0, |c| c.dropped),
                    refused_connections: counters
                        .by_port
                        .get(&(protocol, port))
                        .map_or(0, |c| c.refused),
                }
            })
            .collect();
        Ok(StatusReport {
            audit: self.audit.clone(),
            started_at: self.started_at,
            configured_mode: self.config.mode,
            nftables_active: self.enforcers.nftables_active(),
            xdp_active: self.enforcers.xdp().is_some(),
            enforcement: self.enforcers.check(),
            ports,
            active_grants: self.active.len(),
            policy_revision: self.policy.revision,
            flows,
            xdp_reasons: counters.by_reason,
        })
    }

    fn reconcile(&mut self) -> anyhow::Result<()> {
        let repairs = self
            .enforcers
            .reconcile(&self.active, &self.policy.protected())?;
        self.record_drift(&repairs)
    }

    /// Logs and audits repairs of drift.
    fn record_drift(&mut self, repairs: &[String]) -> anyhow::Result<()> {
        if !repairs.is_empty() {
            tracing::warn!("drift repaired: {}", repairs.join("; "));
            self.commit_events(vec![
                Event::new(Kind::DriftRepaired, AGENT, 0, repairs.join("; "))
                    .with_details(serde_json::json!({ "repairs": repairs })),
            ])?;
        }
        Ok(())
    }

    /// Audits the flows opened under grants since the last call, collects
    /// deny events, and at the end of each interval stores the denial
    /// summaries. Nothing is marked audited unless its records are stored.
    fn observe(&mut self) -> anyhow::Result<()> {
        let mut events = Vec::new();
        let mut meta = Vec::new();
        let mut flows_seen = None;
        if let Some(xdp) = self.enforcers.xdp() {
            // Every flow opened before this instant is in the map read next.
            let read_at = SystemTime::now();
            let (fresh, snapshot) = self.flow_watch.new_flows(xdp)?;
            if !fresh.is_empty() {
                meta.push((FLOWS_AUDITED_KEY, crate::time::to_ms(read_at).to_string()));
            }
            flows_seen = Some(snapshot);
            events.extend(fresh.into_iter().map(|(connection, grant_id)| {
                Event::new(
                    Kind::ConnectionOpened,
                    AGENT,
                    grant_id,
                    format!("connection {connection} opened under grant {grant_id}"),
                )
                .with_details(serde_json::json!({
                    "protocol": connection.protocol.name(),
                    "remote": connection.remote.to_string(),
                    "local": connection.local.to_string(),
                }))
            }));
        }
        let summaries = self.collect_denials()?;
        if let Some(summaries) = &summaries {
            events.extend(summaries.events.iter().cloned());
            meta.push((
                DENIALS_SUMMARIZED_KEY,
                serde_json::to_string(&summaries.counters)?,
            ));
        }
        let stored = self.commit_events_and_meta(events, &meta, Recorded::AgainIfLost);
        if let Some(summaries) = summaries {
            match &stored {
                Ok(()) => self.denials.stored(summaries),
                Err(_) => self.denials.not_stored(),
            }
        }
        if stored.is_ok()
            && let Some(snapshot) = flows_seen
        {
            self.flow_watch.mark_audited(snapshot);
        }
        stored
    }

    /// Samples the deny events; at the end of the interval, the summaries.
    fn collect_denials(&mut self) -> anyhow::Result<Option<denials::Summaries>> {
        let protected = self.policy.protected();
        if let Some(ring) = self.enforcers.deny_events() {
            while let Some(item) = ring.next() {
                if let Some(denied) = crate::enforce::xdp::parse_deny_event(&item) {
                    let to_protected = denied
                        .protocol
                        .is_some_and(|p| protected.contains(&(p, denied.port)));
                    self.denials.sample(&denied, to_protected);
                }
            }
        }
        if !self.denials.due(Instant::now()) {
            return Ok(None);
        }
        let counters = drop_counters(&self.enforcers, &protected)?;
        let active = &self.active;
        Ok(Some(self.denials.summarize(counters, |grant| {
            active
                .get(grant)
                .map(|g| (g.target.protocol, g.target.port))
        })))
    }

    fn forget_dead_flows(&mut self) -> anyhow::Result<()> {
        let protected = self.policy.protected();
        let active = &self.active;
        if let Some(xdp) = self.enforcers.xdp_mut() {
            let forgotten = connections::forget_dead_flows(xdp, &protected, active)?;
            if forgotten > 0 {
                tracing::debug!("forgot {forgotten} flows of ended connections");
            }
        }
        Ok(())
    }

    fn reload(&mut self, config: Config) -> Result<(), Refusal> {
        for (field, same) in [
            ("mode", config.mode == self.config.mode),
            ("database", config.database == self.config.database),
            ("pin_dir", config.pin_dir == self.config.pin_dir),
            ("nft_table", config.nft_table == self.config.nft_table),
            ("flows", config.flows == self.config.flows),
            ("denials", config.denials == self.config.denials),
            ("metrics", config.metrics == self.config.metrics),
            (
                "api.unix_socket",
                config.api.unix_socket == self.config.api.unix_socket,
            ),
            (
                "api.tls.listen",
                config.api.tls.as_ref().map(|t| &t.listen)
                    == self.config.api.tls.as_ref().map(|t| &t.listen),
            ),
            (
                "api.max_streams_per_principal",
                config.api.max_streams_per_principal == self.config.api.max_streams_per_principal,
            ),
            (
                "api.stream_stall_timeout",
                config.api.stream_stall_timeout == self.config.api.stream_stall_timeout,
            ),
            (
                "audit.signing_key",
                config.audit.signing_key == self.config.audit.signing_key,
            ),
        ] {
            if !same {
                return Err(Refusal::new(
                    RefusalKind::FailedPrecondition,
                    format!("field `{field}` cannot change without a restart; configuration kept"),
                ));
            }
        }
        let interfaces_changed = (&config.interfaces, &config.exclude_interfaces)
            != (&self.config.interfaces, &self.config.exclude_interfaces);
        self.config = config;
        if interfaces_changed {
            self.enforcers.set_config(&self.config);
            let repairs = self
                .enforcers
                .scan_interfaces()
                .map_err(|e| Refusal::internal("gating the interfaces", format!("{e:#}")))?;
            self.record_drift(&repairs)
                .map_err(|e| Refusal::internal("recording drift", format!("{e:#}")))?;
        }
        self.apply_config_policy()
            .map_err(|e| Refusal::internal("applying the configured policy", e))?;
        self.commit_events(vec![
            Event::new(Kind::ConfigReloaded, AGENT, 0, "configuration reloaded")
                .with_details(serde_json::json!({ "interfaces": self.config.interfaces })),
        ])
        .map_err(|e| Refusal::internal("recording the reload", e))
    }

    /// Applies the configuration file's policy if it changed since it was
    /// last applied (API changes stand until the file's policy is edited).
    fn apply_config_policy(&mut self) -> anyhow::Result<()> {
        let Some(rules) = self.config.policy.clone() else {
            return Ok(());
        };
        let digest = policy_digest(&rules);
        if self.store.meta(CONFIG_POLICY_KEY)?.as_deref() == Some(digest.as_str()) {
            return Ok(());
        }
        self.update_policy("config", PolicyChange::Replace(rules), 0)?;
        let mut batch = self.store.batch()?;
        batch.set_meta(CONFIG_POLICY_KEY, &digest)?;
        batch.commit()?;
        Ok(())
    }
}

/// The kernel's drop counters (zero without XDP).
fn drop_counters(
    enforcers: &Enforcers,
    protected: &BTreeSet<(Protocol, u16)>,
) -> anyhow::Result<CounterSnapshot> {
    let Some(xdp) = enforcers.xdp() else {
        return Ok(CounterSnapshot::default());
    };
    Ok(CounterSnapshot::new(
        &xdp.counters(protected)?,
        &xdp.grant_flow_counts()?,
    ))
}

/// Watches the namespace's interfaces on a thread of its own and tells the
/// engine of every change, so that a new interface is gated at once (the
/// reconciliation would find it too, later).
fn spawn_link_watcher(commands: mpsc::Sender<Command>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("jit-gate-links".into())
        .spawn(move || {
            let watched =
                crate::enforce::links::watch(|| commands.send(Command::LinksChanged).is_ok());
            if let Err(e) = watched {
                tracing::error!(
                    "watching interfaces stopped (reconciliation still finds new ones): {e}"
                );
            }
        })
        .context("starting the interface watcher")?;
    Ok(())
}

/// Returns memory freed after a reconciliation (the kernel state read back
/// for comparison) to the system; glibc keeps it in its arenas otherwise.
fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn policy_digest(rules: &[PortRule]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(
        serde_json::to_vec(rules).expect("rules serialise"),
    ))
}

/// The first policy of a new database: the configuration's, else the default.
fn initial_policy(store: &mut Store, config: &Config) -> anyhow::Result<Policy> {
    let policy = match &config.policy {
        Some(rules) => Policy {
            rules: rules.clone(),
            revision: 1,
        },
        None => Policy::default(),
    };
    let mut batch = store.batch()?;
    batch.save_policy(&policy)?;
    if let Some(rules) = &config.policy {
        batch.set_meta(CONFIG_POLICY_KEY, &policy_digest(rules))?;
    }
    batch.audit(
        Event::new(Kind::PolicyChanged, AGENT, 0, "initial policy")
            .with_details(serde_json::json!({ "policy": policy })),
        SystemTime::now(),
    )?;
    batch.commit()?;
    Ok(policy)
}

impl Engine {
    /// Targets whose enforcement must be recomputed after grants changed.
    fn enforce(&mut self, targets: &BTreeSet<GrantTarget>) {
        if let Err(e) = self.enforcers.apply(targets, &self.active) {
            // The store is the truth; the next reconciliation retries.
            tracing::error!("programming enforcers (reconciliation will retry): {e:#}");
        }
    }
}
