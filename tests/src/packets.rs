//! Frames for the kernel tests: a builder for TCP, UDP and other IP packets
//! (VLAN tags, IPv4 options, fragments and authentication headers, IPv6
//! extension header chains, IP packets cut short or followed by padding).
//! Corruptions and random frames are in `mutate`, fragment sequences in
//! `fragments`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    EtherType, Ethernet2Header, IpAuthHeader, IpFragOffset, IpNumber, Ipv4Header, Ipv4Options,
    Ipv6FragmentHeader, Ipv6Header, Ipv6RawExtHeader, SingleVlanHeader, TcpHeader, UdpHeader,
    VlanId,
};
use ipnet::IpNet;
use rand::{Rng, rngs::StdRng, seq::IndexedRandom};

use crate::{
    checksum::{checksum_offset, transport_checksum},
    mutate::LengthField,
};

/// `BPF_PROG_TEST_RUN` rejects XDP frames shorter than an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;

/// TCP flag bits (byte 13 of the TCP header).
pub mod tcp_flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// Every combination of SYN, ACK, RST and FIN (16 flag bytes).
pub fn syn_ack_rst_fin_combinations() -> impl Iterator<Item = u8> {
    const FLAGS: [u8; 4] = [tcp_flag::SYN, tcp_flag::ACK, tcp_flag::RST, tcp_flag::FIN];
    (0..1u8 << FLAGS.len()).map(|bits| {
        FLAGS
            .iter()
            .enumerate()
            .filter(|(i, _)| bits & (1 << i) != 0)
            .fold(0, |byte, (_, flag)| byte | flag)
    })
}

/// VLAN tag stacks, outermost first: none, single, `QinQ`, and triple-tagged
/// (the builder gives them VLAN IDs from 100 up).
pub const VLAN_STACKS: [&[EtherType]; 8] = [
    &[],
    &[EtherType::VLAN_TAGGED_FRAME],
    &[EtherType::PROVIDER_BRIDGING],
    &[EtherType::VLAN_TAGGED_FRAME, EtherType::VLAN_TAGGED_FRAME],
    &[EtherType::PROVIDER_BRIDGING, EtherType::VLAN_TAGGED_FRAME],
    &[EtherType::PROVIDER_BRIDGING, EtherType::PROVIDER_BRIDGING],
    &[
        EtherType::VLAN_TAGGED_FRAME,
        EtherType::VLAN_TAGGED_FRAME,
        EtherType::VLAN_TAGGED_FRAME,
    ],
    &[
        EtherType::PROVIDER_BRIDGING,
        EtherType::VLAN_TAGGED_FRAME,
        EtherType::VLAN_TAGGED_FRAME,
    ],
];

/// The first and last address of `net`, and the addresses just outside it
/// (where they exist).
pub fn prefix_edges(net: IpNet) -> Vec<IpAddr> {
    let (first, last) = (net.network(), net.broadcast());
    [step(first, -1), Some(first), Some(last), step(last, 1)]
        .into_iter()
        .flatten()
        .collect()
}

fn step(addr: IpAddr, by: i8) -> Option<IpAddr> {
    match addr {
        IpAddr::V4(v4) => u32::from(v4)
            .checked_add_signed(by.into())
            .map(|a| Ipv4Addr::from(a).into()),
        IpAddr::V6(v6) => u128::from(v6)
            .checked_add_signed(by.into())
            .map(|a| Ipv6Addr::from(a).into()),
    }
}

/// What the IP packet carries.
#[derive(Clone, Copy, Debug)]
enum Layer4 {
    Tcp {
        src_port: u16,
        dst_port: u16,
        flags: u8,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
    },
    /// Eight zero bytes of another protocol.
    Other(IpNumber),
}

/// An IPv6 extension header.
#[derive(Clone, Copy, Debug)]
pub enum Extension {
    /// Hop-by-hop, routing or destination options: 8 + 8 × `extra_units` bytes.
    Options {
        kind: IpNumber,
        extra_units: u8,
    },
    Fragment {
        offset: u16,
        more: bool,
    },
    /// Authentication header with a 4 × `icv_words` byte ICV.
    Auth {
        icv_words: u8,
    },
    /// An 8-byte authentication header (payload length 0: no sequence
    /// number, no ICV), shorter than RFC 4302 allows.
    ShortAuth,
}

