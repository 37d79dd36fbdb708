//! Watching the kernel between commands: flows opened under grants
//! audited, deny events sampled and summarised per interval, dead flows
//! removed (reconciliation is `cycles`).

use std::{
    collections::BTreeSet,
    time::{Instant, SystemTime},
};

use super::{
    DENIALS_SUMMARIZED_KEY, Engine, FLOWS_AUDITED_KEY,
    denials::{self, CounterSnapshot},
    record::Recorded,
};
use crate::{
    audit::{AGENT, Event, Kind},
    enforce::{Enforcement, NewFlows},
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

impl Engine {
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
