//! Benchmark floor: XDP programs that return a fixed verdict and touch
//! nothing, so `BPF_PROG_TEST_RUN` on them measures the harness alone; and
//! one that reads what any port filter must read before it drops, the floor
//! of the live benchmark's paths that look at headers.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[xdp]
pub fn floor_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn floor_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// Where an untagged IPv4 TCP frame without options keeps its destination
/// port.
const TCP_DST_PORT_OFFSET: usize = 14 + 20 + 2;

/// Reads the Ethernet type and the TCP destination port of the frame, then
/// drops it (passes what is too short, or carries no Ethernet type, so the
/// reads decide the verdict and cannot be left out).
#[xdp]
pub fn floor_read_drop(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + TCP_DST_PORT_OFFSET + 2 > end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: both within the frame, checked above.
    let (ether_type, port) = unsafe {
        (
            core::ptr::read_volatile((start + 12) as *const u16),
            core::ptr::read_volatile((start + TCP_DST_PORT_OFFSET) as *const u16),
        )
    };
    if ether_type == 0 && port == 0 {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
