//! Live traffic through the attached gate: real TCP and UDP sockets in two
//! namespaces joined by veth, over IPv4 and IPv6; crafted frames sent raw
//! from the client namespace, answered (or not) by the gated stack.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use ipnet::IpNet;
use jit_gate_agent::{enforce::xdp::Attachment, net::Protocol};
use jit_gate_tests::{
    frames::{PacketSocket, mac_of},
    gated_host::GatedHost,
    netns::{CLIENT_V4, CLIENT_V4_OUTSIDE, CLIENT_V6, CLIENT_V6_OUTSIDE, GATED_V4, GATED_V6},
    packets::{Packet, tcp_flag::SYN},
    traffic::{TcpEcho, UdpSink, round_trip, tcp_connect, udp_send},
};

const SSH: u16 = 22;
const SYSLOG: u16 = 514;
const OPEN_PORT: u16 = 8080;
const PROTECTED: [(Protocol, u16); 2] = [(Protocol::Tcp, SSH), (Protocol::Udp, SYSLOG)];

/// (client source, gated address) pairs for both families.
const FAMILIES: [(IpAddr, IpAddr); 2] = [
    (IpAddr::V4(CLIENT_V4), IpAddr::V4(GATED_V4)),
    (IpAddr::V6(CLIENT_V6), IpAddr::V6(GATED_V6)),
];

fn host_net(addr: IpAddr) -> IpNet {
    IpNet::from(addr)
}

/// Echo servers on the protected and the open port, for both families.
fn servers(host: &GatedHost) -> Vec<TcpEcho> {
    FAMILIES
        .iter()
        .flat_map(|(_, gated)| {
            [SSH, OPEN_PORT]
                .map(|port| TcpEcho::start(&host.topo.gated, SocketAddr::new(*gated, port)))
        })
        .collect()
}

fn assert_open_port_reachable(host: &GatedHost, src: IpAddr, gated: IpAddr) {
    let mut s = tcp_connect(&host.topo.client, src, SocketAddr::new(gated, OPEN_PORT))
        .expect_connected("unprotected port");
    round_trip(&mut s, b"open").expect("unprotected port echoes");
}

#[test]
fn attaches_in_native_mode_on_veth() {
    let host = GatedHost::new(&PROTECTED);
    assert_eq!(
        host.attachment,
        Attachment::Attached(jit_gate_agent::enforce::xdp::AttachMode::Native)
    );
}

#[test]
fn without_grant_tcp_is_silently_dropped_and_udp_does_not_arrive() {
    let host = GatedHost::new(&PROTECTED);
    let _servers = servers(&host);
    for (src, gated) in FAMILIES {
        tcp_connect(&host.topo.client, src, SocketAddr::new(gated, SSH))
            .expect_timed_out("no grant");
        let sink = UdpSink::start(&host.topo.gated, SocketAddr::new(gated, SYSLOG));
        udp_send(
            &host.topo.client,
            src,
            SocketAddr::new(gated, SYSLOG),
            b"denied",
        );
        assert!(
            !sink.arrives(b"denied"),
            "UDP to a protected port arrived without a grant ({src})"
        );
        assert_open_port_reachable(&host, src, gated);
    }
    let counters = host
        .gate
        .counters(&PROTECTED.into_iter().collect())
        .expect("counters");
    let dropped = counters.by_port[&(Protocol::Tcp, SSH)].dropped;
    assert!(dropped >= 2, "SYN drops counted on port 22: {dropped}");
}

#[test]
fn exact_grant_opens_tcp_and_udp_for_that_source_only() {
    let mut host = GatedHost::new(&PROTECTED);
    let _servers = servers(&host);
    for (i, (src, gated)) in FAMILIES.into_iter().enumerate() {
        let id = i as u64 + 1;
        host.grant(
            host_net(src),
            Protocol::Tcp,
            SSH,
            Duration::from_mins(1),
            id,
        );
        host.grant(
            host_net(src),
            Protocol::Udp,
            SYSLOG,
            Duration::from_mins(1),
            id,
        );
        let mut s = tcp_connect(&host.topo.client, src, SocketAddr::new(gated, SSH))
            .expect_connected("exact grant");
        round_trip(&mut s, b"granted").expect("echo under grant");
        let sink = UdpSink::start(&host.topo.gated, SocketAddr::new(gated, SYSLOG));
        udp_send(
            &host.topo.client,
            src,
            SocketAddr::new(gated, SYSLOG),
            b"granted",
        );
        assert!(
            sink.arrives(b"granted"),
            "UDP under an exact grant did not arrive ({src})"
        );
    }
    // The other client addresses hold no grant.
    for (src, gated) in [
        (IpAddr::V4(CLIENT_V4_OUTSIDE), IpAddr::V4(GATED_V4)),
        (IpAddr::V6(CLIENT_V6_OUTSIDE), IpAddr::V6(GATED_V6)),
    ] {
        tcp_connect(&host.topo.client, src, SocketAddr::new(gated, SSH))
            .expect_timed_out("other source");
    }
}

