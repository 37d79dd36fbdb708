//! Reading the grant maps back, from the gate itself or from a second
//! handle (`GrantReader`, the maps' descriptors duplicated, so it reads the
//! very maps the gate writes whatever happens to their pins) that
//! reconciliation moves to another thread while the engine goes on. The
//! exact-grant hash maps are read in batches: `BPF_MAP_LOOKUP_BATCH` walks
//! the hash buckets, a few thousand entries a system call, and a
//! concurrent deletion neither restarts nor stalls it (walking by key
//! starts over from the first bucket whenever the key it stands on is
//! deleted). The tries (at most 65,536 prefixes) are read key by key.

use std::{
    mem::{MaybeUninit, size_of},
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
};

use aya::{
    Pod,
    maps::{IterableMap, LpmTrie, Map, MapData, MapError, lpm_trie::Key},
    sys::SyscallError,
};
use ipnet::IpNet;
use jit_gate_common::maps::{
    CIDR_KEY_FIXED_BITS, CidrDataV4, CidrDataV6, GrantKeyV4, GrantKeyV6, GrantValue, names,
};

use super::{GrantEntry, GrantLimits, Result, XdpGate, map_err};
use crate::net::{GrantTarget, Protocol};

/// `BPF_MAP_LOOKUP_BATCH` (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per call; a bucket never holds this many.
const BATCH_ENTRIES: usize = 4096;

/// The four grant maps, borrowed from the gate or owned by a reader.
struct GrantMaps<'a> {
    exact_v4: &'a MapData,
    exact_v6: &'a MapData,
    cidr_v4: &'a LpmTrie<MapData, CidrDataV4, GrantValue>,
    cidr_v6: &'a LpmTrie<MapData, CidrDataV6, GrantValue>,
}

/// The grant maps on duplicated descriptors, to read on another thread.
pub struct GrantReader {
    exact_v4: MapData,
    exact_v6: MapData,
    cidr_v4: LpmTrie<MapData, CidrDataV4, GrantValue>,
    cidr_v6: LpmTrie<MapData, CidrDataV6, GrantValue>,
}

impl GrantReader {
    /// Calls `each` with every grant entry in the kernel, as it is read.
    pub fn for_each_entry(&self, each: impl FnMut(GrantEntry)) -> Result<()> {
        for_each_entry(
            &GrantMaps {
                exact_v4: &self.exact_v4,
                exact_v6: &self.exact_v6,
                cidr_v4: &self.cidr_v4,
                cidr_v6: &self.cidr_v6,
            },
            each,
        )
    }
}

impl XdpGate {
    /// Every grant entry in the kernel.
    pub fn grants(&self) -> Result<Vec<GrantEntry>> {
        let mut out = Vec::new();
        for_each_entry(
            &GrantMaps {
                exact_v4: self.maps.grants_v4.map(),
                exact_v6: self.maps.grants_v6.map(),
                cidr_v4: &self.maps.cidr_v4,
                cidr_v6: &self.maps.cidr_v6,
            },
            |entry| out.push(entry),
        )?;
        Ok(out)
    }

    /// A second handle on the grant maps, for reading them elsewhere.
    pub fn grant_reader(&self) -> Result<GrantReader> {
        Ok(GrantReader {
            exact_v4: duplicate(self.maps.grants_v4.map(), names::GRANTS_V4)?,
            exact_v6: duplicate(self.maps.grants_v6.map(), names::GRANTS_V6)?,
            cidr_v4: duplicate_trie(self.maps.cidr_v4.map(), names::CIDR_GRANTS_V4)?,
            cidr_v6: duplicate_trie(self.maps.cidr_v6.map(), names::CIDR_GRANTS_V6)?,
        })
    }
}

fn duplicate(map: &MapData, name: &'static str) -> Result<MapData> {
    let fd = map.fd().as_fd().try_clone_to_owned().map_err(|io_error| {
        map_err(name)(MapError::SyscallError(SyscallError {
            call: "dup",
            io_error,
        }))
    })?;
    MapData::from_fd(fd).map_err(map_err(name))
}

fn duplicate_trie<K: Pod>(
    map: &MapData,
    name: &'static str,
) -> Result<LpmTrie<MapData, K, GrantValue>> {
    LpmTrie::try_from(Map::LpmTrie(duplicate(map, name)?)).map_err(map_err(name))
}