impl Extension {
    fn kind(self) -> IpNumber {
        match self {
            Extension::Options { kind, .. } => kind,
            Extension::Fragment { .. } => IpNumber::IPV6_FRAGMENTATION_HEADER,
            Extension::Auth { .. } | Extension::ShortAuth => IpNumber::AUTHENTICATION_HEADER,
        }
    }

    /// The header's bytes and the offset of its length byte, if it has one.
    fn to_bytes(self, next_header: IpNumber) -> (Vec<u8>, Option<usize>) {
        match self {
            Extension::Options { kind, extra_units } => {
                let options = vec![0; 6 + 8 * usize::from(extra_units)];
                let header = Ipv6RawExtHeader::new_raw(next_header, &options)
                    .unwrap_or_else(|e| panic!("{kind:?} header: {e}"));
                (header.to_bytes().to_vec(), Some(1))
            }
            Extension::Fragment { offset, more } => {
                let offset = IpFragOffset::try_new(offset).expect("fragment offset fits 13 bits");
                let header = Ipv6FragmentHeader::new(next_header, offset, more, 0x5eed);
                (header.to_bytes().to_vec(), None)
            }
            Extension::Auth { icv_words } => {
                let icv = vec![0; 4 * usize::from(icv_words)];
                let header = IpAuthHeader::new(next_header, 0x100, 1, &icv)
                    .unwrap_or_else(|e| panic!("authentication header: {e}"));
                (header.to_bytes().to_vec(), Some(1))
            }
            Extension::ShortAuth => (vec![next_header.0, 0, 0, 0, 0, 0, 1, 0], Some(1)),
        }
    }
}

/// A random chain of `len` extension headers of every kind. One fragment
/// header in ten is a non-first fragment.
pub fn random_extension_chain(rng: &mut StdRng, len: usize) -> Vec<Extension> {
    const OPTIONS: [IpNumber; 3] = [
        IpNumber::IPV6_HEADER_HOP_BY_HOP,
        IpNumber::IPV6_ROUTE_HEADER,
        IpNumber::IPV6_DESTINATION_OPTIONS,
    ];
    (0..len)
        .map(|_| match rng.random_range(0..5) {
            0..3 => Extension::Options {
                kind: *OPTIONS.choose(rng).expect("non-empty"),
                extra_units: rng.random_range(0..=2),
            },
            3 => Extension::Fragment {
                offset: if rng.random_bool(0.1) {
                    rng.random_range(1..=IpFragOffset::MAX_U16)
                } else {
                    0
                },
                more: rng.random(),
            },
            _ => Extension::Auth {
                icv_words: rng.random_range(0..=3),
            },
        })
        .collect()
}

/// A packet to build. Start with [`Packet::tcp`], [`Packet::udp`] or
/// [`Packet::other`]; source and destination must be of the same family.
#[derive(Clone, Debug)]
pub struct Packet {
    src: IpAddr,
    dst: IpAddr,
    layer4: Layer4,
    /// (tag protocol, VLAN ID), outermost first.
    vlan_tags: Vec<(EtherType, u16)>,
    ipv4_option_words: u8,
    ipv4_fragment: (u16, bool),
    extensions: Vec<Extension>,
    ip_payload_len: Option<usize>,
    padding: usize,
    /// (source, destination) MAC addresses.
    macs: ([u8; 6], [u8; 6]),
    /// Bytes after the TCP or UDP header.
    data: Vec<u8>,
    ipv4_id: u16,
}

/// The source port of built TCP and UDP packets unless set otherwise.
const DEFAULT_SRC_PORT: u16 = 40_000;

impl Packet {
    pub fn tcp(src: IpAddr, dst: IpAddr, dst_port: u16, flags: u8) -> Self {
        Self::new(
            src,
            dst,
            Layer4::Tcp {
                src_port: DEFAULT_SRC_PORT,
                dst_port,
                flags,
            },
        )
    }

    pub fn udp(src: IpAddr, dst: IpAddr, dst_port: u16) -> Self {
        Self::new(
            src,
            dst,
            Layer4::Udp {
                src_port: DEFAULT_SRC_PORT,
                dst_port,
            },
        )
    }

