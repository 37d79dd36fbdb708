//! The packet verdict as a pure function over parsed header fields.
//!
//! The XDP program parses a frame into [`PacketFacts`], then calls [`decide`]
//! with lookups backed by its maps. Tests feed the same function with facts
//! from an independent parser (etherparse) and lookups backed by plain
//! collections, and compare the result with what the loaded program did.

use core::num::NonZeroU16;

use crate::{family, ip_proto};

/// Why a packet got its verdict. Also the index into `REASON_COUNTERS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Not IPv4/IPv6 (after at most two VLAN tags).
    PassNotIp = 0,
    /// IP, but neither TCP nor UDP.
    PassNotTcpUdp = 1,
    /// TCP/UDP to a port that is not protected for that protocol.
    PassNotProtected = 2,
    /// A non-first fragment: carries no ports; reassembly needs the filtered first one.
    PassNonFirstFragment = 3,
    /// Source holds a live exact grant.
    PassExactGrant = 4,
    /// Source holds a live CIDR grant.
    PassCidrGrant = 5,
    /// Packet of a flow opened under a grant.
    PassTrackedFlow = 6,
    /// Protected port, no live grant, no tracked flow.
    DropNoGrant = 7,
    /// A first fragment or unfragmented packet whose TCP/UDP header is
    /// missing, truncated or invalid, that could be headed for a protected port.
    DropTruncatedTransport = 8,
    /// IPv6 extension header chain longer than the walk bound.
    DropHeaderChainTooLong = 9,
    /// IP header truncated or inconsistent (the kernel would discard it too).
    DropMalformedIp = 10,
}

impl Reason {
    pub const COUNT: u32 = 11;
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::PassNotIp,
        Reason::PassNotTcpUdp,
        Reason::PassNotProtected,
        Reason::PassNonFirstFragment,
        Reason::PassExactGrant,
        Reason::PassCidrGrant,
        Reason::PassTrackedFlow,
        Reason::DropNoGrant,
        Reason::DropTruncatedTransport,
        Reason::DropHeaderChainTooLong,
        Reason::DropMalformedIp,
    ];

    pub const fn is_pass(self) -> bool {
        (self as u32) <= Reason::PassTrackedFlow as u32
    }

    pub const fn from_u32(value: u32) -> Option<Reason> {
        if value < Self::COUNT {
            Some(Self::ALL[value as usize])
        } else {
            None
        }
    }

    /// A stable `snake_case` name, for metrics and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassNotTcpUdp => "pass_not_tcp_udp",
            Reason::PassNotProtected => "pass_not_protected",
            Reason::PassNonFirstFragment => "pass_non_first_fragment",
            Reason::PassExactGrant => "pass_exact_grant",
            Reason::PassCidrGrant => "pass_cidr_grant",
            Reason::PassTrackedFlow => "pass_tracked_flow",
            Reason::DropNoGrant => "drop_no_grant",
            Reason::DropTruncatedTransport => "drop_truncated_transport",
            Reason::DropHeaderChainTooLong => "drop_header_chain_too_long",
            Reason::DropMalformedIp => "drop_malformed_ip",
        }
    }
}

/// The most IPv6 extension headers the parser walks before giving up.
pub const MAX_IPV6_EXT_HEADERS: usize = 8;
/// The most VLAN tags the parser strips.
pub const MAX_VLAN_TAGS: usize = 2;

/// An IP address as carried in keys: the family and 16 bytes (IPv4 uses the
/// first four, the rest are zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address {
    pub family: u8,
    pub bytes: [u8; 16],
}

impl Address {
    pub const fn v4(octets: [u8; 4]) -> Self {
        let mut bytes = [0u8; 16];
        bytes[0] = octets[0];
        bytes[1] = octets[1];
        bytes[2] = octets[2];
        bytes[3] = octets[3];
        Address {
            family: family::V4,
            bytes,
        }
    }

    pub const fn v6(bytes: [u8; 16]) -> Self {
        Address {
            family: family::V6,
            bytes,
        }
    }
}

/// The TCP flags the verdict cares about.
pub mod tcp_flags {
    pub const SYN: u8 = 0x02;
    pub const ACK: u8 = 0x10;
}

/// A complete TCP or UDP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transport {
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags byte (zero for UDP).
    pub tcp_flags: u8,
}

/// What lies above the IP header of a first fragment or unfragmented packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upper {
    /// Complete TCP or UDP header.
    Transport(Transport),
    /// TCP or UDP whose header is truncated or invalid; the destination port
    /// when at least the first four bytes are there and it is not zero (port
    /// 0 is never protected; a truncated header to it counts as unknown).
    /// `NonZeroU16` leaves no undefined payload behind `None`, which the
    /// verifier would reject if LLVM carried one in a register.
    TruncatedTransport {
        protocol: u8,
        dst_port: Option<NonZeroU16>,
    },
    /// Any other protocol.
    Other,
}

