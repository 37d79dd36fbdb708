//! The side effects of a verdict: flow records (new flows admitted against
//! their grant's limits, state bits of existing ones), per-CPU counters, and
//! deny events under a per-CPU budget. Nothing here keeps per-source state:
//! a flood from random sources costs what a flood from one source costs.

use core::intrinsics::{AtomicOrdering, atomic_xadd, atomic_xsub};

use aya_ebpf::bindings::{BPF_NOEXIST, BPF_RB_NO_WAKEUP};
use jit_gate_common::{
    maps::{
        DenyEvent, FlowKey, FlowValue, GrantOpens, GrantValue, protected,
        published_clock::STAMP_GRANULARITY_NS,
    },
    verdict::{
        Address, BootClock, FlowAction, PacketFacts, Reason, Rules, Transport, Upper, Verdict,
    },
};

use super::{
    CONFIG, DENY_BUDGET, DENY_EVENTS, FLOWS, GRANT_CLOSES, GRANT_OPENS, PORT_COUNTERS,
    REASON_COUNTERS,
    clock::{LazyBootClock, coarse_ns, stamp_ns, window_may_have_ended},
    lookups::MapLookups,
};

/// `-EEXIST`: another CPU recorded the same flow first.
const EEXIST: i32 = -17;

/// Carries out the verdict's flow action. A new flow the grant's limits (or
/// a full table) refuse turns the verdict into a drop with that reason; the
/// grant's id is returned then, for the deny event.
#[inline(always)]
pub fn carry_out<R: Rules>(
    facts: &PacketFacts,
    verdict: &mut Verdict,
    lookups: &MapLookups,
    clock: &LazyBootClock,
) -> u64 {
    match verdict.flow {
        FlowAction::None => 0,
        FlowAction::Update {
            set_state,
            restart_handshake,
        } => {
            if let Some(flow) = lookups.found_flow() {
                // SAFETY: the entry `decide` looked up; the map is not
                // preallocated, so it is never reused while we hold it.
                // Plain writes: two CPUs racing on one flow can only lose
                // a state bit, which the next packet sets again.
                let flow = unsafe { &mut *flow };
                if flow.state & set_state != set_state {
                    flow.state |= set_state;
                }
                if restart_handshake {
                    // The handshake's age decides whether the flow is
                    // honoured: the kernel's clock, never the published one.
                    let now = clock.boot_ns();
                    flow.opened_at_boot_ns = now;
                    flow.last_seen_boot_ns = now;
                } else {
                    // Only forward: a flow opened on the kernel's clock may
                    // be ahead of the published one.
                    let stamp = stamp_ns(clock);
                    if stamp.saturating_sub(flow.last_seen_boot_ns) >= STAMP_GRANULARITY_NS {
                        flow.last_seen_boot_ns = stamp;
                    }
                }
            }
            0
        }
        FlowAction::Open { grant, state } => {
            let PacketFacts::Ip {
                src,
                dst,
                upper: Upper::Transport(transport),
            } = facts
            else {
                return 0;
            };
            let key = FlowKey::of(src, dst, transport);
            match open_flow::<R>(&key, &grant, state, clock.boot_ns()) {
                Ok(()) => 0,
                Err(reason) => {
                    verdict.reason = reason;
                    grant.grant_id
                }
            }
        }
    }
}

/// Records a new flow if the grant may open one more and the table has
/// room.
///
/// The grant's open count goes up atomically first, then is read back and
/// checked; a refused flow takes its increment back. Concurrent CPUs can
/// only err towards refusing: every admitted flow's increment precedes its
/// own read, so the latest read of all admitted flows counts every one of
/// them, and that read passed the limit. (The BPF target has no fetch-and-
/// add before cpu v3; a plain atomic add and a read need none.)
#[inline(always)]
fn open_flow<R: Rules>(
    key: &FlowKey,
    grant: &GrantValue,
    state: u32,
    now: u64,
) -> Result<(), Reason> {
    let id = grant.grant_id;
    let opens = match GRANT_OPENS.get_ptr_mut(id) {
        Some(opens) => opens,
        None => {
            // Another CPU may create it first; either way it exists after.
            let _ = GRANT_OPENS.insert(id, GrantOpens::default(), BPF_NOEXIST as u64);
            GRANT_OPENS
                .get_ptr_mut(id)
                .ok_or(Reason::DropFlowTableFull)?
        }
    };
    // SAFETY (all accesses below): a live entry of a non-preallocated map,
    // whose fields are only ever changed atomically; the agent alone
    // writes GRANT_CLOSES.
    let (opened, refused) = unsafe { (&raw mut (*opens).opened, &raw mut (*opens).refused) };
    let closed = unsafe { GRANT_CLOSES.get(id) }.copied().unwrap_or(0);
    let opened_with_this = unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(opened, 1);
        core::ptr::read_volatile(opened)
    };
    let refuse = |reason| {
        unsafe {
            atomic_xsub::<u64, u64, { AtomicOrdering::Relaxed }>(opened, 1);
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(refused, 1);
        }
        reason
    };
    R::admit(grant, opened_with_this.saturating_sub(1), closed).map_err(refuse)?;
    let flow = FlowValue {
        grant_id: id,
        opened_at_boot_ns: now,
        last_seen_boot_ns: now,
        state,
        _pad: 0,
    };
    match FLOWS.insert(key, flow, BPF_NOEXIST as u64) {
        Ok(()) => Ok(()),
        Err(EEXIST) => {
            // Counted once, by the CPU that recorded it.
            unsafe { atomic_xsub::<u64, u64, { AtomicOrdering::Relaxed }>(opened, 1) };
            Ok(())
        }
        Err(_) => Err(refuse(Reason::DropFlowTableFull)),
    }
}

