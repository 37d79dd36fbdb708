//! One request to a kernel netlink subsystem and its replies, on a socket
//! opened for the call (so in the calling thread's network namespace).

use std::io;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkDeserializable,
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_sys::{Socket, SocketAddr};

use super::{FlowsError, Operation};

/// Each socket carries one request; replies to anything else are ignored.
const SEQUENCE: u32 = 1;
/// Netlink messages start on 4-byte boundaries within a datagram.
const NLMSG_ALIGNTO: usize = 4;

/// Sends a dump request and returns every message of the reply.
pub(crate) fn dump<I>(protocol: isize, op: Operation, request: I) -> Result<Vec<I>, FlowsError>
where
    I: NetlinkSerializable + NetlinkDeserializable,
{
    exchange(protocol, op, NLM_F_DUMP, request)
}

/// Sends a request that acts on one object and waits for the kernel's
/// acknowledgement; `Ok(false)` when the kernel answers that there is no
/// such object (ENOENT).
pub(crate) fn acknowledge<I>(protocol: isize, op: Operation, request: I) -> Result<bool, FlowsError>
where
    I: NetlinkSerializable + NetlinkDeserializable,
{
    match exchange(protocol, op, NLM_F_ACK, request) {
        Ok(_) => Ok(true),
        Err(FlowsError::Kernel { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Sends a request that creates one object and waits for the kernel's
/// acknowledgement; `Ok(false)` when the object exists already (EEXIST),
/// which is left as it is.
pub(super) fn create<I>(protocol: isize, op: Operation, request: I) -> Result<bool, FlowsError>
where
    I: NetlinkSerializable + NetlinkDeserializable,
{
    match exchange(protocol, op, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, request) {
        Ok(_) => Ok(true),
        Err(FlowsError::Kernel { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn exchange<I>(protocol: isize, op: Operation, flags: u16, request: I) -> Result<Vec<I>, FlowsError>
where
    I: NetlinkSerializable + NetlinkDeserializable,
{
    let socket_error = |step| move |source| FlowsError::Socket { op, step, source };
    let socket = Socket::new(protocol).map_err(socket_error("socket"))?;
    let kernel = SocketAddr::new(0, 0);

    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = SEQUENCE;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(request));
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    socket
        .send_to(&buf, &kernel, 0)
        .map_err(socket_error("send"))?;

    let mut replies = Vec::new();
    loop {
        let (datagram, from) = socket.recv_from_full().map_err(socket_error("receive"))?;
        // Any process in the namespace may send to our port; only the kernel answers.
        if from.port_number() != 0 {
            continue;
        }
        if read_datagram(&datagram, op, &mut replies)? {
            return Ok(replies);
        }
    }
}

/// Appends the datagram's messages to `replies`; true once the reply is complete.
fn read_datagram<I>(
    mut datagram: &[u8],
    op: Operation,
    replies: &mut Vec<I>,
) -> Result<bool, FlowsError>
where
    I: NetlinkDeserializable,
{
    let bad_reply = |detail: String| FlowsError::Reply { op, detail };
    let kernel_error = |errno: i32| FlowsError::Kernel {
        op,
        source: io::Error::from_raw_os_error(errno.abs()),
    };
    while !datagram.is_empty() {
        let message =
            NetlinkMessage::<I>::deserialize(datagram).map_err(|e| bad_reply(e.to_string()))?;
        let (len, kind) = (message.header.length as usize, message.header.message_type);
        datagram = datagram
            .get(len.next_multiple_of(NLMSG_ALIGNTO)..)
            .unwrap_or_default();
        if message.header.sequence_number != SEQUENCE {
            continue;
        }
        match message.payload {
            NetlinkPayload::InnerMessage(inner) => replies.push(inner),
            NetlinkPayload::Noop => {}
            // A dump that fails midway ends with a negative errno in NLMSG_DONE.
            NetlinkPayload::Done(done) if done.code != 0 => return Err(kernel_error(done.code)),
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(error) => match error.code {
                Some(code) => return Err(kernel_error(code.get())),
                // NLMSG_ERROR with code 0 is the acknowledgement.
                None => return Ok(true),
            },
            // Overrun, or whatever later netlink versions add.
            _ => return Err(bad_reply(format!("unexpected message type {kind}"))),
        }
    }
    Ok(false)
}
