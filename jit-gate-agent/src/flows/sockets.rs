//! The gated host's own sockets of inbound connections, through `sock_diag`
//! (`NETLINK_SOCK_DIAG)`: listing them, and destroying one (`SOCK_DESTROY`; a
//! TCP socket sends a reset to its peer).

use std::collections::BTreeSet;

use netlink_packet_sock_diag::{
    AF_INET, AF_INET6, SockDiagDestroy, SockDiagMessage,
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags},
};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

use super::{Connection, FlowsError, Operation, netlink, unmap};
use crate::net::Protocol;

/// Inbound TCP connections (every state but LISTEN, CLOSE and `TIME_WAIT`)
/// and connected UDP sockets whose local port is in `ports`, IPv4 and IPv6.
/// IPv4 peers of IPv6 sockets are reported as plain IPv4, as on the wire.
pub fn inbound(ports: &BTreeSet<(Protocol, u16)>) -> Result<Vec<Connection>, FlowsError> {
    let protocols: BTreeSet<Protocol> = ports.iter().map(|(protocol, _)| *protocol).collect();
    let mut connections = Vec::new();
    for protocol in protocols {
        for family in [AF_INET, AF_INET6] {
            connections.extend(
                sockets(Operation::ListSockets, protocol, family)?
                    .into_iter()
                    .map(|s| s.connection)
                    .filter(|c| ports.contains(&(c.protocol, c.local.port()))),
            );
        }
    }
    Ok(connections)
}

/// Destroys the local socket of `conn`; `Ok(false)` if there is none. For an
/// IPv4 connection this includes an IPv6 socket with the v4-mapped peer.
pub fn destroy(conn: &Connection) -> Result<bool, FlowsError> {
    let op = Operation::DestroySocket(*conn);
    let families: &[u8] = if conn.remote.is_ipv4() {
        &[AF_INET, AF_INET6]
    } else {
        &[AF_INET6]
    };
    let mut destroyed = false;
    for &family in families {
        for socket in sockets(op, conn.protocol, family)? {
            if socket.connection != *conn {
                continue;
            }
            // The kernel looks the socket up by its id and, without an exact
            // match, would fall back to the listener (TCP) or the unconnected
            // socket (UDP) of the port; the cookie from the dump rules that out.
            let request = SockDiagDestroy::new(SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: conn.protocol.number(),
                extensions: ExtensionFlags::empty(),
                // Not consulted by SOCK_DESTROY.
                states: StateFlags::empty(),
                socket_id: socket.id,
            }));
            destroyed |= netlink::acknowledge(NETLINK_SOCK_DIAG, op, request)?;
        }
    }
    Ok(destroyed)
}

/// A socket as `sock_diag` reports it.
struct Socket {
    connection: Connection,
    /// Its id as the kernel gave it (addresses as the socket holds them, cookie).
    id: SocketId,
}

/// The sockets of one protocol and family that belong to a connection.
fn sockets(op: Operation, protocol: Protocol, family: u8) -> Result<Vec<Socket>, FlowsError> {
    let states = match protocol {
        Protocol::Tcp => {
            StateFlags::all() - (StateFlags::LISTEN | StateFlags::CLOSE | StateFlags::TIME_WAIT)
        }
        // A UDP socket is "established" once connected to a peer.
        Protocol::Udp => StateFlags::ESTABLISHED,
    };
    let request = SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: protocol.number(),
        extensions: ExtensionFlags::empty(),
        states,
        socket_id: if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        },
    });
    netlink::dump(NETLINK_SOCK_DIAG, op, request)?
        .into_iter()
        .map(|reply| match reply {
            SockDiagMessage::InetResponse(response) => Ok(socket(protocol, *response)),
            other => Err(FlowsError::Reply {
                op,
                detail: format!("expected an inet socket, got {other:?}"),
            }),
        })
        .collect()
}

fn socket(protocol: Protocol, response: InetResponse) -> Socket {
    let id = response.header.socket_id;
    Socket {
        connection: Connection {
            protocol,
            // In sock_diag, "source" is the socket's own end.
            remote: unmap((id.destination_address, id.destination_port).into()),
            local: unmap((id.source_address, id.source_port).into()),
        },
        id,
    }
}
