//! Recording: audit events committed (with meta values, in one
//! transaction) and published to watchers, kept for the next attempt when
//! the store refuses them; signed checkpoints; retention of denial records.

use std::time::SystemTime;

use super::Engine;
use crate::{
    audit::{AGENT, AuditRecord, Event, Kind},
    checkpoint::Checkpoint,
};

/// Whether events a failed commit leaves behind are kept for the next one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Recorded {
    /// Kept: nothing else would record them.
    Once,
    /// Dropped: they are made again from the kernel's state next time.
    AgainIfLost,
}

/// Events whose commit failed, kept for the next attempt, at most (the
/// oldest are never dropped: new ones are refused with an error log).
const MAX_UNRECORDED: usize = 100_000;

const PRUNE_BATCH: u32 = 10_000;

impl Engine {
    /// Commits `events` in one transaction and publishes them.
    pub(super) fn commit_events(&mut self, events: Vec<Event>) -> anyhow::Result<()> {
        self.commit_events_and_meta(events, &[], Recorded::Once)
    }

    /// `commit_events`, also setting meta values in the same transaction.
    /// Events that cannot be committed (disk full) are kept and committed
    /// first next time, so none is lost while the agent runs; events made
    /// again from the kernel's state next time are not kept (they would be
    /// recorded twice).
    pub(super) fn commit_events_and_meta(
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
    pub(super) fn checkpoint(&mut self) -> anyhow::Result<Checkpoint> {
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
    pub(super) fn prune_denied(&mut self) -> anyhow::Result<()> {
        let before = SystemTime::now()
            .checked_sub(self.config.audit.denied_retention)
            .unwrap_or(std::time::UNIX_EPOCH);
        let pruned = self.store.prune_denied(before, PRUNE_BATCH)?;
        if pruned > 0 {
            tracing::info!("pruned the payload of {pruned} access-denied records past retention");
        }
        Ok(())
    }

    pub(super) fn publish(&self, records: Vec<AuditRecord>) {
        AuditRecord::log_committed(&records);
        for record in records {
            // No watcher is not an error.
            let _ = self.events.send(record);
        }
    }

    /// Logs and audits repairs of drift.
    pub(super) fn record_drift(&mut self, repairs: &[String]) -> anyhow::Result<()> {
        if !repairs.is_empty() {
            tracing::warn!("drift repaired: {}", repairs.join("; "));
            self.commit_events(vec![
                Event::new(Kind::DriftRepaired, AGENT, 0, repairs.join("; "))
                    .with_details(serde_json::json!({ "repairs": repairs })),
            ])?;
        }
        Ok(())
    }
}
