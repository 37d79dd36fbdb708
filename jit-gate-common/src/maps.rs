//! Layouts of the maps shared between the XDP program and the agent.
//!
//! All structs are `#[repr(C)]` without implicit padding (explicit `_pad`
//! fields), so the kernel and user space agree byte for byte. Ports are kept
//! in host byte order in hash keys, and in network order inside LPM keys
//! (whose bytes are matched as a bit string).

use crate::verdict::{Address, Transport};

/// Map names: the names of the statics in the eBPF program, and the file
/// names of their pins under the pin directory.
pub mod names {
    pub const PROTECTED_PORTS: &str = "PROTECTED_PORTS";
    pub const GRANTS_V4: &str = "GRANTS_V4";
    pub const GRANTS_V6: &str = "GRANTS_V6";
    pub const SOURCE_FILTER: &str = "SOURCE_FILTER";
    pub const CIDR_GRANTS_V4: &str = "CIDR_GRANTS_V4";
    pub const CIDR_GRANTS_V6: &str = "CIDR_GRANTS_V6";
    pub const FLOWS: &str = "FLOWS";
    pub const GRANT_OPENS: &str = "GRANT_OPENS";
    pub const GRANT_CLOSES: &str = "GRANT_CLOSES";
    pub const REASON_COUNTERS: &str = "REASON_COUNTERS";
    pub const PORT_COUNTERS: &str = "PORT_COUNTERS";
    pub const DENY_EVENTS: &str = "DENY_EVENTS";
    pub const DENY_BUDGET: &str = "DENY_BUDGET";
    pub const CONFIG: &str = "CONFIG";
    /// Written by user space only: the layout version the pins were made for.
    pub const LAYOUT: &str = "LAYOUT";
    /// Every map of the program, for pinning and removal.
    pub const ALL: [&str; 15] = [
        PROTECTED_PORTS,
        GRANTS_V4,
        GRANTS_V6,
        SOURCE_FILTER,
        CIDR_GRANTS_V4,
        CIDR_GRANTS_V6,
        FLOWS,
        GRANT_OPENS,
        GRANT_CLOSES,
        REASON_COUNTERS,
        PORT_COUNTERS,
        DENY_EVENTS,
        DENY_BUDGET,
        CONFIG,
        LAYOUT,
    ];
}

/// Name of the XDP program in the object file.
pub const PROGRAM_NAME: &str = "jit_gate";

/// Capacities. Grants are sized for a busy bastion fleet host. The flow
/// table's size is a default: the agent sets it from its configuration when
/// it loads the program.
pub mod capacity {
    pub const PORTS: u32 = 65_536;
    pub const EXACT_GRANTS: u32 = 1_048_576;
    pub const CIDR_GRANTS: u32 = 65_536;
    pub const FLOWS: u32 = 262_144;
    /// Grants with flow counters at once: every grant that opened a flow
    /// and still has one, or is still live.
    pub const GRANT_COUNTERS: u32 = 1_048_576;
    /// Distinct protected (port) counter slots.
    pub const PORT_COUNTER_SLOTS: u32 = 1_024;
    pub const DENY_EVENT_BYTES: u32 = 256 * 1024;
}

/// A bitmap over source addresses in front of the exact-grant maps: a
/// source whose bit is clear holds no exact grant, so the program skips the
/// hash lookup. 2^20 bits (128 KiB) stay in the CPU's cache where a table
/// of a million buckets does not, which makes a flood from random sources
/// cost about what a flood from one source costs, as long as few bits are
/// set (one in a hundred with 10,000 grants; with a million grants most
/// are, and the filter saves little). A larger bitmap misses the cache
/// itself. User space (which maps the array into its memory) sets a
/// source's bit before it writes the source's grant entry, and clears bits
/// only by rebuilding the bitmap from the entries: a stale bit costs a
/// lookup, never a grant.
pub mod source_filter {
    use crate::family;

    pub const BITS_LOG2: u32 = 20;
    /// 64-bit words of the bitmap.
    pub const WORDS: u32 = 1 << (BITS_LOG2 - 6);

