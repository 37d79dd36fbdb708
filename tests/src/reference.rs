//! The reference side of the differential test: frames parsed into
//! [`PacketFacts`] by an independent parser built on etherparse's header
//! slices, and the gate's state kept in plain collections.
//!
//! The parsing rules are the gate's specification (DESIGN.md, "Packet
//! verdict"); the XDP program implements the same rules on its own, so any
//! difference between the two shows up as a disagreement.

use std::num::NonZeroU16;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use etherparse::{
    EtherType, Ethernet2HeaderSlice, IpAuthHeaderSlice, IpNumber, Ipv4HeaderSlice,
    Ipv6FragmentHeaderSlice, Ipv6HeaderSlice, Ipv6RawExtHeaderSlice, SingleVlanHeaderSlice,
    TcpHeaderSlice, UdpHeader, UdpHeaderSlice,
};
use ipnet::IpNet;
use jit_gate_agent::net::{GrantTarget, Protocol};
use jit_gate_common::{
    family, ip_proto,
    maps::FlowKey,
    verdict::{
        Address, GateLookups, MAX_IPV6_EXT_HEADERS, MAX_VLAN_TAGS, PacketFacts, Transport, Upper,
    },
};

/// What the gate's parser must make of `frame`.
pub fn facts_from_frame(frame: &[u8]) -> PacketFacts {
    let Ok(ethernet) = Ethernet2HeaderSlice::from_slice(frame) else {
        return PacketFacts::NotIp;
    };
    let mut ether_type = ethernet.ether_type();
    let mut rest = &frame[ethernet.slice().len()..];
    for _ in 0..MAX_VLAN_TAGS {
        if !matches!(
            ether_type,
            EtherType::VLAN_TAGGED_FRAME | EtherType::PROVIDER_BRIDGING
        ) {
            break;
        }
        let Ok(tag) = SingleVlanHeaderSlice::from_slice(rest) else {
            return PacketFacts::NotIp;
        };
        ether_type = tag.ether_type();
        rest = &rest[tag.slice().len()..];
    }
    // A third VLAN tag falls through to "not IP" with every other EtherType.
    match ether_type {
        EtherType::IPV4 => ipv4_facts(rest),
        EtherType::IPV6 => ipv6_facts(rest),
        _ => PacketFacts::NotIp,
    }
}

/// `l3` runs from the IPv4 header to the end of the frame.
fn ipv4_facts(l3: &[u8]) -> PacketFacts {
    // etherparse rejects what the gate calls malformed: fewer than 20 bytes,
    // a version other than 4, IHL < 5, or options cut off by the frame end.
    let Ok(header) = Ipv4HeaderSlice::from_slice(l3) else {
        return PacketFacts::MalformedIp;
    };
    let header_len = header.slice().len();
    let total_len = usize::from(header.total_len());
    if total_len < header_len || total_len > l3.len() {
        return PacketFacts::MalformedIp;
    }
    if header.fragments_offset().value() != 0 {
        return PacketFacts::NonFirstFragment;
    }
    // Bytes past the total length are Ethernet padding, never headers.
    let packet = &l3[..total_len];
    PacketFacts::Ip {
        src: Address::v4(header.source()),
        dst: Address::v4(header.destination()),
        upper: upper_facts(header.protocol(), &packet[header_len..]),
    }
}

/// `l3` runs from the IPv6 header to the end of the frame.
fn ipv6_facts(l3: &[u8]) -> PacketFacts {
    let Ok(header) = Ipv6HeaderSlice::from_slice(l3) else {
        return PacketFacts::MalformedIp;
    };
    let Some(packet) = l3.get(..header.slice().len() + usize::from(header.payload_length())) else {
        return PacketFacts::MalformedIp;
    };
    let mut next_header = header.next_header();
    let mut offset = header.slice().len();
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        if !is_extension_header(next_header) {
            break;
        }
        match extension_header(next_header, &packet[offset..]) {
            Ok((next, len)) => {
                next_header = next;
                offset += len;
            }
            Err(facts) => return facts,
        }
    }
    if is_extension_header(next_header) {
        return PacketFacts::HeaderChainTooLong;
    }
    PacketFacts::Ip {
        src: Address::v6(header.source()),
        dst: Address::v6(header.destination()),
        upper: upper_facts(next_header, &packet[offset..]),
    }
}

