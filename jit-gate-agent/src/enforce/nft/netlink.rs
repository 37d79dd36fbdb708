//! The nf_tables netlink transport: batches (one kernel transaction each,
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

/// A transaction being assembled: messages between a batch begin and end.
/// The kernel applies all of them or none.
pub(super) struct Batch {
    buf: Vec<u8>,
    /// What each message does, for error reports; message `i` has sequence
    /// number `i + 1` (the batch begin has 0).
    what: Vec<String>,
}

const NLMSG_ALIGNTO: usize = 4;

fn nlmsg_align(len: usize) -> usize {
    len.next_multiple_of(NLMSG_ALIGNTO)
}

impl Batch {
    pub(super) fn new() -> Self {
        let mut batch = Batch {
            buf: Vec::new(),
            what: Vec::new(),
        };
        // SAFETY: `append` gives room for the largest message.
        batch.append(0, |buf, seq| unsafe {
            sys::nftnl_batch_begin(buf, seq);
        });
        batch
    }

    /// Appends a message; `what` says what it does, for errors.
    pub(super) fn push(&mut self, msg: &impl Message, what: impl Into<String>) {
        self.what.push(what.into());
        let seq = self.what.len() as u32;
        // SAFETY: `append` gives room for the largest message.
        self.append(seq, |buf, seq| unsafe { msg.write(buf, seq) });
    }

    /// Whether the batch holds no message yet.
    pub(super) fn is_empty(&self) -> bool {
        self.what.is_empty()
    }

    fn append(&mut self, seq: u32, write: impl FnOnce(*mut c_char, u32)) {
        let start = self.buf.len();
        self.buf.resize(start + nft_nlmsg_maxsize() as usize, 0);
        write(self.buf[start..].as_mut_ptr().cast(), seq);
        let len = nlmsg_len(&self.buf[start..]);
        self.buf.truncate(start + nlmsg_align(len));
    }

    fn finish(mut self) -> (Vec<u8>, Vec<String>) {
        let end = self.what.len() as u32 + 1;
        // SAFETY: `append` gives room for the largest message.
        self.append(end, |buf, seq| unsafe {
            sys::nftnl_batch_end(buf, seq);
        });
        (self.buf, self.what)
    }
}

/// The `nlmsg_len` field of the message at the start of `buf`.
fn nlmsg_len(buf: &[u8]) -> usize {
    u32::from_ne_bytes(buf[..4].try_into().expect("4 bytes")) as usize
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
            return Err(NftError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let socket = Socket {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            recv_buf: vec![0; RECV_BUF / size_of::<u64>()],
        };
        // Errors echo only the failing message's header, not all its elements.
        socket.set_option(libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, &1 as &c_int)?;
        let timeout = libc::timeval {
            tv_sec: DUMP_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        socket.set_option(libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout)?;
        Ok(socket)
    }

    fn set_option<T>(&self, level: c_int, name: c_int, value: &T) -> Result<(), NftError> {
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
            Err(NftError::Socket(io::Error::last_os_error()))
        }
    }

    /// Sizes both socket buffers to a batch of `len` bytes and `messages`
    /// acknowledgements: the batch must go out in one datagram, and every
    /// answer must fit until it is read.
    fn size_buffers(&self, len: usize, messages: usize) -> Result<(), NftError> {
        let clamp = |n: usize| c_int::try_from(n).unwrap_or(c_int::MAX);
        self.set_option(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &clamp(len))?;
        let room = clamp((messages + 1) * ACK_ROOM + RECV_BUF);
        self.set_option(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &room)
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
        let mut acked = vec![false; what.len()];
        while let Some(len) = self.recv(libc::MSG_DONTWAIT, "reading batch answers")? {
            for msg in Messages::new(self.received(len)) {
                if let Answer::Error { errno, seq } = answer(msg) {
                    if errno != 0 {
                        return Err(NftError::Rejected {
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
        match acked.iter().position(|ack| !ack) {
            None => Ok(()),
            Some(i) => Err(NftError::Unconfirmed {
                what: describe(i as u32 + 1),
            }),
        }
    }

    /// Sends a dump request of `msg_type` whose attributes `payload` adds,
    /// and hands every answer to `each` until the dump ends.
    pub(super) fn dump(
        &mut self,
        what: &str,
        msg_type: c_int,
        payload: impl FnOnce(*mut libc::nlmsghdr),
        mut each: impl FnMut(&libc::nlmsghdr) -> Result<(), NftError>,
    ) -> Result<(), NftError> {
        let mut request = vec![0u8; nft_nlmsg_maxsize() as usize];
        // SAFETY: `request` has room for the largest message.
        let nlh = unsafe { header(request.as_mut_ptr().cast(), msg_type, libc::NLM_F_DUMP, 1) };
        payload(nlh);
        let len = nlmsg_len(&request);
        // SAFETY: the request is initialised up to `len`.
        if unsafe { libc::send(self.fd.as_raw_fd(), request.as_ptr().cast(), len, 0) } < 0 {
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
            for msg in Messages::new(self.received(len)) {
                if msg.nlmsg_flags & libc::NLM_F_DUMP_INTR as u16 != 0 {
                    return Err(NftError::Interrupted);
                }
                match answer(msg) {
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
    /// An nf_tables object.
    Data,
}

/// The `i32` right after the header of `msg`, if the message is that long:
/// the (negative) error of NLMSG_ERROR and NLMSG_DONE.
fn payload_errno(msg: &libc::nlmsghdr) -> Option<i32> {
    (msg.nlmsg_len as usize >= size_of::<libc::nlmsghdr>() + size_of::<i32>()).then(|| {
        // SAFETY: the message is at least that long (checked), and lies in
        // one buffer with its header, which is 4-aligned.
        -unsafe { ptr::read(ptr::from_ref(msg).add(1).cast::<i32>()) }
    })
}

fn answer(msg: &libc::nlmsghdr) -> Answer {
    match c_int::from(msg.nlmsg_type) {
        libc::NLMSG_ERROR => {
            let full = size_of::<libc::nlmsghdr>() + size_of::<libc::nlmsgerr>();
            let seq = if msg.nlmsg_len as usize >= full {
                // SAFETY: an nlmsgerr (length checked) follows the header.
                unsafe { ptr::read(ptr::from_ref(msg).add(1).cast::<libc::nlmsgerr>()) }
                    .msg
                    .nlmsg_seq
            } else {
                msg.nlmsg_seq
            };
            Answer::Error {
                errno: payload_errno(msg).unwrap_or(libc::EBADMSG),
                seq,
            }
        }
        libc::NLMSG_DONE => Answer::Done {
            errno: payload_errno(msg).unwrap_or(0),
        },
        _ => Answer::Data,
    }
}

/// The netlink messages in a received datagram.
struct Messages<'a> {
    buf: &'a [u8],
}

impl<'a> Messages<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Messages { buf }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = &'a libc::nlmsghdr;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.len() < size_of::<libc::nlmsghdr>() {
            return None;
        }
        let len = nlmsg_len(self.buf);
        if len < size_of::<libc::nlmsghdr>() || len > self.buf.len() {
            return None;
        }
        // SAFETY: the buffer starts 8-aligned and messages are 4-aligned
        // within it; the header lies within the buffer (checked above).
        let msg = unsafe { &*self.buf.as_ptr().cast::<libc::nlmsghdr>() };
        self.buf = &self.buf[nlmsg_align(len).min(self.buf.len())..];
        Some(msg)
    }
}
