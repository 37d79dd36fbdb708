//! Frame parser: Ethernet and its VLAN tags (bounded), IPv4 (options and
//! authentication headers), IPv6 (bounded extension-header walk), then the
//! TCP/UDP header. Produces the `PacketFacts` the verdict is decided on.
//! The bounds come from the rules (`Rules::VLAN_TAGS`, `EXTENSION_HEADERS`):
//! past them the frame drops rather than pass unread.
//!
//! Every read is bounded by the frame and, above the IP header, by the IP
//! length fields, so trailing Ethernet padding is never taken for headers.

use aya_ebpf::{helpers::generated::bpf_xdp_load_bytes, programs::XdpContext};
use core::ffi::c_void;
use core::num::NonZeroU16;
use jit_gate_common::{
    ip_proto,
    verdict::{Address, PacketFacts, Rules, Transport, Upper},
};

const ETH_HEADER: usize = 14;
const VLAN_TAG: usize = 4;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
const IPV6_HEADER: usize = 40;
const NEXT_HOP_BY_HOP: u8 = 0;
const NEXT_ROUTING: u8 = 43;
const NEXT_FRAGMENT: u8 = 44;
const NEXT_AUTH: u8 = 51;
const NEXT_DEST_OPTS: u8 = 60;

/// Reads `N` bytes at `offset` if they lie within `limit` (and the frame).
///
/// Where an IPv4 header and a TCP/UDP header after it without options sit
/// in an untagged, single- or double-tagged frame, the read is direct packet
/// access at a constant offset; any other offset goes through the
/// `bpf_xdp_load_bytes` helper. Offsets that depend on header contents (IHL,
/// extension header lengths) defeat direct access: LLVM rewrites variable
/// packet-pointer arithmetic into forms the verifier rejects.
#[inline(always)]
fn read<const N: usize>(ctx: &XdpContext, offset: usize, limit: usize) -> Option<[u8; N]> {
    // The packet-pointer check comes before the limit check: LLVM drops
    // whichever of two equivalent checks comes second, and the verifier
    // needs the pointer one.
    //
    // The arms give bytes and a flag rather than an `Option`: a `None`
    // leaves its payload undefined, and where LLVM merges the arms it may
    // spill that undefined register, which the verifier rejects.
    let (bytes, read) = match offset {
        14 => defined(read_fixed::<14, N>(ctx)),
        18 => defined(read_fixed::<18, N>(ctx)),
        22 => defined(read_fixed::<22, N>(ctx)),
        34 => defined(read_fixed::<34, N>(ctx)),
        38 => defined(read_fixed::<38, N>(ctx)),
        42 => defined(read_fixed::<42, N>(ctx)),
        _ => read_helper::<N>(ctx, offset),
    };
    if !read || offset + N > limit {
        return None;
    }
    Some(bytes)
}

/// The bytes read and `true`, or zeroes and `false`.
#[inline(always)]
fn defined<const N: usize>(bytes: Option<[u8; N]>) -> ([u8; N], bool) {
    match bytes {
        Some(bytes) => (bytes, true),
        None => ([0; N], false),
    }
}

#[inline(always)]
fn read_helper<const N: usize>(ctx: &XdpContext, offset: usize) -> ([u8; N], bool) {
    let mut buf = [0u8; N];
    // SAFETY: `buf` is a writable stack buffer of exactly N bytes.
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            offset as u32,
            buf.as_mut_ptr().cast::<c_void>(),
            N as u32,
        )
    };
    // `buf` starts zeroed: every byte is defined either way.
    (buf, rc == 0)
}

/// Reads `N` bytes at the constant offset `OFFSET` with direct packet
/// access: no helper call.
#[inline(always)]
fn read_fixed<const OFFSET: usize, const N: usize>(ctx: &XdpContext) -> Option<[u8; N]> {
    let start = ctx.data();
    if start + OFFSET + N > ctx.data_end() {
        return None;
    }
    // SAFETY: [start + OFFSET, start + OFFSET + N) was just checked to be in the packet.
    Some(unsafe { core::ptr::read_unaligned((start + OFFSET) as *const [u8; N]) })
}

