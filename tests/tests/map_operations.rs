//! The enforcement library's map operations, observed through the loaded
//! program with `BPF_PROG_TEST_RUN`: removing grants and flows, wall-clock
//! expiries, and the rate-limited deny-event ring buffer.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, SystemTime},
};

use aya::programs::{TestRun, TestRunOptions};
use jit_gate_agent::{
    clock::{boot_now_ns, wall_to_boot_ns},
    enforce::xdp::XdpGate,
    net::{GrantTarget, Protocol},
};
use jit_gate_common::{
    maps::DenyEvent,
    verdict::{Reason, tcp_flags},
};
use jit_gate_tests::{env::PinDir, packets::Packet};

const SSH: u16 = 22;
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
const HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

fn gate(pins: &PinDir) -> XdpGate {
    let mut gate = pins.open_gate();
    gate.set_protected_ports(&BTreeSet::from([(Protocol::Tcp, SSH)]))
        .expect("protect SSH");
    gate
}

fn passes(gate: &XdpGate, flags: u8) -> bool {
    let frame = Packet::tcp(CLIENT, HOST, SSH, flags).build().bytes;
    let result = gate
        .program()
        .test_run(TestRunOptions {
            data_in: Some(&frame),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    match result.return_value {
        1 => false,
        2 => true,
        other => panic!("unexpected XDP action {other}"),
    }
}

fn ssh_from(source: &str) -> GrantTarget {
    GrantTarget {
        source: source.parse().expect("source"),
        protocol: Protocol::Tcp,
        port: SSH,
    }
}

#[test]
fn removed_grants_and_flows_stop_passing() {
    let pins = PinDir::new();
    let mut gate = gate(&pins);
    let exact = ssh_from("198.51.100.7/32");
    let cidr = ssh_from("198.51.100.0/24");
    let live = boot_now_ns() + 60_000_000_000;

    gate.upsert_grant(&exact, live, 1).expect("exact grant");
    assert!(
        passes(&gate, tcp_flags::SYN),
        "exact grant passes and opens a flow"
    );
    assert_eq!(gate.flows().expect("flows").len(), 1);
    assert!(gate.remove_grant(&exact).expect("remove exact"));
    assert!(
        !gate.remove_grant(&exact).expect("remove again"),
        "second removal finds nothing"
    );
    assert!(passes(&gate, tcp_flags::ACK), "the flow outlives the grant");
    let flow = gate.flows().expect("flows")[0];
    assert!(gate.remove_flow(&flow.key).expect("remove flow"));
    assert!(!passes(&gate, tcp_flags::ACK), "no grant, no flow: dropped");

    gate.upsert_grant(&cidr, live, 2).expect("CIDR grant");
    assert!(passes(&gate, tcp_flags::SYN), "CIDR grant passes");
    assert!(gate.remove_grant(&cidr).expect("remove CIDR"));
    for flow in gate.flows().expect("flows") {
        gate.remove_flow(&flow.key).expect("remove flow");
    }
    assert!(
        !passes(&gate, tcp_flags::SYN),
        "CIDR grant removed: dropped"
    );
    assert!(gate.grants().expect("grants").is_empty());
}

#[test]
fn wall_clock_expiries_convert_to_boot_time() {
    let pins = PinDir::new();
    let mut gate = gate(&pins);
    let target = ssh_from("198.51.100.7/32");
    let ahead = wall_to_boot_ns(SystemTime::now() + Duration::from_secs(30));
    gate.upsert_grant(&target, ahead, 1).expect("grant");
    assert!(passes(&gate, tcp_flags::ACK), "expiry 30 s ahead: live");
    let behind = wall_to_boot_ns(SystemTime::now() - Duration::from_secs(1));
    gate.upsert_grant(&target, behind, 1).expect("grant");
    assert!(!passes(&gate, tcp_flags::ACK), "expiry 1 s ago: dead");
}

fn drain(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<DenyEvent> {
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        assert_eq!(item.len(), size_of::<DenyEvent>(), "event size");
        // SAFETY: DenyEvent is plain old data of exactly this size.
        events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<DenyEvent>()) });
    }
    events
}

#[test]
fn deny_events_are_rate_limited_per_source_without_losing_the_count() {
    let pins = PinDir::new();
    let mut gate = gate(&pins);
    let mut ring = gate.take_deny_events().expect("deny event ring buffer");
    gate.set_deny_report_interval(Duration::from_hours(1))
        .expect("interval");

    for _ in 0..5 {
        assert!(!passes(&gate, tcp_flags::SYN));
    }
    let events = drain(&mut ring);
    assert_eq!(events.len(), 1, "one report per source per interval");
    let event = events[0];
    assert_eq!(&event.src[..4], &[198, 51, 100, 7]);
    assert_eq!(
        (event.protocol, event.dst_port),
        (Protocol::Tcp.number(), SSH)
    );
    assert_eq!(event.reason, Reason::DropNoGrant as u32);
    assert_eq!(event.suppressed_before, 0);

    // With no interval every denial is reported, carrying the four suppressed before.
    gate.set_deny_report_interval(Duration::ZERO)
        .expect("interval");
    assert!(!passes(&gate, tcp_flags::SYN));
    assert!(!passes(&gate, tcp_flags::SYN));
    let events = drain(&mut ring);
    let suppressed: Vec<u64> = events.iter().map(|e| e.suppressed_before).collect();
    assert_eq!(
        suppressed,
        [4, 0],
        "the suppressed count travels with the next report"
    );

    let counters = gate.counters().expect("counters");
    assert_eq!(counters.by_reason[&Reason::DropNoGrant], 7);
    assert_eq!(counters.by_port[&(Protocol::Tcp, SSH)].dropped, 7);
}
