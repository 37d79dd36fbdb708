//! The status report: per protected port (grants, connections, history,
//! kernel drop counters), the flow table, enforcement health and the
//! audit chain's, pending approvals and reconciliation times.

use std::{collections::BTreeMap, time::SystemTime};

use jit_gate_common::verdict::Reason;
use prometheus_client::metrics::histogram::Histogram;

use super::{AuditHealth, EnforcementStatus, Engine, FlowTableReport};
use crate::{config::Mode, enforce::Counters, net::Protocol, refusal::Refusal, store::LastAccess};

pub struct PortReport {
    pub protocol: Protocol,
    pub port: u16,
    pub active_grants: usize,
    pub connections: usize,
    pub grants_last_7_days: u32,
    /// The latest grant on the port.
    pub last_access: Option<LastAccess>,
    /// Packets the XDP gate let through since its state was created.
    pub passed: u64,
    /// Packets the XDP gate dropped since its state was created.
    pub dropped: u64,
    /// Of those, new connections refused by a grant's limits or a full
    /// flow table.
    pub refused_connections: u64,
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
    /// Packets and bytes the nftables gate dropped since its table was
    /// installed (`None` without nftables, or when it could not be read).
    pub nftables_dropped: Option<(u64, u64)>,
    /// Access requests waiting for approval.
    pub pending_approvals: u32,
    /// How long each reconciliation took, since the agent started.
    pub reconcile_durations: Histogram,
    /// The fleet link (`None`: fleet mode off).
    pub fleet: Option<super::FleetReport>,
}

impl Engine {
    pub(super) fn status(&self) -> Result<StatusReport, Refusal> {
        let now = SystemTime::now();
        let protected = self.policy.protected();
        let connections = self
            .enforcement
            .connections(&protected, &self.active)
            .map_err(|e| Refusal::internal("listing connections", e))?;
        // Like the layers' health, a failed read shows, and fails nothing.
        let (counters, flows) = match self.enforcement.flow_table(&protected) {
            Ok(Some((counters, flows))) => (counters, Some(flows)),
            Ok(None) => (Counters::default(), None),
            Err(e) => {
                tracing::warn!("reading the XDP counters for the status: {e:#}");
                (Counters::default(), None)
            }
        };
        let ports = protected
            .iter()
            .map(|&(protocol, port)| {
                let (grants_last_7_days, last_access) = self.activity.of(protocol, port, now);
                let kernel = counters
                    .by_port
                    .get(&(protocol, port))
                    .copied()
                    .unwrap_or_default();
                PortReport {
                    protocol,
                    port,
                    active_grants: self.active.count_on(protocol, port),
                    connections: connections
                        .iter()
                        .filter(|c| {
                            c.connection.protocol == protocol && c.connection.local.port() == port
                        })
                        .count(),
                    grants_last_7_days,
                    last_access,
                    passed: kernel.passed,
                    dropped: kernel.dropped,
                    refused_connections: kernel.refused,
                }
            })
            .collect();
        let nftables_dropped = self
            .enforcement
            .nftables_dropped()
            .inspect_err(|e| tracing::warn!("reading the nftables drop counter: {e:#}"))
            .unwrap_or(None);
        let (_, pending_approvals) = self
            .store
            .pending_counts("")
            .map_err(|e| Refusal::unavailable("counting pending requests", e))?;
        Ok(StatusReport {
            audit: self.audit.clone(),
            started_at: self.started_at,
            configured_mode: self.config.mode,
            nftables_active: self.enforcement.nftables_active(),
            xdp_active: self.enforcement.xdp_active(),
            enforcement: self.enforcement.check(),
            ports,
            active_grants: self.active.len(),
            policy_revision: self.policy.revision,
            flows,
            xdp_reasons: counters.by_reason,
            nftables_dropped,
            pending_approvals,
            reconcile_durations: self.reconcile_durations.clone(),
            fleet: self.fleet_report.clone(),
        })
    }
}