#[test]
fn cidr_grant_opens_inside_the_prefix_only() {
    let mut host = GatedHost::new(&PROTECTED);
    let _servers = servers(&host);
    host.grant(
        "192.0.2.0/25".parse().unwrap(),
        Protocol::Tcp,
        SSH,
        Duration::from_mins(1),
        1,
    );
    host.grant(
        "2001:db8::/112".parse().unwrap(),
        Protocol::Tcp,
        SSH,
        Duration::from_mins(1),
        2,
    );
    let cases = [
        (CLIENT_V4.into(), GATED_V4.into(), true),
        (CLIENT_V4_OUTSIDE.into(), GATED_V4.into(), false),
        (CLIENT_V6.into(), GATED_V6.into(), true),
        (CLIENT_V6_OUTSIDE.into(), GATED_V6.into(), false),
    ];
    for (src, gated, inside) in cases {
        let attempt = tcp_connect(&host.topo.client, src, SocketAddr::new(gated, SSH));
        if inside {
            let mut s = attempt.expect_connected("inside the CIDR grant");
            round_trip(&mut s, b"cidr").expect("echo under CIDR grant");
        } else {
            attempt.expect_timed_out("outside the CIDR grant");
        }
        assert_open_port_reachable(&host, src, gated);
    }
}

#[test]
fn connection_opened_under_grant_survives_expiry_but_new_ones_are_dropped() {
    let mut host = GatedHost::new(&PROTECTED);
    let _servers = servers(&host);
    let ttl = Duration::from_secs(2);
    let mut sessions = Vec::new();
    for (i, (src, gated)) in FAMILIES.into_iter().enumerate() {
        host.grant(host_net(src), Protocol::Tcp, SSH, ttl, i as u64 + 1);
        let mut s = tcp_connect(&host.topo.client, src, SocketAddr::new(gated, SSH))
            .expect_connected("under grant");
        round_trip(&mut s, b"before expiry").expect("echo before expiry");
        sessions.push((s, src, gated));
    }
    assert_eq!(
        host.gate.flows().expect("flows").len(),
        2,
        "one tracked flow per session"
    );
    std::thread::sleep(ttl + Duration::from_millis(300));
    for (mut s, src, gated) in sessions {
        round_trip(&mut s, b"after expiry")
            .expect("established session keeps working after expiry");
        tcp_connect(&host.topo.client, src, SocketAddr::new(gated, SSH))
            .expect_timed_out("new connection after expiry");
        assert_open_port_reachable(&host, src, gated);
    }
}

/// Raw frames from the client's end of the veth pair, and what comes back.
struct RawClient {
    socket: PacketSocket,
    macs: ([u8; 6], [u8; 6]),
}

impl RawClient {
    fn new(host: &GatedHost) -> Self {
        RawClient {
            socket: PacketSocket::capture(&host.topo.client, &host.topo.client_if),
            macs: (
                mac_of(&host.topo.client, &host.topo.client_if),
                mac_of(&host.topo.gated, &host.topo.gated_if),
            ),
        }
    }

    /// Whether the gated host answers a SYN from `src`:`src_port` to
    /// `dst`:22 carried under `tags` priority tags with a SYN-ACK.
    fn syn_answered(&self, src: IpAddr, dst: IpAddr, tags: usize, src_port: u16) -> bool {
        let frame = Packet::tcp(src, dst, SSH, SYN)
            .src_port(src_port)
            .priority_tags(tags)
            .macs(self.macs.0, self.macs.1)
            .build()
            .bytes;
        self.socket.drain(Duration::ZERO);
        self.socket.send(&frame);
        self.socket
            .drain(Duration::from_millis(500))
            .iter()
            .any(|reply| is_syn_ack(reply, dst, src_port))
    }
}

