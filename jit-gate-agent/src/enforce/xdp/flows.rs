//! The gate's flow table and what it reports: tracked flows, the per-grant
//! flow counters (opened by the program, closed by the agent), the per-CPU
//! counters, and the deny events of the ring buffer.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use aya::maps::{MapData, MapError, RingBuf};
use jit_gate_common::{
    family,
    maps::{DenyEvent, FlowKey, FlowValue, PortCounters, names, protected},
    verdict::Reason,
};

use super::{Result, XdpGate, existed, map_err};
use crate::net::Protocol;

/// A tracked flow, as read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub key: FlowKey,
    pub value: FlowValue,
}

/// A grant's flow counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantFlowCounts {
    /// Flows ever opened under the grant (kept by the program).
    pub opened: u64,
    /// New connections the grant's limits or a full table refused.
    pub refused: u64,
    /// Flows of the grant the agent removed.
    pub closed: u64,
}

impl GrantFlowCounts {
    /// Flows of the grant in the table, as the program counts them.
    pub fn live(&self) -> u64 {
        self.opened.saturating_sub(self.closed)
    }
}

/// A denied packet as reported on the deny-event ring buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeniedPacket {
    pub source: IpAddr,
    pub protocol: Option<Protocol>,
    pub port: u16,
    pub reason: Reason,
    /// For a refused new connection, the grant whose limits refused it.
    pub grant_id: Option<u64>,
}

/// Decodes one ring-buffer record; `None` if it is not a deny event.
pub fn parse_deny_event(record: &[u8]) -> Option<DeniedPacket> {
    if record.len() < size_of::<DenyEvent>() {
        return None;
    }
    // SAFETY: the record holds at least one DenyEvent, a plain-old-data
    // struct written by the XDP program; read_unaligned tolerates any alignment.
    let event: DenyEvent = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
    let source = match event.family {
        family::V4 => IpAddr::from([event.src[0], event.src[1], event.src[2], event.src[3]]),
        family::V6 => IpAddr::from(event.src),
        _ => return None,
    };
    Some(DeniedPacket {
        source,
        protocol: Protocol::from_number(event.protocol),
        port: event.dst_port,
        reason: Reason::from_u32(event.reason)?,
        grant_id: (event.grant_id != 0).then_some(event.grant_id),
    })
}

/// Counters summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub by_reason: BTreeMap<Reason, u64>,
    pub by_port: BTreeMap<(Protocol, u16), PortCounters>,
}

impl XdpGate {
    /// How long at boot time `now_boot_ns` the flow has at least gone
    /// without a packet: what ages idle flows. Its last-seen stamp is on
    /// the clock the agent publishes, which may lag (see `clock`).
    pub fn idle_for(&self, flow: &Flow, now_boot_ns: u64) -> Duration {
        self.clock
            .publishing()
            .idle_at_least(flow.value.last_seen_boot_ns, now_boot_ns)
    }

    /// Every tracked flow.
    pub fn flows(&self) -> Result<Vec<Flow>> {
        self.maps
            .flows
            .iter()
            .map(|item| {
                item.map(|(key, value)| Flow { key, value })
                    .map_err(map_err(names::FLOWS))
            })
            .collect()
    }

    /// The tracked flow of `key`, if there is one.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>> {
        match self.maps.flows.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(names::FLOWS)(e)),
        }
    }

    /// The flow table's capacity.
    pub fn flow_capacity(&self) -> u32 {
        self.options.flow_capacity
    }

    /// Records a flow (seeding connections that predate the gate). It
    /// counts against no grant's limits.
    pub fn insert_flow(&mut self, key: FlowKey, value: FlowValue) -> Result<()> {
        self.maps
            .flows
            .insert(key, value, 0)
            .map_err(map_err(names::FLOWS))
    }

    /// Forgets a flow, and counts it closed for its grant; returns whether
    /// it was tracked.
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<bool> {
        let Some(FlowValue { grant_id, .. }) = self.flow(key)? else {
            return Ok(false);
        };
        // Deleted first, counted closed after: a failure in between leaves
        // the grant's count one too high (stricter), never too low.
        if !existed(self.maps.flows.remove(key)).map_err(map_err(names::FLOWS))? {
            return Ok(false);
        }
        if grant_id != 0 {
            let closed = match self.maps.grant_closes.get(&grant_id, 0) {
                Ok(closed) => closed,
                Err(MapError::KeyNotFound) => 0,
                Err(e) => return Err(map_err(names::GRANT_CLOSES)(e)),
            };
            self.maps
                .grant_closes
                .insert(grant_id, closed + 1, 0)
                .map_err(map_err(names::GRANT_CLOSES))?;
        }
        Ok(true)
    }

    /// The flow counters of every grant that has them.
    pub fn grant_flow_counts(&self) -> Result<BTreeMap<u64, GrantFlowCounts>> {
        let mut out: BTreeMap<u64, GrantFlowCounts> = BTreeMap::new();
        for item in &self.maps.grant_opens {
            let (id, opens) = item.map_err(map_err(names::GRANT_OPENS))?;
            let counts = out.entry(id).or_default();
            counts.opened = opens.opened;
            counts.refused = opens.refused;
        }
        for item in &self.maps.grant_closes {
            let (id, closed) = item.map_err(map_err(names::GRANT_CLOSES))?;
            out.entry(id).or_default().closed = closed;
        }
        Ok(out)
    }

    /// Drops the flow counters of a grant that ended and has no flow left.
    pub fn forget_grant_counters(&mut self, grant_id: u64) -> Result<()> {
        existed(self.maps.grant_opens.remove(&grant_id)).map_err(map_err(names::GRANT_OPENS))?;
        existed(self.maps.grant_closes.remove(&grant_id)).map_err(map_err(names::GRANT_CLOSES))?;
        Ok(())
    }

    /// Counters summed over all CPUs: every reason, and the protected ports
    /// among `ports`.
    pub fn counters(&self, ports: &BTreeSet<(Protocol, u16)>) -> Result<Counters> {
        let mut counters = Counters::default();
        for reason in Reason::ALL {
            let per_cpu = self
                .maps
                .reason_counters
                .get(&(reason as u32), 0)
                .map_err(map_err(names::REASON_COUNTERS))?;
            counters.by_reason.insert(reason, per_cpu.iter().sum());
        }
        for &(protocol, port) in ports {
            let value = self
                .maps
                .protected_ports
                .get(&u32::from(port), 0)
                .map_err(map_err(names::PROTECTED_PORTS))?;
            if value & protected::bit_for(protocol.number()) == 0 {
                continue;
            }
            let index = protected::counter_index(value, protocol.number());
            let per_cpu = self
                .maps
                .port_counters
                .get(&index, 0)
                .map_err(map_err(names::PORT_COUNTERS))?;
            let sum = per_cpu
                .iter()
                .fold(PortCounters::default(), |a, c| PortCounters {
                    passed: a.passed + c.passed,
                    dropped: a.dropped + c.dropped,
                    refused: a.refused + c.refused,
                });
            counters.by_port.insert((protocol, port), sum);
        }
        Ok(counters)
    }

    /// The deny-event ring buffer; taken once by whoever streams the events.
    pub fn take_deny_events(&mut self) -> Option<RingBuf<MapData>> {
        self.maps.deny_events.take()
    }
}
