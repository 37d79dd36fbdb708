//! The figures read at each scrape, from the engine's status: the XDP
//! gate's counters (per port and verdict, per reason), the nftables drop
//! counter, grants, pending approvals, the flow table, enforcement health
//! and the reconciliation times the engine keeps. A fresh registry each
//! time: a counter here is the kernel's own value, not a sum kept by the
//! agent.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::engine::{InterfaceMode, StatusReport};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PortVerdict {
    port: u16,
    protocol: &'static str,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Port {
    port: u16,
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InterfaceLabel {
    interface: String,
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LayerLabel {
    layer: &'static str,
}

fn mode_name(mode: InterfaceMode) -> &'static str {
    match mode {
        InterfaceMode::XdpNative => "xdp-native",
        InterfaceMode::XdpGeneric => "xdp-generic",
        InterfaceMode::NftablesOnly => "nftables-only",
        InterfaceMode::Unsupported => "unsupported",
        InterfaceMode::Uncovered => "uncovered",
    }
}

fn gauge(value: impl TryInto<i64>) -> Gauge {
    let gauge = Gauge::default();
    gauge.set(value.try_into().unwrap_or(i64::MAX));
    gauge
}

/// A registry holding `status` as metrics.
pub(super) fn registry(status: &StatusReport) -> Registry {
    let mut registry = Registry::default();
    let packets = Family::<PortVerdict, Counter>::default();
    let grants = Family::<Port, Gauge>::default();
    let connections = Family::<Port, Gauge>::default();
    for port in &status.ports {
        let protocol = port.protocol.name();
        for (verdict, value) in [
            ("passed", port.passed),
            ("dropped", port.dropped),
            ("refused", port.refused_connections),
        ] {
            packets
                .get_or_create(&PortVerdict {
                    port: port.port,
                    protocol,
                    verdict,
                })
                .inc_by(value);
        }
        let label = Port {
            port: port.port,
            protocol,
        };
        grants
            .get_or_create(&label)
            .set(port.active_grants.try_into().unwrap_or(i64::MAX));
        connections
            .get_or_create(&label)
            .set(port.connections.try_into().unwrap_or(i64::MAX));
    }
    registry.register(
        "jit_gate_xdp_port_packets",
        "Packets to a protected port the XDP gate passed or dropped since its state was created; refused: new connections among the dropped refused by a grant's limits or a full flow table",
        packets,
    );
    let reasons = Family::<ReasonLabel, Counter>::default();
    for (reason, value) in &status.xdp_reasons {
        reasons
            .get_or_create(&ReasonLabel {
                reason: reason.name(),
            })
            .inc_by(*value);
    }
    registry.register(
        "jit_gate_xdp_verdicts",
        "Packets the XDP gate decided since its state was created, by verdict reason",
        reasons,
    );
    registry.register(
        "jit_gate_grants_active",
        "Active grants",
        gauge(status.active_grants),
    );
    registry.register(
        "jit_gate_port_grants_active",
        "Active grants per protected port",
        grants,
    );
    registry.register(
        "jit_gate_port_connections",
        "Connections to a protected port the gate lets through",
        connections,
    );
    let interfaces = Family::<InterfaceLabel, Gauge>::default();
    for interface in &status.enforcement.interfaces {
        interfaces
            .get_or_create(&InterfaceLabel {
                interface: interface.name.clone(),
                mode: mode_name(interface.mode),
            })
            .set(i64::from(interface.is_sound()));
    }
    registry.register(
        "jit_gate_interface_healthy",
        "1 if the gate on the interface is as it should be and the interface is no ungated path, by enforcement mode",
        interfaces,
    );
    let layers = Family::<LayerLabel, Gauge>::default();
    let xdp_ok = status.xdp_active && status.enforcement.xdp.problem.is_none();
    let nft_ok = status.nftables_active && status.enforcement.nftables.problem.is_none();
    layers
        .get_or_create(&LayerLabel { layer: "xdp" })
        .set(i64::from(xdp_ok));
    layers
        .get_or_create(&LayerLabel { layer: "nftables" })
        .set(i64::from(nft_ok));
    registry.register(
        "jit_gate_layer_healthy",
        "1 if the enforcement layer is active and nothing is wrong with it",
        layers,
    );
    registry.register(
        "jit_gate_healthy",
        "1 if nothing is wrong in any layer or interface",
        gauge(i64::from(status.enforcement.healthy())),
    );
    if let Some((packets, bytes)) = status.nftables_dropped {
        for (name, help, value) in [
            (
                "jit_gate_nftables_dropped_packets",
                "Packets to protected ports the nftables gate dropped since its table was installed",
                packets,
            ),
            (
                "jit_gate_nftables_dropped_bytes",
                "Bytes of the packets the nftables gate dropped since its table was installed",
                bytes,
            ),
        ] {
            let counter = Counter::<u64>::default();
            counter.inc_by(value);
            registry.register(name, help, counter);
        }
    }
    registry.register(
        "jit_gate_requests_pending",
        "Access requests waiting for approval",
        gauge(status.pending_approvals),
    );
    registry.register(
        "jit_gate_reconcile_duration_seconds",
        "How long each reconciliation of the store with the kernel took, since the agent started",
        status.reconcile_durations.clone(),
    );
    if let Some(fleet) = &status.fleet {
        registry.register(
            "jit_gate_fleet_connected",
            "1 while the agent reaches etcd in fleet mode (enforcement goes on either way)",
            gauge(i64::from(fleet.connected)),
        );
        registry.register(
            "jit_gate_fleet_applied_revision",
            "The etcd revision up to which every fleet grant event was applied and answered",
            gauge(fleet.applied_revision),
        );
        let outcomes = Family::<OutcomeLabel, Counter>::default();
        for (outcome, value) in [
            ("applied", fleet.grants_applied),
            ("refused", fleet.grants_refused),
        ] {
            outcomes
                .get_or_create(&OutcomeLabel { outcome })
                .inc_by(value);
        }
        registry.register(
            "jit_gate_fleet_grants",
            "Fleet grants this agent applied or refused since it started",
            outcomes,
        );
    }
    if let Some(flows) = &status.flows {
        registry.register(
            "jit_gate_flows_tracked",
            "Connections in the XDP flow table",
            gauge(flows.tracked),
        );
        registry.register(
            "jit_gate_flows_capacity",
            "Capacity of the XDP flow table",
            gauge(flows.capacity),
        );
    }
    registry
}