    pub fn other(src: IpAddr, dst: IpAddr, protocol: IpNumber) -> Self {
        Self::new(src, dst, Layer4::Other(protocol))
    }

    fn new(src: IpAddr, dst: IpAddr, layer4: Layer4) -> Self {
        assert_eq!(
            src.is_ipv4(),
            dst.is_ipv4(),
            "{src} and {dst} differ in family"
        );
        Packet {
            src,
            dst,
            layer4,
            vlan_tags: Vec::new(),
            ipv4_option_words: 0,
            ipv4_fragment: (0, false),
            extensions: Vec::new(),
            ip_payload_len: None,
            padding: 0,
            macs: ([0x02, 0, 0, 0, 0, 0x01], [0x02, 0, 0, 0, 0, 0x02]),
            ipv4_id: 0,
            data: Vec::new(),
        }
    }

    /// Bytes after the TCP or UDP header.
    pub fn data(mut self, data: &[u8]) -> Self {
        self.data = data.to_vec();
        self
    }

    /// The Ethernet addresses (default 02:00:00:00:00:01 → :02).
    pub fn macs(mut self, source: [u8; 6], destination: [u8; 6]) -> Self {
        self.macs = (source, destination);
        self
    }

    /// The IPv4 identification (fragments of one datagram share it).
    pub fn ipv4_id(mut self, id: u16) -> Self {
        self.ipv4_id = id;
        self
    }

    /// The TCP flags.
    pub fn flags(mut self, new: u8) -> Self {
        match &mut self.layer4 {
            Layer4::Tcp { flags, .. } => *flags = new,
            _ => panic!("only TCP has flags"),
        }
        self
    }

    /// Whether the packet carries TCP.
    pub fn is_tcp(&self) -> bool {
        matches!(self.layer4, Layer4::Tcp { .. })
    }

    pub fn dst_port(mut self, port: u16) -> Self {
        match &mut self.layer4 {
            Layer4::Tcp { dst_port, .. } | Layer4::Udp { dst_port, .. } => *dst_port = port,
            Layer4::Other(_) => panic!("only TCP and UDP have ports"),
        }
        self
    }

    pub fn src_port(mut self, port: u16) -> Self {
        match &mut self.layer4 {
            Layer4::Tcp { src_port, .. } | Layer4::Udp { src_port, .. } => *src_port = port,
            Layer4::Other(_) => panic!("only TCP and UDP have ports"),
        }
        self
    }

    /// VLAN tags between the Ethernet header and the IP header, outermost
    /// first, with VLAN IDs 100, 101, ...
    pub fn vlan(mut self, tags: &[EtherType]) -> Self {
        self.vlan_tags = tags.iter().copied().zip(100..).collect();
        self
    }

    /// VLAN tags with the given IDs (0: a priority tag), outermost first.
    pub fn vlan_ids(mut self, tags: &[(EtherType, u16)]) -> Self {
        self.vlan_tags = tags.to_vec();
        self
    }

    /// `count` priority tags (802.1Q, VLAN ID 0): what the kernel strips
    /// one after another without any VLAN device.
    pub fn priority_tags(self, count: usize) -> Self {
        let tags = vec![(EtherType::VLAN_TAGGED_FRAME, 0); count];
        self.vlan_ids(&tags)
    }

    /// IPv4 options (NOPs) of `words` × 4 bytes: IHL 5 + `words`.
    pub fn ipv4_options(mut self, words: u8) -> Self {
        assert!(self.src.is_ipv4(), "options are IPv4 only");
        self.ipv4_option_words = words;
        self
    }

    /// Marks an IPv4 packet as a fragment, or adds an IPv6 fragment header.
    pub fn fragment(mut self, offset: u16, more: bool) -> Self {
        if self.src.is_ipv4() {
            self.ipv4_fragment = (offset, more);
        } else {
            self.extensions.push(Extension::Fragment { offset, more });
        }
        self
    }

    /// IPv6 extension headers (IPv4: authentication headers only) after
    /// those already added.
    pub fn extensions(mut self, chain: &[Extension]) -> Self {
        assert!(
            self.src.is_ipv6()
                || chain
                    .iter()
                    .all(|e| matches!(e, Extension::Auth { .. } | Extension::ShortAuth)),
            "IPv4 carries authentication headers only"
        );
        self.extensions.extend_from_slice(chain);
        self
    }

