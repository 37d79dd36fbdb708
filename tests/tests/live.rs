//! Live traffic through the attached gate: real TCP and UDP sockets in two
//! namespaces joined by veth, over IPv4 and IPv6.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use ipnet::IpNet;
use jit_gate_agent::{enforce::xdp::Attachment, net::Protocol};
use jit_gate_tests::{
    gated_host::GatedHost,
    netns::{CLIENT_V4, CLIENT_V4_OUTSIDE, CLIENT_V6, CLIENT_V6_OUTSIDE, GATED_V4, GATED_V6},
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
    let counters = host.gate.counters().expect("counters");
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