    /// The bit of a source address (multiplicative hashing of its 32-bit
    /// words: a few instructions in the program).
    #[inline(always)]
    pub const fn bit(addr: &[u8; 16], fam: u8) -> u32 {
        let words = if fam == family::V4 { 1 } else { 4 };
        let mut hash: u32 = 0x811c_9dc5 ^ fam as u32;
        let mut i = 0;
        while i < 4 {
            if i < words {
                let word = u32::from_le_bytes([
                    addr[4 * i],
                    addr[4 * i + 1],
                    addr[4 * i + 2],
                    addr[4 * i + 3],
                ]);
                hash = (hash ^ word).wrapping_mul(0x9e37_79b1).rotate_left(13);
            }
            i += 1;
        }
        hash.wrapping_mul(0x85eb_ca6b) >> (32 - BITS_LOG2)
    }

    /// The index of the bit's word in the bitmap.
    pub const fn word(bit: u32) -> u32 {
        bit >> 6
    }

    /// The bit within its word.
    pub const fn mask(bit: u32) -> u64 {
        1 << (bit & 63)
    }
}

/// Per-grant flow limits unless configured otherwise.
pub mod defaults {
    /// Connections a grant may hold open at once.
    pub const FLOW_QUOTA: u32 = 64;
    /// A TCP flow whose handshake has not completed this long after its
    /// SYN is no longer honoured (nanoseconds).
    pub const HALF_OPEN_TIMEOUT_NS: u64 = 30_000_000_000;
    /// Deny events each CPU may send per window.
    pub const DENY_EVENTS_PER_WINDOW: u32 = 32;
    /// The deny-event budget window (nanoseconds).
    pub const DENY_WINDOW_NS: u64 = 1_000_000_000;
}

/// Value of `PROTECTED_PORTS[port]`: which protocols are protected on the
/// port, and the slot of its counters in `PORT_COUNTERS`.
pub mod protected {
    pub const TCP: u32 = 1 << 0;
    pub const UDP: u32 = 1 << 1;
    pub const SLOT_SHIFT: u32 = 8;

    pub const fn bit_for(protocol: u8) -> u32 {
        match protocol {
            crate::ip_proto::TCP => TCP,
            crate::ip_proto::UDP => UDP,
            _ => 0,
        }
    }

    pub const fn encode(protocol_bits: u32, slot: u32) -> u32 {
        protocol_bits | (slot << SLOT_SHIFT)
    }

    pub const fn slot(value: u32) -> u32 {
        value >> SLOT_SHIFT
    }

    /// Index into `PORT_COUNTERS`: two entries (TCP, UDP) per slot.
    pub const fn counter_index(value: u32, protocol: u8) -> u32 {
        slot(value) * 2
            + if protocol == crate::ip_proto::UDP {
                1
            } else {
                0
            }
    }
}

/// Key of the exact IPv4 grant map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrantKeyV4 {
    pub addr: [u8; 4],
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

impl GrantKeyV4 {
    #[inline(always)]
    pub const fn new(addr: [u8; 4], protocol: u8, port: u16) -> Self {
        GrantKeyV4 {
            addr,
            port,
            protocol,
            _pad: 0,
        }
    }
}

/// Key of the exact IPv6 grant map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrantKeyV6 {
    pub addr: [u8; 16],
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

impl GrantKeyV6 {
    #[inline(always)]
    pub const fn new(addr: [u8; 16], protocol: u8, port: u16) -> Self {
        GrantKeyV6 {
            addr,
            port,
            protocol,
            _pad: 0,
        }
    }
}

/// Value of every grant map: the latest expiry among the grants for the
/// key, the grant it belongs to, and that grant's flow limits (carried here
/// so the program needs no other lookup to apply them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantValue {
    /// `CLOCK_BOOTTIME` nanoseconds; the grant is live while `now < expires_at_boot_ns`.
    pub expires_at_boot_ns: u64,
    /// The grant whose expiry this is; recorded in the flows it opens.
    pub grant_id: u64,
    /// Flows the grant may hold at once (opened minus closed).
    pub flow_quota: u32,
    /// Flows the grant may ever open; 0: no limit (a single-use grant has 1).
    pub max_opens: u32,
}

