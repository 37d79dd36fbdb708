//! The delivery oracle: the kernel, not a model, says what got through.
//!
//! More than 20,000 crafted and mutated frames (VLAN tag stacks 0–6 deep,
//! priority tags among them, IPv4 options, fragments split, duplicated and
//! overlapping, IPv6 extension chains, authentication headers over IPv4 and
//! IPv6, truncations, random bytes, random transport headers, mutations) go
//! out raw (`AF_PACKET`) from the client namespace to the gated one, three
//! times, each time into fresh namespaces:
//! - without the gate: what the kernel delivers on its own;
//! - through the gate (mode xdp) without grants: raw sockets in the gated
//!   namespace, which get a copy of every TCP and UDP packet the IP stack
//!   delivers, must see nothing to a protected port, and the client must
//!   see no SYN-ACK or reset from one;
//! - through the gate with grants for the client's addresses: everything
//!   the kernel delivered on its own from those addresses (or to open
//!   ports) with a whole TCP/UDP header must be delivered again, save the
//!   frames README says drop even under a grant (first fragments without
//!   their whole transport header, extension chains past the bound).
#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use etherparse::{EtherType, IpNumber, Ipv4Header, Ipv6Header, SlicedPacket, TransportSlice};
use jit_gate_agent::{
    clock::boot_now_ns,
    enforce::xdp::GrantLimits,
    net::{GrantTarget, Protocol},
};
use jit_gate_tests::{
    checksum::fix_ipv4_header_checksum,
    fragments::{fragment, split},
    frames::{Delivered, DeliveryTap, PacketSocket, if_counts, mac_of},
    gated_host::GatedHost,
    mutate::random_frame,
    netns::{
        CLIENT_V4, CLIENT_V4_OUTSIDE, CLIENT_V6, CLIENT_V6_OUTSIDE, GATED_V4, GATED_V6, Topology,
    },
    packets::{Extension, Frame, Packet, random_extension_chain, tcp_flag::*},
};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};

const PROTECTED: [(Protocol, u16); 3] = [
    (Protocol::Tcp, 22),
    (Protocol::Udp, 5353),
    (Protocol::Tcp, 3389),
];
const OPEN: [(Protocol, u16); 3] = [
    (Protocol::Tcp, 80),
    (Protocol::Udp, 53),
    (Protocol::Udp, 22),
];
/// Granted in the third run.
const GRANTED: [IpAddr; 2] = [IpAddr::V4(CLIENT_V4), IpAddr::V6(CLIENT_V6)];
/// Never granted; the client owns them, so answers would come back.
const STRANGERS: [IpAddr; 2] = [IpAddr::V4(CLIENT_V4_OUTSIDE), IpAddr::V6(CLIENT_V6_OUTSIDE)];
const MIN_FRAMES: usize = 20_000;
/// Frames sent before pausing for the receiving side to keep up.
const BATCH: usize = 32;
const PAUSE: Duration = Duration::from_micros(600);

fn protected(protocol: u8, port: u16) -> bool {
    PROTECTED
        .iter()
        .any(|(p, q)| p.number() == protocol && *q == port)
}

fn gated_for(src: IpAddr) -> IpAddr {
    if src.is_ipv4() {
        GATED_V4.into()
    } else {
        GATED_V6.into()
    }
}

/// Frames of one kind, and whether the gate must let through, under a
/// grant, whatever the kernel would deliver of them.
struct Category {
    name: &'static str,
    frames: Vec<Vec<u8>>,
    all_deliverable: bool,
}

/// TCP segments (SYN, ACK, FIN|ACK, RST) and UDP datagrams from every
/// source to every port, with `data` after the header.
fn base_packets(data: &[u8]) -> Vec<Packet> {
    let mut packets = Vec::new();
    for src in GRANTED.into_iter().chain(STRANGERS) {
        let dst = gated_for(src);
        for (protocol, port) in PROTECTED.into_iter().chain(OPEN) {
            match protocol {
                Protocol::Tcp => {
                    for flags in [SYN, ACK, FIN | ACK, RST] {
                        packets.push(Packet::tcp(src, dst, port, flags).data(data));
                    }
                }
                Protocol::Udp => packets.push(Packet::udp(src, dst, port).data(data)),
            }
        }
    }
    packets
}

