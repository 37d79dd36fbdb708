//! The live benchmark's traffic generator: raw Ethernet frames written to
//! an `AF_PACKET` socket that bypasses the qdisc (`PACKET_QDISC_BYPASS`),
//! in batches through `sendmmsg`, from a thread pinned to one CPU, for a
//! bounded time and count.

use std::{
    io, mem,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

/// Frames per `sendmmsg` call.
const BATCH: usize = 64;

/// A raw socket bound to one interface.
pub struct PacketSender {
    socket: OwnedFd,
}

/// What one sending period did.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    /// Frames the interface took.
    pub accepted: u64,
    /// Batches cut short by a refused frame (the peer's ring full: the
    /// receiver fell behind).
    pub refusals: u64,
    pub elapsed: Duration,
}

impl PacketSender {
    /// A socket bound to `ifname` of the calling thread's network namespace
    /// (it stays there whichever thread sends).
    pub fn open(ifname: &str) -> io::Result<Self> {
        let index = jit_gate_agent::config::interface_index(ifname).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no interface {ifname}"))
        })?;
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        // SAFETY: the option value is a c_int that outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain old data; zeroed is a valid value.
        let mut address: libc::sockaddr_ll = unsafe { mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_ifindex = index as i32;
        // SAFETY: address is a valid sockaddr_ll of the given length.
        let rc = unsafe {
            libc::bind(
                fd,
                (&raw const address).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PacketSender { socket })
    }

    /// Sends `frames` over and over, in order, for `duration` or until
    /// `max_frames` went out, from a thread pinned to `cpu` (if given).
    pub fn send(
        &self,
        frames: &[Vec<u8>],
        cpu: Option<usize>,
        duration: Duration,
        max_frames: u64,
    ) -> io::Result<Sent> {
        assert!(!frames.is_empty(), "nothing to send");
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    if let Some(cpu) = cpu {
                        pin(0, cpu)?;
                    }
                    self.send_here(frames, duration, max_frames)
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    fn send_here(
        &self,
        frames: &[Vec<u8>],
        duration: Duration,
        max_frames: u64,
    ) -> io::Result<Sent> {
        let mut iovecs: Vec<libc::iovec> = frames
            .iter()
            .map(|frame| libc::iovec {
                iov_base: frame.as_ptr().cast_mut().cast(),
                iov_len: frame.len(),
            })
            .collect();
        let (mut accepted, mut refusals, mut next) = (0u64, 0u64, 0usize);
        let start = Instant::now();
        while start.elapsed() < duration && accepted < max_frames {
            // SAFETY: mmsghdr is plain old data; zeroed is a valid value.
            let mut messages: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
            for message in &mut messages {
                message.msg_hdr.msg_iov = &raw mut iovecs[next];
                message.msg_hdr.msg_iovlen = 1;
                next = (next + 1) % iovecs.len();
            }
            // SAFETY: every header points at one iovec of a frame that
            // outlives the call; the socket is bound, so no address is needed.
            let rc = unsafe {
                libc::sendmmsg(
                    self.socket.as_raw_fd(),
                    messages.as_mut_ptr(),
                    BATCH as libc::c_uint,
                    0,
                )
            };
            if rc < 0 {
                let error = io::Error::last_os_error();
                if error.raw_os_error() != Some(libc::ENOBUFS) {
                    return Err(error);
                }
                // The first frame of the batch was refused; go on with the rest.
                refusals += 1;
            } else {
                let rc = rc as u64;
                accepted += rc;
                if rc < BATCH as u64 {
                    refusals += 1;
                }
            }
        }
        Ok(Sent {
            accepted,
            refusals,
            elapsed: start.elapsed(),
        })
    }
}

/// Pins thread or process `pid` (0: the calling thread) to `cpu`.
pub fn pin(pid: libc::pid_t, cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain old data; CPU_SET writes within it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid, size_of::<libc::cpu_set_t>(), &raw const set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
