//! Differential test of the XDP program against the reference model.
//!
//! Every frame of a corpus (crafted edge cases, random bytes, mutations of
//! built packets) runs through the loaded program with `BPF_PROG_TEST_RUN`,
//! and through `decide` fed by the etherparse-based parser and the state kept
//! in plain collections. The action, the reason counted and the flow recorded
//! must agree for every frame.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::{Duration, Instant},
};

use aya::{
    maps::{Map, MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions},
};
use etherparse::IpNumber;
use ipnet::IpNet;
use jit_gate_agent::{
    clock::boot_now_ns,
    enforce::xdp::XdpGate,
    net::{
        GrantTarget,
        Protocol::{self, Tcp, Udp},
    },
};
use jit_gate_common::{
    maps::{FlowKey, FlowValue, names},
    verdict::{PacketFacts, Reason, Transport, Upper, Verdict, decide},
};
use jit_gate_tests::{
    env::PinDir,
    packets::{
        Extension, Frame, Packet, VLAN_STACKS, prefix_edges, random_extension_chain, random_frame,
        syn_ack_rst_fin_combinations,
        tcp_flag::{ACK, FIN, RST, SYN},
    },
    reference::{ReferenceState, address, facts_from_frame},
};
use rand::{SeedableRng, rngs::StdRng, seq::IndexedRandom};

// ---------------------------------------------------------------------------
// The gate's state, installed identically in the kernel and the reference.

const HOST_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const HOST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

/// The host address of `src`'s family: where every packet goes.
fn host_for(src: IpAddr) -> IpAddr {
    if src.is_ipv4() {
        HOST_V4.into()
    } else {
        HOST_V6.into()
    }
}

const PROTECTED: [(Protocol, u16); 5] = [
    (Tcp, 22),
    (Tcp, 3389),
    (Udp, 5353),
    (Tcp, 5985),
    (Udp, 5985),
];

/// Open ports: unprotected numbers, and protected numbers with the other protocol.
const UNPROTECTED: [(Protocol, u16); 4] = [(Tcp, 80), (Udp, 53), (Tcp, 5353), (Udp, 22)];

#[derive(Clone, Copy)]
enum Expiry {
    /// Expires a minute after setup.
    Live,
    /// Expired a millisecond before setup.
    Expired,
}

const LIVE_FOR: Duration = Duration::from_mins(1);
const EXPIRED_FOR: Duration = Duration::from_millis(1);

/// (source, protocol, port, expiry, grant id). Full-length prefixes are exact grants.
const GRANTS: [(&str, Protocol, u16, Expiry, u64); 24] = [
    ("198.51.100.10/32", Tcp, 22, Expiry::Live, 1),
    ("198.51.100.11/32", Tcp, 22, Expiry::Expired, 2),
    ("198.51.100.10/32", Udp, 5353, Expiry::Live, 3),
    ("198.51.100.12/32", Tcp, 5985, Expiry::Live, 4),
    ("198.51.100.13/32", Udp, 5985, Expiry::Expired, 5),
    ("198.51.100.14/32", Tcp, 3389, Expiry::Live, 6),
    // Expired exact grant inside the live 10.0.0.0/8: the CIDR grant still counts.
    ("10.9.9.9/32", Tcp, 22, Expiry::Expired, 7),
    ("2001:db8:1::10/128", Tcp, 22, Expiry::Live, 8),
    ("2001:db8:1::11/128", Tcp, 22, Expiry::Expired, 9),
    ("2001:db8:1::12/128", Udp, 5353, Expiry::Live, 10),
    ("2001:db8:1::13/128", Tcp, 3389, Expiry::Expired, 11),
    // An IPv6 grant for an IPv4-mapped address; 198.51.100.15 itself has none.
    ("::ffff:198.51.100.15/128", Tcp, 22, Expiry::Live, 12),
    ("10.0.0.0/8", Tcp, 22, Expiry::Live, 20),
    // Nested and expired: shadows the live /8, as the LPM trie returns only the longest.
    ("10.1.2.0/24", Tcp, 22, Expiry::Expired, 21),
    // Nested and live: flows open under the longer prefix's grant.
    ("10.20.0.0/16", Tcp, 22, Expiry::Live, 22),
    ("203.0.113.0/24", Udp, 5353, Expiry::Live, 23),
    ("192.0.2.100/31", Tcp, 3389, Expiry::Live, 24),
    ("100.64.0.0/10", Udp, 5985, Expiry::Live, 25),
    ("2001:db8:aa::/48", Tcp, 22, Expiry::Live, 30),
    ("2001:db8:aa:1::/64", Tcp, 22, Expiry::Expired, 31),
    ("2001:db8:aa:2::/64", Tcp, 22, Expiry::Live, 32),
    ("2001:db8:bb::/127", Udp, 5353, Expiry::Live, 33),
    ("2001:db8:cc::/56", Tcp, 5985, Expiry::Live, 34),
    ("2001:db8:8000::/33", Tcp, 3389, Expiry::Expired, 35),
];