fn built(packets: impl IntoIterator<Item = Packet>) -> Vec<Vec<u8>> {
    packets.into_iter().map(|p| p.build().bytes).collect()
}

fn vlan_stacks(bases: &[Packet]) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    for depth in 0..=6usize {
        let priority = vec![(EtherType::VLAN_TAGGED_FRAME, 0); depth];
        let provider = vec![(EtherType::PROVIDER_BRIDGING, 0); depth];
        let alternating: Vec<_> = (0..depth)
            .map(|i| {
                let tpid = if i % 2 == 0 {
                    EtherType::PROVIDER_BRIDGING
                } else {
                    EtherType::VLAN_TAGGED_FRAME
                };
                (tpid, 0)
            })
            .collect();
        let mut numbered = priority.clone();
        if let Some(outer) = numbered.first_mut() {
            outer.1 = 100;
        }
        for stack in [priority, provider, alternating, numbered] {
            frames.extend(built(bases.iter().map(|p| p.clone().vlan_ids(&stack))));
        }
    }
    frames
}

/// Fragment sequences whose first fragment holds the whole transport
/// header: split in two or three, in order and reversed.
fn whole_header_fragments(bases: &[Packet], ids: &mut u32) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    for base in bases {
        let frame = base.build();
        for cuts in [&[24][..], &[24, 40], &[32]] {
            *ids += 1;
            let mut pieces = split(&frame, cuts, *ids);
            frames.extend(pieces.clone());
            *ids += 1;
            pieces = split(&frame, cuts, *ids);
            pieces.reverse();
            frames.extend(pieces);
        }
    }
    frames
}

/// Fragment sequences that README drops even under a grant, or that the
/// kernel discards: tiny first fragments, duplicated and overlapping ones,
/// a protected port slipped into a second first fragment.
fn tiny_and_overlapping_fragments(bases: &[Packet], ids: &mut u32) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    for base in bases {
        let frame = base.build();
        for cuts in [&[8][..], &[16], &[8, 16]] {
            *ids += 1;
            frames.extend(split(&frame, cuts, *ids));
        }
        // The same datagram to an open port, then its first fragment again
        // aimed at a protected port, then the rest.
        let open = retarget(base, 80, 53).build();
        *ids += 1;
        frames.push(fragment(&open, 0, 24, true, *ids));
        frames.push(fragment(&frame, 0, 24, true, *ids));
        frames.push(fragment(&open, 24, usize::MAX, false, *ids));
        // Overlapping: a short protected first fragment inside a longer open one.
        *ids += 1;
        frames.push(fragment(&open, 0, 32, true, *ids));
        frames.push(fragment(&frame, 0, 16, true, *ids));
        frames.push(fragment(&open, 16, usize::MAX, false, *ids));
    }
    frames
}

/// `base` aimed at an open port of its protocol.
fn retarget(base: &Packet, tcp_port: u16, udp_port: u16) -> Packet {
    let port = if base.is_tcp() { tcp_port } else { udp_port };
    base.clone().dst_port(port)
}

fn extension_chains(
    rng: &mut StdRng,
    bases: &[Packet],
    lengths: std::ops::RangeInclusive<usize>,
    count: usize,
) -> Vec<Vec<u8>> {
    let v6: Vec<&Packet> = bases
        .iter()
        .filter(|p| p.build().bytes[12..14] == [0x86, 0xdd])
        .collect();
    (0..count)
        .map(|_| {
            let len = rng.random_range(lengths.clone());
            let chain = random_extension_chain(rng, len);
            let base = (*v6.choose(rng).expect("IPv6 packets")).clone();
            base.extensions(&chain).build().bytes
        })
        .collect()
}

fn auth_chains(rng: &mut StdRng, bases: &[Packet]) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    for base in bases {
        let len = rng.random_range(1..=9);
        let chain: Vec<Extension> = (0..len)
            .map(|_| match rng.random_range(0..4) {
                0 => Extension::ShortAuth,
                words => Extension::Auth { icv_words: words },
            })
            .collect();
        frames.push(base.clone().extensions(&chain).build().bytes);
    }
    frames
}

