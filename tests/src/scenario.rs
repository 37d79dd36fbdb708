//! The gate state the verdict tests install, identically in a loaded gate
//! and in the spec (`spec::State`), and the runner that puts a frame through
//! a program (the gate's, or a mutant sharing its maps) and compares what
//! the kernel did with what the spec says: the XDP action, the reason
//! counted, and the flow entry of the frame's tuple.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::Duration,
};

use aya::{
    maps::{Map, MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions, Xdp},
};
use ipnet::IpNet;
use jit_gate_agent::{
    clock::boot_now_ns,
    enforce::xdp::{GateOptions, GrantLimits, XdpGate},
    net::{
        GrantTarget,
        Protocol::{self, Tcp, Udp},
    },
};
use jit_gate_common::{
    maps::{FlowKey, FlowValue, flow_state, names},
    verdict::{Address, Reason, Transport},
};

use crate::{
    env::PinDir,
    packets::Packet,
    spec::{self, FlowId, GrantEntry},
};

pub const HOST_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const HOST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

/// The host address of `src`'s family: where every packet goes.
pub fn host_for(src: IpAddr) -> IpAddr {
    if src.is_ipv4() {
        HOST_V4.into()
    } else {
        HOST_V6.into()
    }
}

pub const PROTECTED: [(Protocol, u16); 5] = [
    (Tcp, 22),
    (Tcp, 3389),
    (Udp, 5353),
    (Tcp, 5985),
    (Udp, 5985),
];

/// Open ports: unprotected numbers, and protected numbers with the other protocol.
pub const UNPROTECTED: [(Protocol, u16); 4] = [(Tcp, 80), (Udp, 53), (Tcp, 5353), (Udp, 22)];

/// The gate's half-open timeout in these tests.
pub const HALF_OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// The flow quota of grants that do not set their own.
pub const QUOTA: u32 = 64;

#[derive(Clone, Copy)]
pub enum Expiry {
    /// Expires ten minutes after setup.
    Live,
    /// Expired a millisecond before setup.
    Expired,
}

const LIVE_FOR: Duration = Duration::from_mins(10);
const EXPIRED_FOR: Duration = Duration::from_millis(1);