/// Flows that predate the test, to the host: (source, source port, protocol,
/// port, grant id). Their source port is not the builder's default, so
/// other packets from these sources meet the grants alone.
const SEEDED_FLOWS: [(&str, u16, Protocol, u16, u64); 5] = [
    // The grant expired; the session lives on.
    ("198.51.100.11", 50_022, Tcp, 22, 100),
    ("2001:db8:1::11", 50_022, Tcp, 22, 101),
    // Under the expired nested /24.
    ("10.1.2.3", 50_022, Tcp, 22, 102),
    // No grant at all.
    ("198.51.100.99", 50_053, Udp, 5353, 103),
    // Live grant 3: a UDP flow keeps the grant it was first recorded under.
    ("198.51.100.10", 50_053, Udp, 5353, 104),
];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("address {s:?}: {e}"))
}

fn grant_source(s: &str) -> IpNet {
    s.parse().unwrap_or_else(|e| panic!("prefix {s:?}: {e}"))
}

fn flow_key(src: IpAddr, src_port: u16, protocol: Protocol, dst_port: u16) -> FlowKey {
    let transport = Transport {
        protocol: protocol.number(),
        src_port,
        dst_port,
        tcp_flags: 0,
    };
    FlowKey::of(&address(src), &address(host_for(src)), &transport)
}

/// Installs the scenario in both; returns when the live grants expire.
fn install_scenario(gate: &mut XdpGate, reference: &mut ReferenceState) -> u64 {
    let protected: BTreeSet<_> = PROTECTED.into_iter().collect();
    gate.set_protected_ports(&protected)
        .unwrap_or_else(|e| panic!("protecting ports: {e}"));
    for (protocol, port) in PROTECTED {
        reference.protect(protocol, port);
    }
    let now = boot_now_ns();
    let live_until = now + LIVE_FOR.as_nanos() as u64;
    for (source, protocol, port, expiry, grant_id) in GRANTS {
        let target = GrantTarget {
            source: grant_source(source),
            protocol,
            port,
        };
        let expires = match expiry {
            Expiry::Live => live_until,
            Expiry::Expired => now - EXPIRED_FOR.as_nanos() as u64,
        };
        gate.upsert_grant(&target, expires, grant_id)
            .unwrap_or_else(|e| panic!("grant {target}: {e}"));
        reference.upsert_grant(&target, expires, grant_id);
    }
    for (src, src_port, protocol, dst_port, grant_id) in SEEDED_FLOWS {
        let key = flow_key(ip(src), src_port, protocol, dst_port);
        let value = FlowValue {
            grant_id,
            opened_at_boot_ns: now,
        };
        gate.insert_flow(key, value)
            .unwrap_or_else(|e| panic!("seeding flow from {src}: {e}"));
        reference.insert_flow(key, grant_id);
    }
    live_until
}

