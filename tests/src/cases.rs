//! README's decision list ("What the gate decides") as named cases: frames,
//! in order, with the verdict each must get, written by hand from the list
//! (the numbers in the names are the list's). Every case uses tuples of its
//! own in the `scenario`, so all run one after another on one gate. The
//! differential test runs them through the loaded program and the spec, the
//! mutation test through each mutant; a failure names the case and step.

use std::{cell::Cell, net::IpAddr};

use etherparse::{EtherType, IpNumber};

use crate::{
    packets::{
        Extension, Packet,
        tcp_flag::{ACK, FIN, RST, SYN},
    },
    scenario::{HOST_V4, ip, tcp, udp},
    spec::Outcome,
};

/// A named sequence of frames and the verdict each must get.
pub struct Case {
    pub name: String,
    pub steps: Vec<(Vec<u8>, Outcome)>,
}

const PASS_NOT_IP: Outcome = Outcome::pass("pass_not_ip");
const PASS_NOT_TCP_UDP: Outcome = Outcome::pass("pass_not_tcp_udp");
const PASS_NOT_PROTECTED: Outcome = Outcome::pass("pass_not_protected");
const PASS_NON_FIRST_FRAGMENT: Outcome = Outcome::pass("pass_non_first_fragment");
const PASS_EXACT_GRANT: Outcome = Outcome::pass("pass_exact_grant");
const PASS_CIDR_GRANT: Outcome = Outcome::pass("pass_cidr_grant");
const PASS_TRACKED_FLOW: Outcome = Outcome::pass("pass_tracked_flow");
const DROP_NO_GRANT: Outcome = Outcome::drop("drop_no_grant");
const DROP_TRUNCATED: Outcome = Outcome::drop("drop_truncated_transport");
const DROP_CHAIN_TOO_LONG: Outcome = Outcome::drop("drop_header_chain_too_long");
const DROP_MALFORMED: Outcome = Outcome::drop("drop_malformed_ip");
const DROP_VLAN_TOO_DEEP: Outcome = Outcome::drop("drop_vlan_too_deep");
const DROP_FLOW_QUOTA: Outcome = Outcome::drop("drop_flow_quota");
const DROP_OPENS_EXHAUSTED: Outcome = Outcome::drop("drop_opens_exhausted");

/// Sources of the scenario, by what they hold.
struct Sources {
    /// Live exact grant for 22/tcp (and 5353/udp for the IPv4 one).
    granted: [IpAddr; 2],
    /// No grant anywhere.
    stranger: [IpAddr; 2],
}

fn sources() -> Sources {
    Sources {
        granted: [ip("198.51.100.10"), ip("2001:db8:1::10")],
        stranger: [ip("192.0.2.200"), ip("2001:db8:ffff::1")],
    }
}

/// Hands out source ports no other case uses.
struct Ports(Cell<u16>);

impl Ports {
    fn next(&self) -> u16 {
        self.0.set(self.0.get() + 1);
        self.0.get()
    }
}

struct Table {
    cases: Vec<Case>,
    ports: Ports,
}

impl Table {
    fn case(&mut self, name: impl Into<String>, steps: Vec<(Vec<u8>, Outcome)>) {
        self.cases.push(Case {
            name: name.into(),
            steps,
        });
    }

    /// A TCP segment from `src` to 22 on a fresh tuple.
    fn ssh(&self, src: IpAddr, flags: u8) -> Packet {
        tcp(src, 22, flags).src_port(self.ports.next())
    }

    /// A SYN from `src` to 80/tcp (not protected) on a fresh tuple.
    fn web(&self, src: IpAddr) -> Packet {
        tcp(src, 80, SYN).src_port(self.ports.next())
    }
}

fn family(src: IpAddr) -> &'static str {
    if src.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// A frame of `tags` priority tags announcing `ether_type` next, with a
/// few payload bytes: what the builder cannot make (it builds IP only).
fn tagged(tags: usize, ether_type: u16) -> Vec<u8> {
    let mut frame = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
    for _ in 0..tags {
        // Each EtherType field announces a tag, whose ID (0) follows.
        frame.extend([0x81, 0x00, 0x00, 0x00]);
    }
    frame.extend(ether_type.to_be_bytes());
    frame.extend([0u8; 28]);
    frame
}

