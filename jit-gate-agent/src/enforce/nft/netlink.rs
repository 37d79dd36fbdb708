//! The `nf_tables` netlink transport: batches (one kernel transaction each,
//! checked message by message) and dump requests. The socket is opened in
//! the network namespace of the calling thread.

use std::{
    ffi::{c_char, c_int, c_void},
    io,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    ptr,
    time::Duration,
};

use nftnl::{MsgType, NlMsg, nft_nlmsg_maxsize, nftnl_sys as sys};

use super::NftError;

/// A netlink message that writes itself into a buffer.
///
/// # Safety
/// `write` must build exactly one netlink message at `buf` and write no
/// more than `nft_nlmsg_maxsize()` bytes, which is what `buf` has room for.
pub(super) unsafe trait Message {
    /// # Safety
    /// `buf` must be valid for writes of `nft_nlmsg_maxsize()` bytes.
    unsafe fn write(&self, buf: *mut c_char, seq: u32);
}

/// One of nftnl's objects (table, chain, rule) with what to do with it.
pub(super) struct Op<'a, T>(pub &'a T, pub MsgType);

// SAFETY: nftnl's `NlMsg` has the same contract as `Message`.
unsafe impl<T: NlMsg> Message for Op<'_, T> {
    unsafe fn write(&self, buf: *mut c_char, seq: u32) {
        // SAFETY: forwarded from our caller.
        unsafe { self.0.write(buf.cast::<c_void>(), seq, self.1) }
    }
}

/// Builds the netlink header of a message for the inet family.
///
/// # Safety
/// `buf` must be valid for writes of a netlink and nfgen header.
pub(super) unsafe fn header(
    buf: *mut c_char,
    msg_type: c_int,
    flags: c_int,
    seq: u32,
) -> *mut libc::nlmsghdr {
    // SAFETY: forwarded from our caller; the values fit their u16 fields.
    unsafe {
        sys::nftnl_nlmsg_build_hdr(
            buf,
            msg_type as u16,
            libc::NFPROTO_INET as u16,
            flags as u16,
            seq,
        )
    }
}

/// The start of a batch (`seq` 0: errors with it concern the commit).
struct BatchBegin;

// SAFETY: a bare nfgen message, far below the maximum size.
unsafe impl Message for BatchBegin {
    unsafe fn write(&self, buf: *mut c_char, seq: u32) {
        // SAFETY: `buf` has room for the largest message (our contract).
        unsafe { sys::nftnl_batch_begin(buf, seq) };
    }
}

struct BatchEnd;

// SAFETY: a bare nfgen message, far below the maximum size.
unsafe impl Message for BatchEnd {
    unsafe fn write(&self, buf: *mut c_char, seq: u32) {
        // SAFETY: `buf` has room for the largest message (our contract).
        unsafe { sys::nftnl_batch_end(buf, seq) };
    }
}

const NLMSG_ALIGNTO: usize = 4;
const NLMSG_HDRLEN: usize = size_of::<libc::nlmsghdr>();

/// Appends `msg` to `buf`, padded to the netlink alignment.
///
/// The room for the largest message is reserved, not zeroed: zeroing
/// 64 KiB for every message made batches and dumps of many small
/// messages slow (most of a read of a table with hundreds of sets).
fn append(buf: &mut Vec<u8>, msg: &impl Message, seq: u32) {
    let start = buf.len();
    let max = nft_nlmsg_maxsize() as usize;
    buf.reserve(max + NLMSG_ALIGNTO);
    let room = buf.spare_capacity_mut();
    // SAFETY: `room` has at least nft_nlmsg_maxsize() writable bytes.
    unsafe { msg.write(room.as_mut_ptr().cast(), seq) };
    // SAFETY: `write` initialised the header, whose first field is the
    // message length, and the `len` bytes it counts (libmnl zeroes the
    // padding inside the message).
    let len = unsafe { room.as_ptr().cast::<u32>().read_unaligned() } as usize;
    assert!(
        (NLMSG_HDRLEN..=max).contains(&len),
        "libnftnl built a message of {len} bytes"
    );
    let padded = len.next_multiple_of(NLMSG_ALIGNTO);
    room[len..padded].fill(std::mem::MaybeUninit::new(0));
    // SAFETY: the first `padded` bytes of the spare room are initialised.
    unsafe { buf.set_len(start + padded) };
}

fn u32_at(buf: &[u8], offset: usize) -> u32 {
    u32::from_ne_bytes(buf[offset..offset + 4].try_into().expect("4 bytes"))
}

/// A transaction being assembled: messages between a batch begin and end.
/// The kernel applies all of them or none.
pub(super) struct Batch {
    buf: Vec<u8>,
    /// What each message does, for error reports; message `i` has sequence
    /// number `i + 1`.
    what: Vec<String>,
}

impl Batch {
    pub(super) fn new() -> Self {
        let mut buf = Vec::new();
        append(&mut buf, &BatchBegin, 0);
        Batch {
            buf,
            what: Vec::new(),
        }
    }