/// Bits of an LPM key that precede the address: protocol (8) and port (16).
pub const CIDR_KEY_FIXED_BITS: u32 = 24;

/// LPM trie data for IPv4: protocol, port (network order), address.
pub type CidrDataV4 = [u8; 7];
/// LPM trie data for IPv6: protocol, port (network order), address.
pub type CidrDataV6 = [u8; 19];

/// Builds the LPM data bytes: the fixed protocol and port, then the address.
pub fn cidr_data<const N: usize, const A: usize>(
    protocol: u8,
    port: u16,
    addr: &[u8; A],
) -> [u8; N] {
    let mut data = [0u8; N];
    data[0] = protocol;
    let port = port.to_be_bytes();
    data[1] = port[0];
    data[2] = port[1];
    let mut i = 0;
    while i < A && i + 3 < N {
        data[i + 3] = addr[i];
        i += 1;
    }
    data
}

/// Key of the flow map, for both families (IPv4 addresses use the first four
/// bytes). The family is part of the key so an IPv6 packet can never match an
/// IPv4 flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// The key of the flow a packet belongs to.
    #[inline(always)]
    pub const fn of(src: &Address, dst: &Address, transport: &Transport) -> Self {
        FlowKey {
            src: src.bytes,
            dst: dst.bytes,
            src_port: transport.src_port,
            dst_port: transport.dst_port,
            protocol: transport.protocol,
            family: src.family,
            _pad: [0; 2],
        }
    }
}

/// Bits of `FlowValue::state`.
pub mod flow_state {
    /// TCP: the client sent an ACK without SYN (the handshake completed).
    /// UDP flows and flows seeded from the host's connections start with it.
    pub const ESTABLISHED: u32 = 1 << 0;
    /// A FIN was seen from the client (spoofable: only a hint to the agent).
    pub const FIN_SEEN: u32 = 1 << 1;
    /// A RST was seen from the client (spoofable: only a hint to the agent).
    pub const RST_SEEN: u32 = 1 << 2;
}

/// Value of the flow map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowValue {
    /// The grant it was opened under; 0 for a connection that predates the gate.
    pub grant_id: u64,
    /// When its SYN (or first datagram) passed; a SYN under a live grant
    /// restarts it while the handshake is incomplete.
    pub opened_at_boot_ns: u64,
    /// When a packet of the flow last passed, to the second.
    pub last_seen_boot_ns: u64,
    /// `flow_state` bits.
    pub state: u32,
    pub _pad: u32,
}

/// Value of `GRANT_OPENS`, keyed by grant id; written by the program only
/// (atomically), so user space never races it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GrantOpens {
    /// Flows ever opened under the grant.
    pub opened: u64,
    /// New connections refused (quota, max opens, flow table full).
    pub refused: u64,
}

/// A denied packet, as reported through the `DENY_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenyEvent {
    pub src: [u8; 16],
    pub family: u8,
    pub protocol: u8,
    pub dst_port: u16,
    pub reason: u32,
    pub at_boot_ns: u64,
    /// For a refused new connection: the grant whose limit refused it; else 0.
    pub grant_id: u64,
}

/// Per-CPU state of the deny-event budget: events sent in the current window.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DenyBudget {
    pub window_start_boot_ns: u64,
    pub sent: u64,
}

/// Per protected (port, protocol) counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortCounters {
    pub passed: u64,
    pub dropped: u64,
    /// Of `dropped`: new connections refused by a grant's limits or a full flow table.
    pub refused: u64,
}

