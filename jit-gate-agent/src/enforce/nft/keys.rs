//! The sets of the gate's table, their names and the byte layout of their
//! keys. Keys follow nftables' concatenation layout: each field starts on a
//! 4-byte register boundary and is zero-padded up to the next one, so the
//! kernel can compare them with what the rules load into consecutive
//! registers.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::shards::SHARDS;
use crate::net::{GrantTarget, Protocol};

/// Name of the set of protected (protocol . port).
pub(super) const PROTECTED_SET: &str = "protected";

/// nftables datatype numbers (nft's `enum datatypes`). The kernel ignores
/// them; they only let `nft list ruleset` print the keys legibly.
mod datatype {
    pub(super) const IPADDR: u32 = 7;
    pub(super) const IP6ADDR: u32 = 8;
    pub(super) const INET_PROTOCOL: u32 = 12;
    pub(super) const INET_SERVICE: u32 = 13;
    pub(super) const MARK: u32 = 19;
}

/// nft's encoding of a concatenated type: 6 bits per field, first field highest.
const fn concat(types: &[u32]) -> u32 {
    let mut packed = 0;
    let mut i = 0;
    while i < types.len() {
        packed = (packed << 6) | types[i];
        i += 1;
    }
    packed
}

/// Length of the (protocol . port) part of a key: two padded registers.
const SERVICE_LEN: usize = 8;

pub(super) const PROTECTED_KEY_TYPE: u32 =
    concat(&[datatype::INET_PROTOCOL, datatype::INET_SERVICE]);
pub(super) const PROTECTED_KEY_LEN: u32 = SERVICE_LEN as u32;

/// Key of a dispatch map: the shard number the hash leaves in a register,
/// in host byte order (nft prints it as a mark).
pub(super) const SHARD_KEY_TYPE: u32 = datatype::MARK;
pub(super) const SHARD_KEY_LEN: u32 = 4;

/// `protocol . port`: the protocol number in the first register, the port
/// in network byte order at the start of the second.
pub(super) fn service_key(protocol: Protocol, port: u16) -> [u8; SERVICE_LEN] {
    let [hi, lo] = port.to_be_bytes();
    [protocol.number(), 0, 0, 0, hi, lo, 0, 0]
}

pub(super) fn parse_service_key(key: &[u8]) -> Option<(Protocol, u16)> {
    match *key {
        [number, 0, 0, 0, hi, lo, 0, 0] => {
            Some((Protocol::from_number(number)?, u16::from_be_bytes([hi, lo])))
        }
        _ => None,
    }
}

/// Address family of an allow set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Family {
    V4,
    V6,
}

impl Family {
    pub(super) fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub(super) const fn addr_len(self) -> usize {
        match self {
            Family::V4 => 4,
            Family::V6 => 16,
        }
    }

    /// The `meta nfproto` value of packets of this family.
    pub(super) const fn nfproto(self) -> u8 {
        match self {
            Family::V4 => libc::NFPROTO_IPV4 as u8,
            Family::V6 => libc::NFPROTO_IPV6 as u8,
        }
    }

    const fn datatype(self) -> u32 {
        match self {
            Family::V4 => datatype::IPADDR,
            Family::V6 => datatype::IP6ADDR,
        }
    }

    const fn tag(self) -> &'static str {
        match self {
            Family::V4 => "v4",
            Family::V6 => "v6",
        }
    }

    /// The all-zero address of this family.
    pub(super) fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }

    fn addr(self, octets: &[u8]) -> Option<IpAddr> {
        Some(match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(octets).ok()?)),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(octets).ok()?)),
        })
    }
}

/// One allow group: the live grants of one family and source prefix
/// length, keyed by `masked source . protocol . port` and spread over
/// `SHARDS` shard sets by a hash of the key. One group per prefix length
/// lets prefixes of any lengths overlap, which interval sets forbid.
///
/// Names: the group's dispatch map is `allow_v4_24`; shard `k` is the set
/// and the chain `allow_v4_24_<k>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct AllowSet {
    pub family: Family,
    pub prefix_len: u8,
}

const ALLOW_PREFIX: &str = "allow_";

impl AllowSet {
    /// The set holding `target`.
    pub(super) fn of(target: &GrantTarget) -> Self {
        AllowSet {
            family: Family::of(target.source.addr()),
            prefix_len: target.source.prefix_len(),
        }
    }

    /// `allow_v4_24`, `allow_v6_128`, …: the name of the dispatch map.
    pub(super) fn name(self) -> String {
        format!("{ALLOW_PREFIX}{}_{}", self.family.tag(), self.prefix_len)
    }

    /// `allow_v4_24_7`: the name of shard set (and chain) `shard`.
    pub(super) fn shard_name(self, shard: u32) -> String {
        format!("{}_{shard}", self.name())
    }

    /// The group and shard a shard set's name stands for.
    pub(super) fn parse_shard_name(name: &str) -> Option<(Self, u32)> {
        let (group, shard) = name.rsplit_once('_')?;
        let shard: u32 = shard.parse().ok()?;
        // One spelling per number: `07` is not shard 7.
        (shard < SHARDS && shard.to_string() == name[group.len() + 1..])
            .then_some(())
            .and(Self::parse_name(group).map(|set| (set, shard)))
    }