    /// Appends a message; `what` says what it does, for errors.
    pub(super) fn push(&mut self, msg: &impl Message, what: impl Into<String>) {
        self.what.push(what.into());
        append(&mut self.buf, msg, self.what.len() as u32);
    }

    /// Whether the batch holds no message yet.
    pub(super) fn is_empty(&self) -> bool {
        self.what.is_empty()
    }

    /// The messages pushed so far (after the batch begin).
    pub(super) fn messages(&self) -> impl Iterator<Item = Received<'_>> {
        Messages(&self.buf).skip(1)
    }

    fn finish(mut self) -> (Vec<u8>, Vec<String>) {
        append(&mut self.buf, &BatchEnd, self.what.len() as u32 + 1);
        (self.buf, self.what)
    }
}

/// Size of the receive buffer: dumps arrive in messages of at most 32 KiB.
const RECV_BUF: usize = 128 * 1024;
/// How long a dump may stay silent before it counts as lost.
const DUMP_TIMEOUT: Duration = Duration::from_secs(30);
/// Room per acknowledgement in the receive buffer (kernel accounting of a
/// small skb plus its echoed header).
const ACK_ROOM: usize = 2048;

/// A netfilter netlink socket.
pub(super) struct Socket {
    fd: OwnedFd,
    /// 8-byte aligned, so netlink headers in it can be read in place.
    recv_buf: Vec<u64>,
}

impl Socket {
    /// Opens a socket in the calling thread's network namespace.
    pub(super) fn open() -> Result<Self, NftError> {
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(NftError::Socket {
                what: "socket",
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let socket = Socket {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            recv_buf: vec![0; RECV_BUF / size_of::<u64>()],
        };
        // Errors echo only the failing message's header, not all its elements.
        socket.set_option(
            libc::SOL_NETLINK,
            libc::NETLINK_CAP_ACK,
            "NETLINK_CAP_ACK",
            &1 as &c_int,
        )?;
        let timeout = libc::timeval {
            tv_sec: DUMP_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        socket.set_option(libc::SOL_SOCKET, libc::SO_RCVTIMEO, "SO_RCVTIMEO", &timeout)?;
        Ok(socket)
    }

    fn set_option<T>(
        &self,
        level: c_int,
        name: c_int,
        what: &'static str,
        value: &T,
    ) -> Result<(), NftError> {
        // SAFETY: `value` points to a live T of the given size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                ptr::from_ref(value).cast(),
                size_of::<T>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(NftError::Socket {
                what,
                source: io::Error::last_os_error(),
            })
        }
    }

    /// Sizes both socket buffers to a batch of `len` bytes and `messages`
    /// acknowledgements: the batch must go out in one datagram, and every
    /// answer must fit until it is read.
    fn size_buffers(&self, len: usize, messages: usize) -> Result<(), NftError> {
        let clamp = |n: usize| c_int::try_from(n).unwrap_or(c_int::MAX);
        // The FORCE variants exceed the sysctl limits; they need CAP_NET_ADMIN,
        // which changing nftables needs anyway.
        self.set_option(
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            "SO_SNDBUFFORCE",
            &clamp(len),
        )?;
        let room = clamp((messages + 1) * ACK_ROOM + RECV_BUF);
        self.set_option(
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            "SO_RCVBUFFORCE",
            &room,
        )
    }

    /// Sends `batch` as one transaction and checks that the kernel accepted
    /// every message. On error the kernel has applied none of them.
    pub(super) fn commit(&mut self, batch: Batch) -> Result<(), NftError> {
        let (buf, what) = batch.finish();
        self.size_buffers(buf.len(), what.len())?;
        // SAFETY: `buf` is a live, initialised buffer of that length.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
        if sent < 0 {
            return Err(NftError::Io {
                what: "sending a batch".into(),
                source: io::Error::last_os_error(),
            });
        }
        // The kernel processes a batch inside send(): every answer is queued
        // by now, so reading until the queue is empty sees all of them.
        let describe = |seq: u32| match seq {
            0 => "committing the batch".to_owned(),
            n => what
                .get(n as usize - 1)
                .cloned()
                .unwrap_or_else(|| format!("batch message {n}")),
        };
        // Every answer is read, also after an error, so that the socket
        // holds none and serves the next call.
        let mut acked = vec![false; what.len()];
        let mut rejected = None;
        while let Some(len) = self.recv(libc::MSG_DONTWAIT, "reading batch answers")? {
            for msg in Messages(self.received(len)) {
                if let Answer::Error { errno, seq } = msg.answer() {
                    if errno != 0 {
                        rejected.get_or_insert(NftError::Rejected {
                            what: describe(seq),
                            source: io::Error::from_raw_os_error(errno),
                        });
                    }
                    if let Some(ack) = (seq as usize).checked_sub(1).and_then(|i| acked.get_mut(i))
                    {
                        *ack = true;
                    }
                }
            }
        }
        if let Some(rejected) = rejected {
            return Err(rejected);
        }
        match acked.iter().position(|ack| !ack) {
            None => Ok(()),
            Some(i) => Err(NftError::Unconfirmed {
                what: describe(i as u32 + 1),
            }),
        }
    }

    /// Sends a dump `request` and hands every answer to `each` until the
    /// dump ends.
    pub(super) fn dump(
        &mut self,
        what: &str,
        request: &impl Message,
        mut each: impl FnMut(Received<'_>) -> Result<(), NftError>,
    ) -> Result<(), NftError> {
        let mut buf = Vec::new();
        append(&mut buf, request, 1);
        // SAFETY: `buf` is a live, initialised buffer of that length.
        if unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) } < 0 {
            return Err(NftError::Io {
                what: format!("requesting {what}"),
                source: io::Error::last_os_error(),
            });
        }
        loop {
            let len = self.recv(0, what)?.ok_or_else(|| NftError::Io {
                what: format!("reading {what}"),
                source: io::ErrorKind::TimedOut.into(),
            })?;
            for msg in Messages(self.received(len)) {
                if msg.flags() & libc::NLM_F_DUMP_INTR as u16 != 0 {
                    return Err(NftError::Interrupted);
                }
                match msg.answer() {
                    Answer::Done { errno: 0 } | Answer::Error { errno: 0, .. } => return Ok(()),
                    Answer::Done { errno } | Answer::Error { errno, .. } => {
                        return Err(NftError::Rejected {
                            what: format!("reading {what}"),
                            source: io::Error::from_raw_os_error(errno),
                        });
                    }
                    Answer::Data => each(msg)?,
                }
            }
        }
    }

    /// Receives one datagram; `None` if none is queued (or, blocking, the
    /// wait timed out).
    fn recv(&mut self, flags: c_int, what: &str) -> Result<Option<usize>, NftError> {
        let cap = self.recv_buf.len() * size_of::<u64>();
        // SAFETY: `recv_buf` is valid for writes of `cap` bytes.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.recv_buf.as_mut_ptr().cast(),
                cap,
                flags | libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                _ => Err(NftError::Io {
                    what: what.to_owned(),
                    source: err,
                }),
            };
        }
        let n = n as usize;
        if n > cap {
            return Err(NftError::Io {
                what: format!("{what}: a {n}-byte answer does not fit the receive buffer"),
                source: io::ErrorKind::InvalidData.into(),
            });
        }
        Ok(Some(n))
    }

    fn received(&self, len: usize) -> &[u8] {
        // SAFETY: the u64 buffer is at least `len` bytes long and initialised.
        unsafe { std::slice::from_raw_parts(self.recv_buf.as_ptr().cast::<u8>(), len) }
    }
}