// ---------------------------------------------------------------------------
// The corpus.

const RANDOM_FRAMES: usize = 2_500;
const RANDOM_FRAME_MAX_LEN: usize = 128;
const MUTATIONS: usize = 4_500;
const CHAINS_PER_LENGTH: usize = 30;
const MIN_CORPUS: usize = 10_000;

#[derive(Default)]
struct Corpus {
    frames: Vec<(&'static str, Vec<u8>)>,
    /// Every frame built from a [`Packet`]: the raw material of mutations.
    built: Vec<Frame>,
}

impl Corpus {
    fn add(&mut self, category: &'static str, frames: impl IntoIterator<Item = Vec<u8>>) {
        self.frames
            .extend(frames.into_iter().map(|frame| (category, frame)));
    }

    fn add_packets(&mut self, category: &'static str, packets: impl IntoIterator<Item = Packet>) {
        for packet in packets {
            let frame = packet.build();
            self.frames.push((category, frame.bytes.clone()));
            self.built.push(frame);
        }
    }

    fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for (category, _) in &self.frames {
            *counts.entry(*category).or_default() += 1;
        }
        counts
    }
}

fn tcp(src: IpAddr, port: u16, flags: u8) -> Packet {
    Packet::tcp(src, host_for(src), port, flags)
}

fn udp(src: IpAddr, port: u16) -> Packet {
    Packet::udp(src, host_for(src), port)
}

/// From `src` to every protected and unprotected (protocol, port): a TCP SYN
/// and a bare ACK, or a UDP datagram.
fn to_every_port(src: IpAddr) -> Vec<Packet> {
    PROTECTED
        .iter()
        .chain(&UNPROTECTED)
        .flat_map(|&(protocol, port)| match protocol {
            Tcp => vec![tcp(src, port, SYN), tcp(src, port, ACK)],
            Udp => vec![udp(src, port)],
        })
        .collect()
}

/// Sources with no grant of their own.
fn strangers() -> [IpAddr; 3] {
    [
        ip("192.0.2.200"),
        ip("2001:db8:ffff::1"),
        ip("198.51.100.15"),
    ]
}

/// One packet of each kind that matters, from one family: granted and
/// not, TCP and UDP, protected and not.
fn assorted(v4: bool) -> Vec<Packet> {
    let [live_tcp, live_udp, stranger] = if v4 {
        ["198.51.100.10", "198.51.100.10", "192.0.2.200"]
    } else {
        ["2001:db8:1::10", "2001:db8:1::12", "2001:db8:ffff::1"]
    }
    .map(ip);
    vec![
        tcp(live_tcp, 22, SYN),
        tcp(stranger, 22, SYN),
        udp(live_udp, 5353),
        udp(stranger, 5353),
        tcp(stranger, 80, SYN),
    ]
}

fn both_families() -> impl Iterator<Item = Packet> {
    [true, false].into_iter().flat_map(assorted)
}

