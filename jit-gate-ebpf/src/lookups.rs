//! `GateLookups` backed by the program's maps.

use aya_ebpf::maps::lpm_trie::Key;
use jit_gate_common::{
    family,
    maps::{
        CIDR_KEY_FIXED_BITS, FlowKey, GrantKeyV4, GrantKeyV6, GrantValue, cidr_data, protected,
    },
    verdict::{Address, GateLookups, Transport},
};

use crate::{CIDR_GRANTS_V4, CIDR_GRANTS_V6, CONFIG, FLOWS, GRANTS_V4, GRANTS_V6, PROTECTED_PORTS};

pub struct MapLookups;

#[inline(always)]
fn entry(value: Option<&GrantValue>) -> Option<(u64, u64)> {
    value.map(|v| (v.expires_at_boot_ns, v.grant_id))
}

#[inline(always)]
fn v4_octets(addr: &Address) -> [u8; 4] {
    [addr.bytes[0], addr.bytes[1], addr.bytes[2], addr.bytes[3]]
}

impl GateLookups for MapLookups {
    #[inline(always)]
    fn is_protected(&self, protocol: u8, port: u16) -> bool {
        PROTECTED_PORTS
            .get(port as u32)
            .is_some_and(|v| *v & protected::bit_for(protocol) != 0)
    }

    #[inline(always)]
    fn exact_grant(&self, src: &Address, protocol: u8, port: u16) -> Option<(u64, u64)> {
        if src.family == family::V4 {
            let key = GrantKeyV4::new(v4_octets(src), protocol, port);
            entry(unsafe { GRANTS_V4.get(&key) })
        } else {
            let key = GrantKeyV6::new(src.bytes, protocol, port);
            entry(unsafe { GRANTS_V6.get(&key) })
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
    fn cidr_grant(&self, src: &Address, protocol: u8, port: u16) -> Option<(u64, u64)> {
        if src.family == family::V4 {
            let key = Key::new(
                CIDR_KEY_FIXED_BITS + 32,
                cidr_data(protocol, port, &v4_octets(src)),
            );
            entry(CIDR_GRANTS_V4.get(&key))
        } else {
            let key = Key::new(
                CIDR_KEY_FIXED_BITS + 128,
                cidr_data(protocol, port, &src.bytes),
            );
            entry(CIDR_GRANTS_V6.get(&key))
        }
    }

    #[inline(always)]
    fn flow_tracked(&self, src: &Address, dst: &Address, transport: &Transport) -> bool {
        let key = FlowKey::of(src, dst, transport);
        unsafe { FLOWS.get(&key) }.is_some()
    }
}
