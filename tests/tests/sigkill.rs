//! The process that installed the gate dies by SIGKILL while a grant is
//! live: the pinned program keeps enforcing, and the grant still closes on
//! time because its expiry is checked in the kernel.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use jit_gate_tests::{
    env::PinDir,
    netns::{CLIENT_V4, CLIENT_V4_OUTSIDE, GATED_V4, Topology},
    traffic::{TcpEcho, round_trip, tcp_connect},
};

const SSH: u16 = 22;
const GRANT: Duration = Duration::from_secs(5);

#[test]
fn enforcement_and_expiry_survive_sigkill_of_the_installer() {
    let topo = Topology::new();
    let pins = PinDir::new();
    let _server = TcpEcho::start(&topo.gated, SocketAddr::new(GATED_V4.into(), SSH));
    let mut installer = Command::new(env!("CARGO_BIN_EXE_gate-installer"))
        .args(["--pin-dir", pins.path.to_str().unwrap()])
        .args(["--netns", &topo.gated.name, "--ifname", &topo.gated_if])
        .args([
            "--port",
            &SSH.to_string(),
            "--grant-source",
            &CLIENT_V4.to_string(),
        ])
        .args(["--grant-ms", &GRANT.as_millis().to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start gate-installer");
    let mut line = String::new();
    BufReader::new(installer.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("read installer output");
    assert_eq!(line.trim(), "ready", "installer failed to set up the gate");
    // The grant was written before "ready": it expires no later than this + GRANT.
    let expiry = Instant::now() + GRANT;

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