/// The single entry of the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GateConfig {
    /// Number of entries in the IPv4 CIDR trie; zero skips the trie lookup.
    pub cidr_v4_entries: u32,
    /// Number of entries in the IPv6 CIDR trie; zero skips the trie lookup.
    pub cidr_v6_entries: u32,
    /// See `defaults::HALF_OPEN_TIMEOUT_NS`.
    pub half_open_timeout_ns: u64,
    /// See `defaults::DENY_WINDOW_NS`.
    pub deny_window_ns: u64,
    /// See `defaults::DENY_EVENTS_PER_WINDOW`.
    pub deny_events_per_window: u32,
    pub _pad: u32,
}

impl GateConfig {
    /// The configuration of a freshly loaded gate.
    pub const fn initial() -> Self {
        GateConfig {
            cidr_v4_entries: 0,
            cidr_v6_entries: 0,
            half_open_timeout_ns: defaults::HALF_OPEN_TIMEOUT_NS,
            deny_window_ns: defaults::DENY_WINDOW_NS,
            deny_events_per_window: defaults::DENY_EVENTS_PER_WINDOW,
            _pad: 0,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::{
        DenyBudget, DenyEvent, FlowKey, FlowValue, GateConfig, GrantKeyV4, GrantKeyV6, GrantOpens,
        GrantValue, PortCounters,
    };
    // SAFETY: all of these are `#[repr(C)]`, made of integers and byte
    // arrays, with no implicit padding (checked by the size tests below).
    unsafe impl aya::Pod for GrantKeyV4 {}
    unsafe impl aya::Pod for GrantKeyV6 {}
    unsafe impl aya::Pod for GrantValue {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for GrantOpens {}
    unsafe impl aya::Pod for DenyEvent {}
    unsafe impl aya::Pod for DenyBudget {}
    unsafe impl aya::Pod for PortCounters {}
    unsafe impl aya::Pod for GateConfig {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<GrantKeyV4>(), 4 + 2 + 1 + 1);
        assert_eq!(size_of::<GrantKeyV6>(), 16 + 2 + 1 + 1);
        assert_eq!(size_of::<GrantValue>(), 8 + 8 + 4 + 4);
        assert_eq!(size_of::<FlowKey>(), 16 + 16 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(size_of::<FlowValue>(), 8 + 8 + 8 + 4 + 4);
        assert_eq!(size_of::<GrantOpens>(), 16);
        assert_eq!(size_of::<DenyEvent>(), 16 + 1 + 1 + 2 + 4 + 8 + 8);
        assert_eq!(size_of::<DenyBudget>(), 16);
        assert_eq!(size_of::<PortCounters>(), 24);
        assert_eq!(size_of::<GateConfig>(), 4 + 4 + 8 + 8 + 4 + 4);
    }

    #[test]
    fn cidr_data_puts_protocol_port_then_address() {
        let data: CidrDataV4 = cidr_data(6, 22, &[10, 1, 2, 3]);
        assert_eq!(data, [6, 0, 22, 10, 1, 2, 3]);
        let data: CidrDataV6 = cidr_data(17, 0x1234, &[0xfe; 16]);
        assert_eq!(&data[..3], &[17, 0x12, 0x34]);
        assert_eq!(&data[3..], &[0xfe; 16]);
    }

    #[test]
    fn source_bits_spread_over_the_bitmap() {
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..4_096u32 {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&(0x0a00_0000 + i).to_be_bytes());
            let bit = source_filter::bit(&addr, crate::family::V4);
            assert!(bit < 1 << source_filter::BITS_LOG2);
            seen.insert(bit);
        }
        // Consecutive addresses rarely share a bit.
        assert!(seen.len() > 4_000, "{}", seen.len());
        let v6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_ne!(
            source_filter::bit(&v6, crate::family::V6),
            source_filter::bit(&[0; 16], crate::family::V6)
        );
    }

    #[test]
    fn protected_value_round_trips_slot_and_counter_index() {
        let v = protected::encode(protected::TCP | protected::UDP, 5);
        assert_eq!(protected::slot(v), 5);
        assert_eq!(protected::counter_index(v, crate::ip_proto::TCP), 10);
        assert_eq!(protected::counter_index(v, crate::ip_proto::UDP), 11);
        assert_ne!(v & protected::bit_for(crate::ip_proto::TCP), 0);
    }
}
