//! Internet checksums of crafted packets, so that the stack accepts what the
//! gate lets through: TCP and UDP with their pseudo-header, IPv4 headers.

use std::net::IpAddr;

use etherparse::IpNumber;

/// Where the checksum of a TCP or UDP header is.
pub fn checksum_offset(protocol: IpNumber) -> Option<usize> {
    match protocol {
        IpNumber::TCP => Some(16),
        IpNumber::UDP => Some(6),
        _ => None,
    }
}

/// The Internet checksum of a TCP or UDP header (and empty payload) with
/// its pseudo-header, so that the stack accepts what the gate passes.
pub fn transport_checksum(src: IpAddr, dst: IpAddr, protocol: IpNumber, segment: &[u8]) -> u16 {
    let mut bytes = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            bytes.extend_from_slice(&s.octets());
            bytes.extend_from_slice(&d.octets());
            bytes.extend_from_slice(&[0, protocol.0]);
            bytes.extend_from_slice(&(segment.len() as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            bytes.extend_from_slice(&s.octets());
            bytes.extend_from_slice(&d.octets());
            bytes.extend_from_slice(&(segment.len() as u32).to_be_bytes());
            bytes.extend_from_slice(&[0, 0, 0, protocol.0]);
        }
        _ => unreachable!("Packet::new checks the families match"),
    }
    bytes.extend_from_slice(segment);
    match internet_checksum(&bytes) {
        // UDP sends a computed 0 as all ones (0 means "no checksum").
        0 if protocol == IpNumber::UDP => 0xffff,
        checksum => checksum,
    }
}

/// The Internet checksum (one's complement sum) of `bytes`.
fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Recomputes the header checksum of the IPv4 packet in `frame` (behind up
/// to eight VLAN tags), if its header is there whole; a corrupted frame so
/// keeps reaching the stack.
pub fn fix_ipv4_header_checksum(frame: &mut [u8]) {
    let mut at = 12;
    for _ in 0..8 {
        match frame.get(at..at + 2) {
            Some([0x81, 0x00] | [0x88, 0xa8]) => at += 4,
            _ => break,
        }
    }
    if frame.get(at..at + 2) != Some(&[0x08, 0x00]) {
        return;
    }
    let l3 = at + 2;
    let Some(&first) = frame.get(l3) else {
        return;
    };
    let header_len = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || header_len < 20 || l3 + header_len > frame.len() {
        return;
    }
    frame[l3 + 10..l3 + 12].fill(0);
    let sum = internet_checksum(&frame[l3..l3 + header_len]);
    frame[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
}
