//! The grant maps: exact entries (hash maps) and CIDR entries (LPM tries),
//! written with their flow limits, removed, and read back.

use std::net::IpAddr;

use aya::maps::lpm_trie::Key;
use ipnet::IpNet;
use jit_gate_common::{
    family,
    maps::{
        CIDR_KEY_FIXED_BITS, CidrDataV4, CidrDataV6, GrantKeyV4, GrantKeyV6, GrantValue, cidr_data,
        names,
    },
};

use super::{GrantEntry, GrantLimits, Result, XdpGate, existed, map_err};
use crate::net::{GrantTarget, Protocol};

impl XdpGate {
    /// Writes the kernel entry for `target`: live until `expires_at_boot_ns`,
    /// with the configured flow quota and no limit on opens.
    pub fn upsert_grant(
        &mut self,
        target: &GrantTarget,
        expires_at_boot_ns: u64,
        grant_id: u64,
    ) -> Result<()> {
        self.upsert_grant_opening_at_most(target, expires_at_boot_ns, grant_id, 0)
    }

    /// Writes the kernel entry for `target` with the configured flow quota:
    /// at most `max_opens` connections opened under `grant_id` in all
    /// (0: no limit). The kernel counts them per grant id, so rewriting the
    /// entry of the same grant keeps the count.
    pub fn upsert_grant_opening_at_most(
        &mut self,
        target: &GrantTarget,
        expires_at_boot_ns: u64,
        grant_id: u64,
        max_opens: u32,
    ) -> Result<()> {
        let limits = GrantLimits {
            flow_quota: self.options.flow_quota,
            max_opens,
        };
        self.upsert_grant_with_limits(target, expires_at_boot_ns, grant_id, limits)
    }

    /// Writes the kernel entry for `target` with explicit flow limits.
    pub fn upsert_grant_with_limits(
        &mut self,
        target: &GrantTarget,
        expires_at_boot_ns: u64,
        grant_id: u64,
        limits: GrantLimits,
    ) -> Result<()> {
        let value = GrantValue {
            expires_at_boot_ns,
            grant_id,
            flow_quota: limits.flow_quota,
            max_opens: limits.max_opens,
        };
        let (protocol, port) = (target.protocol.number(), target.port);
        if target.is_exact() {
            // Before the entry: the program looks a source up only if its
            // bit is set.
            self.admit_source(target.source.addr())?;
        }
        match (target.source, target.is_exact()) {
            (IpNet::V4(net), true) => self
                .maps
                .grants_v4
                .insert(
                    GrantKeyV4::new(net.addr().octets(), protocol, port),
                    value,
                    0,
                )
                .map_err(map_err(names::GRANTS_V4)),
            (IpNet::V6(net), true) => self
                .maps
                .grants_v6
                .insert(
                    GrantKeyV6::new(net.addr().octets(), protocol, port),
                    value,
                    0,
                )
                .map_err(map_err(names::GRANTS_V6)),
            (IpNet::V4(net), false) => {
                let key = cidr_key_v4(target, net);
                let trie = &mut self.maps.cidr_v4;
                let added = trie.get(&key, 0).is_err();
                trie.insert(&key, value, 0)
                    .map_err(map_err(names::CIDR_GRANTS_V4))?;
                if added {
                    self.adjust_cidr_count(family::V4, 1)?;
                }
                Ok(())
            }
            (IpNet::V6(net), false) => {
                let key = cidr_key_v6(target, net);
                let trie = &mut self.maps.cidr_v6;
                let added = trie.get(&key, 0).is_err();
                trie.insert(&key, value, 0)
                    .map_err(map_err(names::CIDR_GRANTS_V6))?;
                if added {
                    self.adjust_cidr_count(family::V6, 1)?;
                }
                Ok(())
            }
        }
    }