pub fn cases() -> Vec<Case> {
    let mut t = Table {
        cases: Vec::new(),
        ports: Ports(Cell::new(41_000)),
    };
    let s = sources();
    layer_two(&mut t, &s);
    layer_three(&mut t, &s);
    fast_path_edges(&mut t, &s);
    upper_layer(&mut t, &s);
    new_connections(&mut t, &s);
    packets_of_connections(&mut t, &s);
    t.cases
}

/// Decision 1: VLAN tags.
fn layer_two(t: &mut Table, s: &Sources) {
    for tags in 0..=8 {
        for (stranger, granted) in s.stranger.into_iter().zip(s.granted) {
            let f = family(stranger);
            t.case(
                format!("1: {tags} priority tags (VLAN ID 0), {f} SYN to 22/tcp from a stranger"),
                vec![(
                    t.ssh(stranger, SYN).priority_tags(tags).build().bytes,
                    DROP_NO_GRANT,
                )],
            );
            t.case(
                format!("1: {tags} priority tags, {f} SYN to 22/tcp from a grantee"),
                vec![(
                    t.ssh(granted, SYN).priority_tags(tags).build().bytes,
                    PASS_EXACT_GRANT,
                )],
            );
        }
    }
    let mixed = [
        (EtherType::PROVIDER_BRIDGING, 7),
        (EtherType::VLAN_TAGGED_FRAME, 0),
        (EtherType::VLAN_TAGGED_FRAME, 4094),
    ];
    t.case(
        "1: three tags (802.1ad, priority, 802.1Q), SYN to 22/tcp from a stranger",
        vec![(
            t.ssh(s.stranger[0], SYN).vlan_ids(&mixed).build().bytes,
            DROP_NO_GRANT,
        )],
    );
    t.case(
        "1: nine priority tags, SYN to 22/tcp from a grantee",
        vec![(
            t.ssh(s.granted[0], SYN).priority_tags(9).build().bytes,
            DROP_VLAN_TOO_DEEP,
        )],
    );
    t.case(
        "1: nine tags then ARP",
        vec![(tagged(9, 0x0806), DROP_VLAN_TOO_DEEP)],
    );
    t.case(
        "1: eight tags then ARP",
        vec![(tagged(8, 0x0806), PASS_NOT_IP)],
    );
    let three = t.ssh(s.stranger[0], SYN).priority_tags(3).build().bytes;
    t.case(
        "1: a frame ending inside its third tag",
        vec![(three[..14 + 8 + 2].to_vec(), PASS_NOT_IP)],
    );
}

