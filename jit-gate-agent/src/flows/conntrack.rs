//! Conntrack entries of inbound connections, through ctnetlink
//! (NETLINK_NETFILTER, subsystem CTNETLINK): listing them and deleting one.
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
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol as CtProtocol, Tuple,
    },
};
use netlink_sys::protocols::NETLINK_NETFILTER;

use super::{Connection, FlowsError, Operation, netlink};
use crate::net::Protocol;

/// nfgenmsg version of every ctnetlink message.
const NFNETLINK_V0: u8 = 0;

/// Entries whose original direction goes from a remote peer to a port in
/// `ports` (original source = remote, original destination = local). Where
/// conntrack is not active in the namespace the table is empty, and so is
/// the result.
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
    let family = if conn.remote.is_ipv4() {
        NetfilterProtoFamily::IPv4
    } else {
        NetfilterProtoFamily::IPv6
    };
    let tuple = vec![
        Tuple::Ip(vec![
            IPTuple::SourceAddress(conn.remote.ip()),
            IPTuple::DestinationAddress(conn.local.ip()),
        ]),
        Tuple::Proto(vec![
            ProtoTuple::Protocol(CtProtocol::from(conn.protocol.number())),
            ProtoTuple::SourcePort(conn.remote.port()),
            ProtoTuple::DestinationPort(conn.local.port()),
        ]),
    ];
    let request = message(
        family,
        ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(tuple)]),
    );
    netlink::acknowledge(
        NETLINK_NETFILTER,
        Operation::DeleteConntrack(*conn),
        request,
    )
}

fn message(family: NetfilterProtoFamily, message: ConntrackMessage) -> NetfilterMessage {
    NetfilterMessage::new(NetfilterHeader::new(family, NFNETLINK_V0, 0), message)
}

/// The connection of an entry's original tuple; `None` for entries that are
/// not TCP or UDP.
fn original_direction(reply: &NetfilterMessage) -> Option<Connection> {
    let NetfilterMessageInner::Conntrack(ConntrackMessage::New(attributes)) = &reply.inner else {
        return None;
    };
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
