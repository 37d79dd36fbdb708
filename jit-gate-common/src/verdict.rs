//! The packet verdict as a pure function over parsed header fields.
//!
//! The XDP program parses a frame into [`PacketFacts`], then calls [`decide`]
//! with lookups backed by its maps, and carries out the [`FlowAction`] the
//! verdict asks for (admitting a new flow through [`admit`]). Each rule is a
//! method of [`Rules`], so that the mutation check can build programs with
//! exactly one rule broken and show the tests catch it.

use core::num::NonZeroU16;

use crate::{
    family, ip_proto,
    maps::{FlowKey, FlowValue, GrantValue, flow_state},
};

/// Why a packet got its verdict. Also the index into `REASON_COUNTERS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Not IPv4/IPv6 (after the VLAN tags).
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
    /// Packet of a connection tracked in the flow map.
    PassTrackedFlow = 6,
    /// Protected port, no live grant, no tracked flow that may carry the packet.
    DropNoGrant = 7,
    /// A first fragment or unfragmented packet whose TCP/UDP header is
    /// missing, truncated or invalid, that could be headed for a protected port.
    DropTruncatedTransport = 8,
    /// IPv6 extension header (or IPv4 AH) chain longer than the walk bound.
    DropHeaderChainTooLong = 9,
    /// IP header truncated or inconsistent (the kernel would discard it too).
    DropMalformedIp = 10,
    /// More VLAN tags than the parser follows.
    DropVlanTooDeep = 11,
    /// A new connection under a grant that holds its quota of open flows.
    DropFlowQuota = 12,
    /// A new connection under a grant that has opened its maximum number.
    DropOpensExhausted = 13,
    /// A new connection while the flow table (or the grant counters) is full.
    DropFlowTableFull = 14,
}

impl Reason {
    pub const COUNT: u32 = 15;
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
        Reason::DropVlanTooDeep,
        Reason::DropFlowQuota,
        Reason::DropOpensExhausted,
        Reason::DropFlowTableFull,
    ];

    pub const fn is_pass(self) -> bool {
        (self as u32) <= Reason::PassTrackedFlow as u32
    }

    /// A new connection refused by a grant's limits or a full flow table.
    pub const fn is_refused_connection(self) -> bool {
        matches!(
            self,
            Reason::DropFlowQuota | Reason::DropOpensExhausted | Reason::DropFlowTableFull
        )
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
            Reason::DropVlanTooDeep => "drop_vlan_too_deep",
            Reason::DropFlowQuota => "drop_flow_quota",
            Reason::DropOpensExhausted => "drop_opens_exhausted",
            Reason::DropFlowTableFull => "drop_flow_table_full",
        }
    }
}

/// The most VLAN tags (802.1Q, 802.1ad, priority tags alike) the parser
/// follows; a frame with more drops. Real networks stack two (`QinQ`); the
/// kernel strips priority tags without bound, so the parser must follow
/// what it strips, and eight leaves room for unusual stacks at the cost of
/// a few helper reads that only such frames pay.
pub const MAX_VLAN_TAGS: usize = 8;
/// The most IPv6 extension headers (or IPv4 authentication headers) the
/// parser walks; a longer chain drops.
pub const MAX_IP_EXTENSION_HEADERS: usize = 8;

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
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
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
    /// More VLAN tags than [`Rules::VLAN_TAGS`].
    VlanTooDeep,
    /// IP header truncated or inconsistent.
    MalformedIp,
    /// Extension header chain longer than [`Rules::EXTENSION_HEADERS`].
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
    /// The exact grant entry for the key.
    fn exact_grant(&self, src: &Address, protocol: u8, port: u16) -> Option<GrantValue>;
    /// Whether any CIDR grant of this family exists (skip the trie otherwise).
    fn has_cidr_grants(&self, family: u8) -> bool;
    /// The longest-prefix CIDR grant entry covering `src` for the key.
    fn cidr_grant(&self, src: &Address, protocol: u8, port: u16) -> Option<GrantValue>;
    /// The tracked flow of the key.
    fn flow(&self, key: &FlowKey) -> Option<FlowValue>;
    /// How long a TCP flow whose handshake has not completed is honoured.
    fn half_open_timeout_ns(&self) -> u64;
}

