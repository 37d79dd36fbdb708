//! The process that installed the gate dies by SIGKILL while a grant is
//! live: the pinned program keeps enforcing, and the grant still closes on
//! time because its expiry is checked in the kernel; the half-open flows a
//! grantee left behind never let a new connection in after it.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use jit_gate_common::maps::{FlowKey, FlowValue, flow_state, names};
use jit_gate_tests::{
    env::PinDir,
    frames::{PacketSocket, mac_of},
    netns::{CLIENT_V4, CLIENT_V4_OUTSIDE, GATED_V4, Topology},
    packets::{Packet, tcp_flag::SYN},
    traffic::{TcpEcho, round_trip, tcp_connect, tcp_connect_from},
};

const SSH: u16 = 22;
const GRANT: Duration = Duration::from_secs(5);

/// Starts the installer: the gate on the gated end of the veth pair, SSH
/// protected, `CLIENT_V4` granted for `grant`. Returns it and the instant by
/// which the grant has expired.
fn install(topo: &Topology, pins: &PinDir, grant: Duration) -> (Child, Instant) {
    let mut installer = Command::new(env!("CARGO_BIN_EXE_gate-installer"))
        .args(["--pin-dir", pins.path.to_str().unwrap()])
        .args(["--netns", &topo.gated.name, "--ifname", &topo.gated_if])
        .args([
            "--port",
            &SSH.to_string(),
            "--grant-source",
            &CLIENT_V4.to_string(),
        ])
        .args(["--grant-ms", &grant.as_millis().to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start gate-installer");
    let mut line = String::new();
    BufReader::new(installer.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("read installer output");
    assert_eq!(line.trim(), "ready", "installer failed to set up the gate");
    // The grant was written before "ready": it expires no later than this + grant.
    (installer, Instant::now() + grant)
}

#[test]
fn enforcement_and_expiry_survive_sigkill_of_the_installer() {
    let topo = Topology::new();
    let pins = PinDir::new();
    let _server = TcpEcho::start(&topo.gated, SocketAddr::new(GATED_V4.into(), SSH));
    let (mut installer, expiry) = install(&topo, &pins, GRANT);

    let ssh = SocketAddr::new(GATED_V4.into(), SSH);
    let granted: IpAddr = CLIENT_V4.into();
    let mut session = tcp_connect(&topo.client, granted, ssh).expect_connected("under grant");
    round_trip(&mut session, b"hello").expect("echo under grant");

    installer.kill().expect("SIGKILL the installer"); // Child::kill sends SIGKILL
    installer.wait().expect("reap the installer");

    // Still enforcing: the ungranted source is dropped, the granted one passes.
    tcp_connect(&topo.client, CLIENT_V4_OUTSIDE.into(), ssh)
        .expect_timed_out("no grant, installer dead");
    let mut second = tcp_connect(&topo.client, granted, ssh)
        .expect_connected("grant still live, installer dead");
    round_trip(&mut second, b"still").expect("echo after the installer died");

    // The grant closes on time with nobody left to remove it.
    std::thread::sleep(
        expiry.saturating_duration_since(Instant::now()) + Duration::from_millis(200),
    );
    tcp_connect(&topo.client, granted, ssh).expect_timed_out("new connection after expiry");
    round_trip(&mut session, b"established").expect("the established session survives expiry");
    drop(pins);
}

#[test]
fn half_open_flows_of_an_expired_grant_let_no_syn_in_with_the_installer_dead() {
    let topo = Topology::new();
    let pins = PinDir::new();
    let _server = TcpEcho::start(&topo.gated, SocketAddr::new(GATED_V4.into(), SSH));
    let grant = Duration::from_secs(2);
    let (mut installer, expiry) = install(&topo, &pins, grant);
    // Under the grant, bare SYNs from chosen ports: no handshake completes
    // (the client has no socket and resets the SYN-ACKs), the flows stay
    // half-open in the kernel.
    let raw = PacketSocket::sender(&topo.client, &topo.client_if);
    let macs = (
        mac_of(&topo.client, &topo.client_if),
        mac_of(&topo.gated, &topo.gated_if),
    );
    let ports: Vec<u16> = (46_001..=46_003).collect();
    for &port in &ports {
        let syn = Packet::tcp(CLIENT_V4.into(), GATED_V4.into(), SSH, SYN)
            .src_port(port)
            .macs(macs.0, macs.1)
            .build()
            .bytes;
        raw.send(&syn);
    }
    std::thread::sleep(Duration::from_millis(300));
    let flows: HashMap<MapData, FlowKey, FlowValue> =
        MapData::from_pin(pins.path.join(names::FLOWS))
            .and_then(Map::from_map_data)
            .and_then(HashMap::try_from)
            .expect("the pinned flow table");
    let half_open = flows
        .iter()
        .filter_map(Result::ok)
        .filter(|(key, value)| {
            ports.contains(&key.src_port) && value.state & flow_state::ESTABLISHED == 0
        })
        .count();
    assert_eq!(half_open, ports.len(), "each SYN left a half-open flow");
    installer.kill().expect("SIGKILL the installer");
    installer.wait().expect("reap the installer");
    std::thread::sleep(
        expiry.saturating_duration_since(Instant::now()) + Duration::from_millis(200),
    );
    // Well within the half-open timeout, a real connection from each tuple.
    let ssh = SocketAddr::new(GATED_V4.into(), SSH);
    for port in ports {
        tcp_connect_from(&topo.client, SocketAddr::new(CLIENT_V4.into(), port), ssh)
            .expect_timed_out("a new connection on a half-open tuple after the grant expired");
    }
}