/// Decision 2: IPv4 and IPv6 headers, fragments, extension headers.
fn layer_three(t: &mut Table, s: &Sources) {
    let (v4, v6) = (s.stranger[0], s.stranger[1]);
    let syn = t.ssh(v4, SYN).build();
    t.case(
        "2: IPv4 with IHL 4",
        vec![(syn.with_ipv4_ihl(4), DROP_MALFORMED)],
    );
    t.case(
        "2: IPv4 total length past the frame",
        vec![(syn.with_ip_length(syn.ip_length() + 1), DROP_MALFORMED)],
    );
    t.case(
        "2: IPv4 non-first fragment to 22/tcp",
        vec![(
            t.ssh(v4, SYN).fragment(1, false).build().bytes,
            PASS_NON_FIRST_FRAGMENT,
        )],
    );
    t.case(
        "2: IPv4 with 40 bytes of options, SYN to 22/tcp from a stranger",
        vec![(t.ssh(v4, SYN).ipv4_options(10).build().bytes, DROP_NO_GRANT)],
    );
    let ah = Extension::Auth { icv_words: 3 };
    for (src, who, expected) in [
        (v4, "a stranger", DROP_NO_GRANT),
        (s.granted[0], "a grantee", PASS_EXACT_GRANT),
    ] {
        t.case(
            format!("2: IPv4 authentication header, then SYN to 22/tcp from {who}"),
            vec![(t.ssh(src, SYN).extensions(&[ah]).build().bytes, expected)],
        );
    }
    t.case(
        "2: IPv4 8-byte authentication header (length 0), then SYN to 22/tcp from a stranger",
        vec![(
            t.ssh(v4, SYN)
                .extensions(&[Extension::ShortAuth])
                .build()
                .bytes,
            DROP_NO_GRANT,
        )],
    );
    t.case(
        "2: IPv4 eight authentication headers, then SYN to 22/tcp from a grantee",
        vec![(
            t.ssh(s.granted[0], SYN).extensions(&[ah; 8]).build().bytes,
            PASS_EXACT_GRANT,
        )],
    );
    t.case(
        "2: IPv4 nine authentication headers, then SYN to 22/tcp from a grantee",
        vec![(
            t.ssh(s.granted[0], SYN).extensions(&[ah; 9]).build().bytes,
            DROP_CHAIN_TOO_LONG,
        )],
    );
    t.case(
        "2: IPv4 authentication header cut short by the IP length",
        vec![(
            t.ssh(v4, SYN)
                .extensions(&[ah])
                .cut_ip_payload(4)
                .build()
                .bytes,
            DROP_MALFORMED,
        )],
    );
    let hop = Extension::Options {
        kind: IpNumber::IPV6_HEADER_HOP_BY_HOP,
        extra_units: 0,
    };
    let dest = Extension::Options {
        kind: IpNumber::IPV6_DESTINATION_OPTIONS,
        extra_units: 1,
    };
    let chain8 = [hop, dest, dest, dest, ah, dest, dest, dest];
    t.case(
        "2: IPv6 eight extension headers, then SYN to 22/tcp from a stranger",
        vec![(
            t.ssh(v6, SYN).extensions(&chain8).build().bytes,
            DROP_NO_GRANT,
        )],
    );
    t.case(
        "2: IPv6 eight extension headers, then SYN to 22/tcp from a grantee",
        vec![(
            t.ssh(s.granted[1], SYN).extensions(&chain8).build().bytes,
            PASS_EXACT_GRANT,
        )],
    );
    t.case(
        "2: IPv6 nine extension headers, then SYN to 22/tcp from a grantee",
        vec![(
            t.ssh(s.granted[1], SYN)
                .extensions(&chain8)
                .extensions(&[dest])
                .build()
                .bytes,
            DROP_CHAIN_TOO_LONG,
        )],
    );
    t.case(
        "2: IPv6 authentication header, then SYN to 22/tcp from a stranger",
        vec![(
            t.ssh(v6, SYN).extensions(&[ah]).build().bytes,
            DROP_NO_GRANT,
        )],
    );
    t.case(
        "2: IPv6 non-first fragment to 22/tcp",
        vec![(
            t.ssh(v6, SYN).fragment(1, true).build().bytes,
            PASS_NON_FIRST_FRAGMENT,
        )],
    );
    let syn6 = t.ssh(v6, SYN).build();
    t.case(
        "2: IPv6 payload length past the frame",
        vec![(syn6.with_ip_length(syn6.ip_length() + 1), DROP_MALFORMED)],
    );
    t.case(
        "2: bytes after the IP packet are padding: a 10-byte TCP header and 24 bytes after it",
        vec![(
            t.ssh(v4, SYN).cut_ip_payload(10).padding(24).build().bytes,
            DROP_TRUNCATED,
        )],
    );
}

