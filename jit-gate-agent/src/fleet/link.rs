//! The fleet link's state as the engine (status, metrics) and the audit
//! log see it: connected or not since when, why the last call failed, the
//! revision applied, and counts of outcomes. Transitions are audited.

use std::{collections::VecDeque, time::SystemTime};

use crate::{
    audit::{AGENT, Event, Kind},
    engine::{Command, EngineHandle, FleetCommand, FleetReport},
    refusal::Refusal,
    store::FleetCursor,
};

pub(super) struct Link {
    pub(super) engine: EngineHandle,
    report: FleetReport,
    /// The connection state last audited (`None`: nothing audited yet).
    audited: Option<bool>,
    /// The grant ids refused lately, so that a grant answered again (its
    /// event redelivered after a session broke before its revision was
    /// persisted) counts once; applied grants count once by the engine's
    /// idempotency key.
    refused: VecDeque<String>,
}

/// Refused grant ids remembered for counting.
const REFUSALS_REMEMBERED: usize = 4096;

impl Link {
    pub(super) fn new(host: String, engine: EngineHandle) -> Link {
        Link {
            engine,
            report: FleetReport {
                host,
                connected: false,
                since: SystemTime::now(),
                last_error: String::new(),
                applied_revision: 0,
                grants_applied: 0,
                grants_refused: 0,
            },
            audited: None,
            refused: VecDeque::new(),
        }
    }

    pub(super) fn host(&self) -> &str {
        &self.report.host
    }

    pub(super) async fn cursor(&self) -> Result<Option<FleetCursor>, Refusal> {
        let host = self.report.host.clone();
        self.engine
            .call(|reply| FleetCommand::Cursor { host, reply }.into())
            .await
    }

    /// Reports the state; persists `cursor` if given.
    pub(super) async fn report(&mut self, cursor: Option<FleetCursor>) -> Result<(), Refusal> {
        if let Some(cursor) = cursor {
            self.report.applied_revision = cursor.revision;
        }
        let report = self.report.clone();
        self.engine
            .call(|reply| {
                FleetCommand::Progress {
                    report,
                    cursor,
                    reply,
                }
                .into()
            })
            .await
    }

    /// (principal, request id) of every live fleet grant.
    pub(super) async fn live(&self) -> anyhow::Result<Vec<(String, String)>> {
        self.engine
            .call(|reply| FleetCommand::Live(reply).into())
            .await
            .map_err(|e| anyhow::anyhow!("listing live fleet grants: {}", e.message))
    }

    /// Counts a grant applied for the first time.
    pub(super) fn applied(&mut self) {
        self.report.grants_applied += 1;
    }

    /// Counts grant `id` refused, unless it was refused lately.
    pub(super) fn refused(&mut self, id: &str) {
        if self.refused.iter().any(|r| r == id) {
            return;
        }
        if self.refused.len() == REFUSALS_REMEMBERED {
            self.refused.pop_front();
        }
        self.refused.push_back(id.to_owned());
        self.report.grants_refused += 1;
    }

    /// etcd answered: reported, audited if it was not connected.
    pub(super) async fn connected(&mut self, endpoints: &str) -> Result<(), Refusal> {
        if !self.report.connected {
            self.report.connected = true;
            self.report.since = SystemTime::now();
        }
        self.report(None).await?;
        if self.audited != Some(true) {
            self.audit(
                Kind::FleetConnected,
                format!("fleet: connected to etcd at {endpoints}"),
                serde_json::json!({ "endpoints": endpoints, "host": self.report.host }),
            )
            .await;
            self.audited = Some(true);
        }
        Ok(())
    }

    /// etcd is unreachable (or refused a call): reported, and audited on
    /// the transition. Enforcement goes on regardless.
    pub(super) async fn disconnected(&mut self, error: String) {
        tracing::warn!("fleet: etcd unreachable, enforcement goes on: {error}");
        if self.report.connected || self.audited.is_none() {
            self.report.since = SystemTime::now();
        }
        self.report.connected = false;
        self.report.last_error.clone_from(&error);
        if let Err(e) = self.report(None).await {
            tracing::error!("fleet: reporting the disconnection: {}", e.message);
        }
        if self.audited != Some(false) {
            self.audit(
                Kind::FleetDisconnected,
                format!("fleet: etcd unreachable, enforcement goes on: {error}"),
                serde_json::json!({ "error": error, "host": self.report.host }),
            )
            .await;
            self.audited = Some(false);
        }
    }

    pub(super) async fn audit(&self, kind: Kind, message: String, details: serde_json::Value) {
        let event = Event::new(kind, AGENT, 0, message).with_details(details);
        if let Err(e) = self
            .engine
            .call(|reply| Command::Record { event, reply })
            .await
        {
            tracing::error!("fleet: auditing {}: {}", kind.name(), e.message);
        }
    }
}
