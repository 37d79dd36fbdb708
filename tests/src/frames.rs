//! Raw frames in and out of test namespaces: an `AF_PACKET` socket that sends
//! crafted frames on an interface (and captures what crosses it), raw IP
//! sockets that see every TCP or UDP packet the IP stack delivers locally,
//! and an interface's address and counters.

use std::{
    io,
    mem::{size_of, zeroed},
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// `ETH_P_ALL` in network byte order.
const ALL_PROTOCOLS: u16 = (libc::ETH_P_ALL as u16).to_be();

fn check(rc: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(rc)
}

fn set_option(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: a valid socket and a value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(rc, "setsockopt").unwrap_or_else(|e| panic!("{e}"));
}

/// Waits for a datagram on `fd` for at most `timeout`.
fn receive(fd: &OwnedFd, timeout: Duration) -> Option<(Vec<u8>, libc::sockaddr_storage)> {
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&raw mut poll, 1, timeout.as_millis() as libc::c_int) };
    if ready <= 0 {
        return None;
    }
    let mut buf = vec![0u8; 65_536];
    // SAFETY: zeroed storage is a valid sockaddr_storage.
    let mut from: libc::sockaddr_storage = unsafe { zeroed() };
    let mut from_len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: buffers of the sizes given.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
            (&raw mut from).cast(),
            &raw mut from_len,
        )
    };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some((buf, from))
}

/// An `AF_PACKET` socket bound to one interface of a namespace.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

/// `PACKET_IGNORE_OUTGOING` (`linux/if_packet.h)`: receive incoming frames only.
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

impl PacketSocket {
    /// A socket that sends frames on `ifname` in `ns` as they are, and
    /// receives nothing.
    pub fn sender(ns: &Netns, ifname: &str) -> Self {
        Self::open(ns, ifname, 0)
    }

    /// A socket that receives every frame arriving on `ifname` in `ns`
    /// (and can send too).
    pub fn capture(ns: &Netns, ifname: &str) -> Self {
        let socket = Self::open(ns, ifname, ALL_PROTOCOLS);
        set_option(&socket.fd, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, 1);
        set_option(&socket.fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 16 << 20);
        socket
    }

    fn open(ns: &Netns, ifname: &str, protocol: u16) -> Self {
        let name = std::ffi::CString::new(ifname).expect("interface name");
        ns.run(|| {
            // SAFETY: plain socket creation; the fd is owned at once.
            let fd = check(
                unsafe {
                    libc::socket(
                        libc::AF_PACKET,
                        libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                        protocol.into(),
                    )
                },
                "socket(AF_PACKET)",
            )?;
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
            if ifindex == 0 {
                return Err(io::Error::other(format!("no interface {ifname}")));
            }
            // SAFETY: zeroed sockaddr_ll is valid; the fields set follow.
            let mut addr: libc::sockaddr_ll = unsafe { zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = protocol;
            addr.sll_ifindex = ifindex;
            // SAFETY: a valid socket and address of the size given.
            check(
                unsafe {
                    libc::bind(
                        fd.as_raw_fd(),
                        (&raw const addr).cast(),
                        size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                    )
                },
                "bind(AF_PACKET)",
            )?;
            Ok(PacketSocket { fd, ifindex })
        })
        .unwrap_or_else(|e: io::Error| panic!("packet socket on {ifname}: {e}"))
    }

    /// Sends one frame as it is.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: zeroed sockaddr_ll is valid; the fields set follow.
        let mut addr: libc::sockaddr_ll = unsafe { zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        loop {
            // SAFETY: a buffer and address of the sizes given.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const addr).cast(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if n >= 0 {
                return;
            }
            let e = io::Error::last_os_error();
            // The queue is full: let it drain.
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                std::thread::sleep(Duration::from_micros(100));
                continue;
            }
            panic!("sending a {}-byte frame: {e}", frame.len());
        }
    }

    /// Frames received (see [`PacketSocket::capture`]) until nothing arrives
    /// for `quiet`.
    pub fn drain(&self, quiet: Duration) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| receive(&self.fd, quiet).map(|(frame, _)| frame)).collect()
    }
}

/// A packet the local IP stack delivered: its source, and its TCP or UDP
/// header and payload.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Delivered {
    pub protocol: u8,
    pub source: IpAddr,
    pub transport: Vec<u8>,
}

impl Delivered {
    pub fn dst_port(&self) -> Option<u16> {
        self.transport
            .get(2..4)
            .map(|p| u16::from_be_bytes([p[0], p[1]]))
    }