/// Decisions 2 to 4 where the program's fast path for unprotected ports
/// (untagged, no IPv4 options, no IPv6 extension headers, first fragment
/// or whole, port readable and not 0) ends: frames just inside it pass,
/// frames just outside it get the full parse's verdict.
fn fast_path_edges(t: &mut Table, s: &Sources) {
    let (v4, v6) = (s.stranger[0], s.stranger[1]);
    t.case(
        "2: IPv4 with 4 bytes of options (read as port 257 where a header without options has its port), SYN to 22/tcp from a stranger",
        vec![(t.ssh(v4, SYN).ipv4_options(1).build().bytes, DROP_NO_GRANT)],
    );
    t.case(
        "2: IPv4 with 4 bytes of options, SYN to 80/tcp",
        vec![(t.web(v4).ipv4_options(1).build().bytes, PASS_NOT_PROTECTED)],
    );
    t.case(
        "2: IPv4 first fragment to 80/tcp, then a later fragment of it",
        vec![
            (
                t.web(v4).fragment(0, true).build().bytes,
                PASS_NOT_PROTECTED,
            ),
            (
                t.web(v4).fragment(3, false).build().bytes,
                PASS_NON_FIRST_FRAGMENT,
            ),
        ],
    );
    t.case(
        "2: IPv4 first fragment holding the whole header, SYN to 22/tcp from a stranger",
        vec![(
            t.ssh(v4, SYN).fragment(0, true).build().bytes,
            DROP_NO_GRANT,
        )],
    );
    for src in [v4, v6] {
        let f = family(src);
        let tag = [(EtherType::VLAN_TAGGED_FRAME, 5)];
        t.case(
            format!("2: one 802.1Q tag, {f} SYN to 80/tcp, then to 22/tcp from a stranger"),
            vec![
                (t.web(src).vlan_ids(&tag).build().bytes, PASS_NOT_PROTECTED),
                (t.ssh(src, SYN).vlan_ids(&tag).build().bytes, DROP_NO_GRANT),
            ],
        );
    }
    let hop = Extension::Options {
        kind: IpNumber::IPV6_HEADER_HOP_BY_HOP,
        extra_units: 0,
    };
    t.case(
        "2: IPv6 hop-by-hop header, then SYN to 80/tcp, then to 22/tcp from a stranger",
        vec![
            (
                t.web(v6).extensions(&[hop]).build().bytes,
                PASS_NOT_PROTECTED,
            ),
            (
                t.ssh(v6, SYN).extensions(&[hop]).build().bytes,
                DROP_NO_GRANT,
            ),
        ],
    );
    for src in [v4, v6] {
        let f = family(src);
        t.case(
            format!("3: {f} TCP header cut after its 4 bytes of ports, to 80/tcp"),
            vec![(
                t.web(src).cut_ip_payload(4).build().bytes,
                PASS_NOT_PROTECTED,
            )],
        );
        t.case(
            format!("3: {f} IP length ending inside the destination port, to 80/tcp"),
            vec![(
                t.web(src).cut_ip_payload(3).padding(8).build().bytes,
                DROP_TRUNCATED,
            )],
        );
    }
}

/// Decisions 3 and 4: the upper layer, and which ports are protected.
fn upper_layer(t: &mut Table, s: &Sources) {
    let v4 = s.stranger[0];
    let host = IpAddr::from(HOST_V4);
    t.case(
        "3: ICMP",
        vec![(
            Packet::other(v4, host, IpNumber::ICMP).build().bytes,
            PASS_NOT_TCP_UDP,
        )],
    );
    t.case(
        "3: ESP",
        vec![(
            Packet::other(v4, host, IpNumber::ENCAPSULATING_SECURITY_PAYLOAD)
                .build()
                .bytes,
            PASS_NOT_TCP_UDP,
        )],
    );
    for (cut, port, expected, what) in [
        (10, 22, DROP_TRUNCATED, "to 22/tcp"),
        (10, 80, PASS_NOT_PROTECTED, "to 80/tcp"),
        (2, 80, DROP_TRUNCATED, "without its destination port"),
        (4, 0, DROP_TRUNCATED, "to port 0"),
    ] {
        t.case(
            format!("3: a TCP header cut after {cut} bytes {what}"),
            vec![(
                tcp(v4, port, SYN)
                    .src_port(t.ports.next())
                    .cut_ip_payload(cut)
                    .build()
                    .bytes,
                expected,
            )],
        );
    }
    t.case(
        "3: a tiny first fragment: 8 bytes of TCP to 22/tcp, more fragments follow",
        vec![(
            t.ssh(v4, SYN)
                .fragment(0, true)
                .cut_ip_payload(8)
                .build()
                .bytes,
            DROP_TRUNCATED,
        )],
    );
    t.case(
        "3: a UDP header cut after 4 bytes to 5353/udp",
        vec![(
            udp(v4, 5353).cut_ip_payload(4).build().bytes,
            DROP_TRUNCATED,
        )],
    );
    for (packet, what) in [
        (tcp(v4, 80, SYN), "SYN to 80/tcp"),
        (udp(v4, 22), "UDP to 22/udp (only TCP is protected)"),
        (
            tcp(v4, 5353, SYN),
            "SYN to 5353/tcp (only UDP is protected)",
        ),
    ] {
        t.case(
            format!("4: {what}"),
            vec![(packet.build().bytes, PASS_NOT_PROTECTED)],
        );
    }
}