#[inline(always)]
fn be16(b0: u8, b1: u8) -> u16 {
    u16::from_be_bytes([b0, b1])
}

#[inline(always)]
pub fn parse<R: Rules>(ctx: &XdpContext) -> PacketFacts {
    const { assert!(R::VLAN_TAGS >= 2, "the first two tags are read directly") };
    let Some(eth) = read_fixed::<0, ETH_HEADER>(ctx) else {
        return PacketFacts::NotIp;
    };
    let frame_len = ctx.data_end() - ctx.data();
    let mut ethertype = be16(eth[12], eth[13]);
    let mut offset = ETH_HEADER;
    // The first two tags at fixed offsets, without a helper: the common
    // tagged cases cost no more than before the walk grew deeper.
    if is_vlan(ethertype) {
        let Some(tag) = read_fixed::<ETH_HEADER, VLAN_TAG>(ctx) else {
            return PacketFacts::NotIp;
        };
        ethertype = be16(tag[2], tag[3]);
        offset += VLAN_TAG;
        if is_vlan(ethertype) {
            let Some(tag) = read_fixed::<{ ETH_HEADER + VLAN_TAG }, VLAN_TAG>(ctx) else {
                return PacketFacts::NotIp;
            };
            ethertype = be16(tag[2], tag[3]);
            offset += VLAN_TAG;
        }
    }
    // The kernel strips priority tags (VLAN ID 0) one after another without
    // any VLAN device, and VLAN devices strip theirs: every tag is followed.
    for _ in 2..R::VLAN_TAGS {
        if !is_vlan(ethertype) {
            break;
        }
        let Some(tag) = read::<VLAN_TAG>(ctx, offset, frame_len) else {
            return PacketFacts::NotIp;
        };
        ethertype = be16(tag[2], tag[3]);
        offset += VLAN_TAG;
    }
    match ethertype {
        ETHERTYPE_IPV4 => parse_ipv4::<R>(ctx, offset, frame_len),
        ETHERTYPE_IPV6 => parse_ipv6::<R>(ctx, offset, frame_len),
        _ if is_vlan(ethertype) => PacketFacts::VlanTooDeep,
        _ => PacketFacts::NotIp,
    }
}

#[inline(always)]
fn is_vlan(ethertype: u16) -> bool {
    ethertype == ETHERTYPE_VLAN || ethertype == ETHERTYPE_QINQ
}

#[inline(always)]
fn parse_ipv4<R: Rules>(ctx: &XdpContext, l3: usize, frame_len: usize) -> PacketFacts {
    let Some(h) = read::<20>(ctx, l3, frame_len) else {
        return PacketFacts::MalformedIp;
    };
    let header_len = ((h[0] & 0x0f) as usize) * 4;
    let total_len = be16(h[2], h[3]) as usize;
    if h[0] >> 4 != 4 || header_len < 20 || total_len < header_len || l3 + total_len > frame_len {
        return PacketFacts::MalformedIp;
    }
    if be16(h[6], h[7]) & 0x1fff != 0 {
        return PacketFacts::NonFirstFragment;
    }
    let src = Address::v4([h[12], h[13], h[14], h[15]]);
    let dst = Address::v4([h[16], h[17], h[18], h[19]]);
    let ip_end = l3 + total_len;
    let mut protocol = h[9];
    let mut offset = l3 + header_len;
    if R::WALK_IPV4_AH {
        // With a security association the kernel removes AH and delivers
        // what it protects, TCP and UDP included.
        for _ in 0..R::EXTENSION_HEADERS {
            if protocol != NEXT_AUTH {
                break;
            }
            let Some(ah) = read::<8>(ctx, offset, ip_end) else {
                return PacketFacts::MalformedIp;
            };
            protocol = ah[0];
            offset += auth_header_len(ah[1]);
            if offset > ip_end {
                return PacketFacts::MalformedIp;
            }
        }
        if protocol == NEXT_AUTH {
            return PacketFacts::HeaderChainTooLong;
        }
    }
    let upper = parse_upper(ctx, protocol, offset, ip_end);
    PacketFacts::Ip { src, dst, upper }
}