fn build_corpus(rng: &mut StdRng) -> Corpus {
    let mut corpus = Corpus::default();
    let cidr_nets = GRANTS
        .iter()
        .map(|g| grant_source(g.0))
        .filter(|net| net.prefix_len() < net.max_prefix_len());
    let exact_sources = GRANTS
        .iter()
        .map(|g| grant_source(g.0))
        .filter(|net| net.prefix_len() == net.max_prefix_len())
        .map(|net| net.addr());

    corpus.add_packets(
        "exact grant sources and strangers, every port",
        exact_sources
            .clone()
            .chain(strangers())
            .flat_map(to_every_port),
    );
    corpus.add_packets(
        "CIDR prefix edges, every port",
        cidr_nets.flat_map(prefix_edges).flat_map(to_every_port),
    );
    let mapped = exact_sources
        .chain(strangers())
        .chain([ip("10.0.0.1")])
        .filter_map(|src| match src {
            IpAddr::V4(v4) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
            IpAddr::V6(_) => None,
        });
    corpus.add_packets(
        "IPv4-mapped IPv6 sources, every port",
        mapped.flat_map(to_every_port),
    );
    corpus.add_packets("TCP flag combinations", tcp_flag_combinations());
    corpus.add_packets("seeded flows", seeded_flow_packets());
    corpus.add_packets(
        "VLAN, QinQ, triple tags",
        VLAN_STACKS
            .iter()
            .flat_map(|stack| both_families().map(move |p| p.vlan(stack))),
    );
    corpus.add_packets(
        "IPv4 options (IHL 6..=15)",
        (1..=10).flat_map(|words| {
            assorted(true)
                .into_iter()
                .map(move |p| p.ipv4_options(words))
        }),
    );
    corpus.add("IPv4 IHL < 5, IP lengths that lie", ip_length_corruptions());
    for (category, first_fragment) in [
        (
            "transport header cut short, more bytes after the IP packet",
            false,
        ),
        ("tiny first fragments", true),
    ] {
        corpus.add_packets(category, transport_cut_short(first_fragment));
    }
    corpus.add_packets("non-first fragments", non_first_fragments());
    corpus.add_packets(
        "IPv6 extension chains of 0..=12 headers",
        extension_chains(rng),
    );
    corpus.add_packets("IPv6 extension chains cut short", extension_chains_cut(rng));
    corpus.add("frame truncations", frame_truncations());
    corpus.add(
        "random bytes",
        (0..RANDOM_FRAMES).map(|_| random_frame(rng, RANDOM_FRAME_MAX_LEN)),
    );
    let mutations: Vec<_> = (0..MUTATIONS)
        .map(|_| corpus.built.choose(rng).expect("built frames").mutated(rng))
        .collect();
    corpus.add("random mutations of built frames", mutations);
    corpus
}

fn tcp_flag_combinations() -> Vec<Packet> {
    let sources = [
        "198.51.100.10",
        "2001:db8:1::10",
        "10.0.0.1",
        "2001:db8:aa::1",
        "198.51.100.11",
        "2001:db8:ffff::1",
    ];
    let mut packets = Vec::new();
    for src in sources.map(ip) {
        for port in [22, 3389, 5985, 80] {
            packets.extend(syn_ack_rst_fin_combinations().map(|flags| tcp(src, port, flags)));
        }
    }
    packets
}

/// Packets of each seeded flow, and of the flow next to it (source port + 1).
fn seeded_flow_packets() -> Vec<Packet> {
    let mut packets = Vec::new();
    for (src, flow_port, protocol, port, _) in SEEDED_FLOWS {
        let src = ip(src);
        for src_port in [flow_port, flow_port + 1] {
            match protocol {
                Tcp => packets.extend(
                    syn_ack_rst_fin_combinations().map(|f| tcp(src, port, f).src_port(src_port)),
                ),
                Udp => packets.push(udp(src, port).src_port(src_port)),
            }
        }
    }
    packets
}

/// IPv4 IHL below 5; IPv4 total lengths and IPv6 payload lengths that end
/// the packet before the transport header, inside it, or past the end of
/// the frame; each with and without bytes after the IP packet.
fn ip_length_corruptions() -> Vec<Vec<u8>> {
    const PADDING: u16 = 16;
    // (packet, the length value at which the transport header starts): the
    // IPv4 total length counts the header, the IPv6 payload length does not.
    let ipv4 = [0, 3].into_iter().flat_map(|words| {
        let header_len = 20 + 4 * u16::from(words);
        assorted(true)
            .into_iter()
            .map(move |p| (p.ipv4_options(words), header_len))
    });
    let ipv6 = assorted(false).into_iter().map(|p| (p, 0));
    let mut frames = Vec::new();
    for (packet, transport) in ipv4.chain(ipv6) {
        for padding in [0, PADDING] {
            let frame = packet.clone().padding(padding.into()).build();
            if frame.is_ipv4() {
                frames.extend((0..5).map(|ihl| frame.with_ipv4_ihl(ihl)));
            }
            let full = frame.ip_length();
            let lengths = [
                0,
                1,
                transport.saturating_sub(1),
                transport + 3,
                transport + 4,
                transport + 7,
                transport + 8,
                transport + 12,
                transport + 19,
                full - 1,
                full + 1,
                full + PADDING,
                full + PADDING + 1,
                u16::MAX,
            ];
            frames.extend(lengths.map(|len| frame.with_ip_length(len)));
        }
    }
    frames
}