/// Everything the verdict needs to know about a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketFacts {
    /// Not IPv4/IPv6 (or a frame too short to tell).
    NotIp,
    /// IP header truncated or inconsistent.
    MalformedIp,
    /// IPv6 extension header chain longer than [`MAX_IPV6_EXT_HEADERS`].
    HeaderChainTooLong,
    /// A fragment other than the first.
    NonFirstFragment,
    /// A first fragment or unfragmented packet.
    Ip {
        src: Address,
        dst: Address,
        upper: Upper,
    },
}

/// The state the verdict consults. Every method is a lookup; none may have
/// side effects, and `decide` calls each at most once, only when needed.
pub trait GateLookups {
    /// Whether `port` is protected for `protocol`.
    fn is_protected(&self, protocol: u8, port: u16) -> bool;
    /// The exact grant entry for the key: (expiry in boot ns, grant id).
    fn exact_grant(&self, src: &Address, protocol: u8, port: u16) -> Option<(u64, u64)>;
    /// Whether any CIDR grant of this family exists (skip the trie otherwise).
    fn has_cidr_grants(&self, family: u8) -> bool;
    /// The longest-prefix CIDR grant entry covering `src` for the key.
    fn cidr_grant(&self, src: &Address, protocol: u8, port: u16) -> Option<(u64, u64)>;
    /// Whether the flow is tracked.
    fn flow_tracked(&self, src: &Address, dst: &Address, transport: &Transport) -> bool;
}

/// What to do with a packet, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub reason: Reason,
    /// Set when the packet passes under a grant and opens a flow (TCP SYN
    /// without ACK, or any UDP packet): the grant id to record the flow under.
    pub open_flow_for_grant: Option<u64>,
}

impl Verdict {
    const fn of(reason: Reason) -> Self {
        Verdict {
            reason,
            open_flow_for_grant: None,
        }
    }

    pub const fn passes(&self) -> bool {
        self.reason.is_pass()
    }
}

/// The verdict for a packet, at boot time `now_boot_ns`.
#[inline(always)]
pub fn decide<L: GateLookups>(facts: &PacketFacts, lookups: &L, now_boot_ns: u64) -> Verdict {
    let (src, dst, upper) = match facts {
        PacketFacts::NotIp => return Verdict::of(Reason::PassNotIp),
        PacketFacts::MalformedIp => return Verdict::of(Reason::DropMalformedIp),
        PacketFacts::HeaderChainTooLong => return Verdict::of(Reason::DropHeaderChainTooLong),
        PacketFacts::NonFirstFragment => return Verdict::of(Reason::PassNonFirstFragment),
        PacketFacts::Ip { src, dst, upper } => (src, dst, upper),
    };
    let transport = match upper {
        Upper::Other => return Verdict::of(Reason::PassNotTcpUdp),
        Upper::TruncatedTransport {
            protocol,
            dst_port: Some(port),
        } if !lookups.is_protected(*protocol, port.get()) => {
            return Verdict::of(Reason::PassNotProtected);
        }
        // The port is protected, or unknown and so possibly protected.
        Upper::TruncatedTransport { .. } => return Verdict::of(Reason::DropTruncatedTransport),
        Upper::Transport(transport) => transport,
    };
    let (protocol, port) = (transport.protocol, transport.dst_port);
    if !lookups.is_protected(protocol, port) {
        return Verdict::of(Reason::PassNotProtected);
    }

    let live = |entry: Option<(u64, u64)>| entry.filter(|(expires, _)| now_boot_ns < *expires);
    let granted = if let Some((_, id)) = live(lookups.exact_grant(src, protocol, port)) {
        Some((Reason::PassExactGrant, id))
    } else if lookups.has_cidr_grants(src.family) {
        live(lookups.cidr_grant(src, protocol, port)).map(|(_, id)| (Reason::PassCidrGrant, id))
    } else {
        None
    };
    if let Some((reason, grant_id)) = granted {
        return Verdict {
            reason,
            open_flow_for_grant: opens_flow(transport).then_some(grant_id),
        };
    }
    if lookups.flow_tracked(src, dst, transport) {
        return Verdict::of(Reason::PassTrackedFlow);
    }
    Verdict::of(Reason::DropNoGrant)
}

