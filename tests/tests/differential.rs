//! Differential test of the XDP program against the verdict spec.
//!
//! Every frame of a corpus (crafted edge cases, random bytes, mutations of
//! built packets) runs through the loaded program with `BPF_PROG_TEST_RUN`,
//! and through the spec (`jit_gate_tests::spec`), a second implementation
//! of README's decision list sharing no code with the program. The action,
//! the reason counted and the flow entry of the frame's tuple must agree for
//! every frame; so must the flow table and the grants' flow counters at the
//! end. README's decision list as named cases (`jit_gate_tests::cases`)
//! runs the same way, and each case's verdicts are checked against the
//! table too.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr, time::Instant};

use etherparse::IpNumber;
use jit_gate_agent::{
    clock::boot_now_ns,
    net::Protocol::{Tcp, Udp},
};
use jit_gate_tests::{
    cases::cases,
    env::PinDir,
    mutate::random_frame,
    packets::{
        Extension, Frame, Packet, VLAN_STACKS, prefix_edges, random_extension_chain,
        syn_ack_rst_fin_combinations,
        tcp_flag::{ACK, FIN, RST, SYN},
    },
    scenario::{
        GRANTS, HOST_V6, PROTECTED, Run, SEEDED_FLOWS, Sides, UNPROTECTED, grant_source, ip, tcp,
        udp,
    },
};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};

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
        "0..=10 priority tags (VLAN ID 0)",
        (0..=10).flat_map(|tags| both_families().map(move |p| p.priority_tags(tags))),
    );
    corpus.add_packets("IPv4 authentication headers", ipv4_auth_chains(rng));
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
    for (src, flow_port, protocol, port, _, _) in SEEDED_FLOWS {
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

/// TCP and UDP behind 0..=10 authentication headers over IPv4, of every
/// size (the 8-byte one included).
fn ipv4_auth_chains(rng: &mut StdRng) -> Vec<Packet> {
    let mut packets = Vec::new();
    for len in 0..=10 {
        for packet in assorted(true) {
            let chain: Vec<Extension> = (0..len)
                .map(|_| match rng.random_range(0..4) {
                    0 => Extension::ShortAuth,
                    words => Extension::Auth { icv_words: words },
                })
                .collect();
            packets.push(packet.extensions(&chain));
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

struct Disagreement {
    category: String,
    frame: Vec<u8>,
    run: Run,
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
fn kernel_verdicts_match_the_spec() {
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
    let mut verdicts: BTreeMap<&str, u64> = BTreeMap::new();
    for (category, frame) in &corpus.frames {
        let run = sides.run(frame);
        *verdicts.entry(run.spec.reason).or_default() += 1;
        if !run.agrees() {
            disagreements.push(Disagreement {
                category: category.to_string(),
                frame: frame.clone(),
                run,
            });
        }
    }
    println!(
        "compared {} packets in {:.1?}; the spec's verdicts:",
        corpus.frames.len(),
        started.elapsed()
    );
    for (reason, count) in &verdicts {
        println!("{count:>6}  {reason}");
    }
    assert!(
        disagreements.is_empty(),
        "{}",
        report(&disagreements, corpus.frames.len())
    );
    assert_final_state_agrees(&sides);
}

#[test]
fn readme_cases_hold_in_the_kernel_and_the_spec() {
    let pins = PinDir::new();
    let mut sides = Sides::new(&pins);
    let mut failures = Vec::new();
    let mut steps = 0;
    for case in cases() {
        for (i, (frame, wanted)) in case.steps.iter().enumerate() {
            steps += 1;
            let run = sides.run(frame);
            let step = format!("[{}] step {}", case.name, i + 1);
            if run.spec != *wanted {
                failures.push(format!(
                    "{step}: the spec says {:?}, README's list {wanted:?}",
                    run.spec
                ));
            }
            if !run.agrees() {
                failures.push(format!(
                    "{step}: kernel {:?}, expected {:?}",
                    run.kernel, run.expected
                ));
            }
        }
    }
    println!("{steps} steps of {} cases", cases().len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_final_state_agrees(&sides);
}

/// After a run: the live grants were live throughout, and the flow table
/// and the grants' flow counters match.
fn assert_final_state_agrees(sides: &Sides) {
    assert!(
        boot_now_ns() < sides.live_until,
        "the run outlasted the live grants: live-grant cases were not tested as such"
    );
    let flows = sides.differing_flows();
    assert!(
        flows.is_empty(),
        "flows (key, kernel's, spec's) that differ: {flows:#?}"
    );
    let counts = sides.differing_grant_counts();
    assert!(
        counts.is_empty(),
        "grant flow counters (id, kernel's (opened, refused), spec's) that differ: {counts:?}"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
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
            "[{}] spec: {:?}\n  expected: {:?}\n  kernel:   {:?}\n  frame: {}",
            d.category,
            d.run.spec,
            d.run.expected,
            d.run.kernel,
            hex(&d.frame)
        );
    }
    report
}