/// The extension headers the gate walks over; anything else is the upper layer.
fn is_extension_header(next_header: IpNumber) -> bool {
    matches!(
        next_header,
        IpNumber::IPV6_HEADER_HOP_BY_HOP
            | IpNumber::IPV6_ROUTE_HEADER
            | IpNumber::IPV6_DESTINATION_OPTIONS
            | IpNumber::IPV6_FRAGMENTATION_HEADER
            | IpNumber::AUTHENTICATION_HEADER
    )
}

/// The extension header of type `kind` at the start of `bytes` (which end
/// where the IP packet ends): its next header and length, or the facts that
/// end the walk.
fn extension_header(kind: IpNumber, bytes: &[u8]) -> Result<(IpNumber, usize), PacketFacts> {
    match kind {
        IpNumber::IPV6_FRAGMENTATION_HEADER => {
            let header =
                Ipv6FragmentHeaderSlice::from_slice(bytes).map_err(|_| PacketFacts::MalformedIp)?;
            if header.fragment_offset().value() != 0 {
                return Err(PacketFacts::NonFirstFragment);
            }
            Ok((header.next_header(), header.slice().len()))
        }
        IpNumber::AUTHENTICATION_HEADER => auth_header(bytes),
        // Hop-by-hop, routing, destination options: (length + 1) × 8 bytes.
        _ => {
            let header =
                Ipv6RawExtHeaderSlice::from_slice(bytes).map_err(|_| PacketFacts::MalformedIp)?;
            Ok((header.next_header(), header.slice().len()))
        }
    }
}

/// An authentication header spans (payload length + 2) × 4 bytes.
fn auth_header(bytes: &[u8]) -> Result<(IpNumber, usize), PacketFacts> {
    if let Ok(header) = IpAuthHeaderSlice::from_slice(bytes) {
        return Ok((header.next_header(), header.slice().len()));
    }
    // etherparse insists on RFC 4302's 12-byte minimum (payload length >= 1);
    // the gate also accepts payload length 0, an 8-byte header. Those 8 bytes
    // are laid out like a raw extension header of length 0 (next header, then
    // a zero length byte), so etherparse can read them as one. Any other
    // rejected header runs past the packet end.
    let eight = bytes.get(..8).ok_or(PacketFacts::MalformedIp)?;
    let header = Ipv6RawExtHeaderSlice::from_slice(eight).map_err(|_| PacketFacts::MalformedIp)?;
    Ok((header.next_header(), eight.len()))
}

/// What follows the IP headers; `bytes` end where the IP packet ends.
fn upper_facts(protocol: IpNumber, bytes: &[u8]) -> Upper {
    match protocol {
        IpNumber::TCP => match TcpHeaderSlice::from_slice(bytes) {
            Ok(tcp) => Upper::Transport(Transport {
                protocol: ip_proto::TCP,
                src_port: tcp.source_port(),
                dst_port: tcp.destination_port(),
                tcp_flags: tcp_flags_byte(&tcp),
            }),
            // Shorter than 20 bytes, data offset < 5, or options past the end.
            Err(_) => truncated_transport(ip_proto::TCP, bytes),
        },
        IpNumber::UDP => match UdpHeaderSlice::from_slice(bytes) {
            Ok(udp) => Upper::Transport(Transport {
                protocol: ip_proto::UDP,
                src_port: udp.source_port(),
                dst_port: udp.destination_port(),
                tcp_flags: 0,
            }),
            Err(_) => truncated_transport(ip_proto::UDP, bytes),
        },
        _ => Upper::Other,
    }
}

/// A TCP or UDP header that is cut short or invalid. Both start with the
/// source and destination ports; etherparse reads ports only from a whole
/// header, so the first four bytes are completed to an (empty) UDP header.
fn truncated_transport(protocol: u8, bytes: &[u8]) -> Upper {
    let dst_port = bytes.get(..4).and_then(|ports| {
        let mut header = [0u8; UdpHeader::LEN];
        header[..4].copy_from_slice(ports);
        let port = UdpHeaderSlice::from_slice(&header)
            .expect("a UdpHeader::LEN slice is a UDP header")
            .destination_port();
        // Port 0 is never protected: the model treats it as unknown.
        NonZeroU16::new(port)
    });
    Upper::TruncatedTransport { protocol, dst_port }
}

/// Byte 13 of the TCP header, rebuilt from etherparse's flag accessors
/// (bit 0 FIN up to bit 7 CWR).
fn tcp_flags_byte(tcp: &TcpHeaderSlice<'_>) -> u8 {
    [
        tcp.fin(),
        tcp.syn(),
        tcp.rst(),
        tcp.psh(),
        tcp.ack(),
        tcp.urg(),
        tcp.ece(),
        tcp.cwr(),
    ]
    .into_iter()
    .enumerate()
    .fold(0, |byte, (bit, set)| byte | (u8::from(set) << bit))
}