/// What the packet does to the flow map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowAction {
    None,
    /// Record a new flow in `state` under this grant entry if [`admit`]
    /// allows it (the packet drops with the refusal's reason otherwise).
    Open {
        grant: GrantValue,
        state: u32,
    },
    /// The packet's flow exists: add `set_state` bits, refresh its last-seen
    /// time, and if `restart_handshake`, its opening time (a SYN under a
    /// live grant for a flow whose handshake never completed).
    Update {
        set_state: u32,
        restart_handshake: bool,
    },
}

/// What to do with a packet, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub reason: Reason,
    pub flow: FlowAction,
}

impl Verdict {
    const fn of(reason: Reason) -> Self {
        Verdict {
            reason,
            flow: FlowAction::None,
        }
    }

    pub const fn passes(&self) -> bool {
        self.reason.is_pass()
    }
}

/// The gate's rules, one method each. [`Gate`] is the product; a mutant
/// overrides exactly one method with a broken rule.
pub trait Rules {
    /// VLAN tags the parser follows before it gives up and drops.
    const VLAN_TAGS: usize = MAX_VLAN_TAGS;
    /// Extension headers the parser walks before it gives up and drops.
    const EXTENSION_HEADERS: usize = MAX_IP_EXTENSION_HEADERS;
    /// Whether the parser walks authentication headers over IPv4.
    const WALK_IPV4_AH: bool = true;
    /// Whether the program's fast path for unprotected ports leaves IPv4
    /// headers with options to the full parse (it reads the port where a
    /// header without options puts it).
    const FAST_PATH_CHECKS_IHL: bool = true;

    /// A grant is live strictly before its expiry.
    #[inline(always)]
    fn grant_live(grant: &GrantValue, now_boot_ns: u64) -> bool {
        now_boot_ns < grant.expires_at_boot_ns
    }

    /// A TCP SYN without ACK asks for a new connection: it needs a live
    /// grant and never passes as a tracked flow.
    #[inline(always)]
    fn opens_connection(transport: &Transport) -> bool {
        transport.protocol == ip_proto::TCP
            && transport.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
    }

    /// A UDP datagram passing under a grant records its flow.
    #[inline(always)]
    fn datagram_opens_flow(transport: &Transport) -> bool {
        transport.protocol == ip_proto::UDP
    }

    /// A flow carries packets once established, and while its handshake is
    /// younger than the half-open timeout. The clock is read only for a
    /// flow not yet established.
    #[inline(always)]
    fn flow_honoured<C: BootClock>(flow: &FlowValue, clock: &C, half_open_timeout_ns: u64) -> bool {
        flow.state & flow_state::ESTABLISHED != 0
            || clock.boot_ns().saturating_sub(flow.opened_at_boot_ns) < half_open_timeout_ns
    }

    /// The state a packet of a flow reports: an ACK without SYN completes
    /// the handshake; FIN and RST are noted for the agent to confirm.
    #[inline(always)]
    fn state_seen(transport: &Transport) -> u32 {
        if transport.protocol != ip_proto::TCP {
            return 0;
        }
        let flags = transport.tcp_flags;
        let mut state = 0;
        if flags & (tcp_flags::ACK | tcp_flags::SYN) == tcp_flags::ACK {
            state |= flow_state::ESTABLISHED;
        }
        if flags & tcp_flags::FIN != 0 {
            state |= flow_state::FIN_SEEN;
        }
        if flags & tcp_flags::RST != 0 {
            state |= flow_state::RST_SEEN;
        }
        state
    }

    /// Whether a grant may open one more flow, given the flows it opened
    /// before this one and the flows the agent has closed since.
    #[inline(always)]
    fn admit(grant: &GrantValue, opened_before: u64, closed: u64) -> Result<(), Reason> {
        if grant.max_opens != 0 && opened_before >= u64::from(grant.max_opens) {
            return Err(Reason::DropOpensExhausted);
        }
        if opened_before.saturating_sub(closed) >= u64::from(grant.flow_quota) {
            return Err(Reason::DropFlowQuota);
        }
        Ok(())
    }
}

