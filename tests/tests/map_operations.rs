//! The enforcement library's map operations, observed through the loaded
//! program with `BPF_PROG_TEST_RUN`: removing grants and flows, wall-clock
//! expiries, per-grant flow limits (quota, single use) and their counters,
//! a full flow table, flows' last-seen times on the clock the agent
//! publishes and ages flows by (also once it stops publishing), and the
//! budgeted deny-event ring buffer.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, SystemTime},
};

use aya::{
    maps::{Array, HashMap, Map, MapData, MapError},
    programs::{TestRun, TestRunOptions, Xdp},
};
use aya_obj::programs::XdpAttachType;
use jit_gate_agent::{
    clock::{boot_now_ns, wall_to_boot_ns},
    enforce::xdp::{GateOptions, GrantLimits, XdpGate},
    net::{GrantTarget, Protocol},
};
use jit_gate_common::{
    maps::{DenyEvent, FlowKey, FlowValue, names, published_clock},
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
    frame_passes(gate, &Packet::tcp(src, HOST, SSH, flags).src_port(src_port))
}

/// Whether the program passes `packet`.
fn frame_passes(gate: &XdpGate, packet: &Packet) -> bool {
    program_passes(gate.program(), packet)
}

/// Whether `program` passes `packet`.
fn program_passes(program: &Xdp, packet: &Packet) -> bool {
    let frame = packet.build().bytes;
    let result = program
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

#[test]
fn last_seen_times_are_on_the_clock_the_agent_ages_flows_by() {
    let pins = PinDir::new();
    let mut gate = gate(&pins);
    protect_syslog(&mut gate);
    gate.upsert_grant(&syslog_from(CLIENT), boot_now_ns() + MINUTE_NS, 1)
        .expect("grant");
    let datagram = |gate: &XdpGate, src_port: u16| {
        assert!(
            program_passes(gate.program(), &syslog_datagram(src_port)),
            "datagram from port {src_port} passes"
        );
    };
    let flow_from = |gate: &XdpGate, src_port: u16| flow_from_port(gate, src_port);

    // A new flow is stamped on the kernel's boot clock.
    let before = boot_now_ns();
    datagram(&gate, 40_001);
    datagram(&gate, 40_002);
    let after = boot_now_ns();
    for src_port in [40_001, 40_002] {
        let seen = flow_from(&gate, src_port).value.last_seen_boot_ns;
        assert!(
            (before..=after).contains(&seen),
            "last seen at {seen}, read between {before} and {after} on CLOCK_BOOTTIME"
        );
    }

    // Both idle for ten minutes; then traffic on one refreshes it, from
    // the boot time the agent publishes.
    let ten_minutes_ago = boot_now_ns() - 10 * MINUTE_NS;
    for src_port in [40_001, 40_002] {
        let mut flow = flow_from(&gate, src_port);
        flow.value.last_seen_boot_ns = ten_minutes_ago;
        gate.insert_flow(flow.key, flow.value)
            .expect("age the flow");
    }
    let before = boot_now_ns();
    datagram(&gate, 40_001);
    let after = boot_now_ns();
    let refreshed = flow_from(&gate, 40_001);
    let seen = refreshed.value.last_seen_boot_ns;
    assert!(
        (before.saturating_sub(published_clock::MAX_GAP_NS)..=after).contains(&seen),
        "last seen at {seen}: the published boot time when the datagram passed \
         (between {before} less the publisher's largest gap and {after})"
    );
    let allowance =
        Duration::from_nanos(published_clock::MAX_GAP_NS + published_clock::STAMP_GRANULARITY_NS);
    let refreshed_idle = gate.idle_for(&refreshed, boot_now_ns());
    assert!(
        refreshed_idle < Duration::from_secs(1),
        "a refreshed flow is recent, {refreshed_idle:?}"
    );
    // Fresh maps: every stamp so far was the kernel's clock or published,
    // so the agent's measure of idle time only allows for the stamps' lag.
    let idle = gate.idle_for(&flow_from(&gate, 40_002), boot_now_ns());
    assert!(
        idle + allowance >= Duration::from_mins(10),
        "a flow without traffic stays idle, {idle:?}"
    );
    assert_eq!(reasons(&gate)[&Reason::PassTrackedFlow], 1);
}

/// With the publisher gone (the agent stopped), the pinned program keeps
/// stamping flows from the slot as it was left: only forwards, from the
/// kernel's clock while the slot is 0, and never for anything but
/// last-seen: a half-open flow past its timeout still drops, an
/// established one still passes.
#[test]
fn a_stale_or_empty_published_clock_only_delays_last_seen() {
    let pins = PinDir::new();
    let mut gate = gate(&pins);
    protect_syslog(&mut gate);
    let now = boot_now_ns();
    let ssh = ssh_from("198.51.100.7/32");
    gate.upsert_grant(&syslog_from(CLIENT), now + MINUTE_NS, 1)
        .expect("syslog grant");
    gate.upsert_grant(&ssh, now + MINUTE_NS, 2)
        .expect("SSH grant");
    assert!(program_passes(gate.program(), &syslog_datagram(40_001)));
    assert!(passes(&gate, tcp_flags::SYN), "the grant opens a handshake");
    let datagram_flow = flow_from_port(&gate, 40_001);
    // The handshake began past the half-open timeout and never completed.
    let mut handshake = flow_from_port(&gate, 40_000);
    handshake.value.opened_at_boot_ns = now - 31_000_000_000;
    gate.insert_flow(handshake.key, handshake.value)
        .expect("age the handshake");
    assert!(gate.remove_grant(&syslog_from(CLIENT)).expect("remove"));
    assert!(gate.remove_grant(&ssh).expect("remove"));
    // The agent stops: its publisher with it; program and maps stay pinned.
    drop(gate);
    let program = Xdp::from_pin(pins.path.join("program"), XdpAttachType::Interface)
        .expect("the pinned program");
    let mut slot: Array<MapData, u64> = pinned(&pins, names::PUBLISHED_CLOCK);
    let mut flows: HashMap<MapData, FlowKey, FlowValue> = pinned(&pins, names::FLOWS);
    let mut set_slot = |value: u64| slot.set(0, value, 0).expect("write the slot");
    let datagram_passes = || program_passes(&program, &syslog_datagram(40_001));

    // A stale slot: the flow takes exactly its value, not the kernel's clock.
    let mut aged = datagram_flow.value;
    aged.last_seen_boot_ns = now - 10 * MINUTE_NS;
    flows
        .insert(datagram_flow.key, aged, 0)
        .expect("age the flow");
    let stale = now - 5 * MINUTE_NS;
    set_slot(stale);
    assert!(datagram_passes(), "the flow passes");
    let last_seen = |flows: &HashMap<MapData, FlowKey, FlowValue>| {
        flows
            .get(&datagram_flow.key, 0)
            .expect("the flow")
            .last_seen_boot_ns
    };
    assert_eq!(last_seen(&flows), stale);
    // A slot behind the stamp never moves it back.
    set_slot(stale - MINUTE_NS);
    assert!(datagram_passes());
    assert_eq!(last_seen(&flows), stale);
    // Long stale: the handshake is past its timeout on the kernel's clock
    // and drops; the established flow passes.
    set_slot(1);
    let handshake_ack = Packet::tcp(CLIENT, HOST, SSH, tcp_flags::ACK).src_port(40_000);
    assert!(
        !program_passes(&program, &handshake_ack),
        "a handshake past the half-open timeout drops whatever the published clock says"
    );
    assert!(
        datagram_passes(),
        "an established flow passes on a stale clock"
    );

    // An empty slot (nothing ever published): the kernel's clock.
    set_slot(0);
    let before = boot_now_ns();
    assert!(datagram_passes());
    let after = boot_now_ns();
    let seen = last_seen(&flows);
    assert!(
        (before..=after).contains(&seen),
        "last seen at {seen}, read between {before} and {after} on CLOCK_BOOTTIME"
    );
}

/// A map of the gate, opened from its pin.
fn pinned<T: TryFrom<Map, Error = MapError>>(pins: &PinDir, name: &str) -> T {
    let data = MapData::from_pin(pins.path.join(name))
        .unwrap_or_else(|e| panic!("the pin of {name}: {e}"));
    let map = Map::from_map_data(data).unwrap_or_else(|e| panic!("map {name}: {e}"));
    T::try_from(map).unwrap_or_else(|e| panic!("map {name}: {e}"))
}

const SYSLOG: u16 = 514;

fn protect_syslog(gate: &mut XdpGate) {
    gate.set_protected_ports(&BTreeSet::from([
        (Protocol::Udp, SYSLOG),
        (Protocol::Tcp, SSH),
    ]))
    .expect("protect syslog and SSH");
}

fn syslog_from(source: IpAddr) -> GrantTarget {
    GrantTarget {
        source: source.into(),
        protocol: Protocol::Udp,
        port: SYSLOG,
    }
}

fn syslog_datagram(src_port: u16) -> Packet {
    Packet::udp(CLIENT, HOST, SYSLOG).src_port(src_port)
}

fn flow_from_port(gate: &XdpGate, src_port: u16) -> jit_gate_agent::enforce::xdp::Flow {
    gate.flows()
        .expect("flows")
        .into_iter()
        .find(|f| f.key.src_port == src_port)
        .unwrap_or_else(|| panic!("no flow from port {src_port}"))
}

fn drain(ring: &mut aya::maps::RingBuf<MapData>) -> Vec<DenyEvent> {
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