/// A grant entry: (source, protocol, port, expiry, grant id, quota, max opens).
pub type Grant = (&'static str, Protocol, u16, Expiry, u64, u32, u32);

/// Full-length prefixes are exact grants.
pub const GRANTS: [Grant; 27] = [
    ("198.51.100.10/32", Tcp, 22, Expiry::Live, 1, QUOTA, 0),
    ("198.51.100.11/32", Tcp, 22, Expiry::Expired, 2, QUOTA, 0),
    ("198.51.100.10/32", Udp, 5353, Expiry::Live, 3, QUOTA, 0),
    ("198.51.100.12/32", Tcp, 5985, Expiry::Live, 4, QUOTA, 0),
    ("198.51.100.13/32", Udp, 5985, Expiry::Expired, 5, QUOTA, 0),
    ("198.51.100.14/32", Tcp, 3389, Expiry::Live, 6, QUOTA, 0),
    // Expired exact grant inside the live 10.0.0.0/8: the CIDR grant still counts.
    ("10.9.9.9/32", Tcp, 22, Expiry::Expired, 7, QUOTA, 0),
    ("2001:db8:1::10/128", Tcp, 22, Expiry::Live, 8, QUOTA, 0),
    ("2001:db8:1::11/128", Tcp, 22, Expiry::Expired, 9, QUOTA, 0),
    ("2001:db8:1::12/128", Udp, 5353, Expiry::Live, 10, QUOTA, 0),
    (
        "2001:db8:1::13/128",
        Tcp,
        3389,
        Expiry::Expired,
        11,
        QUOTA,
        0,
    ),
    // An IPv6 grant for an IPv4-mapped address; 198.51.100.15 itself has none.
    (
        "::ffff:198.51.100.15/128",
        Tcp,
        22,
        Expiry::Live,
        12,
        QUOTA,
        0,
    ),
    // Flow limits: a quota of two, a single-use grant, a UDP quota of one.
    ("198.51.100.50/32", Tcp, 22, Expiry::Live, 40, 2, 0),
    ("198.51.100.51/32", Tcp, 22, Expiry::Live, 41, QUOTA, 1),
    ("198.51.100.52/32", Udp, 5353, Expiry::Live, 42, 1, 0),
    ("10.0.0.0/8", Tcp, 22, Expiry::Live, 20, QUOTA, 0),
    // Nested and expired: shadows the live /8, as the LPM trie returns only the longest.
    ("10.1.2.0/24", Tcp, 22, Expiry::Expired, 21, QUOTA, 0),
    // Nested and live: flows open under the longer prefix's grant.
    ("10.20.0.0/16", Tcp, 22, Expiry::Live, 22, QUOTA, 0),
    ("203.0.113.0/24", Udp, 5353, Expiry::Live, 23, QUOTA, 0),
    ("192.0.2.100/31", Tcp, 3389, Expiry::Live, 24, QUOTA, 0),
    ("100.64.0.0/10", Udp, 5985, Expiry::Live, 25, QUOTA, 0),
    ("2001:db8:aa::/48", Tcp, 22, Expiry::Live, 30, QUOTA, 0),
    ("2001:db8:aa:1::/64", Tcp, 22, Expiry::Expired, 31, QUOTA, 0),
    ("2001:db8:aa:2::/64", Tcp, 22, Expiry::Live, 32, QUOTA, 0),
    ("2001:db8:bb::/127", Udp, 5353, Expiry::Live, 33, QUOTA, 0),
    ("2001:db8:cc::/56", Tcp, 5985, Expiry::Live, 34, QUOTA, 0),
    (
        "2001:db8:8000::/33",
        Tcp,
        3389,
        Expiry::Expired,
        35,
        QUOTA,
        0,
    ),
];

/// Where a seeded flow's handshake stands.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    Established,
    /// SYN seen a moment ago, no ACK yet.
    Young,
    /// SYN seen twice the half-open timeout ago, never completed.
    Stale,
}

/// Flows that predate the test, to the host: (source, source port,
/// protocol, port, grant id, handshake). Their source port is not the
/// builder's default, so other packets from these sources meet the grants
/// alone.
pub const SEEDED_FLOWS: [(&str, u16, Protocol, u16, u64, Handshake); 8] = [
    // The grant expired; the session lives on.
    (
        "198.51.100.11",
        50_022,
        Tcp,
        22,
        100,
        Handshake::Established,
    ),
    (
        "2001:db8:1::11",
        50_022,
        Tcp,
        22,
        101,
        Handshake::Established,
    ),
    // Under the expired nested /24.
    ("10.1.2.3", 50_022, Tcp, 22, 102, Handshake::Established),
    // No grant at all.
    (
        "198.51.100.99",
        50_053,
        Udp,
        5353,
        103,
        Handshake::Established,
    ),
    // Live grant 3: a UDP flow keeps the grant it was first recorded under.
    (
        "198.51.100.10",
        50_053,
        Udp,
        5353,
        104,
        Handshake::Established,
    ),
    // Half-open, the grant expired: SYNs left behind by a grantee.
    ("198.51.100.11", 50_023, Tcp, 22, 2, Handshake::Stale),
    ("2001:db8:1::11", 50_023, Tcp, 22, 9, Handshake::Stale),
    // Half-open and young, no grant: its handshake may still complete.
    ("198.51.100.60", 50_024, Tcp, 22, 105, Handshake::Young),
];

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("address {s:?}: {e}"))
}

pub fn grant_source(s: &str) -> IpNet {
    s.parse().unwrap_or_else(|e| panic!("prefix {s:?}: {e}"))
}