    /// Whether the TCP or UDP header is whole.
    pub fn complete(&self) -> bool {
        match self.protocol {
            6 => self
                .transport
                .get(12)
                .is_some_and(|b| (b >> 4) >= 5 && self.transport.len() >= usize::from(b >> 4) * 4),
            _ => self.transport.len() >= 8,
        }
    }
}

/// Raw IP sockets (IPv4 and IPv6, TCP and UDP) in a namespace: each gets a
/// copy of every packet of its protocol the stack delivers locally, before
/// TCP or UDP look at it.
pub struct DeliveryTap {
    sockets: Vec<(u8, libc::c_int, OwnedFd)>,
}

impl DeliveryTap {
    pub fn open(ns: &Netns) -> Self {
        let sockets = ns.run(|| {
            let mut sockets = Vec::new();
            for family in [libc::AF_INET, libc::AF_INET6] {
                for protocol in [libc::IPPROTO_TCP, libc::IPPROTO_UDP] {
                    // SAFETY: plain socket creation; the fd is owned at once.
                    let fd = check(
                        unsafe {
                            libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol)
                        },
                        "socket(SOCK_RAW)",
                    )?;
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    set_option(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 32 << 20);
                    sockets.push((protocol as u8, family, fd));
                }
            }
            Ok::<_, io::Error>(sockets)
        });
        DeliveryTap {
            sockets: sockets.unwrap_or_else(|e| panic!("raw sockets: {e}")),
        }
    }

    /// Packets delivered since the last call, waiting until none arrives
    /// for `quiet`.
    pub fn drain(&self, quiet: Duration) -> Vec<Delivered> {
        let mut out = Vec::new();
        let deadline = Instant::now() + quiet;
        for (protocol, family, fd) in &self.sockets {
            let wait = deadline.saturating_duration_since(Instant::now());
            let mut first = true;
            while let Some((bytes, from)) = receive(fd, if first { wait } else { quiet }) {
                first = false;
                out.extend(delivered(*protocol, *family, &bytes, &from));
            }
        }
        out
    }
}

fn delivered(
    protocol: u8,
    family: libc::c_int,
    bytes: &[u8],
    from: &libc::sockaddr_storage,
) -> Option<Delivered> {
    let (source, transport) = if family == libc::AF_INET {
        // IPv4 raw sockets receive the IP header too.
        let header_len = usize::from(bytes.first()? & 0x0f) * 4;
        let source = IpAddr::from(<[u8; 4]>::try_from(bytes.get(12..16)?).ok()?);
        (source, bytes.get(header_len..)?.to_vec())
    } else {
        // SAFETY: an AF_INET6 socket fills a sockaddr_in6.
        let from: &libc::sockaddr_in6 =
            unsafe { &*std::ptr::from_ref(from).cast::<libc::sockaddr_in6>() };
        (IpAddr::from(from.sin6_addr.s6_addr), bytes.to_vec())
    };
    Some(Delivered {
        protocol,
        source,
        transport,
    })
}

/// The MAC address of `ifname` in `ns`.
pub fn mac_of(ns: &Netns, ifname: &str) -> [u8; 6] {
    let text = ns.exec("cat", &[&format!("/sys/class/net/{ifname}/address")]);
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|e| panic!("MAC {text:?}: {e}")))
        .collect();
    bytes.try_into().unwrap_or_else(|_| panic!("MAC {text:?}"))
}

/// An interface's packet counters, as the kernel's `/proc/net/dev` has them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfCounts {
    pub rx_packets: u64,
    pub rx_dropped: u64,
    pub tx_packets: u64,
    pub tx_dropped: u64,
}

/// The counters of `ifname` in `ns`.
pub fn if_counts(ns: &Netns, ifname: &str) -> IfCounts {
    // /proc/thread-self/net is the network namespace of the reading thread.
    let text = ns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/dev"))
        .unwrap_or_else(|e| panic!("/proc/net/dev in {}: {e}", ns.name));
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{ifname}:")))
        .unwrap_or_else(|| panic!("{ifname} not in /proc/net/dev:\n{text}"));
    let fields: Vec<u64> = line
        .split_whitespace()
        .map(|f| f.parse().unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect();
    // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets errs drop ...
    IfCounts {
        rx_packets: fields[1],
        rx_dropped: fields[3],
        tx_packets: fields[9],
        tx_dropped: fields[11],
    }
}