/// Decision 5: a SYN without ACK asks for a new connection.
fn new_connections(t: &mut Table, s: &Sources) {
    for (granted, stranger) in s.granted.into_iter().zip(s.stranger) {
        let f = family(granted);
        let syn = t.ssh(granted, SYN);
        t.case(
            format!("5: {f} SYN from a live exact grant, then its ACK"),
            vec![
                (syn.build().bytes, PASS_EXACT_GRANT),
                (syn.clone().flags(ACK).build().bytes, PASS_TRACKED_FLOW),
            ],
        );
        t.case(
            format!("5: {f} SYN from a stranger"),
            vec![(t.ssh(stranger, SYN).build().bytes, DROP_NO_GRANT)],
        );
    }
    for (src, what, expected) in [
        ("198.51.100.11", "an expired exact grant", DROP_NO_GRANT),
        ("2001:db8:1::11", "an expired exact grant", DROP_NO_GRANT),
        (
            "10.9.9.9",
            "the live 10.0.0.0/8 whose exact grant expired",
            PASS_CIDR_GRANT,
        ),
        (
            "10.1.2.9",
            "the expired 10.1.2.0/24 nested in the live /8",
            DROP_NO_GRANT,
        ),
        (
            "10.20.0.5",
            "the live 10.20.0.0/16 in the /8",
            PASS_CIDR_GRANT,
        ),
        (
            "2001:db8:aa:1::5",
            "the expired /64 nested in a live /48",
            DROP_NO_GRANT,
        ),
        ("2001:db8:aa:3::5", "the live /48", PASS_CIDR_GRANT),
        (
            "::ffff:192.0.2.200",
            "an IPv4-mapped IPv6 address of a stranger",
            DROP_NO_GRANT,
        ),
        (
            "::ffff:198.51.100.10",
            "the IPv4-mapped IPv6 form of a grantee (IPv4 grant only)",
            DROP_NO_GRANT,
        ),
        (
            "198.51.100.15",
            "an address whose IPv4-mapped IPv6 form alone holds a grant",
            DROP_NO_GRANT,
        ),
    ] {
        t.case(
            format!("5: SYN to 22/tcp from {what}"),
            vec![(t.ssh(ip(src), SYN).build().bytes, expected)],
        );
    }
    for (src, what) in [
        ("198.51.100.11", "an established flow"),
        ("198.51.100.11", "a stale half-open flow"),
        ("198.51.100.60", "a young half-open flow"),
    ] {
        let port = match what {
            "an established flow" => 50_022,
            "a stale half-open flow" => 50_023,
            _ => 50_024,
        };
        t.case(
            format!("5: SYN on the tuple of {what}, no live grant"),
            vec![(
                tcp(ip(src), 22, SYN).src_port(port).build().bytes,
                DROP_NO_GRANT,
            )],
        );
    }
    let quota_two = ip("198.51.100.50");
    let first = t.ssh(quota_two, SYN);
    t.case(
        "5: a grant with a quota of two: SYNs on three tuples, then the first again",
        vec![
            (first.build().bytes, PASS_EXACT_GRANT),
            (t.ssh(quota_two, SYN).build().bytes, PASS_EXACT_GRANT),
            (t.ssh(quota_two, SYN).build().bytes, DROP_FLOW_QUOTA),
            (first.build().bytes, PASS_EXACT_GRANT),
        ],
    );
    let single_use = ip("198.51.100.51");
    let first = t.ssh(single_use, SYN);
    t.case(
        "5: a single-use grant: a SYN, its retransmission, then a second tuple",
        vec![
            (first.build().bytes, PASS_EXACT_GRANT),
            (first.build().bytes, PASS_EXACT_GRANT),
            (t.ssh(single_use, SYN).build().bytes, DROP_OPENS_EXHAUSTED),
        ],
    );
}

