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
    pub const PUBLISHED_CLOCK: &str = "PUBLISHED_CLOCK";
    /// Written by user space only: the layout version the pins were made for.
    pub const LAYOUT: &str = "LAYOUT";
    /// Every map of the program, for pinning and removal.
    pub const ALL: [&str; 16] = [
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
        PUBLISHED_CLOCK,
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
/// hash lookup.
///
/// The bitmap is sized to the grants, about 16 bits per exact entry, from
/// one cache line up to 2^24 bits: a flood from random sources then reads
/// a bitmap small enough to stay in the cache and the TLB (a fixed 128 KiB
/// bitmap cost a random-source flood 1.5× the single-source drop path with
/// a single grant, measured live; 4 KiB cost 1.1×), while a bitmap full of
/// grants still rules out all but about one random source in sixteen.
///
/// The array holds a shape word (which of two regions is in use, and its
/// size) and the two regions. User space builds a new size in the region
/// not in use and then switches the shape word with one store, so the
/// program always reads a complete bitmap. A shape word that does not
/// decode (a fresh or tampered map) makes the program look every source up
/// in the exact maps: slower, never wrong. User space sets a source's bit
/// before it writes the source's grant entry, and clears bits only by
/// rebuilding: a stale bit costs a lookup, never a grant.
pub mod source_filter {
    use crate::family;

    /// The smallest bitmap: one cache line.
    pub const MIN_BITS_LOG2: u32 = 9;
    /// The largest bitmap (2 MiB), for about a million exact entries.
    pub const MAX_BITS_LOG2: u32 = 24;
    /// Bits per exact entry the sizing aims for (16: about one random
    /// source in sixteen needs a lookup once the bitmap is full).
    const BITS_PER_ENTRY_LOG2: u32 = 4;
    /// The word holding the shape.
    pub const SHAPE_WORD: u32 = 0;
    /// Words of one region (each large enough for the largest bitmap).
    pub const REGION_WORDS: u32 = 1 << (MAX_BITS_LOG2 - 6);
    /// The first region starts one cache line after the shape word.
    const FIRST_REGION_WORD: u32 = 8;
    /// 64-bit words of the array: the shape's cache line and two regions.
    pub const WORDS: u32 = FIRST_REGION_WORD + 2 * REGION_WORDS;
    /// Marks a shape word as written by the agent (a zeroed map decodes to
    /// no shape).
    const SHAPE_MAGIC: u64 = 0x4a47_5346 << 32;

    /// Which region is in use, and its size.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Shape {
        /// 0 or 1.
        pub region: u32,
        pub bits_log2: u32,
    }

    impl Shape {
        /// The size for `entries` exact entries, in `region`.
        pub const fn for_entries(entries: u64, region: u32) -> Shape {
            let wanted = entries.saturating_mul(1 << BITS_PER_ENTRY_LOG2);
            let mut bits_log2 = MIN_BITS_LOG2;
            while bits_log2 < MAX_BITS_LOG2 && (1u64 << bits_log2) < wanted {
                bits_log2 += 1;
            }
            Shape { region, bits_log2 }
        }

        /// The other region, at another size.
        pub const fn next(self, entries: u64) -> Shape {
            Shape::for_entries(entries, 1 - self.region)
        }

        pub const fn encode(self) -> u64 {
            SHAPE_MAGIC | ((self.region as u64) << 8) | self.bits_log2 as u64
        }

        /// The shape a word holds, if it holds one.
        #[inline(always)]
        pub const fn decode(word: u64) -> Option<Shape> {
            let region = ((word >> 8) & 0xff) as u32;
            let bits_log2 = (word & 0xff) as u32;
            if word & !0xffff != SHAPE_MAGIC
                || region > 1
                || bits_log2 < MIN_BITS_LOG2
                || bits_log2 > MAX_BITS_LOG2
            {
                return None;
            }
            Some(Shape { region, bits_log2 })
        }

        /// Words of the bitmap.
        pub const fn words(self) -> u32 {
            1 << (self.bits_log2 - 6)
        }

        /// The source's bit in this bitmap.
        #[inline(always)]
        pub const fn bit(self, hash: u32) -> u32 {
            hash.wrapping_mul(0x85eb_ca6b) >> (32 - self.bits_log2)
        }

        /// The array index of the bit's word.
        #[inline(always)]
        pub const fn word_index(self, bit: u32) -> u32 {
            FIRST_REGION_WORD + self.region * REGION_WORDS + (bit >> 6)
        }
    }

    /// The hash of a source address (multiplicative hashing of its 32-bit
    /// words: a few instructions in the program).
    #[inline(always)]
    pub const fn hash(addr: &[u8; 16], fam: u8) -> u32 {
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
        hash
    }

    /// The bit within its word.
    #[inline(always)]
    pub const fn mask(bit: u32) -> u64 {
        1 << (bit & 63)
    }
}