    /// Removes the kernel entry for `target`; returns whether one existed.
    pub fn remove_grant(&mut self, target: &GrantTarget) -> Result<bool> {
        let (protocol, port) = (target.protocol.number(), target.port);
        let removed = match (target.source, target.is_exact()) {
            (IpNet::V4(net), true) => {
                self.maps
                    .grants_v4
                    .remove(&GrantKeyV4::new(net.addr().octets(), protocol, port))
            }
            (IpNet::V6(net), true) => {
                self.maps
                    .grants_v6
                    .remove(&GrantKeyV6::new(net.addr().octets(), protocol, port))
            }
            (IpNet::V4(net), false) => {
                let removed = self.maps.cidr_v4.remove(&cidr_key_v4(target, net));
                if removed.is_ok() {
                    self.adjust_cidr_count(family::V4, -1)?;
                }
                removed
            }
            (IpNet::V6(net), false) => {
                let removed = self.maps.cidr_v6.remove(&cidr_key_v6(target, net));
                if removed.is_ok() {
                    self.adjust_cidr_count(family::V6, -1)?;
                }
                removed
            }
        };
        let existed = existed(removed).map_err(map_err("grants"))?;
        if existed && target.is_exact() {
            self.source_removed()?;
        }
        Ok(existed)
    }

    /// Every grant entry in the kernel.
    pub fn grants(&self) -> Result<Vec<GrantEntry>> {
        let mut out = Vec::new();
        let entry = |source: IpNet, protocol: u8, port: u16, value: GrantValue| {
            Protocol::from_number(protocol).map(|protocol| GrantEntry {
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
            })
        };
        for item in &self.maps.grants_v4 {
            let (k, v) = item.map_err(map_err(names::GRANTS_V4))?;
            let source = IpNet::from(IpAddr::from(k.addr));
            out.extend(entry(source, k.protocol, k.port, v));
        }
        for item in &self.maps.grants_v6 {
            let (k, v) = item.map_err(map_err(names::GRANTS_V6))?;
            let source = IpNet::from(IpAddr::from(k.addr));
            out.extend(entry(source, k.protocol, k.port, v));
        }
        for item in &self.maps.cidr_v4 {
            let (k, v) = item.map_err(map_err(names::CIDR_GRANTS_V4))?;
            let (protocol, port, addr, len) = split_cidr_key::<7, 4>(&k);
            let source = IpNet::new(IpAddr::from(addr), len).expect("trie prefix fits the family");
            out.extend(entry(source, protocol, port, v));
        }
        for item in &self.maps.cidr_v6 {
            let (k, v) = item.map_err(map_err(names::CIDR_GRANTS_V6))?;
            let (protocol, port, addr, len) = split_cidr_key::<19, 16>(&k);
            let source = IpNet::new(IpAddr::from(addr), len).expect("trie prefix fits the family");
            out.extend(entry(source, protocol, port, v));
        }
        Ok(out)
    }

    fn adjust_cidr_count(&mut self, fam: u8, delta: i64) -> Result<()> {
        let mut config = self.config()?;
        let count = if fam == family::V4 {
            &mut config.cidr_v4_entries
        } else {
            &mut config.cidr_v6_entries
        };
        *count = (i64::from(*count) + delta).max(0) as u32;
        self.set_config(config)
    }
}

fn cidr_key_v4(target: &GrantTarget, net: ipnet::Ipv4Net) -> Key<CidrDataV4> {
    let data = cidr_data(
        target.protocol.number(),
        target.port,
        &net.network().octets(),
    );
    Key::new(CIDR_KEY_FIXED_BITS + u32::from(net.prefix_len()), data)
}

fn cidr_key_v6(target: &GrantTarget, net: ipnet::Ipv6Net) -> Key<CidrDataV6> {
    let data = cidr_data(
        target.protocol.number(),
        target.port,
        &net.network().octets(),
    );
    Key::new(CIDR_KEY_FIXED_BITS + u32::from(net.prefix_len()), data)
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
