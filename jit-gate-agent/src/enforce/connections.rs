//! Connections to protected ports: seeding the XDP flow map (and conntrack,
//! for nftables) with the ones that predate the gate (or, in the flow map, a
//! port's protection), noticing flows opened under grants, removing dead
//! flows (handshakes that never completed, FIN or RST confirmed by the host,
//! connections the host no longer knows, idle UDP) and the counters of ended
//! grants, and ending a revoked grant's connections. The host's view
//! (sockets, conntrack) and the flow map are combined here; enforcement
//! never depends on this view being complete.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::{Duration, SystemTime},
};

use jit_gate_common::maps::{FlowKey, FlowValue, flow_state};

use crate::{
    clock::{boot_now_ns, boot_to_wall},
    enforce::xdp::{Flow, XdpGate},
    flows::{Connection, conntrack, sockets},
    grants::{ActiveGrant, ActiveGrants},
    net::{GrantTarget, Protocol},
};

/// A TCP flow the host no longer knows is forgotten after this long (its
/// handshake may still be in flight before that), at once if the client
/// sent FIN or RST.
const TCP_FLOW_GRACE: Duration = Duration::from_secs(30);
/// A UDP flow neither conntrack nor a connected socket shows is forgotten
/// once no packet of it passed for this long.
const UDP_FLOW_IDLE: Duration = Duration::from_mins(2);

/// A connection as listed by the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionInfo {
    pub connection: Connection,
    /// The grant it was opened under; 0 if it predates the gate.
    pub grant_id: u64,
    pub opened_at: Option<SystemTime>,
}

/// Connections to `protected` ports the host knows of: sockets and
/// conntrack entries. Errors are logged; what could be read is returned.
pub(super) fn host_connections(protected: &BTreeSet<(Protocol, u16)>) -> BTreeSet<Connection> {
    let (mut out, tracked) = host_view(protected);
    out.extend(tracked);
    out
}

/// The host's sockets and conntrack entries of connections to `protected`.
fn host_view(
    protected: &BTreeSet<(Protocol, u16)>,
) -> (BTreeSet<Connection>, BTreeSet<Connection>) {
    let sockets = sockets::inbound(protected).unwrap_or_else(|e| {
        tracing::warn!("listing sockets: {e}");
        Vec::new()
    });
    let tracked = conntrack::list(protected).unwrap_or_else(|e| {
        tracing::warn!("listing conntrack: {e}");
        Vec::new()
    });
    (sockets.into_iter().collect(), tracked.into_iter().collect())
}

/// Records in conntrack, as established, the connections to `protected`
/// that have a socket but no conntrack entry, so that nftables' `ct state`
/// rule lets them continue: conntrack only tracks a namespace once some
/// rule needs it, and would take their next packets for new connections.
/// Returns how many were recorded; failures are logged.
pub(super) fn seed_conntrack(protected: &BTreeSet<(Protocol, u16)>) -> usize {
    let (sockets, tracked) = host_view(protected);
    let mut added = 0;
    for connection in sockets.difference(&tracked) {
        match conntrack::create(connection) {
            Ok(created) => added += usize::from(created),
            Err(e) => tracing::warn!("{e}"),
        }
    }
    added
}

/// Records every established connection to `protected` in the flow map so
/// that the gate lets it continue; returns how many were added.
pub(super) fn seed(
    xdp: &mut XdpGate,
    protected: &BTreeSet<(Protocol, u16)>,
) -> anyhow::Result<usize> {
    let tracked: BTreeSet<FlowKey> = xdp.flows()?.into_iter().map(|f| f.key).collect();
    let mut added = 0;
    for connection in host_connections(protected) {
        let key = connection.flow_key();
        if !tracked.contains(&key) {
            let now = boot_now_ns();
            xdp.insert_flow(
                key,
                FlowValue {
                    grant_id: 0,
                    opened_at_boot_ns: now,
                    last_seen_boot_ns: now,
                    state: flow_state::ESTABLISHED,
                    _pad: 0,
                },
            )?;
            added += 1;
        }
    }
    Ok(added)
}

/// The flows of the map already audited (key → grant id), so each new one
/// is audited once.
#[derive(Default)]
pub(super) struct FlowWatch {
    seen: HashMap<FlowKey, u64>,
}

