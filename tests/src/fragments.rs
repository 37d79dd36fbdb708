//! Fragments of built packets: IPv4 fragments (offset and more-fragments
//! flag in the header) and IPv6 fragments (a fragment header after the
//! fixed one), covering any 8-byte-aligned stretch of the packet's payload,
//! so tests can split, duplicate and overlap them at will.

use crate::{checksum::fix_ipv4_header_checksum, packets::Frame};

/// The fragment of `frame` (an unfragmented IP packet without IPv6
/// extension headers) carrying its IP payload from byte `start` (a multiple
/// of 8) up to `end` (clamped to the payload), with the more-fragments flag
/// `more` and identification `id`.
pub fn fragment(frame: &Frame, start: usize, end: usize, more: bool, id: u32) -> Vec<u8> {
    assert_eq!(start % 8, 0, "fragment offsets count 8-byte units");
    let bytes = &frame.bytes;
    let l3 = frame.ip_start;
    let mut out = bytes[..l3].to_vec();
    if frame.is_ipv4() {
        let header_len = usize::from(bytes[l3] & 0x0f) * 4;
        let payload = &bytes[l3 + header_len..l3 + usize::from(frame.ip_length())];
        let piece = &payload[start.min(payload.len())..end.min(payload.len())];
        let mut header = bytes[l3..l3 + header_len].to_vec();
        header[2..4].copy_from_slice(&((header_len + piece.len()) as u16).to_be_bytes());
        header[4..6].copy_from_slice(&(id as u16).to_be_bytes());
        let flags = (start / 8) as u16 | if more { 0x2000 } else { 0 };
        header[6..8].copy_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(piece);
        fix_ipv4_header_checksum(&mut out);
    } else {
        let payload = &bytes[l3 + 40..l3 + 40 + usize::from(frame.ip_length())];
        let piece = &payload[start.min(payload.len())..end.min(payload.len())];
        let mut header = bytes[l3..l3 + 40].to_vec();
        let next_header = header[6];
        header[4..6].copy_from_slice(&((8 + piece.len()) as u16).to_be_bytes());
        header[6] = 44;
        out.extend_from_slice(&header);
        let offset = ((start / 8) as u16) << 3 | u16::from(more);
        out.extend_from_slice(&[next_header, 0]);
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(piece);
    }
    out
}

/// `frame` split at `cuts` (increasing multiples of 8): one fragment per
/// stretch, the last without the more-fragments flag.
pub fn split(frame: &Frame, cuts: &[usize], id: u32) -> Vec<Vec<u8>> {
    let ends: Vec<usize> = cuts.iter().copied().chain([usize::MAX]).collect();
    let mut start = 0;
    ends.iter()
        .map(|&end| {
            let more = end != usize::MAX;
            let piece = fragment(frame, start, end, more, id);
            start = end;
            piece
        })
        .collect()
}
