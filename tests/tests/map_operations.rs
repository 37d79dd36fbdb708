//! The enforcement library's map operations, observed through the loaded
//! program with `BPF_PROG_TEST_RUN`: removing grants and flows, wall-clock
//! expiries, per-grant flow limits (quota, single use) and their counters,
//! a full flow table, and the budgeted deny-event ring buffer.

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
    enforce::xdp::{GateOptions, GrantLimits, XdpGate},
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
const MINUTE_NS: u64 = 60_000_000_000;

fn protected() -> BTreeSet<(Protocol, u16)> {
    BTreeSet::from([(Protocol::Tcp, SSH)])
}

fn gate_with(pins: &PinDir, options: GateOptions) -> XdpGate {
    let mut gate = XdpGate::open_with(&pins.path, options)
        .unwrap_or_else(|e| panic!("loading the XDP program: {e}"));
    gate.set_protected_ports(&protected()).expect("protect SSH");
    gate
}

fn gate(pins: &PinDir) -> XdpGate {
    gate_with(pins, GateOptions::default())
}

/// Whether a TCP segment from `src`:`src_port` to SSH passes.
fn passes_from(gate: &XdpGate, src: IpAddr, src_port: u16, flags: u8) -> bool {
    let frame = Packet::tcp(src, HOST, SSH, flags)
        .src_port(src_port)
        .build()
        .bytes;
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

fn passes(gate: &XdpGate, flags: u8) -> bool {
    passes_from(gate, CLIENT, 40_000, flags)
}

fn ssh_from(source: &str) -> GrantTarget {
    GrantTarget {
        source: source.parse().expect("source"),
        protocol: Protocol::Tcp,
        port: SSH,
    }
}

fn reasons(gate: &XdpGate) -> std::collections::BTreeMap<Reason, u64> {
    gate.counters(&protected()).expect("counters").by_reason
}

#[test]
fn removed_grants_and_flows_stop_passing() {
    let pins = PinDir::new();
    let mut gate = gate(&pins);
    let exact = ssh_from("198.51.100.7/32");
    let cidr = ssh_from("198.51.100.0/24");
    let live = boot_now_ns() + MINUTE_NS;

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
    assert!(
        !passes(&gate, tcp_flags::SYN),
        "a SYN on the flow's tuple needs a live grant"
    );
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

#[test]
fn a_grants_quota_bounds_its_open_flows_and_closed_ones_free_it() {
    let pins = PinDir::new();
    let mut gate = gate(&pins);
    let limits = GrantLimits {
        flow_quota: 3,
        max_opens: 0,
    };
    let live = boot_now_ns() + MINUTE_NS;
    gate.upsert_grant_with_limits(&ssh_from("198.51.100.7/32"), live, 9, limits)
        .expect("grant");
    for port in 1..=3 {
        assert!(
            passes_from(&gate, CLIENT, port, tcp_flags::SYN),
            "tuple {port}"
        );
    }
    assert!(
        !passes_from(&gate, CLIENT, 4, tcp_flags::SYN),
        "a fourth connection is over the quota"
    );
    assert!(
        passes_from(&gate, CLIENT, 2, tcp_flags::SYN),
        "a retransmitted SYN is not a new connection"
    );
    assert_eq!(reasons(&gate)[&Reason::DropFlowQuota], 1);
    let counts = gate.grant_flow_counts().expect("counts")[&9];
    assert_eq!((counts.opened, counts.refused, counts.closed), (3, 1, 0));
    // The agent removes a dead flow: it counts as closed, and frees a place.
    let dead = gate.flows().expect("flows")[0].key;
    assert!(gate.remove_flow(&dead).expect("remove"));
    assert_eq!(gate.grant_flow_counts().expect("counts")[&9].closed, 1);
    assert!(passes_from(&gate, CLIENT, 4, tcp_flags::SYN), "room again");
    assert!(!passes_from(&gate, CLIENT, 5, tcp_flags::SYN), "full again");
    let port_counts = gate.counters(&protected()).expect("counters").by_port[&(Protocol::Tcp, SSH)];
    assert_eq!((port_counts.dropped, port_counts.refused), (2, 2));
}

#[test]
fn a_single_use_grant_opens_its_maximum_of_connections_ever() {
    let pins = PinDir::new();
    let mut gate = gate(&pins);
    let limits = GrantLimits {
        flow_quota: 64,
        max_opens: 2,
    };
    let live = boot_now_ns() + MINUTE_NS;
    gate.upsert_grant_with_limits(&ssh_from("198.51.100.0/24"), live, 5, limits)
        .expect("grant");
    assert!(passes_from(&gate, CLIENT, 1, tcp_flags::SYN));
    let other = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 8));
    assert!(passes_from(&gate, other, 1, tcp_flags::SYN));
    assert!(
        !passes_from(&gate, other, 2, tcp_flags::SYN),
        "a third connection under a grant of two opens"
    );
    for flow in gate.flows().expect("flows") {
        gate.remove_flow(&flow.key).expect("remove");
    }
    assert!(
        !passes_from(&gate, CLIENT, 3, tcp_flags::SYN),
        "closing connections gives no opens back"
    );
    assert_eq!(reasons(&gate)[&Reason::DropOpensExhausted], 2);
    let entry = gate.grants().expect("grants")[0];
    assert_eq!(entry.limits, limits, "the limits travel in the grant entry");
}