/// The key address of an IP address (IPv4-mapped IPv6 addresses stay IPv6).
pub fn address(ip: IpAddr) -> Address {
    match ip {
        IpAddr::V4(v4) => Address::v4(v4.octets()),
        IpAddr::V6(v6) => Address::v6(v6.octets()),
    }
}

fn ip_addr(address: &Address) -> IpAddr {
    if address.family == family::V4 {
        let [a, b, c, d, ..] = address.bytes;
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    } else {
        IpAddr::V6(Ipv6Addr::from(address.bytes))
    }
}

/// An entry of a grant map: expiry (boot ns) and grant id.
type GrantEntry = (u64, u64);

struct CidrGrant {
    net: IpNet,
    protocol: u8,
    port: u16,
    entry: GrantEntry,
}

/// The gate's state in plain collections, answering the verdict's lookups
/// the way the kernel maps do.
#[derive(Default)]
pub struct ReferenceState {
    protected: BTreeSet<(u8, u16)>,
    exact_grants: BTreeMap<(IpAddr, u8, u16), GrantEntry>,
    cidr_grants: Vec<CidrGrant>,
    /// Tracked flows and the grant each was recorded under.
    flows: BTreeMap<FlowKey, u64>,
}

impl ReferenceState {
    pub fn protect(&mut self, protocol: Protocol, port: u16) {
        self.protected.insert((protocol.number(), port));
    }

    /// Like `XdpGate::upsert_grant`: a full-length prefix is an exact grant,
    /// anything shorter a CIDR grant; an existing entry is replaced.
    pub fn upsert_grant(&mut self, target: &GrantTarget, expires_at_boot_ns: u64, grant_id: u64) {
        let (protocol, port) = (target.protocol.number(), target.port);
        let entry = (expires_at_boot_ns, grant_id);
        if target.is_exact() {
            self.exact_grants
                .insert((target.source.addr(), protocol, port), entry);
            return;
        }
        let net = target.source.trunc();
        self.cidr_grants
            .retain(|g| (g.net, g.protocol, g.port) != (net, protocol, port));
        self.cidr_grants.push(CidrGrant {
            net,
            protocol,
            port,
            entry,
        });
    }

    /// Like `XdpGate::insert_flow`: records or replaces the flow.
    pub fn insert_flow(&mut self, key: FlowKey, grant_id: u64) {
        self.flows.insert(key, grant_id);
    }

    /// The flow record the XDP program writes when a packet opens a flow: a
    /// TCP SYN (re)opens the connection under the new grant, while a UDP flow
    /// keeps the grant it was first recorded under.
    pub fn open_flow(&mut self, key: FlowKey, grant_id: u64) {
        if key.protocol == ip_proto::UDP {
            self.flows.entry(key).or_insert(grant_id);
        } else {
            self.flows.insert(key, grant_id);
        }
    }

    /// Tracked flows and the grant each is recorded under.
    pub fn flows(&self) -> &BTreeMap<FlowKey, u64> {
        &self.flows
    }
}

impl GateLookups for ReferenceState {
    fn is_protected(&self, protocol: u8, port: u16) -> bool {
        self.protected.contains(&(protocol, port))
    }

    fn exact_grant(&self, src: &Address, protocol: u8, port: u16) -> Option<(u64, u64)> {
        self.exact_grants
            .get(&(ip_addr(src), protocol, port))
            .copied()
    }

    fn has_cidr_grants(&self, family: u8) -> bool {
        let v4 = family == family::V4;
        self.cidr_grants
            .iter()
            .any(|g| matches!(g.net, IpNet::V4(_)) == v4)
    }

    /// Only the longest matching prefix counts, live or not: that is what the
    /// kernel's LPM trie returns.
    fn cidr_grant(&self, src: &Address, protocol: u8, port: u16) -> Option<(u64, u64)> {
        let src = ip_addr(src);
        self.cidr_grants
            .iter()
            .filter(|g| g.protocol == protocol && g.port == port && g.net.contains(&src))
            .max_by_key(|g| g.net.prefix_len())
            .map(|g| g.entry)
    }

    fn flow_tracked(&self, src: &Address, dst: &Address, transport: &Transport) -> bool {
        self.flows.contains_key(&FlowKey::of(src, dst, transport))
    }
}
