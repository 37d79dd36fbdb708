//! The grant maps: exact entries (hash maps) and CIDR entries (LPM tries),
//! written with their flow limits and removed (`reader` reads them back).

use aya::maps::lpm_trie::Key;
use ipnet::IpNet;
use jit_gate_common::{
    family,
    maps::{
        CIDR_KEY_FIXED_BITS, CidrDataV4, CidrDataV6, GrantKeyV4, GrantKeyV6, GrantValue, cidr_data,
        names,
    },
};

use super::{GrantLimits, Result, XdpGate, existed, map_err};
use crate::net::GrantTarget;

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