/// An authentication header spans (payload length + 2) × 4 bytes, as the
/// kernel's walkers compute it (a length of 0 gives 8 bytes).
#[inline(always)]
fn auth_header_len(payload_len: u8) -> usize {
    (payload_len as usize + 2) * 4
}

#[inline(always)]
fn parse_ipv6<R: Rules>(ctx: &XdpContext, l3: usize, frame_len: usize) -> PacketFacts {
    let Some(h) = read::<IPV6_HEADER>(ctx, l3, frame_len) else {
        return PacketFacts::MalformedIp;
    };
    let ip_end = l3 + IPV6_HEADER + be16(h[4], h[5]) as usize;
    if h[0] >> 4 != 6 || ip_end > frame_len {
        return PacketFacts::MalformedIp;
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    dst.copy_from_slice(&h[24..40]);
    let mut next = h[6];
    let mut offset = l3 + IPV6_HEADER;
    for _ in 0..R::EXTENSION_HEADERS {
        let Some(ext) = read::<8>(ctx, offset, ip_end) else {
            if is_extension_header(next) {
                return PacketFacts::MalformedIp;
            }
            break;
        };
        let len = match next {
            NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DEST_OPTS => (ext[1] as usize + 1) * 8,
            NEXT_FRAGMENT => {
                if be16(ext[2], ext[3]) >> 3 != 0 {
                    return PacketFacts::NonFirstFragment;
                }
                8
            }
            NEXT_AUTH => auth_header_len(ext[1]),
            _ => break,
        };
        next = ext[0];
        offset += len;
        if offset > ip_end {
            return PacketFacts::MalformedIp;
        }
    }
    if is_extension_header(next) {
        return PacketFacts::HeaderChainTooLong;
    }
    let upper = parse_upper(ctx, next, offset, ip_end);
    PacketFacts::Ip {
        src: Address::v6(src),
        dst: Address::v6(dst),
        upper,
    }
}

#[inline(always)]
fn is_extension_header(next: u8) -> bool {
    matches!(
        next,
        NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_FRAGMENT | NEXT_AUTH | NEXT_DEST_OPTS
    )
}

/// The TCP or UDP header at `offset`, which must end by `ip_end`.
#[inline(always)]
fn parse_upper(ctx: &XdpContext, protocol: u8, offset: usize, ip_end: usize) -> Upper {
    let full_len = match protocol {
        ip_proto::TCP => 20,
        ip_proto::UDP => 8,
        _ => return Upper::Other,
    };
    let Some(ports) = read::<4>(ctx, offset, ip_end) else {
        return Upper::TruncatedTransport {
            protocol,
            dst_port: None,
        };
    };
    let src_port = be16(ports[0], ports[1]);
    let dst_port = be16(ports[2], ports[3]);
    let truncated = Upper::TruncatedTransport {
        protocol,
        dst_port: NonZeroU16::new(dst_port),
    };
    let mut tcp_flags = 0;
    if full_len == 20 {
        let Some(tcp) = read::<20>(ctx, offset, ip_end) else {
            return truncated;
        };
        let data_offset = (tcp[12] >> 4) as usize * 4;
        if data_offset < 20 || offset + data_offset > ip_end {
            return truncated;
        }
        tcp_flags = tcp[13];
    } else if read::<8>(ctx, offset, ip_end).is_none() {
        return truncated;
    }
    Upper::Transport(Transport {
        protocol,
        src_port,
        dst_port,
        tcp_flags,
    })
}
