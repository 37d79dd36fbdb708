//! The jit-gate XDP program: drops traffic to protected ports unless the
//! source holds a live grant or the packet belongs to a connection opened
//! under one. The decision is `jit_gate_common::verdict::decide`; `gate`
//! holds the maps, the parser and the side effects.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod gate;

use aya_ebpf::{macros::xdp, programs::XdpContext};
use jit_gate_common::verdict::Gate;

#[xdp]
pub fn jit_gate(ctx: XdpContext) -> u32 {
    gate::run::<Gate>(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
