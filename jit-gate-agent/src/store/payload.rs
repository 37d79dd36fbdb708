//! Audit payloads as the database stores them (schema 7): the digest's
//! preimage (`len(message) ‖ message ‖ len(details) ‖ details`) deflated
//! (raw DEFLATE, RFC 1951) against a preset dictionary, behind one byte
//! naming that dictionary. The dictionaries live in the database itself
//! (`audit_dictionaries`), so anyone can inflate a payload with zlib alone
//! (`tests/python/verify_audit.py` does); a record's digest and hash are
//! over the inflated bytes, exactly as before schema 7.

use std::collections::HashMap;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use rusqlite::{Connection, params};

use crate::audit::Payload;

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