/// A TCP SYN without ACK opens a connection; any UDP datagram may open a flow
/// (recording an existing one again is harmless).
#[inline(always)]
fn opens_flow(transport: &Transport) -> bool {
    match transport.protocol {
        ip_proto::TCP => transport.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN,
        ip_proto::UDP => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    const NOW: u64 = 1_000_000;
    const SRC: Address = Address::v4([192, 0, 2, 10]);
    const DST: Address = Address::v4([192, 0, 2, 1]);

    #[derive(Default)]
    struct Fixture {
        protected: BTreeSet<(u8, u16)>,
        exact: BTreeMap<(Address, u8, u16), (u64, u64)>,
        cidr: Option<(u64, u64)>,
        flows: bool,
    }

    impl GateLookups for Fixture {
        fn is_protected(&self, protocol: u8, port: u16) -> bool {
            self.protected.contains(&(protocol, port))
        }
        fn exact_grant(&self, src: &Address, protocol: u8, port: u16) -> Option<(u64, u64)> {
            self.exact.get(&(*src, protocol, port)).copied()
        }
        fn has_cidr_grants(&self, _family: u8) -> bool {
            self.cidr.is_some()
        }
        fn cidr_grant(&self, _src: &Address, _protocol: u8, _port: u16) -> Option<(u64, u64)> {
            self.cidr
        }
        fn flow_tracked(&self, _src: &Address, _dst: &Address, _t: &Transport) -> bool {
            self.flows
        }
    }

    fn ssh() -> Fixture {
        Fixture {
            protected: [(ip_proto::TCP, 22)].into_iter().collect(),
            ..Fixture::default()
        }
    }

    fn tcp(dst_port: u16, flags: u8) -> PacketFacts {
        PacketFacts::Ip {
            src: SRC,
            dst: DST,
            upper: Upper::Transport(Transport {
                protocol: ip_proto::TCP,
                src_port: 40000,
                dst_port,
                tcp_flags: flags,
            }),
        }
    }

    #[test]
    fn protected_port_without_grant_is_dropped() {
        let v = decide(&tcp(22, tcp_flags::SYN), &ssh(), NOW);
        assert_eq!(v.reason, Reason::DropNoGrant);
        assert!(!v.passes());
    }

    #[test]
    fn unprotected_port_passes_without_lookups_of_grants() {
        assert_eq!(
            decide(&tcp(80, tcp_flags::SYN), &ssh(), NOW).reason,
            Reason::PassNotProtected
        );
    }

    #[test]
    fn live_exact_grant_passes_and_syn_opens_flow() {
        let mut f = ssh();
        f.exact.insert((SRC, ip_proto::TCP, 22), (NOW + 1, 7));
        let v = decide(&tcp(22, tcp_flags::SYN), &f, NOW);
        assert_eq!(
            v,
            Verdict {
                reason: Reason::PassExactGrant,
                open_flow_for_grant: Some(7)
            }
        );
        let v = decide(&tcp(22, tcp_flags::SYN | tcp_flags::ACK), &f, NOW);
        assert_eq!(
            v,
            Verdict {
                reason: Reason::PassExactGrant,
                open_flow_for_grant: None
            }
        );
    }

    #[test]
    fn grant_expiring_now_is_dead_and_falls_back_to_cidr_then_flow() {
        let mut f = ssh();
        f.exact.insert((SRC, ip_proto::TCP, 22), (NOW, 7));
        assert_eq!(
            decide(&tcp(22, tcp_flags::ACK), &f, NOW).reason,
            Reason::DropNoGrant
        );
        f.cidr = Some((NOW + 5, 8));
        assert_eq!(
            decide(&tcp(22, tcp_flags::ACK), &f, NOW).reason,
            Reason::PassCidrGrant
        );
        f.cidr = Some((NOW - 1, 8));
        f.flows = true;
        assert_eq!(
            decide(&tcp(22, tcp_flags::ACK), &f, NOW).reason,
            Reason::PassTrackedFlow
        );
    }

    #[test]
    fn truncated_transport_drops_unless_port_known_unprotected() {
        let f = ssh();
        let facts = |dst_port| PacketFacts::Ip {
            src: SRC,
            dst: DST,
            upper: Upper::TruncatedTransport {
                protocol: ip_proto::TCP,
                dst_port,
            },
        };
        assert_eq!(
            decide(&facts(None), &f, NOW).reason,
            Reason::DropTruncatedTransport
        );
        assert_eq!(
            decide(&facts(NonZeroU16::new(22)), &f, NOW).reason,
            Reason::DropTruncatedTransport
        );
        assert_eq!(
            decide(&facts(NonZeroU16::new(80)), &f, NOW).reason,
            Reason::PassNotProtected
        );
    }

    #[test]
    fn layer_three_outcomes() {
        let f = ssh();
        assert_eq!(
            decide(&PacketFacts::NotIp, &f, NOW).reason,
            Reason::PassNotIp
        );
        assert_eq!(
            decide(&PacketFacts::NonFirstFragment, &f, NOW).reason,
            Reason::PassNonFirstFragment
        );
        assert_eq!(
            decide(&PacketFacts::MalformedIp, &f, NOW).reason,
            Reason::DropMalformedIp
        );
        assert_eq!(
            decide(&PacketFacts::HeaderChainTooLong, &f, NOW).reason,
            Reason::DropHeaderChainTooLong
        );
    }

    #[test]
    fn reasons_round_trip_and_split_pass_from_drop() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(Reason::from_u32(i as u32), Some(*r));
            assert_eq!(r.is_pass(), r.name().starts_with("pass_"));
        }
        assert_eq!(Reason::from_u32(Reason::COUNT), None);
    }
}