/// The key address of an IP address (IPv4-mapped IPv6 addresses stay IPv6).
pub fn address(ip: IpAddr) -> Address {
    match ip {
        IpAddr::V4(v4) => Address::v4(v4.octets()),
        IpAddr::V6(v6) => Address::v6(v6.octets()),
    }
}

/// The kernel's key of a spec flow.
pub fn flow_key((src, dst, src_port, dst_port, protocol): FlowId) -> FlowKey {
    let transport = Transport {
        protocol,
        src_port,
        dst_port,
        tcp_flags: 0,
    };
    FlowKey::of(&address(src), &address(dst), &transport)
}

/// A TCP segment to the host.
pub fn tcp(src: IpAddr, port: u16, flags: u8) -> Packet {
    Packet::tcp(src, host_for(src), port, flags)
}

/// A UDP datagram to the host.
pub fn udp(src: IpAddr, port: u16) -> Packet {
    Packet::udp(src, host_for(src), port)
}

/// The per-CPU reason counters, read straight from their pin: the numbers
/// `XdpGate::counters().by_reason` sums, without its other reads.
struct ReasonCounters(PerCpuArray<MapData, u64>);

impl ReasonCounters {
    fn open(pin_dir: &Path) -> Self {
        let path = pin_dir.join(names::REASON_COUNTERS);
        let map = MapData::from_pin(&path)
            .and_then(Map::from_map_data)
            .and_then(PerCpuArray::try_from)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        ReasonCounters(map)
    }

    fn read(&self) -> BTreeMap<Reason, u64> {
        Reason::ALL
            .into_iter()
            .map(|reason| {
                let per_cpu = self
                    .0
                    .get(&(reason as u32), 0)
                    .unwrap_or_else(|e| panic!("reading counter {}: {e}", reason.name()));
                (reason, per_cpu.iter().sum())
            })
            .collect()
    }
}

/// A flow entry as both sides describe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowState {
    pub grant_id: u64,
    pub established: bool,
    pub fin: bool,
    pub rst: bool,
}

impl From<&spec::Flow> for FlowState {
    fn from(f: &spec::Flow) -> Self {
        FlowState {
            grant_id: f.grant_id,
            established: f.established,
            fin: f.fin,
            rst: f.rst,
        }
    }
}

impl From<&FlowValue> for FlowState {
    fn from(v: &FlowValue) -> Self {
        FlowState {
            grant_id: v.grant_id,
            established: v.state & flow_state::ESTABLISHED != 0,
            fin: v.state & flow_state::FIN_SEEN != 0,
            rst: v.state & flow_state::RST_SEEN != 0,
        }
    }
}

/// A grant's flows opened and connections refused.
pub type OpenedRefused = (u64, u64);

/// What running one packet did, or should have done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub pass: bool,
    /// The reason counters that went up, by how much.
    pub counted: BTreeMap<&'static str, u64>,
    /// The flow entry of the frame's tuple afterwards.
    pub flow: Option<FlowState>,
}

/// One frame through the kernel and the spec.
pub struct Run {
    pub spec: spec::Outcome,
    pub expected: Observed,
    pub kernel: Observed,
}

impl Run {
    pub fn agrees(&self) -> bool {
        self.expected == self.kernel
    }
}

/// The loaded gate and the spec, holding the same state.
pub struct Sides {
    pub gate: XdpGate,
    pub spec: spec::State,
    counters: ReasonCounters,
    counted_so_far: BTreeMap<Reason, u64>,
    /// When the live grants expire (boot ns).
    pub live_until: u64,
}

/// XDP actions as `BPF_PROG_TEST_RUN` returns them.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