/// The flow map as read for [`FlowWatch::new_flows`]: what counts as
/// audited once the records of the new flows are stored.
pub struct FlowSnapshot(HashMap<FlowKey, u64>);

impl FlowWatch {
    /// Resumes after an earlier run that audited every flow opened before
    /// `audited_until`: those are not reported again.
    pub(super) fn resume(xdp: &XdpGate, audited_until: Option<SystemTime>) -> anyhow::Result<Self> {
        let Some(until) = audited_until else {
            return Ok(FlowWatch::default());
        };
        let seen = xdp
            .flows()?
            .into_iter()
            .filter(|f| boot_to_wall(f.value.opened_at_boot_ns) < until)
            .map(|f| (f.key, f.value.grant_id))
            .collect();
        Ok(FlowWatch { seen })
    }

    /// Flows opened under a grant and not yet audited. Call
    /// [`FlowWatch::mark_audited`] with the snapshot once their records are
    /// stored; until then they are reported again.
    pub(super) fn new_flows(
        &self,
        xdp: &XdpGate,
    ) -> anyhow::Result<(Vec<(Connection, u64)>, FlowSnapshot)> {
        let current: HashMap<FlowKey, u64> = xdp
            .flows()?
            .into_iter()
            .map(|f| (f.key, f.value.grant_id))
            .collect();
        let fresh = current
            .iter()
            .filter(|(key, grant_id)| **grant_id != 0 && self.seen.get(*key) != Some(*grant_id))
            .filter_map(|(key, grant_id)| Connection::from_flow_key(key).map(|c| (c, *grant_id)))
            .collect();
        Ok((fresh, FlowSnapshot(current)))
    }

    /// The flows of `snapshot` have been audited.
    pub(super) fn mark_audited(&mut self, snapshot: FlowSnapshot) {
        self.seen = snapshot.0;
    }
}

/// Whether a UDP flow has seen no packet for the idle timeout at boot time
/// `now`.
fn udp_idle(xdp: &XdpGate, flow: &Flow, now: u64) -> bool {
    xdp.idle_for(flow, now) > UDP_FLOW_IDLE
}

/// Why a flow is removed, if it is.
fn dead(
    xdp: &XdpGate,
    flow: &Flow,
    connection: &Connection,
    alive: bool,
    now: u64,
    half_open: Duration,
) -> bool {
    let value = &flow.value;
    match connection.protocol {
        Protocol::Tcp if value.state & flow_state::ESTABLISHED == 0 => {
            // The program no longer honours it; it only holds quota.
            since(value.opened_at_boot_ns, now) >= half_open
        }
        Protocol::Tcp => {
            !alive
                && (value.state & (flow_state::FIN_SEEN | flow_state::RST_SEEN) != 0
                    || since(value.opened_at_boot_ns, now) > TCP_FLOW_GRACE)
        }
        Protocol::Udp => !alive && udp_idle(xdp, flow, now),
    }
}

/// Removes the flows of ended connections and half-open handshakes, then
/// the flow counters of ended grants with no flow left; returns how many
/// flows were removed. FIN and RST are only hints (anyone can spoof them):
/// a flow goes when the host confirms its connection is gone.
pub(super) fn forget_dead_flows(
    xdp: &mut XdpGate,
    protected: &BTreeSet<(Protocol, u16)>,
    active: &ActiveGrants,
) -> anyhow::Result<usize> {
    let alive: BTreeSet<FlowKey> = host_connections(protected)
        .iter()
        .map(Connection::flow_key)
        .collect();
    let now = boot_now_ns();
    let half_open = xdp.options().half_open_timeout;
    let mut removed = 0;
    let mut grants_with_flows = BTreeSet::new();
    for flow in xdp.flows()? {
        let Some(connection) = Connection::from_flow_key(&flow.key) else {
            continue;
        };
        if dead(
            xdp,
            &flow,
            &connection,
            alive.contains(&flow.key),
            now,
            half_open,
        ) && xdp.remove_flow(&flow.key)?
        {
            removed += 1;
        } else {
            grants_with_flows.insert(flow.value.grant_id);
        }
    }
    for grant_id in xdp.grant_flow_counts()?.into_keys() {
        if active.get(grant_id).is_none() && !grants_with_flows.contains(&grant_id) {
            xdp.forget_grant_counters(grant_id)?;
        }
    }
    Ok(removed)
}

