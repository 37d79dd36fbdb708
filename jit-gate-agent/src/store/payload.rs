//! Audit payloads as the database stores them: the digest's preimage
//! (`len(message) ‖ message ‖ len(details) ‖ details`) deflated (raw
//! DEFLATE, RFC 1951) against a preset dictionary, behind one byte naming
//! that dictionary (schema 7). The dictionaries live in the database itself
//! (`audit_dictionaries`), so anyone can inflate a payload with zlib alone
//! (`tests/python/verify_audit.py` does). Since schema 8 a `grant-created`
//! record's payload is instead a reference to its grant's row (byte 0,
//! `by_reference`). A record's digest and hash are over the preimage,
//! exactly as before schema 7.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use rusqlite::{Connection, params};

use crate::audit::{GrantFacts, Payload};

/// The first byte of a `grant-created` payload kept as a reference to its
/// grant's row (no dictionary has this id). What follows is how many
/// seconds after the record's second the grant was shown to end, unsigned
/// big-endian in as few bytes as it takes (at most 4): the only fact of
/// the record that the row does not keep (its `expires_ms` moves).
const GRANT_ROW: u8 = 0;

/// The last second a reference may show as an end (9999-12-31T23:59:59Z):
/// four-digit years read alike everywhere.
const LAST_SECOND: u64 = 253_402_300_799;

/// The payload of `grant`'s `grant-created` record, written at `at_ms`,
/// kept as a reference to the grant's row, if the row rebuilds it: the
/// payload is a function of the facts alone (`GrantFacts::payload`), and
/// the end it shows (to the second) must lie between the record's second
/// and year 9999. `None`: deflate it.
pub(super) fn by_reference(grant: &GrantFacts<'_>, at_ms: i64) -> Option<Vec<u8>> {
    let at = u64::try_from(at_ms.div_euclid(1000)).ok()?;
    let end = grant
        .expires_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?
        .as_secs();
    let after = u32::try_from(end.checked_sub(at)?).ok()?;
    let mut stored = vec![GRANT_ROW];
    let bytes = after.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    stored.extend_from_slice(&bytes[skip..]);
    if end > LAST_SECOND {
        return None;
    }
    // Rebuilding costs as much as making the payload: checked by the tests.
    debug_assert_eq!(rebuild(&stored, at_ms, grant), Some(grant.payload()));
    Some(stored)
}

/// Whether `stored` is a reference to the grant's row.
pub(super) fn is_reference(stored: &[u8]) -> bool {
    stored.first() == Some(&GRANT_ROW)
}

/// The payload a reference stands for, from its grant's `row` (whose
/// `expires_at` is ignored); `None` if `stored` is no reference.
pub(super) fn rebuild(stored: &[u8], at_ms: i64, row: &GrantFacts<'_>) -> Option<Payload> {
    let (&GRANT_ROW, after) = stored.split_first()? else {
        return None;
    };
    if after.len() > 4 {
        return None;
    }
    let after = after.iter().fold(0, |n, b| n << 8 | u64::from(*b));
    let end = u64::try_from(at_ms.div_euclid(1000)).ok()? + after;
    Some(
        GrantFacts {
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(end),
            ..row.clone()
        }
        .payload(),
    )
}

/// The dictionary new payloads are deflated against; never changed once
/// shipped (a better one gets the next id, and old payloads keep theirs).
const DICTIONARY_ID: u8 = 1;

/// Text that grant, connection and denial records share, the most common
/// last (DEFLATE prefers near matches).
const DICTIONARY: &[u8] = b"\0\0\0\0\0\0\0\0{}\"port\":,\"protocol\":\"udp\",\"reason\":\"\",\"source\":\"\
\"local\":\"\",\"remote\":\"\"connection  opened under grant grant  revoked by  expired ended \
\0\0\0\0\0\0\0grant  for /32 tcp/22 until 2026-12-02T10:00:00Z to \0\0\0\0\0\0\0\
{\"duration_ms\":3600000,\"justification\":\"\",\"max_connections\":0,\"request_id\":\"\",\"requester\":\"\",\"ticket\":\"\"}";

/// Largest preimage inflated (a bound against a crafted row): records are
/// far smaller (every text field of a request is bounded).
const MAX_PREIMAGE: usize = 1 << 20;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit_dictionaries (id INTEGER PRIMARY KEY, bytes BLOB NOT NULL);
";

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("audit dictionary {0} in the database is not the one this agent ships")]
    Dictionary(u8),
}

/// Deflates and inflates payloads with the database's dictionaries.
pub(super) struct Codec {
    dictionaries: HashMap<u8, Vec<u8>>,
    compress: Compress,
}

impl Codec {
    /// Stores this agent's dictionary if missing (writable connections)
    /// and loads every dictionary the database holds.
    pub(super) fn open(conn: &Connection, writable: bool) -> Result<Codec, CodecError> {
        if writable {
            conn.execute(
                "INSERT OR IGNORE INTO audit_dictionaries (id, bytes) VALUES (?1, ?2)",
                params![DICTIONARY_ID, DICTIONARY],
            )?;
        }
        let mut stmt = conn.prepare("SELECT id, bytes FROM audit_dictionaries")?;
        let dictionaries = stmt
            .query_map([], |r| Ok((r.get::<_, u8>(0)?, r.get::<_, Vec<u8>>(1)?)))?
            .collect::<rusqlite::Result<HashMap<_, _>>>()?;
        if writable && dictionaries.get(&DICTIONARY_ID).map(Vec::as_slice) != Some(DICTIONARY) {
            return Err(CodecError::Dictionary(DICTIONARY_ID));
        }
        Ok(Codec {
            dictionaries,
            compress: Compress::new(Compression::best(), false),
        })
    }

