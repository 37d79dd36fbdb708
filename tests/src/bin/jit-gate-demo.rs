//! `cargo xtask demo`: the gate doing its work, in namespaces it creates.
//! A client namespace talks to a gated namespace over veth; the gate protects
//! TCP 22. Each step states what should happen and checks that it did; any
//! surprise ends the demo with a non-zero exit. Everything is removed at
//! the end, also on failure (the fixtures clean up on drop).

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use jit_gate_agent::net::Protocol;
use jit_gate_tests::{
    gated_host::GatedHost,
    netns::{CLIENT_V4, GATED_V4},
    traffic::{Connect, TcpEcho, round_trip, tcp_connect},
};

const SSH: u16 = 22;
const WEB: u16 = 8080;
const GRANT: Duration = Duration::from_secs(5);

fn step(text: &str) {
    println!("\n==> {text}");
}

fn ok(text: &str) {
    println!("    ok: {text}");
}

fn main() {
    step("Creating namespaces (gated host, client) joined by veth; attaching the XDP gate");
    let mut host = GatedHost::new(&[(Protocol::Tcp, SSH)]);
    let _servers = [SSH, WEB]
        .map(|port| TcpEcho::start(&host.topo.gated, SocketAddr::new(GATED_V4.into(), port)));
    ok(&format!(
        "gate on {} in namespace {} ({:?}); TCP {SSH} protected, TCP {WEB} not",
        host.topo.gated_if, host.topo.gated.name, host.attachment
    ));
    let client: IpAddr = CLIENT_V4.into();
    let ssh = SocketAddr::new(GATED_V4.into(), SSH);

    step(&format!(
        "Connecting from {client} to port {SSH} without a grant: expect a silent drop"
    ));
    tcp_connect(&host.topo.client, client, ssh).expect_timed_out("no grant");
    ok("no answer at all: the SYN was dropped in XDP");
    let mut web = tcp_connect(
        &host.topo.client,
        client,
        SocketAddr::new(GATED_V4.into(), WEB),
    )
    .expect_connected("unprotected port");
    round_trip(&mut web, b"web").expect("unprotected echo");
    ok(&format!("port {WEB} (unprotected) answers"));

    step(&format!(
        "Granting {client} access to TCP {SSH} for {}s",
        GRANT.as_secs()
    ));
    host.grant(client.into(), Protocol::Tcp, SSH, GRANT, 1);
    let expires = Instant::now() + GRANT;
    let mut session = tcp_connect(&host.topo.client, client, ssh).expect_connected("under grant");
    round_trip(&mut session, b"hello").expect("echo under grant");
    ok("connected and exchanged data under the grant");

    step("Waiting for the grant to expire (decided in the kernel, no user space involved)");
    std::thread::sleep(
        expires.saturating_duration_since(Instant::now()) + Duration::from_millis(300),
    );
    round_trip(&mut session, b"still here").expect("the established session survives expiry");
    ok("the session opened under the grant is still up");
    match tcp_connect(&host.topo.client, client, ssh) {
        Connect::TimedOut => ok("a new connection is dropped again"),
        other => panic!("new connection after expiry: expected a drop, got {other:?}"),
    }

    step("Kernel counters");
    let counters = host.gate.counters().expect("read counters");
    for (reason, count) in counters.by_reason.iter().filter(|(_, c)| **c > 0) {
        println!("    {:<28} {count}", reason.name());
    }
    for ((protocol, port), c) in &counters.by_port {
        println!(
            "    {port}/{protocol}: passed {}, dropped {}",
            c.passed, c.dropped
        );
    }

    step("Cleaning up: detaching the gate, deleting the namespaces");
    drop(host);
    ok("done");
}