/// How long before boot time `now` the instant `at` lies.
fn since(at: u64, now: u64) -> Duration {
    Duration::from_nanos(now.saturating_sub(at))
}

fn covered_by(target: &GrantTarget, connection: &Connection) -> bool {
    connection.protocol == target.protocol
        && connection.local.port() == target.port
        && target.source.contains(&connection.remote.ip())
}

fn target_of(connection: &Connection) -> GrantTarget {
    GrantTarget {
        source: connection.remote.ip().into(),
        protocol: connection.protocol,
        port: connection.local.port(),
    }
}

/// Ends the connections of `revoked` (already removed from `active`): those
/// opened under it, and those from its source that no other active grant
/// accounts for. Flow entries go first so no packet re-opens anything, then
/// sockets are destroyed (TCP resets the peer), then conntrack entries.
pub(super) fn terminate(
    mut xdp: Option<&mut XdpGate>,
    revoked: &ActiveGrant,
    active: &ActiveGrants,
) -> anyhow::Result<Vec<Connection>> {
    let target = revoked.target;
    let ports = BTreeSet::from([(target.protocol, target.port)]);
    let flows: BTreeMap<Connection, u64> = match xdp.as_deref() {
        Some(xdp) => xdp
            .flows()?
            .into_iter()
            .filter_map(|f| Connection::from_flow_key(&f.key).map(|c| (c, f.value.grant_id)))
            .filter(|(c, _)| covered_by(&target, c))
            .collect(),
        None => BTreeMap::new(),
    };
    let alive: BTreeSet<Connection> = host_connections(&ports)
        .into_iter()
        .filter(|c| covered_by(&target, c))
        .collect();
    let candidates: BTreeSet<Connection> = alive.iter().chain(flows.keys()).copied().collect();
    let mut ended = Vec::new();
    for connection in candidates {
        let attributed = flows.get(&connection).copied();
        let own = attributed == Some(revoked.id);
        let accounted_for = attributed.is_some_and(|id| active.get(id).is_some())
            || !active.covering(&target_of(&connection)).is_empty();
        if !own && accounted_for {
            continue;
        }
        if let Some(xdp) = xdp.as_deref_mut() {
            xdp.remove_flow(&connection.flow_key())?;
        }
        // A flow entry of a connection that already ended is only forgotten.
        if !alive.contains(&connection) {
            continue;
        }
        if let Err(e) = sockets::destroy(&connection) {
            tracing::warn!("destroying the socket of {connection}: {e}");
        }
        if let Err(e) = conntrack::delete(&connection) {
            tracing::warn!("deleting the conntrack entry of {connection}: {e}");
        }
        ended.push(connection);
    }
    Ok(ended)
}

/// Connections to protected ports: the host's, with the grant their flow
/// was opened under. A flow the host does not know stands for a
/// connection only if it is UDP and recent (without conntrack, the host
/// has no record of a UDP exchange); otherwise it has ended, and waits to
/// be forgotten.
pub(super) fn list(
    xdp: Option<&XdpGate>,
    protected: &BTreeSet<(Protocol, u16)>,
    active: &ActiveGrants,
) -> anyhow::Result<Vec<ConnectionInfo>> {
    let host = host_connections(protected);
    let now = boot_now_ns();
    let mut out: BTreeMap<Connection, ConnectionInfo> = BTreeMap::new();
    if let Some(xdp) = xdp {
        for flow in xdp.flows()? {
            let Some(connection) = Connection::from_flow_key(&flow.key) else {
                continue;
            };
            let udp_recent = connection.protocol == Protocol::Udp && !udp_idle(xdp, &flow, now);
            if host.contains(&connection) || udp_recent {
                out.insert(
                    connection,
                    ConnectionInfo {
                        connection,
                        grant_id: flow.value.grant_id,
                        opened_at: Some(boot_to_wall(flow.value.opened_at_boot_ns)),
                    },
                );
            }
        }
    }
    for connection in host {
        out.entry(connection).or_insert_with(|| ConnectionInfo {
            connection,
            grant_id: active
                .covering(&target_of(&connection))
                .into_iter()
                .max()
                .unwrap_or(0),
            opened_at: None,
        });
    }
    Ok(out.into_values().collect())
}