/// The IP packet ends inside the TCP/UDP header (every length), followed by
/// padding or not; as a first fragment (MF set) or unfragmented.
fn transport_cut_short(first_fragment: bool) -> Vec<Packet> {
    let mut packets = Vec::new();
    for packet in both_families() {
        let packet = if first_fragment {
            packet.fragment(0, true)
        } else {
            packet
        };
        for padding in [0, 24] {
            packets.extend(packet.ip_payload_cuts().map(|cut| cut.padding(padding)));
        }
    }
    packets
}

fn non_first_fragments() -> Vec<Packet> {
    let mut packets = Vec::new();
    for packet in both_families() {
        for offset in [1, 2, 185, etherparse::IpFragOffset::MAX_U16] {
            for more in [true, false] {
                packets.push(packet.clone().fragment(offset, more));
            }
        }
    }
    packets
}

/// What extension chains lead to: every kind of packet, and upper layers
/// that are neither TCP nor UDP.
fn chain_ends() -> Vec<Packet> {
    let (src, dst) = (ip("2001:db8:aa::5"), IpAddr::from(HOST_V6));
    let mut ends = assorted(false);
    ends.push(tcp(src, 22, SYN));
    ends.extend(
        [
            IpNumber::IPV6_ICMP,
            IpNumber::ENCAPSULATING_SECURITY_PAYLOAD,
            IpNumber::IPV6_NO_NEXT_HEADER,
        ]
        .map(|protocol| Packet::other(src, dst, protocol)),
    );
    ends
}

fn extension_chains(rng: &mut StdRng) -> Vec<Packet> {
    let ends = chain_ends();
    let mut packets = Vec::new();
    for len in 0..=12 {
        for _ in 0..CHAINS_PER_LENGTH {
            let chain = random_extension_chain(rng, len);
            let end = ends.choose(rng).expect("non-empty").clone();
            packets.push(end.extensions(&chain));
        }
    }
    packets
}

/// One chain of each length up to the walk bound and one past it, cut after
/// every byte.
fn extension_chains_cut(rng: &mut StdRng) -> Vec<Packet> {
    let end = tcp(ip("2001:db8:1::10"), 22, SYN);
    (1..=9)
        .flat_map(|len| {
            let chain = random_extension_chain(rng, len);
            let packet = end.clone().extensions(&chain);
            packet.ip_payload_cuts().collect::<Vec<_>>()
        })
        .collect()
}

fn frame_truncations() -> Vec<Vec<u8>> {
    let stacks = [VLAN_STACKS[0], VLAN_STACKS[1], VLAN_STACKS[4]];
    let granted = [
        tcp(ip("198.51.100.10"), 22, SYN | ACK),
        udp(ip("198.51.100.10"), 5353),
        tcp(ip("2001:db8:1::10"), 22, FIN | ACK),
        udp(ip("2001:db8:1::12"), 5353),
    ];
    let mut bases: Vec<Packet> = stacks
        .iter()
        .flat_map(|stack| granted.iter().map(|p| p.clone().vlan(stack)))
        .collect();
    bases.push(tcp(ip("192.0.2.200"), 22, RST).ipv4_options(4));
    bases.push(tcp(ip("2001:db8:ffff::1"), 22, SYN).extensions(&[
        Extension::Options {
            kind: IpNumber::IPV6_HEADER_HOP_BY_HOP,
            extra_units: 0,
        },
        Extension::Options {
            kind: IpNumber::IPV6_DESTINATION_OPTIONS,
            extra_units: 1,
        },
        Extension::Fragment {
            offset: 0,
            more: true,
        },
        Extension::Auth { icv_words: 1 },
    ]));
    bases
        .iter()
        .flat_map(|p| p.build().truncations().collect::<Vec<_>>())
        .collect()
}

