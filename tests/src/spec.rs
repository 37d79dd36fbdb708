//! The gate's verdict written a second time, from README's decision list
//! ("What the gate decides"), as the oracle of the differential and
//! mutation tests. It shares no code and no constant with the program or
//! `jit-gate-common`: its parser is built on etherparse's header slices,
//! its bounds and rules are written again here, and reasons are the names
//! README gives them. A wrong rule in either place shows up as a
//! disagreement.
//!
//! The state is the kernel's, as entries: grant entries (an exact address
//! or a prefix, with its expiry, id and flow limits), flows, and the flow
//! counters of each grant.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use etherparse::{
    EtherType, Ethernet2HeaderSlice, IpNumber, Ipv4HeaderSlice, Ipv6HeaderSlice,
    SingleVlanHeaderSlice, TcpHeaderSlice, UdpHeaderSlice,
};
use ipnet::IpNet;

/// README, decision 1: VLAN tags followed.
pub const VLAN_TAGS: usize = 8;
/// README, decision 2: IPv6 extension headers (or IPv4 authentication
/// headers) walked.
pub const EXTENSION_HEADERS: usize = 8;

/// The verdict on a frame: pass or drop, and the reason's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Outcome {
    pub pass: bool,
    pub reason: &'static str,
}

impl Outcome {
    pub const fn pass(reason: &'static str) -> Outcome {
        Outcome { pass: true, reason }
    }

    pub const fn drop(reason: &'static str) -> Outcome {
        Outcome {
            pass: false,
            reason,
        }
    }
}

/// What a frame is, as far as the verdict is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Parsed {
    Done(Outcome),
    /// A complete TCP or UDP header of a first fragment or unfragmented packet.
    Segment(Segment),
    /// TCP or UDP whose header is cut short: its destination port, if readable.
    Truncated {
        protocol: u8,
        port: Option<u16>,
    },
}

/// The fields of a TCP or UDP packet the verdict reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Segment {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

const TCP: u8 = 6;
const AUTH: u8 = 51;

/// Decisions 1 to 3: what the frame carries.
fn parse(frame: &[u8]) -> Parsed {
    let Ok(ethernet) = Ethernet2HeaderSlice::from_slice(frame) else {
        return Parsed::Done(Outcome::pass("pass_not_ip"));
    };
    let mut ether_type = ethernet.ether_type();
    let mut rest = &frame[ethernet.slice().len()..];
    let is_tag = |t: EtherType| t == EtherType(0x8100) || t == EtherType(0x88a8);
    let mut tags = 0;
    while is_tag(ether_type) {
        if tags == VLAN_TAGS {
            return Parsed::Done(Outcome::drop("drop_vlan_too_deep"));
        }
        let Ok(tag) = SingleVlanHeaderSlice::from_slice(rest) else {
            return Parsed::Done(Outcome::pass("pass_not_ip"));
        };
        ether_type = tag.ether_type();
        rest = &rest[4..];
        tags += 1;
    }
    match ether_type.0 {
        0x0800 => ipv4(rest),
        0x86dd => ipv6(rest),
        _ => Parsed::Done(Outcome::pass("pass_not_ip")),
    }
}

/// `l3` runs from the IPv4 header to the end of the frame.
fn ipv4(l3: &[u8]) -> Parsed {
    let malformed = Parsed::Done(Outcome::drop("drop_malformed_ip"));
    // etherparse rejects fewer than 20 bytes, a version other than 4,
    // IHL < 5, and options cut off by the frame's end.
    let Ok(header) = Ipv4HeaderSlice::from_slice(l3) else {
        return malformed;
    };
    let header_len = header.slice().len();
    let total_len = usize::from(header.total_len());
    if total_len < header_len || total_len > l3.len() {
        return malformed;
    }
    if header.fragments_offset().value() != 0 {
        return Parsed::Done(Outcome::pass("pass_non_first_fragment"));
    }
    let packet = &l3[..total_len];
    let mut protocol = header.protocol().0;
    let mut offset = header_len;
    let mut walked = 0;
    while protocol == AUTH {
        if walked == EXTENSION_HEADERS {
            return Parsed::Done(Outcome::drop("drop_header_chain_too_long"));
        }
        let Some(ah) = packet.get(offset..offset + 8) else {
            return malformed;
        };
        protocol = ah[0];
        offset += (usize::from(ah[1]) + 2) * 4;
        if offset > packet.len() {
            return malformed;
        }
        walked += 1;
    }
    upper(
        IpAddr::from(header.source()),
        IpAddr::from(header.destination()),
        protocol,
        &packet[offset..],
    )
}