    /// Keeps only the first `len` bytes after the IPv4 header (with its
    /// options) or the fixed IPv6 header; the IP length field says so too.
    pub fn cut_ip_payload(mut self, len: usize) -> Self {
        self.ip_payload_len = Some(len);
        self
    }

    /// Bytes after the IP packet: Ethernet padding that is no header.
    pub fn padding(mut self, len: usize) -> Self {
        self.padding = len;
        self
    }

    /// The packet cut after every byte of its IP payload, from none of it
    /// to all of it (see [`Packet::cut_ip_payload`]).
    pub fn ip_payload_cuts(&self) -> impl Iterator<Item = Packet> + '_ {
        let (_, payload, _) = self.ip_payload();
        (0..=payload.len()).map(|len| self.clone().cut_ip_payload(len))
    }

    pub fn build(&self) -> Frame {
        let mut bytes = self.ethernet_and_vlan();
        let ip_start = bytes.len();
        let (first_header, mut payload, payload_lengths) = self.ip_payload();
        if let Some(len) = self.ip_payload_len {
            payload.truncate(len);
        }
        let mut length_fields = Vec::new();
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let mut header = Ipv4Header::new(0, 64, first_header, src.octets(), dst.octets())
                    .expect("an empty payload fits");
                let nops = [1u8; 40];
                header.options =
                    Ipv4Options::try_from(&nops[..4 * usize::from(self.ipv4_option_words)])
                        .expect("at most ten option words");
                header
                    .set_payload_len(payload.len())
                    .expect("test packets are small");
                let (offset, more) = self.ipv4_fragment;
                header.fragment_offset =
                    IpFragOffset::try_new(offset).expect("fragment offset fits 13 bits");
                header.more_fragments = more;
                header.dont_fragment = false;
                header.identification = self.ipv4_id;
                // The kernel discards an IPv4 header whose checksum is wrong.
                header.header_checksum = header.calc_header_checksum();
                length_fields.push(LengthField::LowNibble(ip_start));
                length_fields.push(LengthField::Word(ip_start + 2));
                bytes.extend_from_slice(&header.to_bytes());
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let header = Ipv6Header {
                    payload_length: u16::try_from(payload.len()).expect("test packets are small"),
                    next_header: first_header,
                    hop_limit: 64,
                    source: src.octets(),
                    destination: dst.octets(),
                    ..Default::default()
                };
                length_fields.push(LengthField::Word(ip_start + 4));
                bytes.extend_from_slice(&header.to_bytes());
            }
            _ => unreachable!("Packet::new checks the families match"),
        }
        length_fields.extend(payload_lengths.iter().map(|f| f.shifted(bytes.len())));
        bytes.extend_from_slice(&payload);
        bytes.resize(bytes.len() + self.padding, 0xa5);
        length_fields.retain(|f| f.end() <= bytes.len());
        Frame {
            bytes,
            ip_start,
            length_fields,
        }
    }

    fn ethernet_and_vlan(&self) -> Vec<u8> {
        let ip_type = if self.src.is_ipv4() {
            EtherType::IPV4
        } else {
            EtherType::IPV6
        };
        // Each header's EtherType announces the next header.
        let mut types = self
            .vlan_tags
            .iter()
            .map(|(tpid, _)| *tpid)
            .chain([ip_type]);
        let ethernet = Ethernet2Header {
            source: self.macs.0,
            destination: self.macs.1,
            ether_type: types.next().expect("at least the IP EtherType"),
        };
        let mut bytes = ethernet.to_bytes().to_vec();
        for ((_, vlan_id), ether_type) in self.vlan_tags.iter().zip(types) {
            let tag = SingleVlanHeader {
                vlan_id: VlanId::try_new(*vlan_id).expect("a 12-bit VLAN id"),
                ether_type,
                ..Default::default()
            };
            bytes.extend_from_slice(&tag.to_bytes());
        }
        bytes
    }

    /// The layer-4 protocol, header bytes, and its length field.
    fn layer4_bytes(&self) -> (IpNumber, Vec<u8>, Option<LengthField>) {
        match self.layer4 {
            Layer4::Tcp {
                src_port,
                dst_port,
                flags,
            } => {
                let mut tcp = TcpHeader::new(src_port, dst_port, 1, 8192);
                tcp.fin = flags & tcp_flag::FIN != 0;
                tcp.syn = flags & tcp_flag::SYN != 0;
                tcp.rst = flags & tcp_flag::RST != 0;
                tcp.ack = flags & tcp_flag::ACK != 0;
                (
                    IpNumber::TCP,
                    tcp.to_bytes().to_vec(),
                    Some(LengthField::HighNibble(12)),
                )
            }
            Layer4::Udp { src_port, dst_port } => {
                let udp = UdpHeader {
                    source_port: src_port,
                    destination_port: dst_port,
                    length: UdpHeader::LEN_U16 + self.data.len() as u16,
                    checksum: 0,
                };
                (
                    IpNumber::UDP,
                    udp.to_bytes().to_vec(),
                    Some(LengthField::Word(4)),
                )
            }
            Layer4::Other(protocol) => (protocol, vec![0; 8], None),
        }
    }

    /// What follows the fixed IP header, uncut: the IPv6 extension headers
    /// (if any) then the layer-4 bytes; the number of the first of them; and
    /// the length fields (relative to the payload start).
    fn ip_payload(&self) -> (IpNumber, Vec<u8>, Vec<LengthField>) {
        let (layer4_protocol, layer4, layer4_length) = self.layer4_bytes();
        let mut payload = Vec::new();
        let mut length_fields = Vec::new();
        let next_headers = self
            .extensions
            .iter()
            .skip(1)
            .map(|e| e.kind())
            .chain([layer4_protocol]);
        for (extension, next_header) in self.extensions.iter().zip(next_headers) {
            let (header, length_byte) = extension.to_bytes(next_header);
            length_fields.extend(length_byte.map(|at| LengthField::Byte(payload.len() + at)));
            payload.extend_from_slice(&header);
        }
        length_fields.extend(layer4_length.map(|f| f.shifted(payload.len())));
        let mut layer4 = layer4;
        if !matches!(self.layer4, Layer4::Other(_)) {
            layer4.extend_from_slice(&self.data);
        }
        if let Some(at) = checksum_offset(layer4_protocol) {
            let sum = transport_checksum(self.src, self.dst, layer4_protocol, &layer4);
            layer4[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        }
        payload.extend_from_slice(&layer4);
        let first_header = self
            .extensions
            .first()
            .map_or(layer4_protocol, |e| e.kind());
        (first_header, payload, length_fields)
    }
}