impl Sides {
    /// A gate pinned under `pins` and the spec, both holding the scenario.
    pub fn new(pins: &PinDir) -> Self {
        let options = GateOptions {
            half_open_timeout: HALF_OPEN_TIMEOUT,
            flow_quota: QUOTA,
            ..GateOptions::default()
        };
        let gate = XdpGate::open_with(&pins.path, options)
            .unwrap_or_else(|e| panic!("loading the XDP program: {e}"));
        let counters = ReasonCounters::open(&pins.path);
        let mut sides = Sides {
            spec: spec::State::new(0, 0),
            counted_so_far: counters.read(),
            counters,
            gate,
            live_until: 0,
        };
        sides.install();
        sides
    }

    /// Empties the flow table, the grant counters and the grants of both
    /// sides, then installs the scenario again.
    pub fn reset(&mut self) {
        let gate = &mut self.gate;
        for flow in gate.flows().expect("reading flows") {
            gate.remove_flow(&flow.key).expect("removing a flow");
        }
        for grant_id in gate
            .grant_flow_counts()
            .expect("grant counters")
            .into_keys()
        {
            gate.forget_grant_counters(grant_id)
                .expect("removing grant counters");
        }
        for entry in gate.grants().expect("reading grants") {
            gate.remove_grant(&entry.target).expect("removing a grant");
        }
        self.install();
    }

    fn install(&mut self) {
        let options = *self.gate.options();
        self.spec = spec::State::new(
            options.half_open_timeout.as_nanos() as u64,
            options.flow_capacity as usize,
        );
        let protected: BTreeSet<_> = PROTECTED.into_iter().collect();
        self.gate
            .set_protected_ports(&protected)
            .unwrap_or_else(|e| panic!("protecting ports: {e}"));
        for (protocol, port) in PROTECTED {
            self.spec.protected.insert((protocol.number(), port));
        }
        let now = boot_now_ns();
        self.live_until = now + LIVE_FOR.as_nanos() as u64;
        for (source, protocol, port, expiry, grant_id, quota, max_opens) in GRANTS {
            let target = GrantTarget {
                source: grant_source(source),
                protocol,
                port,
            };
            let expires = match expiry {
                Expiry::Live => self.live_until,
                Expiry::Expired => now - EXPIRED_FOR.as_nanos() as u64,
            };
            let limits = GrantLimits {
                flow_quota: quota,
                max_opens,
            };
            self.gate
                .upsert_grant_with_limits(&target, expires, grant_id, limits)
                .unwrap_or_else(|e| panic!("grant {target}: {e}"));
            self.spec.grant(GrantEntry {
                source: target.source,
                protocol: protocol.number(),
                port,
                expires_ns: expires,
                grant_id,
                quota,
                max_opens,
            });
        }
        let half_open = HALF_OPEN_TIMEOUT.as_nanos() as u64;
        for (src, src_port, protocol, dst_port, grant_id, handshake) in SEEDED_FLOWS {
            let src = ip(src);
            let id: FlowId = (src, host_for(src), src_port, dst_port, protocol.number());
            let opened = match handshake {
                Handshake::Stale => now - 2 * half_open,
                Handshake::Established | Handshake::Young => now,
            };
            let established = handshake == Handshake::Established;
            let value = FlowValue {
                grant_id,
                opened_at_boot_ns: opened,
                last_seen_boot_ns: opened,
                state: if established {
                    flow_state::ESTABLISHED
                } else {
                    0
                },
                _pad: 0,
            };
            self.gate
                .insert_flow(flow_key(id), value)
                .unwrap_or_else(|e| panic!("seeding flow from {src}: {e}"));
            self.spec.flows.insert(
                id,
                spec::Flow {
                    grant_id,
                    opened_ns: opened,
                    established,
                    fin: false,
                    rst: false,
                },
            );
        }
        self.counted_so_far = self.counters.read();
    }

    /// Runs `frame` through `program` (a mutant sharing the gate's maps)
    /// and through the spec.
    pub fn run_through(&mut self, program: &Xdp, frame: &[u8]) -> Run {
        let Sides {
            gate,
            spec,
            counters,
            counted_so_far,
            ..
        } = self;
        run_frame(program, gate, spec, counters, counted_so_far, frame)
    }

