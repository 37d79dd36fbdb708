//! The agent's view of connections that already exist on the gated host:
//! sockets (`sock_diag`) and conntrack entries (ctnetlink), and their keys in
//! the XDP flow map. Used to seed the flow map and conntrack at start (so
//! turning the gate on never cuts an open session) and to terminate the
//! sessions of a revoked grant.
//!
//! Every function acts in the network namespace of the calling thread: each
//! call opens its own netlink socket, and a socket belongs to the namespace
//! of the thread that created it.

pub mod conntrack;
pub(crate) mod netlink;
pub mod sockets;

use std::{
    fmt, io,
    net::{IpAddr, SocketAddr},
};

use jit_gate_common::{family, maps::FlowKey, verdict::Transport};

use crate::net::{Protocol, map_address};

/// A connection to the gated host: `remote` is the peer, `local` the host's
/// own end (protected port). Both ends are of the same address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Connection {
    pub protocol: Protocol,
    pub remote: SocketAddr,
    pub local: SocketAddr,
}

impl Connection {
    /// Key of the XDP flow map for this connection's inbound packets
    /// (src = remote, dst = local), built exactly as the XDP program builds it.
    pub fn flow_key(&self) -> FlowKey {
        let transport = Transport {
            protocol: self.protocol.number(),
            src_port: self.remote.port(),
            dst_port: self.local.port(),
            // Not part of the key.
            tcp_flags: 0,
        };
        FlowKey::of(
            &map_address(self.remote.ip()),
            &map_address(self.local.ip()),
            &transport,
        )
    }

    /// The connection a flow-map key stands for; `None` for a key the XDP
    /// program would never build (unknown protocol or family, bytes set
    /// past an IPv4 address).
    pub fn from_flow_key(key: &FlowKey) -> Option<Connection> {
        let ip = |bytes: [u8; 16]| match (key.family, bytes) {
            (family::V4, [a, b, c, d, rest @ ..]) if rest == [0; 12] => {
                Some(IpAddr::from([a, b, c, d]))
            }
            (family::V6, bytes) => Some(IpAddr::from(bytes)),
            _ => None,
        };
        Some(Connection {
            protocol: Protocol::from_number(key.protocol)?,
            remote: SocketAddr::new(ip(key.src)?, key.src_port),
            local: SocketAddr::new(ip(key.dst)?, key.dst_port),
        })
    }
}

impl fmt::Display for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} -> {}", self.protocol, self.remote, self.local)
    }
}

/// An IPv4 peer of an IPv6 socket appears as `::ffff:a.b.c.d`; on the wire
/// (and so in the flow map and in conntrack) it is plain IPv4.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// What a function of this module was doing when it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    ListSockets,
    DestroySocket(Connection),
    ListConntrack,
    DeleteConntrack(Connection),
    CreateConntrack(Connection),
    /// Listing the namespace's network interfaces (rtnetlink).
    ListLinks,
    /// Removing an XDP program that is not the gate's from an interface.
    DetachXdp {
        ifindex: u32,
    },
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operation::ListSockets => f.write_str("listing sockets (sock_diag)"),
            Operation::DestroySocket(c) => write!(f, "destroying the socket of {c} (sock_diag)"),
            Operation::ListConntrack => f.write_str("listing conntrack entries (ctnetlink)"),
            Operation::DeleteConntrack(c) => {
                write!(f, "deleting the conntrack entry of {c} (ctnetlink)")
            }
            Operation::CreateConntrack(c) => {
                write!(f, "creating a conntrack entry for {c} (ctnetlink)")
            }
            Operation::ListLinks => f.write_str("listing network interfaces (rtnetlink)"),
            Operation::DetachXdp { ifindex } => {
                write!(
                    f,
                    "removing the XDP program of interface {ifindex} (rtnetlink)"
                )
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FlowsError {
    /// Opening the netlink socket, sending or receiving failed.
    #[error("{op}: netlink {step}: {source}")]
    Socket {
        op: Operation,
        step: &'static str,
        source: io::Error,
    },
    /// The kernel answered with an error; `source.raw_os_error()` is the errno.
    #[error("{op}: the kernel answered: {source}")]
    Kernel { op: Operation, source: io::Error },
    /// A reply that does not parse or that the protocol does not allow.
    #[error("{op}: bad netlink reply: {detail}")]
    Reply { op: Operation, detail: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(protocol: Protocol, remote: &str, local: &str) -> Connection {
        Connection {
            protocol,
            remote: remote.parse().unwrap(),
            local: local.parse().unwrap(),
        }
    }

    #[test]
    fn flow_key_has_the_layout_the_program_builds() {
        let c = conn(Protocol::Tcp, "192.0.2.2:40000", "192.0.2.1:22");
        let key = c.flow_key();
        assert_eq!(key.family, family::V4);
        assert_eq!(key.protocol, 6);
        assert_eq!(&key.src[..4], &[192, 0, 2, 2]);
        assert_eq!(&key.src[4..], &[0; 12]);
        assert_eq!(&key.dst[..4], &[192, 0, 2, 1]);
        // Host byte order, as parse.rs stores them.
        assert_eq!((key.src_port, key.dst_port), (40000, 22));
    }

    #[test]
    fn flow_key_round_trips() {
        for c in [
            conn(Protocol::Tcp, "192.0.2.2:40000", "192.0.2.1:22"),
            conn(Protocol::Udp, "[2001:db8::2]:5000", "[2001:db8::1]:514"),
        ] {
            assert_eq!(Connection::from_flow_key(&c.flow_key()), Some(c));
        }
    }

    #[test]
    fn from_flow_key_rejects_keys_the_program_never_builds() {
        let good = conn(Protocol::Tcp, "192.0.2.2:40000", "192.0.2.1:22").flow_key();
        let mut bad_family = good;
        bad_family.family = 0;
        let mut bad_protocol = good;
        bad_protocol.protocol = 1;
        let mut v4_tail = good;
        v4_tail.dst[15] = 1;
        for key in [bad_family, bad_protocol, v4_tail] {
            assert_eq!(Connection::from_flow_key(&key), None, "{key:?}");
        }
    }

    #[test]
    fn unmap_turns_v4_mapped_into_v4_only() {
        let mapped: SocketAddr = "[::ffff:192.0.2.2]:40000".parse().unwrap();
        assert_eq!(unmap(mapped), "192.0.2.2:40000".parse().unwrap());
        let v6: SocketAddr = "[2001:db8::2]:1".parse().unwrap();
        assert_eq!(unmap(v6), v6);
        // IPv4-compatible (deprecated ::a.b.c.d) addresses are real IPv6.
        let compatible: SocketAddr = "[::192.0.2.2]:1".parse().unwrap();
        assert_eq!(unmap(compatible), compatible);
    }
}