/// Valid IP headers from the client's addresses to the gated host, over
/// random TCP or UDP bytes (often aimed at a protected port).
fn random_transports(rng: &mut StdRng, count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|_| {
            let src = *GRANTED
                .iter()
                .chain(&STRANGERS)
                .collect::<Vec<_>>()
                .choose(rng)
                .expect("sources");
            let protocol = *[IpNumber::TCP, IpNumber::UDP]
                .choose(rng)
                .expect("protocols");
            let mut payload: Vec<u8> = (0..rng.random_range(0..60)).map(|_| rng.random()).collect();
            if payload.len() >= 4 && rng.random_bool(0.7) {
                let (_, port) = *PROTECTED.choose(rng).expect("ports");
                payload[2..4].copy_from_slice(&port.to_be_bytes());
            }
            let mut frame = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
            match (*src, gated_for(*src)) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    frame.extend([0x08, 0x00]);
                    let mut header =
                        Ipv4Header::new(payload.len() as u16, 64, protocol, s.octets(), d.octets())
                            .expect("small payload");
                    header.header_checksum = header.calc_header_checksum();
                    frame.extend_from_slice(&header.to_bytes());
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    frame.extend([0x86, 0xdd]);
                    let header = Ipv6Header {
                        payload_length: payload.len() as u16,
                        next_header: protocol,
                        hop_limit: 64,
                        source: s.octets(),
                        destination: d.octets(),
                        ..Default::default()
                    };
                    frame.extend_from_slice(&header.to_bytes());
                }
                _ => unreachable!("one family"),
            }
            frame.extend_from_slice(&payload);
            frame
        })
        .collect()
}

fn corpus(seed: u64) -> Vec<Category> {
    let mut rng = StdRng::seed_from_u64(seed);
    let bases = base_packets(&[0x5a; 32]);
    let bare = base_packets(&[]);
    let mut ids = 0u32;
    let mut categories = vec![
        Category {
            name: "VLAN tag stacks 0-6 deep (priority, 802.1Q, 802.1ad)",
            frames: vlan_stacks(&bare),
            all_deliverable: true,
        },
        Category {
            name: "IPv4 options",
            frames: (1..=10)
                .flat_map(|words| {
                    built(
                        bases
                            .iter()
                            .filter(|p| p.build().is_ipv4())
                            .map(|p| p.clone().ipv4_options(words)),
                    )
                })
                .collect(),
            all_deliverable: true,
        },
        Category {
            name: "fragments holding the whole header, in order and reversed",
            frames: whole_header_fragments(&bases, &mut ids),
            all_deliverable: true,
        },
        Category {
            name: "tiny, duplicated and overlapping fragments",
            frames: tiny_and_overlapping_fragments(&bases, &mut ids),
            all_deliverable: false,
        },
        Category {
            name: "IPv6 extension chains of 0-8 headers",
            frames: extension_chains(&mut rng, &bare, 0..=8, 1_500),
            all_deliverable: true,
        },
        Category {
            name: "IPv6 extension chains of 9-10 headers",
            frames: extension_chains(&mut rng, &bare, 9..=10, 200),
            all_deliverable: false,
        },
        Category {
            name: "authentication headers over IPv4 and IPv6",
            frames: auth_chains(&mut rng, &[bare.clone(), bases.clone()].concat()),
            all_deliverable: true,
        },
        Category {
            name: "truncations",
            frames: bare
                .iter()
                .step_by(3)
                .flat_map(|p| {
                    p.clone()
                        .priority_tags(1)
                        .build()
                        .truncations()
                        .collect::<Vec<_>>()
                })
                .collect(),
            all_deliverable: true,
        },
        Category {
            name: "random bytes",
            frames: (0..4_000).map(|_| random_frame(&mut rng, 128)).collect(),
            all_deliverable: true,
        },
        Category {
            name: "random TCP and UDP bytes behind valid IP headers",
            frames: random_transports(&mut rng, 3_000),
            all_deliverable: true,
        },
    ];
    let sources: Vec<Frame> = bases
        .iter()
        .chain(&bare)
        .flat_map(|p| {
            [
                p.build(),
                p.clone().priority_tags(3).build(),
                p.clone().vlan(&[EtherType::PROVIDER_BRIDGING]).build(),
            ]
        })
        .collect();
    let mutations = (0..7_000)
        .map(|_| {
            let mut frame = sources.choose(&mut rng).expect("frames").mutated(&mut rng);
            if rng.random() {
                fix_ipv4_header_checksum(&mut frame);
            }
            frame
        })
        .collect();
    categories.push(Category {
        name: "mutations of built frames",
        frames: mutations,
        all_deliverable: true,
    });
    categories
}