/// The gate's rules as shipped.
pub struct Gate;

impl Rules for Gate {}

/// The boot-time clock the verdict reads, only when a grant's expiry or a
/// flow's age matters: most drops and passes never need the time. A `u64`
/// is a clock stopped at that instant; the program's clock reads the
/// kernel's once, the first time it is asked.
pub trait BootClock {
    fn boot_ns(&self) -> u64;
}

impl BootClock for u64 {
    #[inline(always)]
    fn boot_ns(&self) -> u64 {
        *self
    }
}

/// The verdict for a packet, at boot time `now_boot_ns`.
#[inline(always)]
pub fn decide<L: GateLookups>(facts: &PacketFacts, lookups: &L, now_boot_ns: u64) -> Verdict {
    decide_by::<Gate, L, u64>(facts, lookups, &now_boot_ns)
}

/// Whether the grant entry may open one more flow (see [`Rules::admit`]).
#[inline(always)]
pub fn admit(grant: &GrantValue, opened_before: u64, closed: u64) -> Result<(), Reason> {
    Gate::admit(grant, opened_before, closed)
}

/// [`decide`] under the rules `R`.
#[inline(always)]
pub fn decide_by<R: Rules, L: GateLookups, C: BootClock>(
    facts: &PacketFacts,
    lookups: &L,
    clock: &C,
) -> Verdict {
    let (src, dst, upper) = match facts {
        PacketFacts::NotIp => return Verdict::of(Reason::PassNotIp),
        PacketFacts::VlanTooDeep => return Verdict::of(Reason::DropVlanTooDeep),
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
    if !lookups.is_protected(transport.protocol, transport.dst_port) {
        return Verdict::of(Reason::PassNotProtected);
    }
    let key = FlowKey::of(src, dst, transport);

    if R::opens_connection(transport) {
        let Some((reason, grant)) = live_grant::<R, L, C>(src, transport, lookups, clock) else {
            return Verdict::of(Reason::DropNoGrant);
        };
        let flow = match lookups.flow(&key) {
            None => FlowAction::Open { grant, state: 0 },
            // A retransmitted SYN, or a new handshake on the tuple: counted once.
            Some(flow) => FlowAction::Update {
                set_state: 0,
                restart_handshake: flow.state & flow_state::ESTABLISHED == 0,
            },
        };
        return Verdict { reason, flow };
    }

    let flow = lookups.flow(&key);
    let update = FlowAction::Update {
        set_state: R::state_seen(transport),
        restart_handshake: false,
    };
    if let Some(tracked) = &flow
        && R::flow_honoured(tracked, clock, lookups.half_open_timeout_ns())
    {
        return Verdict {
            reason: Reason::PassTrackedFlow,
            flow: update,
        };
    }
    let Some((reason, grant)) = live_grant::<R, L, C>(src, transport, lookups, clock) else {
        return Verdict::of(Reason::DropNoGrant);
    };
    let flow = match flow {
        Some(_) => update,
        // A datagram exchange has no handshake: its flow is established at once.
        None if R::datagram_opens_flow(transport) => FlowAction::Open {
            grant,
            state: flow_state::ESTABLISHED,
        },
        None => FlowAction::None,
    };
    Verdict { reason, flow }
}

/// The live grant the source holds for the packet's (protocol, port): the
/// exact one, else (only if any CIDR grant exists) the longest CIDR prefix.
#[inline(always)]
fn live_grant<R: Rules, L: GateLookups, C: BootClock>(
    src: &Address,
    transport: &Transport,
    lookups: &L,
    clock: &C,
) -> Option<(Reason, GrantValue)> {
    let (protocol, port) = (transport.protocol, transport.dst_port);
    let live = |grant: Option<GrantValue>| grant.filter(|g| R::grant_live(g, clock.boot_ns()));
    if let Some(grant) = live(lookups.exact_grant(src, protocol, port)) {
        return Some((Reason::PassExactGrant, grant));
    }
    if !lookups.has_cidr_grants(src.family) {
        return None;
    }
    live(lookups.cidr_grant(src, protocol, port)).map(|grant| (Reason::PassCidrGrant, grant))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    const NOW: u64 = 1_000_000_000_000;
    const HALF_OPEN: u64 = 30_000_000_000;
    const SRC: Address = Address::v4([192, 0, 2, 10]);
    const DST: Address = Address::v4([192, 0, 2, 1]);

    #[derive(Default)]
    struct Fixture {
        protected: BTreeSet<(u8, u16)>,
        exact: BTreeMap<(Address, u8, u16), GrantValue>,
        cidr: Option<GrantValue>,
        flow: Option<FlowValue>,
    }

    impl GateLookups for Fixture {
        fn is_protected(&self, protocol: u8, port: u16) -> bool {
            self.protected.contains(&(protocol, port))
        }
        fn exact_grant(&self, src: &Address, protocol: u8, port: u16) -> Option<GrantValue> {
            self.exact.get(&(*src, protocol, port)).copied()
        }
        fn has_cidr_grants(&self, _family: u8) -> bool {
            self.cidr.is_some()
        }
        fn cidr_grant(&self, _src: &Address, _protocol: u8, _port: u16) -> Option<GrantValue> {
            self.cidr
        }
        fn flow(&self, _key: &FlowKey) -> Option<FlowValue> {
            self.flow
        }
        fn half_open_timeout_ns(&self) -> u64 {
            HALF_OPEN
        }
    }

    fn grant(expires_at_boot_ns: u64, grant_id: u64) -> GrantValue {
        GrantValue {
            expires_at_boot_ns,
            grant_id,
            flow_quota: 2,
            max_opens: 0,
        }
    }

    fn flow(state: u32, opened_at_boot_ns: u64) -> FlowValue {
        FlowValue {
            grant_id: 7,
            opened_at_boot_ns,
            last_seen_boot_ns: opened_at_boot_ns,
            state,
            _pad: 0,
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
    fn unprotected_port_passes() {
        assert_eq!(
            decide(&tcp(80, tcp_flags::SYN), &ssh(), NOW).reason,
            Reason::PassNotProtected
        );
    }

    #[test]
    fn live_grant_passes_and_only_a_syn_without_tracked_flow_opens_one() {
        let mut f = ssh();
        f.exact.insert((SRC, ip_proto::TCP, 22), grant(NOW + 1, 7));
        let v = decide(&tcp(22, tcp_flags::SYN), &f, NOW);
        assert_eq!(v.reason, Reason::PassExactGrant);
        assert_eq!(
            v.flow,
            FlowAction::Open {
                grant: grant(NOW + 1, 7),
                state: 0
            }
        );
        let v = decide(&tcp(22, tcp_flags::SYN | tcp_flags::ACK), &f, NOW);
        assert_eq!(v, Verdict::of(Reason::PassExactGrant));
        // A retransmitted SYN restarts the handshake clock, counted once.
        f.flow = Some(flow(0, NOW - 5));
        let v = decide(&tcp(22, tcp_flags::SYN), &f, NOW);
        assert_eq!(
            v.flow,
            FlowAction::Update {
                set_state: 0,
                restart_handshake: true
            }
        );
    }

    #[test]
    fn a_syn_never_passes_as_a_tracked_flow() {
        let mut f = ssh();
        f.flow = Some(flow(flow_state::ESTABLISHED, NOW - 5));
        assert_eq!(
            decide(&tcp(22, tcp_flags::SYN), &f, NOW).reason,
            Reason::DropNoGrant
        );
        assert_eq!(
            decide(&tcp(22, tcp_flags::ACK), &f, NOW).reason,
            Reason::PassTrackedFlow
        );
    }

    #[test]
    fn half_open_flows_are_honoured_only_until_the_timeout() {
        let mut f = ssh();
        f.flow = Some(flow(0, NOW - HALF_OPEN + 1));
        let v = decide(&tcp(22, tcp_flags::ACK), &f, NOW);
        assert_eq!(v.reason, Reason::PassTrackedFlow);
        assert_eq!(
            v.flow,
            FlowAction::Update {
                set_state: flow_state::ESTABLISHED,
                restart_handshake: false
            }
        );
        f.flow = Some(flow(0, NOW - HALF_OPEN));
        assert_eq!(
            decide(&tcp(22, tcp_flags::ACK), &f, NOW).reason,
            Reason::DropNoGrant
        );
        // Under a live grant the stale flow's handshake completes.
        f.exact.insert((SRC, ip_proto::TCP, 22), grant(NOW + 1, 7));
        let v = decide(&tcp(22, tcp_flags::ACK | tcp_flags::FIN), &f, NOW);
        assert_eq!(v.reason, Reason::PassExactGrant);
        assert_eq!(
            v.flow,
            FlowAction::Update {
                set_state: flow_state::ESTABLISHED | flow_state::FIN_SEEN,
                restart_handshake: false
            }
        );
    }

    #[test]
    fn grant_expiring_now_is_dead_and_falls_back_to_cidr_then_flow() {
        let mut f = ssh();
        f.exact.insert((SRC, ip_proto::TCP, 22), grant(NOW, 7));
        assert_eq!(
            decide(&tcp(22, tcp_flags::ACK), &f, NOW).reason,
            Reason::DropNoGrant
        );
        f.cidr = Some(grant(NOW + 5, 8));
        assert_eq!(
            decide(&tcp(22, tcp_flags::ACK), &f, NOW).reason,
            Reason::PassCidrGrant
        );
        f.cidr = Some(grant(NOW - 1, 8));
        f.flow = Some(flow(flow_state::ESTABLISHED, 0));
        assert_eq!(
            decide(&tcp(22, tcp_flags::ACK), &f, NOW).reason,
            Reason::PassTrackedFlow
        );
    }

    #[test]
    fn udp_opens_a_flow_once_under_a_grant() {
        let mut f = Fixture {
            protected: [(ip_proto::UDP, 514)].into_iter().collect(),
            ..Fixture::default()
        };
        let facts = PacketFacts::Ip {
            src: SRC,
            dst: DST,
            upper: Upper::Transport(Transport {
                protocol: ip_proto::UDP,
                src_port: 5000,
                dst_port: 514,
                tcp_flags: 0,
            }),
        };
        f.exact.insert((SRC, ip_proto::UDP, 514), grant(NOW + 1, 3));
        assert_eq!(
            decide(&facts, &f, NOW).flow,
            FlowAction::Open {
                grant: grant(NOW + 1, 3),
                state: flow_state::ESTABLISHED
            }
        );
        f.flow = Some(flow(flow_state::ESTABLISHED, NOW));
        assert_eq!(decide(&facts, &f, NOW).reason, Reason::PassTrackedFlow);
    }

    #[test]
    fn admit_applies_max_opens_then_the_quota() {
        let mut g = grant(NOW + 1, 7);
        assert_eq!(admit(&g, 1, 0), Ok(()));
        assert_eq!(admit(&g, 2, 0), Err(Reason::DropFlowQuota));
        assert_eq!(admit(&g, 2, 1), Ok(()));
        g.max_opens = 2;
        assert_eq!(admit(&g, 2, 2), Err(Reason::DropOpensExhausted));
        // The agent's count may briefly exceed the kernel's: never negative.
        assert_eq!(admit(&grant(NOW + 1, 7), 1, 5), Ok(()));
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
    fn layer_two_and_three_outcomes() {
        let f = ssh();
        for (facts, reason) in [
            (PacketFacts::NotIp, Reason::PassNotIp),
            (PacketFacts::VlanTooDeep, Reason::DropVlanTooDeep),
            (PacketFacts::NonFirstFragment, Reason::PassNonFirstFragment),
            (PacketFacts::MalformedIp, Reason::DropMalformedIp),
            (
                PacketFacts::HeaderChainTooLong,
                Reason::DropHeaderChainTooLong,
            ),
        ] {
            assert_eq!(decide(&facts, &f, NOW).reason, reason);
        }
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
