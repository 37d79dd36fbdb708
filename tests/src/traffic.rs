//! Real TCP and UDP endpoints inside test namespaces: an echo server, a UDP
//! receiver, and clients that bind a chosen source address.

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::Netns;

/// How long a client waits before calling a silent drop a drop.
pub const DROP_TIMEOUT: Duration = Duration::from_millis(1500);
const POLL: Duration = Duration::from_millis(10);

/// A background thread serving until dropped.
struct Worker {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    fn spawn(body: impl FnOnce(Arc<AtomicBool>) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        Worker {
            stop,
            handle: Some(std::thread::spawn(move || body(flag))),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// A TCP echo server listening in a namespace; one thread per connection.
pub struct TcpEcho {
    _worker: Worker,
}

impl TcpEcho {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let listener = ns
            .run(|| TcpListener::bind(addr))
            .expect("bind echo server");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let worker = Worker::spawn(move |stop| {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let stop = stop.clone();
                        std::thread::spawn(move || echo(stream, &stop));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
                    Err(e) => panic!("accept: {e}"),
                }
            }
        });
        TcpEcho { _worker: worker }
    }
}

fn echo(mut stream: TcpStream, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 1024];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// What became of a connection attempt.
#[derive(Debug)]
pub enum Connect {
    Connected(TcpStream),
    /// No answer at all: the SYN was silently dropped.
    TimedOut,
    /// Anything else (refused, unreachable, …).
    Failed(std::io::Error),
}

impl Connect {
    pub fn expect_connected(self, what: &str) -> TcpStream {
        match self {
            Connect::Connected(s) => s,
            other => panic!("{what}: expected a connection, got {other:?}"),
        }
    }

    pub fn expect_timed_out(self, what: &str) {
        match self {
            Connect::TimedOut => {}
            other => panic!("{what}: expected a silent drop (timeout), got {other:?}"),
        }
    }
}

/// Connects from `src` (in namespace `ns`) to `dst`, waiting at most `DROP_TIMEOUT`.
pub fn tcp_connect(ns: &Netns, src: IpAddr, dst: SocketAddr) -> Connect {
    tcp_connect_from(ns, SocketAddr::new(src, 0), dst)
}

/// [`tcp_connect`] from a given source port (0: any).
pub fn tcp_connect_from(ns: &Netns, src: SocketAddr, dst: SocketAddr) -> Connect {
    let result = ns.run(|| {
        let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.bind(&src.into())?;
        socket.connect_timeout(&dst.into(), DROP_TIMEOUT)?;
        Ok::<_, std::io::Error>(TcpStream::from(socket))
    });
    match result {
        Ok(stream) => Connect::Connected(stream),
        Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
            Connect::TimedOut
        }
        Err(e) => Connect::Failed(e),
    }
}

/// Sends `message` and reads the echo back; errors if it does not come.
pub fn round_trip(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<()> {
    stream.set_read_timeout(Some(DROP_TIMEOUT))?;
    stream.write_all(message)?;
    let mut got = vec![0u8; message.len()];
    stream.read_exact(&mut got)?;
    if got != message {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

/// A UDP socket in a namespace that records what it receives.
pub struct UdpSink {
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    _worker: Worker,
}

impl UdpSink {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let socket = ns.run(|| UdpSocket::bind(addr)).expect("bind UDP sink");
        socket
            .set_read_timeout(Some(POLL * 5))
            .expect("UDP timeout");
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        let worker = Worker::spawn(move |stop| {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, _)) = socket.recv_from(&mut buf) {
                    sink.lock().unwrap().push(buf[..n].to_vec());
                }
            }
        });
        UdpSink {
            received,
            _worker: worker,
        }
    }

    /// Whether `payload` arrives within `DROP_TIMEOUT`.
    pub fn arrives(&self, payload: &[u8]) -> bool {
        let deadline = std::time::Instant::now() + DROP_TIMEOUT;
        while std::time::Instant::now() < deadline {
            if self.received.lock().unwrap().iter().any(|p| p == payload) {
                return true;
            }
            std::thread::sleep(POLL);
        }
        false
    }
}

/// Sends one datagram from `src` (in `ns`) to `dst`.
pub fn udp_send(ns: &Netns, src: IpAddr, dst: SocketAddr, payload: &[u8]) {
    ns.run(|| {
        let socket = UdpSocket::bind(SocketAddr::new(src, 0))?;
        socket.send_to(payload, dst).map(|_| ())
    })
    .expect("send UDP datagram");
}

/// A UDP echo server in a namespace: the replies make each exchange an
/// established connection for conntrack.
pub struct UdpEcho {
    _worker: Worker,
}

impl UdpEcho {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let socket = ns.run(|| UdpSocket::bind(addr)).expect("bind UDP echo");
        socket
            .set_read_timeout(Some(POLL * 5))
            .expect("UDP timeout");
        let worker = Worker::spawn(move |stop| {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], from);
                }
            }
        });
        UdpEcho { _worker: worker }
    }
}

/// A UDP socket in `ns` bound to `src` and connected to `dst`: one flow.
pub fn udp_connect(ns: &Netns, src: IpAddr, dst: SocketAddr) -> UdpSocket {
    ns.run(|| {
        let socket = UdpSocket::bind(SocketAddr::new(src, 0))?;
        socket.connect(dst)?;
        Ok::<_, std::io::Error>(socket)
    })
    .expect("UDP client socket")
}

/// Sends `message` on a connected UDP socket and waits for its echo.
pub fn udp_round_trip(socket: &UdpSocket, message: &[u8]) -> std::io::Result<()> {
    socket.set_read_timeout(Some(DROP_TIMEOUT))?;
    socket.send(message)?;
    let mut buf = [0u8; 2048];
    let n = socket.recv(&mut buf)?;
    if &buf[..n] != message {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

/// Tries TCP connections from `ns`, each `(source, destination, opens)`, all
/// at once (telling a silent drop takes `DROP_TIMEOUT`); panics listing
/// every outcome that differs from the expected one.
pub fn expect_access(ns: &Netns, step: &str, probes: &[(IpAddr, SocketAddr, bool)]) {
    let outcomes: Vec<Connect> = std::thread::scope(|scope| {
        let running: Vec<_> = probes
            .iter()
            .map(|&(src, dst, _)| scope.spawn(move || tcp_connect(ns, src, dst)))
            .collect();
        running
            .into_iter()
            .map(|t| t.join().expect("probe thread"))
            .collect()
    });
    let wrong: Vec<String> = probes
        .iter()
        .zip(&outcomes)
        .filter(|((_, _, opens), outcome)| match outcome {
            Connect::Connected(_) => !opens,
            Connect::TimedOut => *opens,
            Connect::Failed(_) => true,
        })
        .map(|((src, dst, opens), outcome)| {
            let expected = if *opens { "a connection" } else { "a drop" };
            format!("{src} -> {dst}: expected {expected}, got {outcome:?}")
        })
        .collect();
    assert!(wrong.is_empty(), "{step}:\n{}", wrong.join("\n"));
}

/// Panics unless the peer closed or reset `stream`: a read must end at once
/// with EOF or a reset, not time out.
pub fn expect_closed(stream: &mut TcpStream, what: &str) {
    stream
        .set_read_timeout(Some(DROP_TIMEOUT))
        .expect("read timeout");
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            ) => {}
        other => panic!("{what}: expected the session to be closed, read gave {other:?}"),
    }
}
