//! Which shard set of an allow group holds a key: the kernel's `jhash`
//! (include/linux/jhash.h) of the key, scaled to the shard count as
//! `nft_jhash_eval` does. The rule that dispatches packets computes the
//! same hash over the same registers, so both sides must agree bit for bit.
//!
//! Why shards: the kernel restarts a hash set's walk for every 32 KiB dump
//! message (`nft_rhash_walk` skips what earlier messages held), so reading
//! a set back costs the square of its size. Spreading a group over
//! `SHARDS` sets divides that cost by `SHARDS`; at a million grants each
//! shard holds ~16k elements and a full read stays within seconds.

/// Shard sets per allow group (family and prefix length).
pub(super) const SHARDS: u32 = 64;

/// The hash seed of the dispatch rule. Fixed, so a restarted agent finds
/// its elements where it put them; it is no secret (an attacker choosing
/// sources can only crowd one shard, which costs read time, not safety).
pub(super) const SEED: u32 = 0x6a69_7467;

const JHASH_INITVAL: u32 = 0xdead_beef;

/// The shard of `key` (an allow set key, as the rule loads it into
/// consecutive registers).
pub(super) fn shard_of(key: &[u8]) -> u32 {
    // reciprocal_scale(): the high half of hash × modulus.
    ((u64::from(jhash(key, SEED)) * u64::from(SHARDS)) >> 32) as u32
}

fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

fn final_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

/// The kernel's `jhash(key, len, initval)`. Whole words are read in the
/// CPU's byte order (`__get_unaligned_cpu32`); the tail byte by byte.
fn jhash(key: &[u8], initval: u32) -> u32 {
    let start = JHASH_INITVAL
        .wrapping_add(key.len() as u32)
        .wrapping_add(initval);
    let (mut a, mut b, mut c) = (start, start, start);
    let word = |bytes: &[u8], i: usize| {
        u32::from_ne_bytes(bytes[i..i + 4].try_into().expect("four bytes"))
    };
    let mut rest = key;
    while rest.len() > 12 {
        a = a.wrapping_add(word(rest, 0));
        b = b.wrapping_add(word(rest, 4));
        c = c.wrapping_add(word(rest, 8));
        mix(&mut a, &mut b, &mut c);
        rest = &rest[12..];
    }
    if rest.is_empty() {
        return c;
    }
    // Byte i of the tail goes to word i / 4, at bit 8 × (i % 4).
    for (i, &byte) in rest.iter().enumerate() {
        let value = u32::from(byte) << (8 * (i % 4));
        match i / 4 {
            0 => a = a.wrapping_add(value),
            1 => b = b.wrapping_add(value),
            _ => c = c.wrapping_add(value),
        }
    }
    final_mix(&mut a, &mut b, &mut c);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jhash_matches_the_kernels() {
        // Bob Jenkins' lookup3 `hashlittle` is the same function on a
        // little-endian CPU; these are its published check values.
        if cfg!(target_endian = "little") {
            assert_eq!(jhash(b"", 0), 0xdead_beef);
            assert_eq!(jhash(b"", 0xdead_beef), 0xbd5b_7dde);
            assert_eq!(jhash(b"Four score and seven years ago", 0), 0x1777_0551);
            assert_eq!(jhash(b"Four score and seven years ago", 1), 0xcd62_8161);
        }
    }

    #[test]
    fn shards_are_in_range_and_spread() {
        let mut counts = [0u32; SHARDS as usize];
        for i in 0..64_000u32 {
            let mut key = [0u8; 12];
            key[..4].copy_from_slice(&i.to_be_bytes());
            key[4] = 6;
            key[9] = 22;
            counts[shard_of(&key) as usize] += 1;
        }
        // 1,000 expected per shard; a fair hash stays well within ±25 %.
        assert!(
            counts.iter().all(|&n| (750..1250).contains(&n)),
            "{counts:?}"
        );
    }
}
