//! The jit-gate XDP program: drops traffic to protected ports unless the
//! source holds a live grant or the packet belongs to a flow opened under one.
//! The decision itself is `jit_gate_common::verdict::decide`; this file holds
//! the maps and the side effects (flow records, counters, deny events).
#![no_std]
#![no_main]

mod lookups;
mod parse;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_NO_PREALLOC, BPF_NOEXIST, xdp_action},
    helpers::bpf_ktime_get_boot_ns,
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::XdpContext,
};
use jit_gate_common::{
    maps::{
        CidrDataV4, CidrDataV6, DenyEvent, DenyRateValue, FlowKey, FlowValue, GateConfig,
        GrantKeyV4, GrantKeyV6, GrantValue, PortCounters, SourceKey, capacity, protected,
    },
    verdict::{Address, GateLookups, PacketFacts, Reason, Upper, Verdict, decide},
};

#[map]
static PROTECTED_PORTS: Array<u32> = Array::pinned(capacity::PORTS, 0);
#[map]
static GRANTS_V4: HashMap<GrantKeyV4, GrantValue> =
    HashMap::pinned(capacity::EXACT_GRANTS, BPF_F_NO_PREALLOC);
#[map]
static GRANTS_V6: HashMap<GrantKeyV6, GrantValue> =
    HashMap::pinned(capacity::EXACT_GRANTS, BPF_F_NO_PREALLOC);
#[map]
static CIDR_GRANTS_V4: LpmTrie<CidrDataV4, GrantValue> = LpmTrie::pinned(capacity::CIDR_GRANTS, 0);
#[map]
static CIDR_GRANTS_V6: LpmTrie<CidrDataV6, GrantValue> = LpmTrie::pinned(capacity::CIDR_GRANTS, 0);
#[map]
static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::pinned(capacity::FLOWS, 0);
#[map]
static REASON_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Reason::COUNT, 0);
#[map]
static PORT_COUNTERS: PerCpuArray<PortCounters> =
    PerCpuArray::pinned(capacity::PORT_COUNTER_SLOTS * 2, 0);
#[map]
static DENY_EVENTS: RingBuf = RingBuf::pinned(capacity::DENY_EVENT_BYTES, 0);
#[map]
static DENY_RATE: LruHashMap<SourceKey, DenyRateValue> =
    LruHashMap::pinned(capacity::DENY_RATE_SOURCES, 0);
#[map]
static CONFIG: Array<GateConfig> = Array::pinned(1, 0);

#[xdp]
pub fn jit_gate(ctx: XdpContext) -> u32 {
    let facts = parse::parse(&ctx);
    let now = if checks_grants(&facts) {
        unsafe { bpf_ktime_get_boot_ns() }
    } else {
        // `decide` reads the clock only to check grants; spare the helper call.
        0
    };
    let verdict = decide(&facts, &lookups::MapLookups, now);
    record(&facts, &verdict, now);
    if verdict.passes() {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// Whether `decide` will compare grant expiries: complete TCP/UDP headers
/// to a protected port.
#[inline(always)]
fn checks_grants(facts: &PacketFacts) -> bool {
    match facts {
        PacketFacts::Ip {
            upper: Upper::Transport(t),
            ..
        } => lookups::MapLookups.is_protected(t.protocol, t.dst_port),
        _ => false,
    }
}

#[inline(always)]
fn record(facts: &PacketFacts, verdict: &Verdict, now: u64) {
    if let Some(count) = REASON_COUNTERS.get_ptr_mut(verdict.reason as u32) {
        unsafe { *count += 1 };
    }
    let PacketFacts::Ip { src, dst, upper } = facts else {
        return;
    };
    let (protocol, port) = match upper {
        Upper::Transport(t) => (t.protocol, t.dst_port),
        Upper::TruncatedTransport {
            protocol,
            dst_port: Some(port),
        } => (*protocol, port.get()),
        _ => (0, 0),
    };
    if let Upper::Transport(transport) = upper
        && let Some(grant_id) = verdict.open_flow_for_grant
    {
        let key = FlowKey::of(src, dst, transport);
        let value = FlowValue {
            grant_id,
            opened_at_boot_ns: now,
        };
        // A SYN (re)opens a connection; a UDP flow is recorded once.
        let flags = if protocol == jit_gate_common::ip_proto::TCP {
            BPF_ANY
        } else {
            BPF_NOEXIST
        };
        let _ = FLOWS.insert(&key, &value, flags as u64);
    }
    // Only verdicts about a protected (or possibly protected) port count
    // per port and report denials; skip the lookups for the rest.
    if matches!(
        verdict.reason,
        Reason::PassNotProtected | Reason::PassNotTcpUdp
    ) {
        return;
    }
    count_port(protocol, port, verdict.passes());
    if !verdict.passes() {
        report_deny(src, protocol, port, verdict.reason, now);
    }
}

#[inline(always)]
fn count_port(protocol: u8, port: u16, passed: bool) {
    let Some(value) = PROTECTED_PORTS.get(port as u32) else {
        return;
    };
    if *value & protected::bit_for(protocol) == 0 {
        return;
    }
    if let Some(counters) = PORT_COUNTERS.get_ptr_mut(protected::counter_index(*value, protocol)) {
        let counters = unsafe { &mut *counters };
        if passed {
            counters.passed += 1;
        } else {
            counters.dropped += 1;
        }
    }
}

/// Reports a denied packet through the ring buffer, at most once per source
/// per configured interval; the packets in between are counted, not lost.
#[inline(always)]
fn report_deny(src: &Address, protocol: u8, port: u16, reason: Reason, now: u64) {
    let interval = CONFIG.get(0).map_or(0, |c| c.deny_report_interval_ns);
    let key = SourceKey {
        addr: src.bytes,
        family: src.family,
        _pad: [0; 7],
    };
    let suppressed_before = match DENY_RATE.get_ptr_mut(&key) {
        Some(state) => {
            let state = unsafe { &mut *state };
            // Plain read-modify-write (the BPF target has no atomic RMW in
            // `core`): concurrent CPUs may lose an increment of this
            // statistic, never a verdict.
            if now.wrapping_sub(state.last_report_boot_ns) < interval {
                state.suppressed += 1;
                return;
            }
            state.last_report_boot_ns = now;
            core::mem::take(&mut state.suppressed)
        }
        None => {
            let fresh = DenyRateValue {
                last_report_boot_ns: now,
                suppressed: 0,
            };
            let _ = DENY_RATE.insert(&key, &fresh, BPF_ANY as u64);
            0
        }
    };
    let event = DenyEvent {
        src: src.bytes,
        family: src.family,
        protocol,
        dst_port: port,
        reason: reason as u32,
        at_boot_ns: now,
        suppressed_before,
    };
    let _ = DENY_EVENTS.output::<DenyEvent>(&event, 0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
