//! Re-adoption after a restart: opening the gate again on the same pins
//! reuses the maps (grants and flows intact) and replaces the program inside
//! the pinned link, so the interface is never without the gate.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{net::SocketAddr, time::Duration};

use jit_gate_agent::{
    enforce::xdp::{Attachment, XdpGate},
    net::Protocol,
};
use jit_gate_tests::{
    gated_host::GatedHost,
    netns::{CLIENT_V4, CLIENT_V4_OUTSIDE, GATED_V4},
    traffic::{TcpEcho, round_trip, tcp_connect},
};

const SSH: u16 = 22;

#[test]
fn reopening_the_pins_keeps_grants_flows_and_enforcement() {
    let mut host = GatedHost::new(&[(Protocol::Tcp, SSH)]);
    let _server = TcpEcho::start(&host.topo.gated, SocketAddr::new(GATED_V4.into(), SSH));
    let ssh = SocketAddr::new(GATED_V4.into(), SSH);
    host.grant(
        std::net::IpAddr::from(CLIENT_V4).into(),
        Protocol::Tcp,
        SSH,
        Duration::from_mins(1),
        7,
    );
    let mut session =
        tcp_connect(&host.topo.client, CLIENT_V4.into(), ssh).expect_connected("granted");
    round_trip(&mut session, b"before").expect("echo before restart");
    let grants_before = host.gate.grants().expect("grants");
    let flows_before = host.gate.flows().expect("flows");

    // "Restart": a new process would open the same pins and attach again.
    let mut reopened = XdpGate::open(host.pins.path.clone()).expect("reopen from pins");
    let ifname = host.topo.gated_if.clone();
    let attachment = host
        .topo
        .gated
        .run(|| reopened.attach(&ifname))
        .expect("re-attach");
    assert_eq!(attachment, Attachment::Adopted);
    host.gate = reopened;

    assert_eq!(
        host.gate.grants().expect("grants"),
        grants_before,
        "grants survive"
    );
    assert_eq!(
        host.gate.flows().expect("flows"),
        flows_before,
        "flows survive"
    );
    assert_eq!(
        host.gate.protected().expect("ports"),
        [(Protocol::Tcp, SSH)].into()
    );
    assert_eq!(
        host.gate.attached_interfaces().expect("links"),
        vec![ifname]
    );
    round_trip(&mut session, b"after").expect("established session survives the restart");
    tcp_connect(&host.topo.client, CLIENT_V4.into(), ssh).expect_connected("grant still honoured");
    tcp_connect(&host.topo.client, CLIENT_V4_OUTSIDE.into(), ssh).expect_timed_out("still gated");
}

#[test]
fn remove_detaches_and_unpins_everything() {
    let host = GatedHost::new(&[(Protocol::Tcp, SSH)]);
    let _server = TcpEcho::start(&host.topo.gated, SocketAddr::new(GATED_V4.into(), SSH));
    let ssh = SocketAddr::new(GATED_V4.into(), SSH);
    tcp_connect(&host.topo.client, CLIENT_V4.into(), ssh).expect_timed_out("gated");
    let GatedHost {
        gate, pins, topo, ..
    } = host;
    drop(gate);
    XdpGate::remove(&pins.path).expect("remove the gate");
    assert!(!pins.path.exists(), "pin directory removed");
    tcp_connect(&topo.client, CLIENT_V4.into(), ssh).expect_connected("gate removed");
}
