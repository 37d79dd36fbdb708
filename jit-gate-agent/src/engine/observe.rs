//! Watching the kernel between commands: flows opened under grants
//! audited, deny events sampled and summarised per interval, dead flows
//! removed, and every layer reconciled with the active grants (drift
//! recorded): the kernel read on another thread, the comparison in steps
//! between commands.

use std::{
    collections::{BTreeSet, VecDeque},
    time::{Duration, Instant, SystemTime},
};

use super::{
    Command, DENIALS_SUMMARIZED_KEY, Engine, FLOWS_AUDITED_KEY,
    denials::{self, CounterSnapshot},
    record::Recorded,
};
use crate::{
    audit::{AGENT, Event, Kind},
    enforce::{Enforcement, KernelSnapshot, NewFlows, Pass},
    net::Protocol,
};

/// The kernel's drop counters (zero without XDP).
pub(super) fn drop_counters(
    enforcement: &Enforcement,
    protected: &BTreeSet<(Protocol, u16)>,
) -> anyhow::Result<CounterSnapshot> {
    Ok(enforcement
        .drop_counters(protected)?
        .map(|(counters, grants)| CounterSnapshot::new(&counters, &grants))
        .unwrap_or_default())
}

/// Time the engine spends comparing a snapshot before it looks at its
/// commands again.
const RECONCILE_STEP: Duration = Duration::from_millis(5);

/// A reconciliation under way: the kernel being read on the reader's
/// thread, one snapshot per layer, each compared in steps once it came.
pub(super) struct Reconciliation {
    started: Instant,
    reads_pending: usize,
    passes: VecDeque<Pass>,
}

impl Engine {
    /// Starts a reconciliation: repairs ports, pins, interfaces and the
    /// nftables structure at once, and reads the grant entries on a thread
    /// of their own, which sends them back as commands.
    pub(super) fn start_reconcile(&mut self) -> anyhow::Result<()> {
        let (repairs, reader) = self
            .enforcement
            .begin_reconcile(&self.active, &self.policy.protected())?;
        let results = self.read_results.clone();
        let reads_pending = reader.parts();
        let spawned = results.map(|results| {
            std::thread::Builder::new()
                .name("jit-gate-read".into())
                .spawn(move || {
                    reader.read(|read| {
                        let _ = results.send(Command::KernelRead(Box::new(read)));
                    });
                })
        });
        match spawned {
            Some(Ok(_)) => {
                self.reconciliation = Some(Reconciliation {
                    started: Instant::now(),
                    reads_pending,
                    passes: VecDeque::new(),
                });
            }
            Some(Err(e)) => {
                self.enforcement.end_reconcile();
                tracing::error!("reconciling: starting the kernel reader: {e}");
            }
            None => self.enforcement.end_reconcile(),
        }
        self.record_drift(&repairs)
    }

    /// A snapshot from the reader arrived: its comparison is queued.
    pub(super) fn kernel_read(&mut self, read: anyhow::Result<KernelSnapshot>) {
        let Some(reconciliation) = &mut self.reconciliation else {
            return;
        };
        reconciliation.reads_pending = reconciliation.reads_pending.saturating_sub(1);
        match read {
            Ok(snapshot) => reconciliation.passes.push_back(Pass::new(snapshot)),
            Err(e) => tracing::error!("reconciling: reading the kernel: {e:#}"),
        }
    }

    /// Whether a snapshot is waiting to be compared (the engine then only
    /// looks at its commands between steps).
    pub(super) fn comparing(&self) -> bool {
        self.reconciliation
            .as_ref()
            .is_some_and(|r| !r.passes.is_empty())
    }

    pub(super) fn reconciling(&self) -> bool {
        self.reconciliation.is_some()
    }

    /// Compares the next part of the first snapshot waiting; returns how
    /// long the whole reconciliation took once it is done.
    pub(super) fn reconcile_step(&mut self) -> anyhow::Result<Option<Duration>> {
        let Some(reconciliation) = &mut self.reconciliation else {
            return Ok(None);
        };
        let mut result = Ok(());
        if let Some(pass) = reconciliation.passes.front_mut() {
            match self.enforcement.reconcile_step(
                pass,
                &self.active,
                &self.policy.protected(),
                RECONCILE_STEP,
            ) {
                Ok(None) => return Ok(None),
                Ok(Some(repairs)) => result = self.record_drift(&repairs),
                // This snapshot is given up; the next reconciliation
                // compares again.
                Err(e) => result = Err(e),
            }
            let reconciliation = self.reconciliation.as_mut().expect("checked above");
            reconciliation.passes.pop_front();
        }
        let reconciliation = self.reconciliation.as_ref().expect("checked above");
        if reconciliation.reads_pending > 0 || !reconciliation.passes.is_empty() {
            return result.map(|()| None);
        }
        let took = reconciliation.started.elapsed();
        self.reconciliation = None;
        self.enforcement.end_reconcile();
        result.map(|()| Some(took))
    }

    /// Audits the flows opened under grants since the last call, collects
    /// deny events, and at the end of each interval stores the denial
    /// summaries. Nothing is marked audited unless its records are stored.
    pub(super) fn observe(&mut self) -> anyhow::Result<()> {
        let mut events = Vec::new();
        let mut meta = Vec::new();
        let mut flows_seen = None;
        // Every flow opened before this instant is in the map read next.
        let read_at = SystemTime::now();
        if let Some(NewFlows {
            opened: fresh,
            snapshot,
        }) = self.enforcement.new_flows()?
        {
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
            self.enforcement.flows_audited(snapshot);
        }
        stored
    }

    /// Samples the deny events; at the end of the interval, the summaries.
    pub(super) fn collect_denials(&mut self) -> anyhow::Result<Option<denials::Summaries>> {
        let protected = self.policy.protected();
        let denials = &mut self.denials;
        self.enforcement.drain_denied(|denied| {
            let to_protected = denied
                .protocol
                .is_some_and(|p| protected.contains(&(p, denied.port)));
            denials.sample(denied, to_protected);
        });
        if !self.denials.due(Instant::now()) {
            return Ok(None);
        }
        let counters = drop_counters(&self.enforcement, &protected)?;
        let active = &self.active;
        Ok(Some(self.denials.summarize(counters, |grant| {
            active
                .get(grant)
                .map(|g| (g.target.protocol, g.target.port))
        })))
    }

    pub(super) fn forget_dead_flows(&mut self) -> anyhow::Result<()> {
        let protected = self.policy.protected();
        let forgotten = self
            .enforcement
            .forget_dead_flows(&protected, &self.active)?;
        if forgotten > 0 {
            tracing::debug!("forgot {forgotten} flows of ended connections");
        }
        Ok(())
    }
}
