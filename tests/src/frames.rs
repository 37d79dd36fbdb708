//! Raw frames in and out of test namespaces: an AF_PACKET socket that sends
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

/// ETH_P_ALL in network byte order.
const ALL_PROTOCOLS: u16 = (libc::ETH_P_ALL as u16).to_be();

fn check(rc: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(rc)
}

fn set_option<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: T) {
    // SAFETY: a valid socket and a value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<T>() as libc::socklen_t,
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
    let ready = unsafe { libc::poll(&mut poll, 1, timeout.as_millis() as libc::c_int) };
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
            &mut from_len,
        )
    };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some((buf, from))
}

/// An AF_PACKET socket bound to one interface of a namespace.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    /// Opens the socket on `ifname` in `ns`. It sends frames as they are,
    /// and receives every frame crossing the interface (both directions).
    pub fn open(ns: &Netns, ifname: &str) -> Self {
        let name = std::ffi::CString::new(ifname).expect("interface name");
        ns.run(|| {
            // SAFETY: plain socket creation; the fd is owned at once.
            let fd = check(
                unsafe {
                    libc::socket(
                        libc::AF_PACKET,
                        libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                        ALL_PROTOCOLS.into(),
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
            addr.sll_protocol = ALL_PROTOCOLS;
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

    /// Frames received until nothing arrives for `quiet`.
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
        let from: &libc::sockaddr_in6 = unsafe { &*(from as *const _ as *const libc::sockaddr_in6) };
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

/// Frames `ifname` in `ns` received, and dropped, so far.
pub fn rx_counts(ns: &Netns, ifname: &str) -> (u64, u64) {
    let read = |name: &str| {
        let path = format!("/sys/class/net/{ifname}/statistics/{name}");
        let text = ns.exec("cat", &[&path]);
        text.trim()
            .parse::<u64>()
            .unwrap_or_else(|e| panic!("{path}: {text:?}: {e}"))
    };
    (read("rx_packets"), read("rx_dropped"))
}