    /// Runs `frame` through the gate's own program and the spec.
    pub fn run(&mut self, frame: &[u8]) -> Run {
        let Sides {
            gate,
            spec,
            counters,
            counted_so_far,
            ..
        } = self;
        run_frame(gate.program(), gate, spec, counters, counted_so_far, frame)
    }

    /// The flows of both sides that differ: (key, kernel's, spec's).
    pub fn differing_flows(&self) -> Vec<(FlowKey, Option<FlowState>, Option<FlowState>)> {
        let kernel: BTreeMap<FlowKey, FlowState> = self
            .gate
            .flows()
            .unwrap_or_else(|e| panic!("reading flows: {e}"))
            .iter()
            .map(|f| (f.key, FlowState::from(&f.value)))
            .collect();
        let spec: BTreeMap<FlowKey, FlowState> = self
            .spec
            .flows
            .iter()
            .map(|(id, f)| (flow_key(*id), FlowState::from(f)))
            .collect();
        let keys: BTreeSet<FlowKey> = kernel.keys().chain(spec.keys()).copied().collect();
        keys.into_iter()
            .map(|key| (key, kernel.get(&key).copied(), spec.get(&key).copied()))
            .filter(|(_, kernel, spec)| kernel != spec)
            .collect()
    }

    /// The grants whose flow counters differ between the sides: (grant id,
    /// kernel's, spec's).
    pub fn differing_grant_counts(&self) -> Vec<(u64, OpenedRefused, OpenedRefused)> {
        let kernel: BTreeMap<u64, (u64, u64)> = self
            .gate
            .grant_flow_counts()
            .unwrap_or_else(|e| panic!("reading grant counters: {e}"))
            .into_iter()
            .map(|(id, c)| (id, (c.opened, c.refused)))
            .filter(|(_, c)| *c != (0, 0))
            .collect();
        let spec: BTreeMap<u64, (u64, u64)> = self
            .spec
            .counts
            .iter()
            .map(|(id, c)| (*id, (c.opened, c.refused)))
            .filter(|(_, c)| *c != (0, 0))
            .collect();
        let ids: BTreeSet<u64> = kernel.keys().chain(spec.keys()).copied().collect();
        ids.into_iter()
            .map(|id| {
                let k = kernel.get(&id).copied().unwrap_or_default();
                let s = spec.get(&id).copied().unwrap_or_default();
                (id, k, s)
            })
            .filter(|(_, k, s)| k != s)
            .collect()
    }
}

fn run_frame(
    program: &Xdp,
    gate: &XdpGate,
    spec: &mut spec::State,
    counters: &ReasonCounters,
    counted_so_far: &mut BTreeMap<Reason, u64>,
    frame: &[u8],
) -> Run {
    let outcome = spec.judge(frame, boot_now_ns());
    let action = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"))
        .return_value;
    assert!(
        matches!(action, XDP_DROP | XDP_PASS),
        "unexpected XDP action {action}"
    );
    let counts = counters.read();
    let counted = counts
        .iter()
        .filter(|(reason, count)| counted_so_far[reason] != **count)
        .map(|(reason, count)| (reason.name(), count - counted_so_far[reason]))
        .collect();
    *counted_so_far = counts;
    let flow = spec::State::flow_id(frame);
    let expected_flow = flow.and_then(|id| spec.flows.get(&id).map(FlowState::from));
    let kernel_flow = flow.and_then(|id| {
        gate.flow(&flow_key(id))
            .unwrap_or_else(|e| panic!("reading a flow: {e}"))
            .as_ref()
            .map(FlowState::from)
    });
    Run {
        spec: outcome,
        expected: Observed {
            pass: outcome.pass,
            counted: BTreeMap::from([(outcome.reason, 1)]),
            flow: expected_flow,
        },
        kernel: Observed {
            pass: action == XDP_PASS,
            counted,
            flow: kernel_flow,
        },
    }
}
