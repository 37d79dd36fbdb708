//! Conntrack entries of inbound connections, through ctnetlink
//! (`NETLINK_NETFILTER`, subsystem CTNETLINK): listing them, creating one for
//! a connection conntrack has not seen, and deleting one.
//!
//! The original tuple is used throughout: it is the direction of the
//! connection's first packet, and the addresses the XDP program sees (before
//! any NAT rewrites them).

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple,
        Protocol as CtProtocol, Status, Tuple,
    },
};
use netlink_sys::protocols::NETLINK_NETFILTER;

use super::{Connection, FlowsError, Operation, netlink};
use crate::net::Protocol;

/// nfgenmsg version of every ctnetlink message.
const NFNETLINK_V0: u8 = 0;
/// States of the kernel's `enum tcp_conntrack`.
const TCP_CONNTRACK_ESTABLISHED: u8 = 3;
const TCP_CONNTRACK_TIME_WAIT: u8 = 7;
const TCP_CONNTRACK_CLOSE: u8 = 8;
/// Timeouts of a created entry, in seconds: the kernel's defaults for an
/// established TCP connection and an assured UDP stream (each packet
/// refreshes them).
const TCP_ESTABLISHED_TIMEOUT: u32 = 5 * 24 * 3600;
const UDP_STREAM_TIMEOUT: u32 = 120;

/// Entries whose original direction goes from a remote peer to a port in
/// `ports` (original source = remote, original destination = local), except
/// TCP connections that have ended (`TIME_WAIT`, CLOSE), which conntrack keeps
/// for minutes. Where conntrack is not active in the namespace the table is
/// empty, and so is the result.
pub fn list(ports: &BTreeSet<(Protocol, u16)>) -> Result<Vec<Connection>, FlowsError> {
    // Unspecified family: one dump of the IPv4 and the IPv6 entries.
    let request = message(
        NetfilterProtoFamily::Unspec,
        ConntrackMessage::Get(Vec::new()),
    );
    let replies = netlink::dump(NETLINK_NETFILTER, Operation::ListConntrack, request)?;
    Ok(replies
        .iter()
        .filter_map(original_direction)
        .filter(|c| ports.contains(&(c.protocol, c.local.port())))
        .collect())
}

/// Deletes the entry of `conn`; `Ok(false)` if there is none.
pub fn delete(conn: &Connection) -> Result<bool, FlowsError> {
    let request = message(
        family(conn),
        ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(tuple(
            conn.protocol,
            conn.remote,
            conn.local,
        ))]),
    );
    netlink::acknowledge(
        NETLINK_NETFILTER,
        Operation::DeleteConntrack(*conn),
        request,
    )
}

/// Creates an entry for `conn` as an established connection seen both
/// ways, so that `ct state established` matches its next packets. Meant
/// for connections that predate conntrack in the namespace (it only tracks
/// once some rule needs it): their next packet would otherwise count as a
/// new connection. `Ok(false)` if conntrack already has an entry.
pub fn create(conn: &Connection) -> Result<bool, FlowsError> {
    let mut attributes = vec![
        ConntrackAttribute::CtaTupleOrig(tuple(conn.protocol, conn.remote, conn.local)),
        ConntrackAttribute::CtaTupleReply(tuple(conn.protocol, conn.local, conn.remote)),
        // The kernel confirms a created entry before applying the status,
        // and refuses one that would clear that bit (EBUSY).
        ConntrackAttribute::CtaStatus(Status::SeenReply | Status::Assured | Status::Confirmed),
    ];
    match conn.protocol {
        Protocol::Tcp => attributes.extend([
            ConntrackAttribute::CtaTimeout(TCP_ESTABLISHED_TIMEOUT),
            ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(vec![ProtoInfoTCP::State(
                TCP_CONNTRACK_ESTABLISHED,
            )])]),
        ]),
        Protocol::Udp => attributes.push(ConntrackAttribute::CtaTimeout(UDP_STREAM_TIMEOUT)),
    }
    let request = message(family(conn), ConntrackMessage::New(attributes));
    netlink::create(
        NETLINK_NETFILTER,
        Operation::CreateConntrack(*conn),
        request,
    )
}