/// Decision 6: packets of connections, and datagrams.
fn packets_of_connections(t: &mut Table, s: &Sources) {
    let seeded =
        |src: &str, port: u16, flags: u8| tcp(ip(src), 22, flags).src_port(port).build().bytes;
    t.case(
        "6: ACK of an established flow whose grant expired",
        vec![(seeded("198.51.100.11", 50_022, ACK), PASS_TRACKED_FLOW)],
    );
    for src in ["198.51.100.11", "2001:db8:1::11"] {
        t.case(
            format!("6: ACK of a stale half-open flow from {src}, grant expired"),
            vec![(seeded(src, 50_023, ACK), DROP_NO_GRANT)],
        );
    }
    t.case(
        "6: a young half-open flow without grant: its ACK, then FIN|ACK",
        vec![
            (seeded("198.51.100.60", 50_024, ACK), PASS_TRACKED_FLOW),
            (
                seeded("198.51.100.60", 50_024, FIN | ACK),
                PASS_TRACKED_FLOW,
            ),
        ],
    );
    t.case(
        "6: RST on an established flow (only noted), then its ACK",
        vec![
            (seeded("10.1.2.3", 50_022, RST), PASS_TRACKED_FLOW),
            (seeded("10.1.2.3", 50_022, ACK), PASS_TRACKED_FLOW),
        ],
    );
    for (flags, what) in [(ACK, "ACK"), (RST, "RST"), (SYN | ACK, "SYN|ACK")] {
        t.case(
            format!("6: {what} from a stranger"),
            vec![(t.ssh(s.stranger[0], flags).build().bytes, DROP_NO_GRANT)],
        );
        t.case(
            format!("6: {what} from a grantee without a flow (no flow recorded)"),
            vec![(t.ssh(s.granted[0], flags).build().bytes, PASS_EXACT_GRANT)],
        );
    }
    let datagram = udp(s.granted[0], 5353).src_port(t.ports.next());
    t.case(
        "6: UDP from a live exact grant, twice",
        vec![
            (datagram.build().bytes, PASS_EXACT_GRANT),
            (datagram.build().bytes, PASS_TRACKED_FLOW),
        ],
    );
    let quota_one = ip("198.51.100.52");
    let first = udp(quota_one, 5353).src_port(t.ports.next());
    t.case(
        "6: UDP under a quota of one: a tuple, a second tuple, the first again",
        vec![
            (first.build().bytes, PASS_EXACT_GRANT),
            (
                udp(quota_one, 5353).src_port(t.ports.next()).build().bytes,
                DROP_FLOW_QUOTA,
            ),
            (first.build().bytes, PASS_TRACKED_FLOW),
        ],
    );
    t.case(
        "6: UDP on a tracked flow of a source without grant",
        vec![(
            udp(ip("198.51.100.99"), 5353)
                .src_port(50_053)
                .build()
                .bytes,
            PASS_TRACKED_FLOW,
        )],
    );
    t.case(
        "6: UDP from a live CIDR grant",
        vec![(
            udp(ip("203.0.113.77"), 5353)
                .src_port(t.ports.next())
                .build()
                .bytes,
            PASS_CIDR_GRANT,
        )],
    );
    t.case(
        "6: UDP from a stranger",
        vec![(
            udp(s.stranger[1], 5353)
                .src_port(t.ports.next())
                .build()
                .bytes,
            DROP_NO_GRANT,
        )],
    );
}
