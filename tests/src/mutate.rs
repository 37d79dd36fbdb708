//! Corruptions of built frames (bit flips, truncations, length fields that
//! lie) and random frames: what an attacker sends without building packets.

use etherparse::EtherType;
use rand::{Rng, rngs::StdRng, seq::IndexedRandom};

use crate::packets::{Frame, MIN_FRAME_LEN};

/// A length field of a built frame, for mutations that make lengths lie.
#[derive(Clone, Copy, Debug)]
pub(crate) enum LengthField {
    /// A big-endian 16-bit length (IPv4 total length, IPv6 payload length, UDP length).
    Word(usize),
    /// An 8-bit length (IPv6 extension headers).
    Byte(usize),
    /// The low nibble of a byte (IPv4 IHL).
    LowNibble(usize),
    /// The high nibble of a byte (TCP data offset).
    HighNibble(usize),
}

impl LengthField {
    pub(crate) fn shifted(self, by: usize) -> Self {
        match self {
            LengthField::Word(at) => LengthField::Word(at + by),
            LengthField::Byte(at) => LengthField::Byte(at + by),
            LengthField::LowNibble(at) => LengthField::LowNibble(at + by),
            LengthField::HighNibble(at) => LengthField::HighNibble(at + by),
        }
    }

    /// One past the field's last byte.
    pub(crate) fn end(self) -> usize {
        match self {
            LengthField::Word(at) => at + 2,
            LengthField::Byte(at) | LengthField::LowNibble(at) | LengthField::HighNibble(at) => {
                at + 1
            }
        }
    }

    /// Moves the field by a small step or sets it to a random value.
    fn perturb(self, bytes: &mut [u8], rng: &mut StdRng) {
        let delta: i8 = rng.random_range(1..=4) * if rng.random() { 1 } else { -1 };
        let random = rng.random_bool(0.25);
        match self {
            LengthField::Word(at) if at + 2 <= bytes.len() => {
                let old = u16::from_be_bytes([bytes[at], bytes[at + 1]]);
                let new = if random {
                    rng.random()
                } else {
                    old.wrapping_add_signed(delta.into())
                };
                bytes[at..at + 2].copy_from_slice(&new.to_be_bytes());
            }
            LengthField::Byte(at) if at < bytes.len() => {
                bytes[at] = if random {
                    rng.random()
                } else {
                    bytes[at].wrapping_add_signed(delta)
                };
            }
            LengthField::LowNibble(at) if at < bytes.len() => {
                let nibble = if random {
                    rng.random()
                } else {
                    bytes[at].wrapping_add_signed(delta)
                };
                bytes[at] = (bytes[at] & 0xf0) | (nibble & 0x0f);
            }
            LengthField::HighNibble(at) if at < bytes.len() => {
                let nibble = if random {
                    rng.random()
                } else {
                    (bytes[at] >> 4).wrapping_add_signed(delta)
                };
                bytes[at] = (nibble << 4) | (bytes[at] & 0x0f);
            }
            // The field was cut off by an earlier truncation.
            _ => {}
        }
    }
}

impl Frame {
    /// Every prefix of the frame from [`MIN_FRAME_LEN`] bytes up to the whole.
    pub fn truncations(&self) -> impl Iterator<Item = Vec<u8>> + '_ {
        (MIN_FRAME_LEN..=self.bytes.len()).map(|len| self.bytes[..len].to_vec())
    }

    /// One to three random corruptions: bit flips, truncations, and length
    /// fields moved a little or set at random.
    pub fn mutated(&self, rng: &mut StdRng) -> Vec<u8> {
        let mut bytes = self.bytes.clone();
        for _ in 0..rng.random_range(1..=3) {
            match rng.random_range(0..3) {
                0 => {
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] ^= 1 << rng.random_range(0..8);
                }
                1 => bytes.truncate(rng.random_range(MIN_FRAME_LEN..=bytes.len())),
                _ => {
                    if let Some(field) = self.length_fields.choose(rng) {
                        field.perturb(&mut bytes, rng);
                    }
                }
            }
        }
        bytes
    }
}

/// Random bytes behind a random `EtherType` (IPv4, IPv6, a VLAN tag, or any),
/// with the IP version nibble right half of the time, so some of them get
/// past the first checks.
pub fn random_frame(rng: &mut StdRng, max_len: usize) -> Vec<u8> {
    let len = rng.random_range(MIN_FRAME_LEN..=max_len);
    let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
    let ether_type = *[
        EtherType::IPV4,
        EtherType::IPV6,
        EtherType::VLAN_TAGGED_FRAME,
        EtherType::PROVIDER_BRIDGING,
        EtherType(rng.random()),
    ]
    .choose(rng)
    .expect("non-empty");
    bytes[12..14].copy_from_slice(&ether_type.0.to_be_bytes());
    let version = match ether_type {
        EtherType::IPV4 => Some(4),
        EtherType::IPV6 => Some(6),
        _ => None,
    };
    if let (Some(version), Some(first)) = (version, bytes.get_mut(MIN_FRAME_LEN))
        && rng.random()
    {
        *first = (version << 4) | (*first & 0x0f);
    }
    bytes
}