/// `l3` runs from the IPv6 header to the end of the frame.
fn ipv6(l3: &[u8]) -> Parsed {
    let malformed = Parsed::Done(Outcome::drop("drop_malformed_ip"));
    let Ok(header) = Ipv6HeaderSlice::from_slice(l3) else {
        return malformed;
    };
    let Some(packet) = l3.get(..40 + usize::from(header.payload_length())) else {
        return malformed;
    };
    let mut next = header.next_header().0;
    let mut offset = 40;
    let mut walked = 0;
    while matches!(next, 0 | 43 | 44 | 51 | 60) {
        if walked == EXTENSION_HEADERS {
            return Parsed::Done(Outcome::drop("drop_header_chain_too_long"));
        }
        let Some(ext) = packet.get(offset..offset + 8) else {
            return malformed;
        };
        let len = match next {
            44 => {
                if u16::from_be_bytes([ext[2], ext[3]]) >> 3 != 0 {
                    return Parsed::Done(Outcome::pass("pass_non_first_fragment"));
                }
                8
            }
            51 => (usize::from(ext[1]) + 2) * 4,
            _ => (usize::from(ext[1]) + 1) * 8,
        };
        next = ext[0];
        offset += len;
        if offset > packet.len() {
            return malformed;
        }
        walked += 1;
    }
    upper(
        IpAddr::from(header.source_addr()),
        IpAddr::from(header.destination_addr()),
        next,
        &packet[offset..],
    )
}

/// What follows the IP headers; `bytes` end where the IP packet ends.
fn upper(src: IpAddr, dst: IpAddr, protocol: u8, bytes: &[u8]) -> Parsed {
    let truncated = || Parsed::Truncated {
        protocol,
        port: bytes.get(2..4).map(|p| u16::from_be_bytes([p[0], p[1]])),
    };
    let segment = |src_port, dst_port| Segment {
        src,
        dst,
        protocol,
        src_port,
        dst_port,
        syn: false,
        ack: false,
        fin: false,
        rst: false,
    };
    match IpNumber(protocol) {
        // etherparse wants 20 bytes, a data offset of 5 or more, and the
        // options within the slice.
        IpNumber::TCP => match TcpHeaderSlice::from_slice(bytes) {
            Ok(tcp) => Parsed::Segment(Segment {
                syn: tcp.syn(),
                ack: tcp.ack(),
                fin: tcp.fin(),
                rst: tcp.rst(),
                ..segment(tcp.source_port(), tcp.destination_port())
            }),
            Err(_) => truncated(),
        },
        IpNumber::UDP => match UdpHeaderSlice::from_slice(bytes) {
            Ok(udp) => Parsed::Segment(segment(udp.source_port(), udp.destination_port())),
            Err(_) => truncated(),
        },
        _ => Parsed::Done(Outcome::pass("pass_not_tcp_udp")),
    }
}

/// A grant entry: an exact address (full-length prefix) or a prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantEntry {
    pub source: IpNet,
    pub protocol: u8,
    pub port: u16,
    pub expires_ns: u64,
    pub grant_id: u64,
    pub quota: u32,
    pub max_opens: u32,
}

/// A tracked flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub grant_id: u64,
    pub opened_ns: u64,
    pub established: bool,
    pub fin: bool,
    pub rst: bool,
}

/// The flow key: source, destination, ports, protocol.
pub type FlowId = (IpAddr, IpAddr, u16, u16, u8);

/// A grant's flow counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub opened: u64,
    pub refused: u64,
    pub closed: u64,
}

/// The kernel's state as the spec sees it.
#[derive(Clone, Debug)]
pub struct State {
    pub protected: BTreeSet<(u8, u16)>,
    pub grants: Vec<GrantEntry>,
    pub flows: BTreeMap<FlowId, Flow>,
    pub counts: BTreeMap<u64, Counts>,
    pub half_open_timeout_ns: u64,
    pub flow_capacity: usize,
}

impl State {
    pub fn new(half_open_timeout_ns: u64, flow_capacity: usize) -> Self {
        State {
            protected: BTreeSet::new(),
            grants: Vec::new(),
            flows: BTreeMap::new(),
            counts: BTreeMap::new(),
            half_open_timeout_ns,
            flow_capacity,
        }
    }

    /// Writes a grant entry, replacing one for the same prefix and key.
    pub fn grant(&mut self, entry: GrantEntry) {
        let entry = GrantEntry {
            source: entry.source.trunc(),
            ..entry
        };
        self.grants.retain(|g| {
            (g.source, g.protocol, g.port) != (entry.source, entry.protocol, entry.port)
        });
        self.grants.push(entry);
    }