// ---------------------------------------------------------------------------
// Running and comparing.

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// The per-CPU reason counters, read straight from their pin: the numbers
/// `XdpGate::counters().by_reason` sums, without its walk over all 65,536
/// protected-port slots (about 0.1 s a call, too slow to do per packet).
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

/// What running one packet did, or should have done.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    /// The XDP action.
    action: u32,
    /// The reason counters that went up, by how much.
    counted: BTreeMap<Reason, u64>,
    /// For a packet that opens a flow: the grant its flow is recorded under.
    flow_grant: Option<u64>,
}

/// One frame through both sides.
struct Run {
    facts: PacketFacts,
    reason: Reason,
    expected: Outcome,
    kernel: Outcome,
}

struct Disagreement {
    category: &'static str,
    frame: Vec<u8>,
    run: Run,
}

/// The loaded gate and the reference, holding the same state.
struct Sides {
    gate: XdpGate,
    reference: ReferenceState,
    counters: ReasonCounters,
    /// The reason counters after the last run.
    counted_so_far: BTreeMap<Reason, u64>,
    live_until: u64,
}

impl Sides {
    fn new(pins: &PinDir) -> Self {
        let mut gate = pins.open_gate();
        let mut reference = ReferenceState::default();
        let live_until = install_scenario(&mut gate, &mut reference);
        let counters = ReasonCounters::open(&pins.path);
        Sides {
            gate,
            reference,
            counted_so_far: counters.read(),
            counters,
            live_until,
        }
    }

    fn run(&mut self, frame: &[u8]) -> Run {
        let facts = facts_from_frame(frame);
        let verdict = decide(&facts, &self.reference, boot_now_ns());
        let action = self
            .gate
            .program()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("test run of {}: {e}", hex(frame)))
            .return_value;
        let counts = self.counters.read();
        let counted = increments(&self.counted_so_far, &counts);
        self.counted_so_far = counts;

        let (expected_flow, kernel_flow) = match opened_flow(&facts, &verdict) {
            Some((key, grant_id)) => {
                self.reference.open_flow(key, grant_id);
                (
                    self.reference.flows().get(&key).copied(),
                    kernel_flows(&self.gate).get(&key).copied(),
                )
            }
            None => (None, None),
        };
        Run {
            facts,
            reason: verdict.reason,
            expected: Outcome {
                action: if verdict.passes() { XDP_PASS } else { XDP_DROP },
                counted: BTreeMap::from([(verdict.reason, 1)]),
                flow_grant: expected_flow,
            },
            kernel: Outcome {
                action,
                counted,
                flow_grant: kernel_flow,
            },
        }
    }

    /// After the corpus: the live grants were live throughout, the agent's
    /// counter API sees what was read per packet, and the flow tables match.
    fn assert_final_state_agrees(&self) {
        assert!(
            boot_now_ns() < self.live_until,
            "the run outlasted the live grants ({LIVE_FOR:?}): live-grant cases were not tested as such"
        );
        let gate_counters = self
            .gate
            .counters()
            .unwrap_or_else(|e| panic!("reading counters: {e}"));
        assert_eq!(
            gate_counters.by_reason, self.counted_so_far,
            "XdpGate::counters disagrees with the pinned counters read per packet"
        );
        let kernel_flows = kernel_flows(&self.gate);
        let expected_flows = self.reference.flows();
        let differing: Vec<_> = kernel_flows
            .iter()
            .map(|(key, grant)| (key, Some(grant), expected_flows.get(key)))
            .chain(
                expected_flows
                    .iter()
                    .map(|(key, grant)| (key, kernel_flows.get(key), Some(grant))),
            )
            .filter(|(_, kernel, expected)| kernel != expected)
            .collect();
        assert!(
            differing.is_empty(),
            "flows (key, kernel's grant id, reference's) that differ: {differing:#?}"
        );
    }
}