/// What a received message is.
enum Answer {
    /// An acknowledgement (errno 0) or error for the request with `seq`.
    Error { errno: i32, seq: u32 },
    /// The end of a dump, which failed if errno is not 0.
    Done { errno: i32 },
    /// An `nf_tables` object.
    Data,
}

/// One received netlink message, header and payload.
#[derive(Clone, Copy)]
pub(super) struct Received<'a>(&'a [u8]);

impl Received<'_> {
    /// The whole message, header included.
    pub(super) fn bytes(&self) -> &[u8] {
        self.0
    }

    /// The message for libnftnl's parsers, which read all of it through
    /// this pointer. It is 4-aligned: the receive buffer is, and so are
    /// messages within it.
    pub(super) fn as_ptr(&self) -> *const libc::nlmsghdr {
        self.0.as_ptr().cast()
    }

    pub(super) fn msg_type(&self) -> c_int {
        c_int::from(u16::from_ne_bytes([self.0[4], self.0[5]]))
    }

    fn flags(&self) -> u16 {
        u16::from_ne_bytes([self.0[6], self.0[7]])
    }

    /// The error number (positive) in an `NLMSG_ERROR` or `NLMSG_DONE` payload.
    fn errno(&self) -> Option<i32> {
        let bytes = self.0.get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)?;
        Some(-i32::from_ne_bytes(bytes.try_into().expect("4 bytes")))
    }

    fn answer(&self) -> Answer {
        match self.msg_type() {
            libc::NLMSG_ERROR => Answer::Error {
                errno: self.errno().unwrap_or(libc::EBADMSG),
                // The error is followed by the header of the request it answers.
                seq: self
                    .0
                    .get(NLMSG_HDRLEN + 4..NLMSG_HDRLEN + 4 + NLMSG_HDRLEN)
                    .map_or(0, |request| u32_at(request, 8)),
            },
            libc::NLMSG_DONE => Answer::Done {
                errno: self.errno().unwrap_or(0),
            },
            _ => Answer::Data,
        }
    }
}

/// The netlink messages in a received datagram.
struct Messages<'a>(&'a [u8]);

impl<'a> Iterator for Messages<'a> {
    type Item = Received<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        let len = self.0.get(..4).map(|b| u32_at(b, 0) as usize)?;
        if len < NLMSG_HDRLEN || len > self.0.len() {
            return None;
        }
        let msg = Received(&self.0[..len]);
        self.0 = &self.0[len.next_multiple_of(NLMSG_ALIGNTO).min(self.0.len())..];
        Some(msg)
    }
}