    pub(super) fn parse_name(name: &str) -> Option<Self> {
        let (tag, len) = name.strip_prefix(ALLOW_PREFIX)?.split_once('_')?;
        let family = [Family::V4, Family::V6]
            .into_iter()
            .find(|f| f.tag() == tag)?;
        let prefix_len: u8 = len.parse().ok()?;
        (usize::from(prefix_len) <= family.addr_len() * 8)
            .then_some(AllowSet { family, prefix_len })
    }

    pub(super) fn key_type(self) -> u32 {
        concat(&[
            self.family.datatype(),
            datatype::INET_PROTOCOL,
            datatype::INET_SERVICE,
        ])
    }

    pub(super) fn key_len(self) -> u32 {
        (self.family.addr_len() + SERVICE_LEN) as u32
    }

    /// The mask the rule applies to the source address before the lookup.
    pub(super) fn netmask(self) -> IpAddr {
        IpNet::new(self.family.unspecified(), self.prefix_len)
            .expect("prefix length checked against the family")
            .netmask()
    }

    /// `target`'s key in this set (its source masked to the prefix).
    pub(super) fn key(target: &GrantTarget) -> Vec<u8> {
        let mut key = match target.source.network() {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        key.extend_from_slice(&service_key(target.protocol, target.port));
        key
    }

    /// The target a key of this set stands for; `None` if the key does not
    /// have this set's layout or carries bits outside the prefix.
    pub(super) fn parse_key(self, key: &[u8]) -> Option<GrantTarget> {
        let (addr, service) = key.split_at_checked(self.family.addr_len())?;
        let source = IpNet::new(self.family.addr(addr)?, self.prefix_len).ok()?;
        let (protocol, port) = parse_service_key(service)?;
        (source.trunc() == source).then_some(GrantTarget {
            source,
            protocol,
            port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(source: &str, protocol: Protocol, port: u16) -> GrantTarget {
        GrantTarget {
            source: source.parse().unwrap(),
            protocol,
            port,
        }
    }

    #[test]
    fn keys_use_nftables_concatenation_layout() {
        let t = target("10.1.2.3/24", Protocol::Tcp, 22);
        assert_eq!(
            AllowSet::key(&t),
            [10, 1, 2, 0, 6, 0, 0, 0, 0, 22, 0, 0],
            "masked address, protocol and port each in a padded register"
        );
        assert_eq!(AllowSet::of(&t).key_len(), 12);
        let v6 = target("2001:db8::1/128", Protocol::Udp, 3389);
        let key = AllowSet::key(&v6);
        assert_eq!(key.len(), 24);
        assert_eq!(&key[16..], [17, 0, 0, 0, 0x0d, 0x3d, 0, 0]);
    }

    #[test]
    fn keys_and_names_round_trip() {
        for t in [
            target("0.0.0.0/0", Protocol::Tcp, 22),
            target("192.0.2.0/25", Protocol::Udp, 514),
            target("192.0.2.7/32", Protocol::Tcp, 65535),
            target("2001:db8::/48", Protocol::Tcp, 5986),
            target("::/0", Protocol::Udp, 1),
        ] {
            let set = AllowSet::of(&t);
            assert_eq!(AllowSet::parse_name(&set.name()), Some(set));
            for shard in [0, 9, SHARDS - 1] {
                assert_eq!(
                    AllowSet::parse_shard_name(&set.shard_name(shard)),
                    Some((set, shard))
                );
            }
            assert_eq!(AllowSet::parse_shard_name(&set.name()), None);
            assert_eq!(AllowSet::parse_name(&set.shard_name(3)), None);
            assert_eq!(set.parse_key(&AllowSet::key(&t)), Some(t));
        }
    }

    #[test]
    fn malformed_names_and_keys_are_refused() {
        for name in [
            "allow_v4_33",
            "allow_v7_8",
            "allow_v6_",
            "protected",
            "allow_v4_-1",
        ] {
            assert_eq!(AllowSet::parse_name(name), None, "{name}");
        }
        for name in [
            "allow_v4_24_64",
            "allow_v4_24_07",
            "allow_v4_24_",
            "allow_v4_33_1",
        ] {
            assert_eq!(AllowSet::parse_shard_name(name), None, "{name}");
        }
        let set = AllowSet {
            family: Family::V4,
            prefix_len: 24,
        };
        // Host bits set, unknown protocol, wrong length.
        assert_eq!(set.parse_key(&[10, 0, 0, 1, 6, 0, 0, 0, 0, 22, 0, 0]), None);
        assert_eq!(set.parse_key(&[10, 0, 0, 0, 1, 0, 0, 0, 0, 22, 0, 0]), None);
        assert_eq!(set.parse_key(&[10, 0, 0, 0, 6, 0, 0, 0, 0, 22]), None);
    }

    #[test]
    fn types_and_masks_match_nft() {
        // What `nft add set … { type ipv4_addr . inet_proto . inet_service; }` sends.
        assert_eq!(
            AllowSet {
                family: Family::V4,
                prefix_len: 32
            }
            .key_type(),
            (0x7 << 12) | (0xc << 6) | 0xd
        );
        assert_eq!(PROTECTED_KEY_TYPE, (0xc << 6) | 0xd);
        assert_eq!(
            AllowSet {
                family: Family::V4,
                prefix_len: 20
            }
            .netmask(),
            "255.255.240.0".parse::<IpAddr>().unwrap()
        );
    }
}
