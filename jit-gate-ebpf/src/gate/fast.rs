//! The fast path for the common frame the gate has nothing to decide on:
//! untagged IPv4 without options or IPv6 without extension headers, first
//! fragment or whole, carrying TCP or UDP to a non-zero port that is not
//! protected for it. Read in place from a few header bytes, before the full
//! parse builds `PacketFacts`. Anything else (tags, options, later
//! fragments, extension headers, short or inconsistent lengths, port 0, a
//! protected port) goes on to the full parse: this path concludes only what
//! the full parse would (`PassNotProtected`), never a drop.

use aya_ebpf::programs::XdpContext;
use jit_gate_common::{
    ip_proto,
    verdict::{GateLookups as _, Rules},
};

use super::lookups::MapLookups;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const L3: usize = 14;
const IPV6_HEADER: usize = 40;
/// Where the TCP/UDP ports (source, then destination) end.
const IPV4_PORTS_END: usize = L3 + 20 + 4;
const IPV6_PORTS_END: usize = L3 + IPV6_HEADER + 4;

/// Whether the frame is TCP/UDP to an unprotected port, decided without
/// the full parse; `false` means "ask the full parse", not "drop".
#[inline(always)]
pub fn passes_unprotected<R: Rules>(ctx: &XdpContext, lookups: &MapLookups) -> bool {
    let (start, end) = (ctx.data(), ctx.data_end());
    // The shorter IPv4 case bounds the reads common to both.
    if start + IPV4_PORTS_END > end {
        return false;
    }
    // SAFETY: callers pass constant offsets below IPV4_PORTS_END, or below
    // IPV6_PORTS_END once that is checked.
    let at = |offset: usize| unsafe { *((start + offset) as *const u8) };
    let be16 = |offset: usize| u16::from_be_bytes([at(offset), at(offset + 1)]);
    // Each family reads its own constant offsets and checks its own
    // lengths: a shared tail would have LLVM compute the offsets in
    // registers instead.
    let (protocol, dst_port) = match be16(12) {
        ETHERTYPE_IPV4 => {
            // Version 4 and no options; the full parse handles options.
            let first = at(L3);
            if first != 0x45 && (R::FAST_PATH_CHECKS_IHL || first >> 4 != 4) {
                return false;
            }
            let protocol = at(L3 + 9);
            if !is_tcp_or_udp(protocol) {
                return false;
            }
            // Later fragments carry no ports: the full parse passes them
            // under their own reason.
            if be16(L3 + 6) & 0x1fff != 0 {
                return false;
            }
            // The IP length must lie within the frame and cover the ports,
            // as the full parse requires (which implies a total length that
            // covers the header).
            let ip_end = L3 + be16(L3 + 2) as usize;
            if ip_end > end - start || IPV4_PORTS_END > ip_end {
                return false;
            }
            (protocol, be16(IPV4_PORTS_END - 2))
        }
        ETHERTYPE_IPV6 => {
            if start + IPV6_PORTS_END > end || at(L3) >> 4 != 6 {
                return false;
            }
            // The next header must be TCP/UDP itself: extension headers
            // (fragments included) take the full parse.
            let protocol = at(L3 + 6);
            if !is_tcp_or_udp(protocol) {
                return false;
            }
            let ip_end = L3 + IPV6_HEADER + be16(L3 + 4) as usize;
            if ip_end > end - start || IPV6_PORTS_END > ip_end {
                return false;
            }
            (protocol, be16(IPV6_PORTS_END - 2))
        }
        _ => return false,
    };
    // A truncated header to port 0 drops in the full parse.
    dst_port != 0 && !lookups.is_protected(protocol, dst_port)
}

#[inline(always)]
fn is_tcp_or_udp(protocol: u8) -> bool {
    protocol == ip_proto::TCP || protocol == ip_proto::UDP
}
