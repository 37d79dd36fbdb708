//! SHA-256 digests as lower-case hex, the way the audit chain and request
//! fingerprints spell them. The engine writes and reads several for every
//! grant, so each is made in one buffer (`hex::encode` builds its string a
//! character at a time) and read back without allocating.

/// `bytes` as lower-case hex.
pub fn encode(bytes: &[u8]) -> String {
    let mut text = vec![0; bytes.len() * 2];
    hex::encode_to_slice(bytes, &mut text).expect("the buffer is twice the input");
    String::from_utf8(text).expect("hex digits are ASCII")
}

/// The digest that `text` spells: 64 hex digits, either case.
pub fn decode(text: &str) -> Option<[u8; 32]> {
    let mut digest = [0; 32];
    hex::decode_to_slice(text, &mut digest).ok()?;
    Some(digest)
}

/// The digest `text` spells exactly as `encode` would (lower case).
pub fn decode_canonical(text: &str) -> Option<[u8; 32]> {
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    decode(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_round_trip_as_the_hex_crate_spells_them() {
        let digest: [u8; 32] = std::array::from_fn(|i| (i * 37 + 5) as u8);
        let text = encode(&digest);
        assert_eq!(text, hex::encode(digest));
        assert_eq!(decode(&text), Some(digest));
        assert_eq!(decode(&text.to_uppercase()), Some(digest));
        assert_eq!(decode_canonical(&text), Some(digest));
        assert_eq!(decode_canonical(&text.to_uppercase()), None);
        assert_eq!(decode(&text[..62]), None, "too short");
        assert_eq!(decode(&format!("{text}00")), None, "too long");
        assert_eq!(decode(&text.replacen('a', "g", 1)), None, "not hex");
    }
}