/// A built frame, with what corruptions (`mutate`) need to know about it.
#[derive(Clone, Debug)]
pub struct Frame {
    pub bytes: Vec<u8>,
    pub(crate) ip_start: usize,
    pub(crate) length_fields: Vec<LengthField>,
}

impl Frame {
    pub fn is_ipv4(&self) -> bool {
        self.bytes[self.ip_start] >> 4 == 4
    }

    /// Where the IPv4 total length or IPv6 payload length is.
    fn ip_length_at(&self) -> usize {
        self.ip_start + if self.is_ipv4() { 2 } else { 4 }
    }

    /// The IPv4 total length or IPv6 payload length.
    pub fn ip_length(&self) -> u16 {
        let at = self.ip_length_at();
        u16::from_be_bytes([self.bytes[at], self.bytes[at + 1]])
    }

    /// The frame with its IPv4 total length or IPv6 payload length set to `len`.
    pub fn with_ip_length(&self, len: u16) -> Vec<u8> {
        let at = self.ip_length_at();
        let mut bytes = self.bytes.clone();
        bytes[at..at + 2].copy_from_slice(&len.to_be_bytes());
        bytes
    }

    /// The IPv4 frame with its IHL set to `ihl`.
    pub fn with_ipv4_ihl(&self, ihl: u8) -> Vec<u8> {
        assert!(self.is_ipv4(), "IHL is an IPv4 field");
        let mut bytes = self.bytes.clone();
        bytes[self.ip_start] = 0x40 | (ihl & 0x0f);
        bytes
    }
}
