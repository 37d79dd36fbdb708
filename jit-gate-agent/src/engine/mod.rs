//! The engine: the one writer of grants and policy. API calls arrive as
//! commands on a channel and are applied in order on a dedicated thread:
//! policy check → store (one transaction) → enforcement → audit watchers.
//! Between commands the same thread expires grants on time, audits new
//! flows and denied sources, and reconciles enforcement. The kernel is
//! reached only through `enforce::Enforcement`, given domain state.

mod activity;
mod approvals;
mod configure;
mod cycles;
mod denials;
mod fleet;
mod lifecycle;
mod observe;
mod record;
mod restore;
mod run;
mod status;

use std::time::{Instant, SystemTime};

use anyhow::Context;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::{broadcast, oneshot};

pub use crate::enforce::{
    ConnectionInfo, EnforcementStatus, FlowTableReport, InterfaceMode, InterfaceStatus,
    LayerHealth, Repair,
};

use crate::{
    approvals::{ApprovalRequest, RequestFilter},
    audit::{AGENT, AuditRecord, Broken, Event, Kind},
    auth::Principal,
    checkpoint::{Checkpoint, CheckpointKey},
    config::Config,
    enforce::Enforcement,
    grants::{ActiveGrants, Grant},
    policy::{Policy, PortRule, RuleProtocol},
    refusal::Refusal,
    request::AccessRequest,
    store::Store,
};
use configure::initial_policy;
use denials::{CounterSnapshot, Denials};
pub use fleet::{FLEET_PRINCIPAL_PREFIX, FleetCommand, FleetReport};
use observe::drop_counters;
use restore::restore_grants;
pub use run::EngineHandle;
pub use status::{PortReport, StatusReport};

pub type Reply<T> = oneshot::Sender<Result<T, Refusal>>;

pub enum PolicyChange {
    Replace(Vec<PortRule>),
    Upsert(PortRule),
    Remove { port: u16, protocol: RuleProtocol },
}

pub struct AccessOutcome {
    pub grants: Vec<Grant>,
    pub replayed: bool,
    /// Set when the request is (or was) held for approval.
    pub approval: Option<ApprovalRequest>,
}

pub struct RevokeOutcome {
    pub grant: Grant,
    pub connections_terminated: usize,
}

/// Whether the audit chain verified at start (and the problem if not).
#[derive(Clone, Debug, Default)]
pub struct AuditHealth {
    pub broken: Option<Broken>,
}

pub enum Command {
    /// A part of what a reconciliation cycle's reader read of a layer
    /// (sent by its thread).
    KernelRead {
        layer: crate::enforce::Layer,
        /// The cycle that started the reader (`Cycles` numbers them).
        cycle: u64,
        read: Box<anyhow::Result<crate::enforce::KernelRead>>,
    },
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
    /// An approver approves (`approve`) or denies a held request.
    Decide {
        principal: Principal,
        id: u64,
        approve: bool,
        comment: String,
        reply: Reply<ApprovalRequest>,
    },
    ListRequests {
        filter: RequestFilter,
        /// Only requests with a smaller id (the page token).
        before: Option<u64>,
        limit: u32,
        reply: Reply<Vec<ApprovalRequest>>,
    },
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
    /// Fleet mode's progress and grant ends.
    Fleet(FleetCommand),
    /// The kernel announced a change to the namespace's interfaces.
    LinksChanged,
    /// Every handle is gone: stop.
    Stop,
}

/// Audit records kept in the broadcast buffer for slow watchers.
const EVENT_BUFFER: usize = 1024;
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
    /// Each port's grants of the last 7 days and its latest, for status.
    activity: activity::PortActivity,
    enforcement: Enforcement,
    denials: Denials,
    events: broadcast::Sender<AuditRecord>,
    started_at: SystemTime,
    audit: AuditHealth,
    key: CheckpointKey,
    last_checkpoint: Option<Checkpoint>,
    /// Events whose commit failed (disk full), retried first next time.
    unrecorded: Vec<Event>,
    /// How long reconciliations took (seconds), shown as a metric.
    reconcile_durations: Histogram,
    /// Each layer's reconciliation cycle.
    cycles: cycles::Cycles,
    /// Where the reconciliation's reader sends what it read (the engine's
    /// own command channel, once it runs).
    read_results: Option<std::sync::mpsc::Sender<Command>>,
    /// The fleet link's last report (`None`: fleet mode off).
    fleet_report: Option<FleetReport>,
}

/// Buckets of the reconciliation time: 1 ms to about 16 s.
fn reconcile_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
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
    /// Opens the store, restores policy and grants, programs every
    /// enforcement layer and attaches to the interfaces. Nothing is
    /// attached if this fails before enforcement is opened.
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
        let active: ActiveGrants = restored.live.iter().map(Grant::active).collect();
        let activity = activity::PortActivity::load(&store, SystemTime::now())?;
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let enforcement = Enforcement::open(&config);
        let summarized: Option<CounterSnapshot> = store
            .meta(DENIALS_SUMMARIZED_KEY)?
            .and_then(|json| serde_json::from_str(&json).ok());
        let denials = Denials::resume(
            config.denials.summary_interval,
            summarized,
            drop_counters(&enforcement, &policy.protected())?,
        );
        let cycles = cycles::Cycles::new(config.reconcile_interval);
        let mut engine = Engine {
            boot_id,
            witnessed_at: Instant::now(),
            enforcement,
            config,
            store,
            policy,
            active,
            activity,
            denials,
            events,
            started_at: SystemTime::now(),
            audit: AuditHealth {
                broken: chain.err(),
            },
            key,
            last_checkpoint,
            unrecorded: Vec::new(),
            reconcile_durations: reconcile_histogram(),
            cycles,
            read_results: None,
            fleet_report: None,
        };
        engine.record_restored(&restored)?;
        let protected = engine.policy.protected();
        let audited = engine
            .store
            .meta(FLOWS_AUDITED_KEY)?
            .and_then(|ms| ms.parse().ok())
            .map(crate::time::from_ms);
        let attached = engine
            .enforcement
            .attach(&engine.active, &protected, audited)?;
        engine.apply_config_policy()?;
        let interfaces: Vec<String> = engine
            .enforcement
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
                "restored": attached.repairs,
                "kernel_state_rebuilt": attached.rebuilt,
                "carried_across_reboot": restored.carried_summary(),
            })),
        ])?;
        Ok(engine)
    }
}
