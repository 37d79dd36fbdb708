//! Mutants for the mutation check: the gate program with exactly one rule
//! broken each, one XDP program per mutant. `tests/tests/mutation.rs` runs
//! the verdict spec's cases through each and fails if one survives. Never
//! loaded in production.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

#[path = "gate/mod.rs"]
mod gate;

use aya_ebpf::{macros::xdp, programs::XdpContext};
use jit_gate_common::{
    maps::{FlowValue, GrantValue},
    verdict::{BootClock, Reason, Rules, Transport},
};

/// Follows four VLAN tags only, so longer priority-tag chains drop.
struct VlanBoundFour;
impl Rules for VlanBoundFour {
    const VLAN_TAGS: usize = 4;
}

/// Takes TCP behind an IPv4 authentication header for another protocol.
struct Ipv4AhNotWalked;
impl Rules for Ipv4AhNotWalked {
    const WALK_IPV4_AH: bool = false;
}

/// The fast path takes the port of an IPv4 header with options from where
/// a header without options puts it.
struct FastPathIgnoresIhl;
impl Rules for FastPathIgnoresIhl {
    const FAST_PATH_CHECKS_IHL: bool = false;
}

/// Walks four extension headers instead of eight.
struct ShortHeaderWalk;
impl Rules for ShortHeaderWalk {
    const EXTENSION_HEADERS: usize = 4;
}

/// Counts a grant live up to and including its expiry instant, and for an
/// hour past it.
struct GrantsOutliveExpiry;
impl Rules for GrantsOutliveExpiry {
    fn grant_live(grant: &GrantValue, now_boot_ns: u64) -> bool {
        now_boot_ns <= grant.expires_at_boot_ns + 3_600_000_000_000
    }
}

/// Lets a SYN pass as a packet of a tracked flow (the half-open reuse).
struct SynPassesAsFlow;
impl Rules for SynPassesAsFlow {
    fn opens_connection(_transport: &Transport) -> bool {
        false
    }
}

/// Honours half-open flows forever.
struct HalfOpenForever;
impl Rules for HalfOpenForever {
    fn flow_honoured<C: BootClock>(
        _flow: &FlowValue,
        _clock: &C,
        _half_open_timeout_ns: u64,
    ) -> bool {
        true
    }
}

/// Never marks a flow established.
struct NeverEstablished;
impl Rules for NeverEstablished {
    fn state_seen(_transport: &Transport) -> u32 {
        0
    }
}

/// Admits every new flow: no quota, no single use.
struct NoFlowLimits;
impl Rules for NoFlowLimits {
    fn admit(_grant: &GrantValue, _opened_before: u64, _closed: u64) -> Result<(), Reason> {
        Ok(())
    }
}

/// Applies the quota but ignores the maximum number of opens.
struct MaxOpensIgnored;
impl Rules for MaxOpensIgnored {
    fn admit(grant: &GrantValue, opened_before: u64, closed: u64) -> Result<(), Reason> {
        if opened_before.saturating_sub(closed) >= u64::from(grant.flow_quota) {
            return Err(Reason::DropFlowQuota);
        }
        Ok(())
    }
}

/// UDP datagrams pass under a grant without recording their flow.
struct UdpFlowsNotRecorded;
impl Rules for UdpFlowsNotRecorded {
    fn datagram_opens_flow(_transport: &Transport) -> bool {
        false
    }
}

macro_rules! mutants {
    ($($program:ident: $rules:ty),+ $(,)?) => {
        $(
            #[xdp]
            pub fn $program(ctx: XdpContext) -> u32 {
                gate::run::<$rules>(&ctx)
            }
        )+
    };
}

mutants! {
    mutant_vlan_bound_four: VlanBoundFour,
    mutant_ipv4_ah_not_walked: Ipv4AhNotWalked,
    mutant_fast_path_ignores_ihl: FastPathIgnoresIhl,
    mutant_short_header_walk: ShortHeaderWalk,
    mutant_grants_outlive_expiry: GrantsOutliveExpiry,
    mutant_syn_passes_as_flow: SynPassesAsFlow,
    mutant_half_open_forever: HalfOpenForever,
    mutant_never_established: NeverEstablished,
    mutant_no_flow_limits: NoFlowLimits,
    mutant_max_opens_ignored: MaxOpensIgnored,
    mutant_udp_flows_not_recorded: UdpFlowsNotRecorded,
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