#[test]
fn a_full_flow_table_refuses_new_connections_and_keeps_every_flow() {
    let pins = PinDir::new();
    let options = GateOptions {
        flow_capacity: 8,
        ..GateOptions::default()
    };
    let mut gate = gate_with(&pins, options);
    let live = boot_now_ns() + MINUTE_NS;
    gate.upsert_grant(&ssh_from("198.51.100.0/24"), live, 1)
        .expect("grant");
    for port in 1..=8 {
        assert!(passes_from(&gate, CLIENT, port, tcp_flags::SYN));
    }
    let other = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 9));
    assert!(
        !passes_from(&gate, other, 1, tcp_flags::SYN),
        "no room: the new connection is refused"
    );
    assert_eq!(reasons(&gate)[&Reason::DropFlowTableFull], 1);
    for port in 1..=8 {
        assert!(
            passes_from(&gate, CLIENT, port, tcp_flags::ACK),
            "flow {port} survives the full table"
        );
    }
    let first = gate.flows().expect("flows")[0].key;
    gate.remove_flow(&first).expect("remove");
    assert!(passes_from(&gate, other, 1, tcp_flags::SYN), "room again");
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

/// Keeps the calling thread on CPU 0, so the per-CPU budget is one budget.
fn stay_on_one_cpu() {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity
    // only touch it and the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        let rc = libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn deny_events_are_budgeted_per_cpu_and_the_counters_carry_every_denial() {
    stay_on_one_cpu();
    let pins = PinDir::new();
    let mut gate = gate(&pins);
    let mut ring = gate.take_deny_events().expect("deny event ring buffer");
    gate.set_deny_budget(3, Duration::from_hours(1))
        .expect("budget");
    // Ten denials from ten sources: no state per source, three events.
    for i in 0..10u8 {
        let source = IpAddr::V4(Ipv4Addr::new(203, 0, 113, i));
        assert!(!passes_from(&gate, source, 40_000, tcp_flags::SYN));
    }
    let events = drain(&mut ring);
    assert_eq!(events.len(), 3, "the window's budget");
    let event = events[0];
    assert_eq!(&event.src[..4], &[203, 0, 113, 0]);
    assert_eq!(
        (event.protocol, event.dst_port),
        (Protocol::Tcp.number(), SSH)
    );
    assert_eq!(event.reason, Reason::DropNoGrant as u32);
    assert_eq!(event.grant_id, 0);
    // A window of a nanosecond: every denial opens a new one.
    gate.set_deny_budget(3, Duration::from_nanos(1))
        .expect("budget");
    for _ in 0..5 {
        assert!(!passes(&gate, tcp_flags::SYN));
    }
    assert_eq!(drain(&mut ring).len(), 5);
    // A window longer than the coarse clock's lag: a spent budget waits on
    // the coarse clock, and still renews once the window has passed.
    let window = Duration::from_secs(1);
    gate.set_deny_budget(2, window).expect("budget");
    for _ in 0..2 {
        std::thread::sleep(window + Duration::from_millis(100));
        for _ in 0..4 {
            assert!(!passes(&gate, tcp_flags::SYN));
        }
        assert_eq!(drain(&mut ring).len(), 2, "a new window's budget");
    }
    let counters = gate.counters(&protected()).expect("counters");
    assert_eq!(counters.by_reason[&Reason::DropNoGrant], 23);
    assert_eq!(counters.by_port[&(Protocol::Tcp, SSH)].dropped, 23);
}

#[test]
fn a_refused_connection_is_reported_with_its_grant() {
    stay_on_one_cpu();
    let pins = PinDir::new();
    let mut gate = gate(&pins);
    let mut ring = gate.take_deny_events().expect("deny event ring buffer");
    let limits = GrantLimits {
        flow_quota: 1,
        max_opens: 0,
    };
    let live = boot_now_ns() + MINUTE_NS;
    gate.upsert_grant_with_limits(&ssh_from("198.51.100.7/32"), live, 77, limits)
        .expect("grant");
    assert!(passes_from(&gate, CLIENT, 1, tcp_flags::SYN));
    assert!(!passes_from(&gate, CLIENT, 2, tcp_flags::SYN));
    let events = drain(&mut ring);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].reason, Reason::DropFlowQuota as u32);
    assert_eq!(events[0].grant_id, 77);
}

#[test]
fn the_source_filter_keeps_every_granted_source_through_removals_and_rebuilds() {
    let pins = PinDir::new();
    let mut gate = gate(&pins);
    let live = boot_now_ns() + MINUTE_NS;
    let source = |i: u32| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
    let target = |i: u32| GrantTarget {
        source: source(i).into(),
        protocol: Protocol::Tcp,
        port: SSH,
    };
    // More removals than the filter takes before it is rebuilt.
    for i in 0..6_000 {
        gate.upsert_grant(&target(i), live, u64::from(i) + 1)
            .expect("grant");
    }
    for i in 0..5_990 {
        assert!(gate.remove_grant(&target(i)).expect("remove"));
    }
    for i in 5_990..6_000 {
        assert!(
            passes_from(&gate, source(i), 40_000, tcp_flags::SYN),
            "granted source {} refused after the rebuild",
            source(i)
        );
    }
    for i in (0..5_990).step_by(599) {
        assert!(!passes_from(&gate, source(i), 40_000, tcp_flags::SYN));
    }
    // A restart rebuilds it from the entries, whatever it held.
    drop(gate);
    let gate = XdpGate::open(&pins.path).expect("reopen");
    assert!(passes_from(&gate, source(5_995), 40_000, tcp_flags::SYN));
}