/// Counts the verdict and reports a denial.
#[inline(always)]
pub fn record(
    facts: &PacketFacts,
    verdict: &Verdict,
    refused_under: u64,
    lookups: &MapLookups,
    clock: &LazyBootClock,
) {
    count_reason(verdict.reason);
    let PacketFacts::Ip { src, upper, .. } = facts else {
        return;
    };
    let (protocol, port) = match upper {
        Upper::Transport(Transport {
            protocol, dst_port, ..
        }) => (*protocol, *dst_port),
        Upper::TruncatedTransport {
            protocol,
            dst_port: Some(port),
        } => (*protocol, port.get()),
        _ => (0, 0),
    };
    // Only verdicts about a protected (or possibly protected) port count
    // per port and report denials; skip the lookups for the rest.
    if matches!(
        verdict.reason,
        Reason::PassNotProtected | Reason::PassNotTcpUdp
    ) {
        return;
    }
    count_port(lookups.protected_entry(port), protocol, verdict.reason);
    if !verdict.passes() {
        report_deny(src, protocol, port, verdict.reason, refused_under, clock);
    }
}

/// Counts one verdict of `reason` on this CPU.
#[inline(always)]
pub fn count_reason(reason: Reason) {
    if let Some(count) = REASON_COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: this CPU's slot; XDP runs without preemption.
        unsafe { *count += 1 };
    }
}

#[inline(always)]
fn count_port(entry: u32, protocol: u8, reason: Reason) {
    if entry & protected::bit_for(protocol) == 0 {
        return;
    }
    if let Some(counters) = PORT_COUNTERS.get_ptr_mut(protected::counter_index(entry, protocol)) {
        // SAFETY: this CPU's slot.
        let counters = unsafe { &mut *counters };
        if reason.is_pass() {
            counters.passed += 1;
        } else {
            counters.dropped += 1;
            if reason.is_refused_connection() {
                counters.refused += 1;
            }
        }
    }
}

/// Reports a denied packet through the ring buffer while this CPU's budget
/// for the current window lasts. The counters carry the exact totals; the
/// events are a sample of who was denied. The window runs on boot time; a
/// spent budget reads it only once the coarse clock says the window may
/// have ended, so a flood past the budget reads no precise time.
#[inline(always)]
fn report_deny(
    src: &Address,
    protocol: u8,
    port: u16,
    reason: Reason,
    grant_id: u64,
    clock: &LazyBootClock,
) {
    let (Some(budget), Some(config)) = (DENY_BUDGET.get_ptr_mut(0), CONFIG.get(0)) else {
        return;
    };
    // SAFETY: this CPU's slot.
    let budget = unsafe { &mut *budget };
    let (limit, window) = (
        u64::from(config.deny_events_per_window),
        config.deny_window_ns,
    );
    if budget.sent >= limit && !window_may_have_ended(budget.window_start_coarse_ns, window) {
        return;
    }
    let now = clock.boot_ns();
    if now.wrapping_sub(budget.window_start_boot_ns) >= window {
        budget.window_start_boot_ns = now;
        budget.window_start_coarse_ns = coarse_ns();
        budget.sent = 0;
    }
    if budget.sent >= limit {
        return;
    }
    budget.sent += 1;
    let event = DenyEvent {
        src: src.bytes,
        family: src.family,
        protocol,
        dst_port: port,
        reason: reason as u32,
        at_boot_ns: now,
        grant_id,
    };
    // A full ring loses the sample, never the count. The agent polls, so
    // no wake-up is needed.
    let _ = DENY_EVENTS.output::<DenyEvent>(&event, BPF_RB_NO_WAKEUP as u64);
}
