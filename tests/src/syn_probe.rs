//! When a gate starts letting a source through, per host: TCP SYNs sent
//! from that source to every host still closed, one per host per round
//! (every ~2 ms), each numbered by its sequence number; the first SYN-ACK a
//! host sends back (its listening socket took the SYN) names the SYN that
//! passed, whose send time is when the gate opened there. Raw sockets,
//! so that thousands of attempts cost no socket set-up each; the caller's
//! kernel answers each SYN-ACK with a reset.

use std::{
    collections::HashMap,
    io::Read as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use socket2::{Domain, Protocol, Socket, Type};

/// What one probe run saw.
pub struct Opened {
    /// Per host (in the order given): when the first SYN that passed was
    /// sent, if one did before the deadline.
    pub at: Vec<Option<Instant>>,
    /// SYNs sent, and rounds (one SYN to each closed host per round).
    pub sent: u64,
    pub rounds: u64,
    /// How long the rounds took on average (the probe's resolution).
    pub mean_round: Duration,
}

/// Raw sockets of the calling thread's namespace: one that sends crafted
/// IPv4 packets, one that receives a copy of every TCP segment.
pub struct SynProbe {
    send: Socket,
    receive: Socket,
}

impl SynProbe {
    /// Opens the sockets in the calling thread's network namespace.
    pub fn open() -> Result<SynProbe> {
        let send = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )
        .context("raw socket for SYNs")?;
        let receive = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))
            .context("raw socket for SYN-ACKs")?;
        receive.set_recv_buffer_size(8 << 20)?;
        receive.set_nonblocking(true)?;
        Ok(SynProbe { send, receive })
    }

    /// Probes `hosts` on `port` from `source` every `period` until each
    /// answered or `deadline`; `ready` is called once the first round went
    /// out (so that what is timed starts after the probing).
    pub fn run(
        &self,
        source: Ipv4Addr,
        hosts: &[Ipv4Addr],
        port: u16,
        period: Duration,
        deadline: Instant,
        ready: impl FnOnce(),
    ) -> Result<Opened> {
        let index: HashMap<Ipv4Addr, usize> =
            hosts.iter().enumerate().map(|(i, h)| (*h, i)).collect();
        let mut at = vec![None; hosts.len()];
        let mut closed: Vec<usize> = (0..hosts.len()).collect();
        // Attempt n (the SYN's sequence number) went to host attempts[n].0 at attempts[n].1.
        let mut attempts: Vec<(usize, Instant)> = Vec::new();
        let mut ready = Some(ready);
        let started = Instant::now();
        let mut rounds = 0;
        while !closed.is_empty() && Instant::now() < deadline {
            let round = Instant::now();
            for &host in &closed {
                let number = u32::try_from(attempts.len()).context("too many attempts")?;
                let mut syn = Vec::with_capacity(40);
                // Source ports cycle above 1024 so consecutive SYNs are separate flows.
                PacketBuilder::ipv4(source.octets(), hosts[host].octets(), 64)
                    .tcp(1024 + (number % 60_000) as u16, port, number, 64_240)
                    .syn()
                    .write(&mut syn, &[])
                    .context("build a SYN")?;
                let to = SocketAddr::V4(SocketAddrV4::new(hosts[host], port));
                attempts.push((host, Instant::now()));
                self.send
                    .send_to(&syn, &to.into())
                    .with_context(|| format!("send a SYN to {to}"))?;
            }
            if let Some(ready) = ready.take() {
                ready();
            }
            rounds += 1;
            self.answers(source, port, &index, &attempts, &mut at)?;
            closed.retain(|h| at[*h].is_none());
            std::thread::sleep(period.saturating_sub(round.elapsed()));
        }
        // SYN-ACKs of the last round.
        std::thread::sleep(Duration::from_millis(20));
        self.answers(source, port, &index, &attempts, &mut at)?;
        Ok(Opened {
            at,
            sent: attempts.len() as u64,
            rounds,
            mean_round: started.elapsed() / u32::try_from(rounds.max(1)).unwrap_or(u32::MAX),
        })
    }

    /// Reads every segment queued; a SYN-ACK from a probed host to
    /// `source` marks the attempt it acknowledges as the one that passed.
    fn answers(
        &self,
        source: Ipv4Addr,
        port: u16,
        index: &HashMap<Ipv4Addr, usize>,
        attempts: &[(usize, Instant)],
        at: &mut [Option<Instant>],
    ) -> Result<()> {
        let mut buffer = [0u8; 2048];
        loop {
            let len = match (&self.receive).read(&mut buffer) {
                Ok(len) => len,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e).context("receive SYN-ACKs"),
            };
            let Ok(packet) = SlicedPacket::from_ip(&buffer[..len]) else {
                continue;
            };
            let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) =
                (packet.net, packet.transport)
            else {
                continue;
            };
            let from = ip.header().source_addr();
            if ip.header().destination_addr() != source
                || tcp.source_port() != port
                || !(tcp.syn() && tcp.ack())
            {
                continue;
            }
            let Some(&host) = index.get(&from) else {
                continue;
            };
            let attempt = tcp.acknowledgment_number().wrapping_sub(1) as usize;
            if let Some(&(to, sent)) = attempts.get(attempt)
                && to == host
                && at[host].is_none_or(|earlier| sent < earlier)
            {
                at[host] = Some(sent);
            }
        }
    }
}