/// The boot clock the agent publishes in `PUBLISHED_CLOCK[0]`, so that a
/// packet of a tracked flow stamps its last-seen time without reading the
/// kernel's clock (a helper call on every such packet).
///
/// Only last-seen stamps take this clock; it ages idle UDP flows and
/// nothing else. A grant's expiry, a handshake's age and every new flow's
/// times stay on the kernel's boot clock, read by the program, so a stalled
/// or dead agent can never keep a port open or a half-open flow honoured.
///
/// A published value is boot time at the moment it was written, so a stamp
/// is never later than the packet; it lags by up to the time since the
/// last publication. The slot is 0 until an agent first publishes: the
/// program then stamps boot time itself. A slot that stops (agent stalled
/// or dead) makes the flows it stamps look idle longer than they are; the
/// agent's ageing allows for the longest gap between its publications and
/// for any time it was not publishing (`enforce/xdp/clock.rs`), so no
/// flow is ever aged out early.
pub mod published_clock {
    /// How often the agent publishes.
    pub const PERIOD_NS: u64 = 250_000_000;
    /// A gap between two publications up to this long still counts as
    /// continuous publishing; a longer one starts a new run, and flows seen
    /// before it count as seen when it ended.
    pub const MAX_GAP_NS: u64 = 2_000_000_000;
    /// The program refreshes a flow's last-seen stamp once the clock has
    /// moved this far past it, so that its packets do not all write to the
    /// entry.
    pub const STAMP_GRANULARITY_NS: u64 = 1_000_000_000;
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

/// Per-CPU state of the deny-event budget: events sent in the current
/// window, and when it began on two clocks. The window is boot time, read
/// precisely; the coarse stamp lets a CPU whose budget is spent rule out
/// the window's end without reading boot time (see the program's
/// `gate/clock.rs`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DenyBudget {
    pub window_start_boot_ns: u64,
    pub sent: u64,
    /// The kernel's coarse monotonic clock when the window began.
    pub window_start_coarse_ns: u64,
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
        assert_eq!(size_of::<DenyBudget>(), 24);
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
        use source_filter::Shape;
        let shape = Shape::for_entries(1 << 20, 0);
        assert_eq!(shape.bits_log2, source_filter::MAX_BITS_LOG2);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..4_096u32 {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&(0x0a00_0000 + i).to_be_bytes());
            let bit = shape.bit(source_filter::hash(&addr, crate::family::V4));
            assert!(bit < 1 << shape.bits_log2);
            seen.insert(bit);
        }
        // Consecutive addresses rarely share a bit.
        assert!(seen.len() > 4_000, "{}", seen.len());
        let v6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_ne!(
            source_filter::hash(&v6, crate::family::V6),
            source_filter::hash(&[0; 16], crate::family::V6)
        );
    }

    #[test]
    fn source_filter_shapes_size_round_trip_and_stay_inside_the_array() {
        use source_filter::{MAX_BITS_LOG2, MIN_BITS_LOG2, Shape, WORDS};
        assert_eq!(Shape::for_entries(0, 0).bits_log2, MIN_BITS_LOG2);
        assert_eq!(Shape::for_entries(32, 0).bits_log2, MIN_BITS_LOG2);
        assert_eq!(Shape::for_entries(33, 0).bits_log2, MIN_BITS_LOG2 + 1);
        assert_eq!(Shape::for_entries(10_000, 1).bits_log2, 18);
        assert_eq!(Shape::for_entries(u64::MAX, 0).bits_log2, MAX_BITS_LOG2);
        let shape = Shape::for_entries(5, 1);
        assert_eq!(Shape::decode(shape.encode()), Some(shape));
        assert_eq!(shape.next(5).region, 0);
        // A zeroed or scribbled word is no shape.
        assert_eq!(Shape::decode(0), None);
        assert_eq!(Shape::decode(shape.encode() + 64), None);
        assert_eq!(Shape::decode(shape.encode() | 0x200), None);
        for region in 0..2 {
            let largest = Shape::for_entries(u64::MAX, region);
            let last_bit = (1 << MAX_BITS_LOG2) - 1;
            assert!(largest.word_index(last_bit) < WORDS);
            assert!(largest.bit(u32::MAX) <= last_bit);
        }
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