/// What one category of frames led to on the gated side.
#[derive(Default)]
struct Outcome {
    delivered: Vec<Delivered>,
    /// SYN-ACKs and resets from a protected port, seen by the client.
    answers: Vec<String>,
}

/// Sends every category from the client to the gated namespace of `topo`;
/// returns what each led to, and how many frames went out.
fn send(topo: &Topology, categories: &[Category]) -> (Vec<Outcome>, usize) {
    let tap = DeliveryTap::open(&topo.gated);
    let sender = PacketSocket::sender(&topo.client, &topo.client_if);
    let capture = PacketSocket::capture(&topo.client, &topo.client_if);
    let client_mac = mac_of(&topo.client, &topo.client_if);
    let gated_mac = mac_of(&topo.gated, &topo.gated_if);
    let before = if_counts(&topo.client, &topo.client_if);
    let mut sent = 0;
    let outcomes = categories
        .iter()
        .map(|category| {
            for (i, frame) in category.frames.iter().enumerate() {
                let mut frame = frame.clone();
                frame[..6].copy_from_slice(&gated_mac);
                frame[6..12].copy_from_slice(&client_mac);
                sender.send(&frame);
                sent += 1;
                if i % BATCH == BATCH - 1 {
                    std::thread::sleep(PAUSE);
                }
            }
            let delivered = tap.drain(Duration::from_millis(150));
            let answers = capture
                .drain(Duration::from_millis(50))
                .iter()
                .filter(|f| f[6..12] == gated_mac)
                .filter_map(|f| answer_from_protected_port(f))
                .collect();
            Outcome { delivered, answers }
        })
        .collect();
    let after = if_counts(&topo.client, &topo.client_if);
    assert_eq!(
        after.tx_dropped, before.tx_dropped,
        "frames were lost in the veth pair: the test did not pace its sending enough"
    );
    (outcomes, sent)
}

/// A TCP SYN-ACK or reset sent from a protected port, described.
fn answer_from_protected_port(frame: &[u8]) -> Option<String> {
    let packet = SlicedPacket::from_ethernet(frame).ok()?;
    let Some(TransportSlice::Tcp(tcp)) = &packet.transport else {
        return None;
    };
    let answered = (tcp.syn() && tcp.ack()) || tcp.rst();
    (answered && protected(6, tcp.source_port())).then(|| {
        format!(
            "{} from port {} to port {}",
            if tcp.rst() { "RST" } else { "SYN-ACK" },
            tcp.source_port(),
            tcp.destination_port()
        )
    })
}

/// A gated host with the gate attached (mode xdp), granting `granted`
/// every protected port without a practical flow limit.
fn gated(granted: &[IpAddr]) -> GatedHost {
    let mut host = GatedHost::new(&PROTECTED);
    let limits = GrantLimits {
        flow_quota: 1_000_000,
        max_opens: 0,
    };
    let expires = boot_now_ns() + 600_000_000_000;
    for (i, source) in granted.iter().enumerate() {
        for (protocol, port) in PROTECTED {
            let target = GrantTarget {
                source: (*source).into(),
                protocol,
                port,
            };
            host.gate
                .upsert_grant_with_limits(&target, expires, i as u64 + 1, limits)
                .expect("grant");
        }
    }
    host
}

fn to_protected(d: &Delivered) -> bool {
    d.dst_port().is_some_and(|port| protected(d.protocol, port))
}

fn describe(d: &Delivered) -> String {
    let protocol = if d.protocol == 6 { "TCP" } else { "UDP" };
    format!("{protocol} from {} to port {:?}", d.source, d.dst_port())
}

