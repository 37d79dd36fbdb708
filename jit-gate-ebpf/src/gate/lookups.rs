//! `GateLookups` backed by the program's maps. The flow lookup keeps the
//! pointer to the entry it found, so carrying out the verdict updates the
//! entry without a second lookup; the protected-port entry is kept the
//! same way, so the fast path, `decide` and the per-port counter look a
//! port up once per frame.

use core::{cell::Cell, ptr};

use aya_ebpf::maps::lpm_trie::Key;
use jit_gate_common::{
    family,
    maps::{
        CIDR_KEY_FIXED_BITS, FlowKey, FlowValue, GrantKeyV4, GrantKeyV6, GrantValue, cidr_data,
        defaults, protected,
        source_filter::{self, Shape},
    },
    verdict::{Address, GateLookups},
};

use super::{
    CIDR_GRANTS_V4, CIDR_GRANTS_V6, CONFIG, FLOWS, GRANTS_V4, GRANTS_V6, PROTECTED_PORTS,
    SOURCE_FILTER,
};

pub struct MapLookups {
    /// The entry the last `flow` lookup found; null if none.
    flow: Cell<*mut FlowValue>,
    /// The port `protected_entry` last looked up (`NO_PORT`: none yet)…
    looked_up_port: Cell<u32>,
    /// …and its `PROTECTED_PORTS` entry (0 if the lookup failed).
    protected_entry: Cell<u32>,
}

/// Not a port: nothing looked up yet.
const NO_PORT: u32 = u32::MAX;

impl MapLookups {
    #[inline(always)]
    pub fn new() -> Self {
        MapLookups {
            flow: Cell::new(ptr::null_mut()),
            looked_up_port: Cell::new(NO_PORT),
            protected_entry: Cell::new(0),
        }
    }

    /// The port's `PROTECTED_PORTS` entry (protocol bits and counter slot),
    /// looked up once per frame and port.
    #[inline(always)]
    pub fn protected_entry(&self, port: u16) -> u32 {
        let port = u32::from(port);
        if self.looked_up_port.get() != port {
            let entry = PROTECTED_PORTS.get(port).copied().unwrap_or(0);
            self.looked_up_port.set(port);
            self.protected_entry.set(entry);
        }
        self.protected_entry.get()
    }

    /// The flow entry `flow` found, to update in place.
    #[inline(always)]
    pub fn found_flow(&self) -> Option<*mut FlowValue> {
        let found = self.flow.get();
        (!found.is_null()).then_some(found)
    }
}

#[inline(always)]
fn v4_octets(addr: &Address) -> [u8; 4] {
    [addr.bytes[0], addr.bytes[1], addr.bytes[2], addr.bytes[3]]
}

impl GateLookups for MapLookups {
    #[inline(always)]
    fn is_protected(&self, protocol: u8, port: u16) -> bool {
        self.protected_entry(port) & protected::bit_for(protocol) != 0
    }

    #[inline(always)]
    fn exact_grant(&self, src: &Address, protocol: u8, port: u16) -> Option<GrantValue> {
        // A clear bit: no exact grant for the source, no hash lookup. No
        // shape (a fresh or tampered map): look every source up.
        let shape = SOURCE_FILTER
            .get(source_filter::SHAPE_WORD)
            .and_then(|word| Shape::decode(*word));
        if let Some(shape) = shape {
            let bit = shape.bit(source_filter::hash(&src.bytes, src.family));
            let word = SOURCE_FILTER.get(shape.word_index(bit)).copied()?;
            if word & source_filter::mask(bit) == 0 {
                return None;
            }
        }
        // SAFETY: the maps are not preallocated: a found entry is never reused.
        if src.family == family::V4 {
            let key = GrantKeyV4::new(v4_octets(src), protocol, port);
            unsafe { GRANTS_V4.get(key) }.copied()
        } else {
            let key = GrantKeyV6::new(src.bytes, protocol, port);
            unsafe { GRANTS_V6.get(key) }.copied()
        }
    }

    #[inline(always)]
    fn has_cidr_grants(&self, family: u8) -> bool {
        CONFIG.get(0).is_some_and(|c| {
            if family == family::V4 {
                c.cidr_v4_entries != 0
            } else {
                c.cidr_v6_entries != 0
            }
        })
    }

    #[inline(always)]
    fn cidr_grant(&self, src: &Address, protocol: u8, port: u16) -> Option<GrantValue> {
        if src.family == family::V4 {
            let key = Key::new(
                CIDR_KEY_FIXED_BITS + 32,
                cidr_data(protocol, port, &v4_octets(src)),
            );
            CIDR_GRANTS_V4.get(&key).copied()
        } else {
            let key = Key::new(
                CIDR_KEY_FIXED_BITS + 128,
                cidr_data(protocol, port, &src.bytes),
            );
            CIDR_GRANTS_V6.get(&key).copied()
        }
    }

    #[inline(always)]
    fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        let found = FLOWS.get_ptr_mut(key)?;
        self.flow.set(found);
        // SAFETY: a pointer to a live entry of a non-preallocated map.
        Some(unsafe { *found })
    }

    #[inline(always)]
    fn half_open_timeout_ns(&self) -> u64 {
        CONFIG
            .get(0)
            .map_or(defaults::HALF_OPEN_TIMEOUT_NS, |c| c.half_open_timeout_ns)
    }
}