fn family(conn: &Connection) -> NetfilterProtoFamily {
    if conn.remote.is_ipv4() {
        NetfilterProtoFamily::IPv4
    } else {
        NetfilterProtoFamily::IPv6
    }
}

/// The tuple of a packet from `src` to `dst`.
fn tuple(protocol: Protocol, src: SocketAddr, dst: SocketAddr) -> Vec<Tuple> {
    vec![
        Tuple::Ip(vec![
            IPTuple::SourceAddress(src.ip()),
            IPTuple::DestinationAddress(dst.ip()),
        ]),
        Tuple::Proto(vec![
            ProtoTuple::Protocol(CtProtocol::from(protocol.number())),
            ProtoTuple::SourcePort(src.port()),
            ProtoTuple::DestinationPort(dst.port()),
        ]),
    ]
}

/// Whether the entry is of a TCP connection in `TIME_WAIT` or CLOSE.
fn has_ended(attributes: &[ConntrackAttribute]) -> bool {
    attributes
        .iter()
        .filter_map(|a| match a {
            ConntrackAttribute::CtaProtoInfo(info) => Some(info),
            _ => None,
        })
        .flatten()
        .filter_map(|info| match info {
            ProtoInfo::TCP(tcp) => Some(tcp),
            _ => None,
        })
        .flatten()
        .any(|field| {
            matches!(
                field,
                ProtoInfoTCP::State(TCP_CONNTRACK_TIME_WAIT | TCP_CONNTRACK_CLOSE)
            )
        })
}

fn message(family: NetfilterProtoFamily, message: ConntrackMessage) -> NetfilterMessage {
    NetfilterMessage::new(NetfilterHeader::new(family, NFNETLINK_V0, 0), message)
}

/// The connection of an entry's original tuple; `None` for entries that are
/// not TCP or UDP, or of a TCP connection that has ended.
fn original_direction(reply: &NetfilterMessage) -> Option<Connection> {
    let NetfilterMessageInner::Conntrack(ConntrackMessage::New(attributes)) = &reply.inner else {
        return None;
    };
    if has_ended(attributes) {
        return None;
    }
    let tuple = attributes.iter().find_map(|a| match a {
        ConntrackAttribute::CtaTupleOrig(tuple) => Some(tuple),
        _ => None,
    })?;
    let (mut src, mut dst): (Option<IpAddr>, Option<IpAddr>) = (None, None);
    let (mut protocol, mut sport, mut dport) = (None, None, None);
    for part in tuple {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(fields) => {
                for field in fields {
                    match field {
                        ProtoTuple::Protocol(p) => protocol = Protocol::from_number((*p).into()),
                        ProtoTuple::SourcePort(p) => sport = Some(*p),
                        ProtoTuple::DestinationPort(p) => dport = Some(*p),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(Connection {
        protocol: protocol?,
        remote: SocketAddr::new(src?, sport?),
        local: SocketAddr::new(dst?, dport?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(state: Option<u8>) -> NetfilterMessage {
        let conn = Connection {
            protocol: Protocol::Tcp,
            remote: "192.0.2.2:40000".parse().unwrap(),
            local: "192.0.2.1:22".parse().unwrap(),
        };
        let mut attributes = vec![ConntrackAttribute::CtaTupleOrig(tuple(
            conn.protocol,
            conn.remote,
            conn.local,
        ))];
        attributes.extend(state.map(|state| {
            ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(vec![ProtoInfoTCP::State(state)])])
        }));
        message(family(&conn), ConntrackMessage::New(attributes))
    }

    #[test]
    fn ended_tcp_entries_are_not_connections() {
        for state in [
            None,
            Some(TCP_CONNTRACK_ESTABLISHED),
            Some(5 /* CLOSE_WAIT */),
        ] {
            let conn = original_direction(&entry(state)).expect("a connection");
            assert_eq!(conn.local.port(), 22, "{state:?}");
        }
        for state in [TCP_CONNTRACK_TIME_WAIT, TCP_CONNTRACK_CLOSE] {
            assert_eq!(original_direction(&entry(Some(state))), None, "{state}");
        }
    }
}