/// A SYN-ACK from `from`:22 to port `to_port`.
fn is_syn_ack(frame: &[u8], from: IpAddr, to_port: u16) -> bool {
    let Ok(packet) = SlicedPacket::from_ethernet(frame) else {
        return false;
    };
    let source = match &packet.net {
        Some(NetSlice::Ipv4(ip)) => IpAddr::from(ip.header().source_addr()),
        Some(NetSlice::Ipv6(ip)) => IpAddr::from(ip.header().source_addr()),
        _ => return false,
    };
    matches!(&packet.transport, Some(TransportSlice::Tcp(tcp))
        if source == from && tcp.source_port() == SSH && tcp.destination_port() == to_port
            && tcp.syn() && tcp.ack())
}

#[test]
fn priority_tagged_syns_are_gated_like_untagged_ones() {
    let mut host = GatedHost::new(&PROTECTED);
    let _servers = servers(&host);
    let client = RawClient::new(&host);
    let mut port = 45_000;
    let mut next_port = || {
        port += 1;
        port
    };
    // The kernel strips any number of priority tags and delivers the SYN:
    // without a grant, the gate must drop it whatever the tag count.
    for tags in [0, 1, 2, 3, 4, 6] {
        for (src, gated) in FAMILIES {
            assert!(
                !client.syn_answered(src, gated, tags, next_port()),
                "a SYN under {tags} priority tags from {src} was answered without a grant"
            );
        }
    }
    for (i, (src, _)) in FAMILIES.into_iter().enumerate() {
        host.grant(
            host_net(src),
            Protocol::Tcp,
            SSH,
            Duration::from_mins(1),
            i as u64 + 1,
        );
    }
    for tags in [0, 3, 6] {
        for (src, gated) in FAMILIES {
            assert!(
                client.syn_answered(src, gated, tags, next_port()),
                "a SYN under {tags} priority tags from {src} got no answer under a grant"
            );
        }
    }
}

#[test]
fn a_flooding_grantee_never_evicts_another_users_session() {
    let mut host = GatedHost::new(&PROTECTED);
    let _servers = servers(&host);
    let victim_grant = Duration::from_secs(3);
    host.grant(
        host_net(CLIENT_V4.into()),
        Protocol::Tcp,
        SSH,
        victim_grant,
        1,
    );
    let granted_at = Instant::now();
    let ssh = SocketAddr::new(GATED_V4.into(), SSH);
    let mut session =
        tcp_connect(&host.topo.client, CLIENT_V4.into(), ssh).expect_connected("victim");
    round_trip(&mut session, b"before").expect("victim's session");
    // A second grantee (four addresses under one CIDR grant) opens new
    // connections as fast as the program runs: SYNs on 150,000 tuples, more
    // than the 65,536 entries the LRU flow table of old held.
    host.grant(
        "192.0.2.76/30".parse().unwrap(),
        Protocol::Tcp,
        SSH,
        Duration::from_mins(1),
        2,
    );
    let mut passed = 0;
    for i in 0..150_000u32 {
        let flooder = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 76 + (i / 50_000) as u8));
        let frame = Packet::tcp(flooder, GATED_V4.into(), SSH, SYN)
            .src_port(1024 + (i % 50_000) as u16)
            .build()
            .bytes;
        let result = host
            .gate
            .program()
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        passed += u32::from(result.return_value == 2);
    }
    let quota = host.gate.options().flow_quota;
    assert_eq!(passed, quota, "the flooder opened exactly its quota");
    let counts = host.gate.grant_flow_counts().expect("grant counters");
    assert_eq!(counts[&2].opened, u64::from(quota));
    assert!(counts[&2].refused > 100_000, "{:?}", counts[&2]);
    std::thread::sleep(
        (granted_at + victim_grant + Duration::from_millis(300))
            .saturating_duration_since(Instant::now()),
    );
    round_trip(&mut session, b"after")
        .expect("the victim's session survives the flood and its own grant's expiry");
    tcp_connect(&host.topo.client, CLIENT_V4.into(), ssh)
        .expect_timed_out("a new connection after the victim's grant expired");
}