/// The flow a packet opens, and the grant it opens it under.
fn opened_flow(facts: &PacketFacts, verdict: &Verdict) -> Option<(FlowKey, u64)> {
    let grant_id = verdict.open_flow_for_grant?;
    let PacketFacts::Ip {
        src,
        dst,
        upper: Upper::Transport(transport),
    } = facts
    else {
        panic!("decide opened a flow for {facts:?}");
    };
    Some((FlowKey::of(src, dst, transport), grant_id))
}

fn kernel_flows(gate: &XdpGate) -> BTreeMap<FlowKey, u64> {
    gate.flows()
        .unwrap_or_else(|e| panic!("reading flows: {e}"))
        .into_iter()
        .map(|flow| (flow.key, flow.value.grant_id))
        .collect()
}

fn increments(
    before: &BTreeMap<Reason, u64>,
    after: &BTreeMap<Reason, u64>,
) -> BTreeMap<Reason, u64> {
    after
        .iter()
        .filter(|(reason, count)| before[reason] != **count)
        .map(|(reason, count)| (*reason, count - before[reason]))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn seed() -> u64 {
    match std::env::var("JIT_GATE_DIFF_SEED") {
        Ok(seed) => seed
            .parse()
            .unwrap_or_else(|e| panic!("JIT_GATE_DIFF_SEED={seed:?}: {e}")),
        Err(_) => rand::random(),
    }
}

#[test]
fn kernel_verdicts_match_the_reference_model() {
    let seed = seed();
    println!("seed {seed} (replay with JIT_GATE_DIFF_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let corpus = build_corpus(&mut rng);
    for (category, count) in corpus.counts() {
        println!("{count:>6}  {category}");
    }
    assert!(
        corpus.frames.len() >= MIN_CORPUS,
        "corpus too small: {}",
        corpus.frames.len()
    );

    let pins = PinDir::new();
    let mut sides = Sides::new(&pins);
    let started = Instant::now();
    let mut disagreements = Vec::new();
    let mut expected_reasons: BTreeMap<Reason, u64> = BTreeMap::new();
    for (category, frame) in &corpus.frames {
        let run = sides.run(frame);
        *expected_reasons.entry(run.reason).or_default() += 1;
        if run.kernel != run.expected {
            disagreements.push(Disagreement {
                category,
                frame: frame.clone(),
                run,
            });
        }
    }
    println!(
        "compared {} packets in {:.1?}; reference verdicts:",
        corpus.frames.len(),
        started.elapsed()
    );
    for (reason, count) in &expected_reasons {
        println!("{count:>6}  {}", reason.name());
    }
    assert!(
        disagreements.is_empty(),
        "{}",
        report(&disagreements, corpus.frames.len())
    );
    sides.assert_final_state_agrees();
}

fn report(disagreements: &[Disagreement], compared: usize) -> String {
    const SHOWN: usize = 20;
    let mut report = format!(
        "{} of {compared} packets disagree; the first {}:\n",
        disagreements.len(),
        disagreements.len().min(SHOWN)
    );
    for d in disagreements.iter().take(SHOWN) {
        let _ = writeln!(
            report,
            "[{}] {}\n  reference facts: {:?}\n  expected: {:?}\n  kernel:   {:?}",
            d.category,
            hex(&d.frame),
            d.run.facts,
            d.run.expected,
            d.run.kernel
        );
    }
    report
}
