//! The gate program's body, generic over its rules: the maps, one run over
//! a frame (the fast path for unprotected ports, else parse, decide, carry
//! out), and the side effects of a verdict (flow records, counters, deny
//! events). `main.rs` instantiates it with the shipped rules; `mutants.rs`
//! with deliberately broken ones.

mod clock;
mod effects;
mod fast;
mod lookups;
mod parse;

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, xdp_action},
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
    programs::XdpContext,
};
use jit_gate_common::{
    maps::{
        CidrDataV4, CidrDataV6, DenyBudget, FlowKey, FlowValue, GateConfig, GrantKeyV4, GrantKeyV6,
        GrantOpens, GrantValue, PortCounters, capacity, source_filter,
    },
    verdict::{Reason, Rules, decide_by},
};

#[map]
static PROTECTED_PORTS: Array<u32> = Array::pinned(capacity::PORTS, 0);
#[map]
static GRANTS_V4: HashMap<GrantKeyV4, GrantValue> =
    HashMap::pinned(capacity::EXACT_GRANTS, BPF_F_NO_PREALLOC);
#[map]
static GRANTS_V6: HashMap<GrantKeyV6, GrantValue> =
    HashMap::pinned(capacity::EXACT_GRANTS, BPF_F_NO_PREALLOC);
/// Sources that may hold an exact grant (see `maps::source_filter`).
#[map]
static SOURCE_FILTER: Array<u64> = Array::pinned(source_filter::WORDS, BPF_F_MMAPABLE);
#[map]
static CIDR_GRANTS_V4: LpmTrie<CidrDataV4, GrantValue> = LpmTrie::pinned(capacity::CIDR_GRANTS, 0);
#[map]
static CIDR_GRANTS_V6: LpmTrie<CidrDataV6, GrantValue> = LpmTrie::pinned(capacity::CIDR_GRANTS, 0);
/// Not LRU: a flow leaves only when the agent removes it, never to make
/// room for someone else's. Not preallocated, so an entry the agent
/// deletes is never reused under a pointer the program still holds.
#[map]
static FLOWS: HashMap<FlowKey, FlowValue> = HashMap::pinned(capacity::FLOWS, BPF_F_NO_PREALLOC);
/// Grant id → flows opened and connections refused; written here only.
#[map]
static GRANT_OPENS: HashMap<u64, GrantOpens> =
    HashMap::pinned(capacity::GRANT_COUNTERS, BPF_F_NO_PREALLOC);
/// Grant id → flows of the grant the agent removed; written by the agent only.
#[map]
static GRANT_CLOSES: HashMap<u64, u64> =
    HashMap::pinned(capacity::GRANT_COUNTERS, BPF_F_NO_PREALLOC);
#[map]
static REASON_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Reason::COUNT, 0);
#[map]
static PORT_COUNTERS: PerCpuArray<PortCounters> =
    PerCpuArray::pinned(capacity::PORT_COUNTER_SLOTS * 2, 0);
#[map]
static DENY_EVENTS: RingBuf = RingBuf::pinned(capacity::DENY_EVENT_BYTES, 0);
#[map]
static DENY_BUDGET: PerCpuArray<DenyBudget> = PerCpuArray::pinned(1, 0);
#[map]
static CONFIG: Array<GateConfig> = Array::pinned(1, 0);
/// Boot time as the agent last published it (`maps::published_clock`).
#[map]
static PUBLISHED_CLOCK: Array<u64> = Array::pinned(1, 0);
/// The layout version the pins were made for; the program never reads it.
#[map]
static LAYOUT: Array<u32> = Array::pinned(1, 0);

/// The verdict on one frame, as an XDP action.
#[inline(always)]
pub fn run<R: Rules>(ctx: &XdpContext) -> u32 {
    let lookups = lookups::MapLookups::new();
    if fast::passes_unprotected::<R>(ctx, &lookups) {
        effects::count_reason(Reason::PassNotProtected);
        return xdp_action::XDP_PASS;
    }
    let facts = parse::parse::<R>(ctx);
    let clock = clock::LazyBootClock::new();
    let mut verdict = decide_by::<R, _, _>(&facts, &lookups, &clock);
    let refused_under = effects::carry_out::<R>(&facts, &mut verdict, &lookups, &clock);
    effects::record(&facts, &verdict, refused_under, &lookups, &clock);
    if verdict.passes() {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}