    /// The stored form of `payload`.
    pub(super) fn deflate(&mut self, payload: &Payload) -> Vec<u8> {
        let input = payload.preimage();
        self.compress.reset();
        self.compress
            .set_dictionary(DICTIONARY)
            .expect("a fresh raw stream takes a dictionary");
        let mut out = Vec::with_capacity(input.len() + 64);
        out.push(DICTIONARY_ID);
        loop {
            let consumed = self.compress.total_in() as usize;
            let status = self
                .compress
                .compress_vec(&input[consumed..], &mut out, FlushCompress::Finish)
                .expect("deflating into a growable buffer");
            if status == Status::StreamEnd {
                return out;
            }
            out.reserve(out.capacity().max(64));
        }
    }

    /// The payload stored as `stored`, or `None` if it does not inflate to
    /// a payload (a damaged or forged row: its record then fails to verify).
    pub(super) fn inflate(&self, stored: &[u8]) -> Option<Payload> {
        let (id, deflated) = stored.split_first()?;
        let dictionary = self.dictionaries.get(id)?;
        let mut inflate = Decompress::new(false);
        inflate.set_dictionary(dictionary).ok()?;
        let mut out = Vec::with_capacity(deflated.len() * 4);
        loop {
            let consumed = inflate.total_in() as usize;
            let status = inflate
                .decompress_vec(&deflated[consumed..], &mut out, FlushDecompress::Finish)
                .ok()?;
            if status == Status::StreamEnd {
                break;
            }
            // Room left yet no end: the stream was cut short.
            if out.len() < out.capacity() || out.len() >= MAX_PREIMAGE {
                return None;
            }
            out.reserve(out.capacity().max(256));
        }
        Payload::from_preimage(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> Codec {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        Codec::open(&conn, true).unwrap()
    }

    #[test]
    fn payloads_round_trip_smaller_and_damage_is_refused() {
        let mut codec = codec();
        let grant = Payload {
            message: "grant 123456 for 10.1.226.64/32 tcp/22 until 2026-12-02T10:39:04Z to alice"
                .into(),
            details: r#"{"duration_ms":3600000,"justification":"maintenance","max_connections":0,"request_id":"bulk-123456","requester":"alice","ticket":""}"#.into(),
        };
        let stored = codec.deflate(&grant);
        assert!(
            stored.len() * 2 < grant.preimage().len(),
            "{} of {} bytes",
            stored.len(),
            grant.preimage().len()
        );
        assert_eq!(codec.inflate(&stored), Some(grant.clone()));
        let long = Payload {
            message: "x".repeat(100_000),
            details: "{}".into(),
        };
        let stored_long = codec.deflate(&long);
        assert_eq!(codec.inflate(&stored_long), Some(long));
        // Another dictionary, a cut stream, flipped bytes: no payload.
        let mut other = stored.clone();
        other[0] = 2;
        assert_eq!(codec.inflate(&other), None);
        assert_eq!(codec.inflate(&stored[..stored.len() - 3]), None);
        let mut flipped = stored.clone();
        flipped[5] ^= 0x55;
        assert_ne!(codec.inflate(&flipped), Some(grant));
    }

    #[test]
    fn a_reference_stands_only_for_what_the_row_rebuilds() {
        let grant = crate::store::tests::grant("r1", "192.0.2.7/32");
        let at_ms = 1_764_669_544_123;
        let end = SystemTime::UNIX_EPOCH + Duration::from_millis(at_ms as u64 + 3_600_500);
        let facts = GrantFacts {
            expires_at: end,
            ..GrantFacts::of(&grant)
        };
        let stored = by_reference(&facts, at_ms).unwrap();
        // 3,600 s after the record's second (…544 + 3,600.5 s ends in …144).
        assert_eq!(stored, [GRANT_ROW, 0x0e, 0x10]);
        assert!(is_reference(&stored));
        let rebuilt = rebuild(&stored, at_ms, &GrantFacts::of(&grant)).unwrap();
        assert_eq!(
            rebuilt,
            GrantFacts {
                expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_673_144),
                ..facts.clone()
            }
            .payload()
        );
        // An end before the record or past year 9999: deflated.
        let before = GrantFacts {
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
            ..facts.clone()
        };
        assert_eq!(by_reference(&before, at_ms), None);
        let far = GrantFacts {
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(LAST_SECOND + 1),
            ..facts.clone()
        };
        // (Its message cannot be made: humantime writes four-digit years.)
        assert_eq!(by_reference(&far, 253_402_000_000_000), None);
        // Too long to be a reference, or no reference at all.
        assert_eq!(rebuild(&[GRANT_ROW, 1, 2, 3, 4, 5], at_ms, &facts), None);
        assert_eq!(rebuild(&[DICTIONARY_ID, 1], at_ms, &facts), None);
    }

    #[test]
    fn a_different_dictionary_under_the_same_id_is_refused() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.execute(
            "INSERT INTO audit_dictionaries (id, bytes) VALUES (1, x'00')",
            [],
        )
        .unwrap();
        assert!(matches!(
            Codec::open(&conn, true),
            Err(CodecError::Dictionary(1))
        ));
    }
}
