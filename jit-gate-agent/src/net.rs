//! Small network vocabulary shared by the control plane and the enforcers.

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;
use jit_gate_common::{ip_proto, verdict::Address};

/// An address as the XDP maps carry it.
pub fn map_address(ip: IpAddr) -> Address {
    match ip {
        IpAddr::V4(v4) => Address::v4(v4.octets()),
        IpAddr::V6(v6) => Address::v6(v6.octets()),
    }
}

/// A transport protocol the gate can protect.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => ip_proto::TCP,
            Protocol::Udp => ip_proto::UDP,
        }
    }

    pub const fn from_number(n: u8) -> Option<Protocol> {
        match n {
            ip_proto::TCP => Some(Protocol::Tcp),
            ip_proto::UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown protocol {0:?} (expected \"tcp\" or \"udp\")")]
pub struct UnknownProtocol(String);

impl FromStr for Protocol {
    type Err = UnknownProtocol;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(UnknownProtocol(s.to_owned())),
        }
    }
}

/// What a grant opens: a source address or prefix, to one (protocol, port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrantTarget {
    pub source: IpNet,
    pub protocol: Protocol,
    pub port: u16,
}

impl GrantTarget {
    /// Whether the source is a single address (kept in the exact-match maps).
    pub fn is_exact(&self) -> bool {
        self.source.prefix_len() == self.source.max_prefix_len()
    }
}

impl fmt::Display for GrantTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}/{}", self.source, self.port, self.protocol)
    }
}