    /// The verdict on `frame` at boot time `now_ns`, with its effect on the flows.
    pub fn judge(&mut self, frame: &[u8], now_ns: u64) -> Outcome {
        let segment = match parse(frame) {
            Parsed::Done(outcome) => return outcome,
            Parsed::Truncated { protocol, port } => {
                return match port {
                    Some(port) if port != 0 && !self.protected.contains(&(protocol, port)) => {
                        Outcome::pass("pass_not_protected")
                    }
                    _ => Outcome::drop("drop_truncated_transport"),
                };
            }
            Parsed::Segment(segment) => segment,
        };
        if !self
            .protected
            .contains(&(segment.protocol, segment.dst_port))
        {
            return Outcome::pass("pass_not_protected");
        }
        let id: FlowId = (
            segment.src,
            segment.dst,
            segment.src_port,
            segment.dst_port,
            segment.protocol,
        );
        let tcp = segment.protocol == TCP;
        // Decision 5: a SYN without ACK is a new connection.
        if tcp && segment.syn && !segment.ack {
            let Some((reason, grant)) = self.live_grant(&segment, now_ns) else {
                return Outcome::drop("drop_no_grant");
            };
            if let Some(flow) = self.flows.get_mut(&id) {
                if !flow.established {
                    flow.opened_ns = now_ns;
                }
                return Outcome::pass(reason);
            }
            return self
                .open(id, &grant, false, now_ns)
                .unwrap_or(Outcome::pass(reason));
        }
        // Decision 6: a packet of a connection, or a datagram.
        let timeout = self.half_open_timeout_ns;
        let honoured = self
            .flows
            .get(&id)
            .is_some_and(|f| f.established || now_ns.saturating_sub(f.opened_ns) < timeout);
        let outcome = if honoured {
            Outcome::pass("pass_tracked_flow")
        } else {
            let Some((reason, grant)) = self.live_grant(&segment, now_ns) else {
                return Outcome::drop("drop_no_grant");
            };
            if !tcp && !self.flows.contains_key(&id) {
                return self
                    .open(id, &grant, true, now_ns)
                    .unwrap_or(Outcome::pass(reason));
            }
            Outcome::pass(reason)
        };
        if let Some(flow) = self.flows.get_mut(&id)
            && tcp
        {
            flow.established |= segment.ack && !segment.syn;
            flow.fin |= segment.fin;
            flow.rst |= segment.rst;
        }
        outcome
    }

    /// Decision 5's live grant: the exact entry for the source if live,
    /// else the longest prefix containing it if that one is live.
    fn live_grant(&self, segment: &Segment, now_ns: u64) -> Option<(&'static str, GrantEntry)> {
        let key = |g: &&GrantEntry| g.protocol == segment.protocol && g.port == segment.dst_port;
        let full = |g: &&GrantEntry| g.source.prefix_len() == g.source.max_prefix_len();
        let live = |g: &GrantEntry| now_ns < g.expires_ns;
        let exact = self
            .grants
            .iter()
            .filter(key)
            .filter(full)
            .find(|g| g.source.addr() == segment.src);
        if let Some(g) = exact.filter(|g| live(g)) {
            return Some(("pass_exact_grant", *g));
        }
        let longest = self
            .grants
            .iter()
            .filter(key)
            .filter(|g| !full(g) && g.source.contains(&segment.src))
            .max_by_key(|g| g.source.prefix_len())?;
        live(longest).then_some(("pass_cidr_grant", *longest))
    }

    /// Records a new flow under the grant's limits; the refusal if refused.
    fn open(
        &mut self,
        id: FlowId,
        grant: &GrantEntry,
        established: bool,
        now_ns: u64,
    ) -> Option<Outcome> {
        let counts = self.counts.entry(grant.grant_id).or_default();
        let refusal = if grant.max_opens != 0 && counts.opened >= u64::from(grant.max_opens) {
            Some(Outcome::drop("drop_opens_exhausted"))
        } else if counts.opened.saturating_sub(counts.closed) >= u64::from(grant.quota) {
            Some(Outcome::drop("drop_flow_quota"))
        } else if self.flows.len() >= self.flow_capacity {
            Some(Outcome::drop("drop_flow_table_full"))
        } else {
            None
        };
        if refusal.is_some() {
            counts.refused += 1;
            return refusal;
        }
        counts.opened += 1;
        self.flows.insert(
            id,
            Flow {
                grant_id: grant.grant_id,
                opened_ns: now_ns,
                established,
                fin: false,
                rst: false,
            },
        );
        None
    }

    /// The agent removed a flow: it counts as closed for its grant.
    pub fn remove_flow(&mut self, id: &FlowId) {
        if let Some(flow) = self.flows.remove(id)
            && flow.grant_id != 0
        {
            self.counts.entry(flow.grant_id).or_default().closed += 1;
        }
    }

    /// The flow key of `frame` if it carries a complete TCP/UDP header.
    pub fn flow_id(frame: &[u8]) -> Option<FlowId> {
        match parse(frame) {
            Parsed::Segment(s) => Some((s.src, s.dst, s.src_port, s.dst_port, s.protocol)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bounds_are_readmes() {
        let readme = include_str!("../../README.md");
        assert!(readme.contains(&format!("up to {VLAN_TAGS} VLAN tags")));
        assert!(readme.contains(&format!("up to {EXTENSION_HEADERS} extension headers")));
    }
}