#[test]
fn nothing_reaches_a_protected_port_without_a_grant_and_nothing_granted_is_lost() {
    let seed = std::env::var("JIT_GATE_DELIVERY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (replay with JIT_GATE_DELIVERY_SEED={seed})");
    let categories = corpus(seed);
    let total: usize = categories.iter().map(|c| c.frames.len()).sum();
    assert!(total >= MIN_FRAMES, "only {total} frames");
    let started = Instant::now();

    let plain = Topology::new();
    let (baseline, sent) = send(&plain, &categories);
    drop(plain);

    let ungranted = gated(&[]);
    let (denied, _) = send(&ungranted.topo, &categories);
    let counted: u64 = ungranted
        .gate
        .counters(&PROTECTED.into_iter().collect())
        .expect("counters")
        .by_reason
        .values()
        .sum();
    assert!(
        counted >= sent as u64,
        "the program ran on {counted} frames, fewer than the {sent} sent"
    );
    drop(ungranted);

    let granted = gated(&GRANTED);
    let (allowed, _) = send(&granted.topo, &categories);
    drop(granted);

    let mut violations = Vec::new();
    let mut false_drops = Vec::new();
    for (((category, base), denied), allowed) in
        categories.iter().zip(&baseline).zip(&denied).zip(&allowed)
    {
        for d in denied.delivered.iter().filter(|d| to_protected(d)) {
            violations.push(format!(
                "[{}] no grant: {} delivered",
                category.name,
                describe(d)
            ));
        }
        for answer in &denied.answers {
            violations.push(format!(
                "[{}] no grant: the host answered ({answer})",
                category.name
            ));
        }
        for d in allowed
            .delivered
            .iter()
            .filter(|d| to_protected(d) && !GRANTED.contains(&d.source))
        {
            violations.push(format!(
                "[{}] grants of others: {} delivered",
                category.name,
                describe(d)
            ));
        }
        if !category.all_deliverable {
            continue;
        }
        let mut have: BTreeMap<&Delivered, usize> = BTreeMap::new();
        for d in &allowed.delivered {
            *have.entry(d).or_default() += 1;
        }
        for d in base
            .delivered
            .iter()
            .filter(|d| d.complete() && (GRANTED.contains(&d.source) || !to_protected(d)))
        {
            match have.get_mut(d) {
                Some(n) if *n > 0 => *n -= 1,
                _ => false_drops.push(format!(
                    "[{}] granted: {} not delivered",
                    category.name,
                    describe(d)
                )),
            }
        }
    }
    println!("frames  delivered to protected ports: alone, no grant, granted  category");
    for (((category, base), denied), allowed) in
        categories.iter().zip(&baseline).zip(&denied).zip(&allowed)
    {
        let count = |o: &Outcome| o.delivered.iter().filter(|d| to_protected(d)).count();
        println!(
            "{:>6}  {:>6} {:>6} {:>6}  {}",
            category.frames.len(),
            count(base),
            count(denied),
            count(allowed),
            category.name
        );
    }
    let delivered = |runs: &[Outcome]| runs.iter().map(|o| o.delivered.len()).sum::<usize>();
    println!(
        "{sent} frames per run in {} categories, three runs in {:.1?}; delivered without the gate {}, \
         through it without grants {} (to protected ports: {}), with grants {}",
        categories.len(),
        started.elapsed(),
        delivered(&baseline),
        delivered(&denied),
        denied
            .iter()
            .flat_map(|o| &o.delivered)
            .filter(|d| to_protected(d))
            .count(),
        delivered(&allowed),
    );
    let protected_baseline = baseline
        .iter()
        .flat_map(|o| &o.delivered)
        .filter(|d| to_protected(d))
        .count();
    assert!(
        protected_baseline > 1_000,
        "the kernel delivered only {protected_baseline} packets to protected ports on its own: the corpus does not test much"
    );
    let shown: BTreeSet<&String> = violations.iter().take(30).collect();
    assert!(
        violations.is_empty(),
        "{} deliveries past the gate:\n{shown:#?}",
        violations.len()
    );
    let shown: BTreeSet<&String> = false_drops.iter().take(30).collect();
    assert!(
        false_drops.is_empty(),
        "{} granted packets lost:\n{shown:#?}",
        false_drops.len()
    );
}