fn for_each_entry(maps: &GrantMaps<'_>, mut each: impl FnMut(GrantEntry)) -> Result<()> {
    let mut entry = |source: IpNet, protocol: u8, port: u16, value: GrantValue| {
        if let Some(protocol) = Protocol::from_number(protocol) {
            each(GrantEntry {
                target: GrantTarget {
                    source,
                    protocol,
                    port,
                },
                expires_at_boot_ns: value.expires_at_boot_ns,
                grant_id: value.grant_id,
                limits: GrantLimits {
                    flow_quota: value.flow_quota,
                    max_opens: value.max_opens,
                },
            });
        }
    };
    lookup_batches::<GrantKeyV4>(maps.exact_v4, names::GRANTS_V4, |k, v| {
        entry(IpAddr::from(k.addr).into(), k.protocol, k.port, v);
    })?;
    lookup_batches::<GrantKeyV6>(maps.exact_v6, names::GRANTS_V6, |k, v| {
        entry(IpAddr::from(k.addr).into(), k.protocol, k.port, v);
    })?;
    for item in maps.cidr_v4 {
        let (k, v) = item.map_err(map_err(names::CIDR_GRANTS_V4))?;
        let (protocol, port, addr, len) = split_cidr_key::<7, 4>(&k);
        let source = IpNet::new(IpAddr::from(addr), len).expect("trie prefix fits the family");
        entry(source, protocol, port, v);
    }
    for item in maps.cidr_v6 {
        let (k, v) = item.map_err(map_err(names::CIDR_GRANTS_V6))?;
        let (protocol, port, addr, len) = split_cidr_key::<19, 16>(&k);
        let source = IpNet::new(IpAddr::from(addr), len).expect("trie prefix fits the family");
        entry(source, protocol, port, v);
    }
    Ok(())
}

/// (protocol, port, address, prefix length) from an LPM key.
fn split_cidr_key<const N: usize, const A: usize>(key: &Key<[u8; N]>) -> (u8, u16, [u8; A], u8)
where
    [u8; A]: Into<IpAddr>,
{
    let data = key.data();
    let mut addr = [0u8; A];
    addr.copy_from_slice(&data[3..3 + A]);
    let len = (key.prefix_len() - CIDR_KEY_FIXED_BITS) as u8;
    (data[0], u16::from_be_bytes([data[1], data[2]]), addr, len)
}

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Calls `each` with every (key, grant value) of the hash map `map`.
pub(super) fn lookup_batches<K: Pod>(
    map: &MapData,
    name: &'static str,
    mut each: impl FnMut(K, GrantValue),
) -> Result<()> {
    let mut keys: Vec<MaybeUninit<K>> = Vec::with_capacity(BATCH_ENTRIES);
    let mut values: Vec<MaybeUninit<GrantValue>> = Vec::with_capacity(BATCH_ENTRIES);
    // The hash map's position token: a bucket index (u32), with room to
    // spare.
    let (mut position, mut next) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                (&raw const position) as u64
            },
            out_batch: (&raw mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH_ENTRIES as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the attribute points at buffers of `count` keys and
        // values of the map's sizes (checked when the map was typed) and at
        // two tokens, all alive for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let error = (rc < 0).then(std::io::Error::last_os_error);
        let read = (attr.count as usize).min(BATCH_ENTRIES);
        for i in 0..read {
            // SAFETY: the kernel wrote `count` keys and values; both types
            // are plain data.
            let (key, value) = unsafe {
                (
                    keys.as_ptr().add(i).read().assume_init(),
                    values.as_ptr().add(i).read().assume_init(),
                )
            };
            each(key, value);
        }
        match error {
            None => {}
            // The walk is complete.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Some(io_error) => {
                return Err(map_err(name)(MapError::SyscallError(SyscallError {
                    call: "bpf_map_lookup_batch",
                    io_error,
                })));
            }
        }
        position = next;
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_attribute_matches_the_kernel_layout() {
        // struct { __aligned_u64 in_batch, out_batch, keys, values;
        //          __u32 count, map_fd; __u64 elem_flags, flags; } batch;
        assert_eq!(size_of::<BatchAttr>(), 56);
        assert_eq!(std::mem::offset_of!(BatchAttr, count), 32);
        assert_eq!(std::mem::offset_of!(BatchAttr, elem_flags), 40);
    }

    #[test]
    fn cidr_keys_split_into_protocol_port_address_and_length() {
        let data = jit_gate_common::maps::cidr_data(6, 22, &[198, 51, 100, 0]);
        let key = Key::new(CIDR_KEY_FIXED_BITS + 24, data);
        assert_eq!(split_cidr_key::<7, 4>(&key), (6, 22, [198, 51, 100, 0], 24));
    }
}
