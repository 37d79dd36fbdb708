//! The audit tables: records stored as `audit` (README "Audit log" gives the
//! layout the chain covers), signed checkpoints, retention of `ACCESS_DENIED`
//! payloads, and a read-only connection for the API's paged readers, so
//! that replaying or exporting the log never waits for the engine.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};

use super::{
    Batch, Result, Store, StoreError,
    payload::{self, Codec},
};
use crate::{
    audit::{self, AuditRecord, Event, GrantFacts, Kind, Payload},
    checkpoint::Checkpoint,
    grants::Grant,
    net::{GrantTarget, Protocol},
    time::to_ms,
};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit_kinds (code INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    principal TEXT NOT NULL,
    grant_id INTEGER NOT NULL,
    port INTEGER,
    message TEXT,
    details TEXT,
    payload BLOB,
    payload_sha256 BLOB,
    hash BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_denied ON audit (at_ms) WHERE kind = 7;
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    seq INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    signature TEXT NOT NULL
);
";

/// Schema 6's audit rows in schema 7's table: kinds by code, digests and
/// hashes as their 32 bytes (a malformed one keeps its text's bytes, and
/// fails to verify as before), the details' port in a column; message
/// and details stay text (`payload` is for records written since).
const UPGRADE_FROM_6: &str = "
ALTER TABLE audit RENAME TO audit_6;
DROP INDEX IF EXISTS audit_by_kind;
";

const COPY_FROM_6: &str = "
INSERT INTO audit (seq, at_ms, kind, principal, grant_id, port, message, details, payload, payload_sha256, hash)
SELECT seq, at_ms, (SELECT code FROM audit_kinds WHERE name = audit_6.kind), principal, grant_id,
       CASE WHEN json_valid(details) AND json_type(details, '$.port') = 'integer'
            THEN json_extract(details, '$.port') END,
       message, details, NULL,
       coalesce(unhex(payload_sha256), CAST(payload_sha256 AS BLOB)),
       coalesce(unhex(hash), CAST(hash AS BLOB))
FROM audit_6 ORDER BY seq;
DROP TABLE audit_6;
";

/// Audit rows, each `grant-created` record kept as a reference with its
/// grant's row (`payload::by_reference`).
const FROM: &str = "audit LEFT JOIN grants AS g \
    ON substr(audit.payload, 1, 1) = x'00' AND g.id = audit.grant_id";

const COLUMNS: &str = "audit.seq, audit.at_ms, audit.kind, audit.principal, audit.grant_id, \
    audit.message, audit.details, audit.payload, audit.payload_sha256, audit.hash, \
    g.source, g.protocol, g.port, g.request_id, g.requester, g.justification, g.ticket, \
    g.granted_ms, g.max_connections";

/// Creates the audit tables, or brings schema 6's up to date (one
/// transaction), and names every kind in `audit_kinds`.
pub(super) fn create_or_upgrade(conn: &Connection) -> Result<()> {
    let kind_type: Option<String> = conn
        .query_row(
            "SELECT type FROM pragma_table_info('audit') WHERE name = 'kind'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let from_6 = kind_type.is_some_and(|t| t.eq_ignore_ascii_case("TEXT"));
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let upgraded = (|| {
        if from_6 {
            conn.execute_batch(UPGRADE_FROM_6)?;
        }
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(payload::SCHEMA)?;
        name_kinds(conn)?;
        if from_6 {
            conn.execute_batch(COPY_FROM_6)?;
        }
        Ok::<_, StoreError>(())
    })();
    match upgraded {
        Ok(()) => conn.execute_batch("COMMIT")?,
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e);
        }
    }
    Ok(())
}

/// Fills `audit_kinds`, and refuses a database whose codes mean other kinds.
fn name_kinds(conn: &Connection) -> Result<()> {
    let mut insert =
        conn.prepare("INSERT OR IGNORE INTO audit_kinds (code, name) VALUES (?1, ?2)")?;
    let mut named = conn.prepare("SELECT name FROM audit_kinds WHERE code = ?1")?;
    for kind in Kind::ALL {
        insert.execute(params![kind.code(), kind.name()])?;
        let name: String = named.query_row([kind.code()], |r| r.get(0))?;
        if name != kind.name() {
            return Err(StoreError::Corrupt {
                what: "audit kind code",
                value: format!("{} names {name}, not {}", kind.code(), kind.name()),
            });
        }
    }
    Ok(())
}

pub(super) fn head(conn: &Connection) -> rusqlite::Result<(u64, String)> {
    Ok(conn
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    hex::encode(r.get::<_, Vec<u8>>(1)?),
                ))
            },
        )
        .optional()?
        .unwrap_or((0, audit::GENESIS_HASH.to_owned())))
}

/// Which records a reader wants; unset fields do not filter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditFilter {
    pub kinds: Vec<Kind>,
    /// At or after (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Before (ms since the epoch).
    pub until_ms: Option<i64>,
    pub principal: Option<String>,
    /// Records about this port: of a grant on it, or whose details name it.
    pub port: Option<u16>,
}

/// What a payload that does not inflate reads as: its digest then differs
/// from the one the chain covers, so the record fails to verify.
const UNREADABLE: &str = "(the stored payload does not inflate)";

/// The payload a `grant-created` record keeps as a reference, from its
/// grant's row (columns 10 to 18 of `COLUMNS`); `None` if the row is
/// missing or malformed.
fn rebuilt(stored: &[u8], at_ms: i64, r: &Row<'_>) -> rusqlite::Result<Option<Payload>> {
    let Some(source) = r.get::<_, Option<String>>(10)? else {
        return Ok(None);
    };
    let (Ok(source), Some(protocol)) = (
        source.parse(),
        u8::try_from(r.get::<_, i64>(11)?)
            .ok()
            .and_then(Protocol::from_number),
    ) else {
        return Ok(None);
    };
    let (request_id, requester, justification, ticket): (String, String, String, String) =
        (r.get(13)?, r.get(14)?, r.get(15)?, r.get(16)?);
    let row = GrantFacts {
        id: r.get::<_, i64>(4)? as u64,
        target: GrantTarget {
            source,
            protocol,
            port: r.get(12)?,
        },
        expires_at: SystemTime::UNIX_EPOCH,
        granted: Duration::from_millis(r.get::<_, Option<i64>>(17)?.unwrap_or(0).max(0) as u64),
        request_id: &request_id,
        requester: &requester,
        justification: &justification,
        ticket: &ticket,
        max_connections: r.get(18)?,
    };
    Ok(payload::rebuild(stored, at_ms, &row))
}

fn record(codec: &Codec, r: &Row<'_>) -> rusqlite::Result<(AuditRecord, i64)> {
    let message: Option<String> = r.get(5)?;
    let details: Option<String> = r.get(6)?;
    let stored: Option<Vec<u8>> = r.get(7)?;
    let digest: Option<Vec<u8>> = r.get(8)?;
    let at_ms: i64 = r.get(1)?;
    // Text as schema 6 stored it, else a reference to the grant's row
    // (schema 8), else the deflated form (schema 7).
    let payload = match (message, stored) {
        (Some(message), _) => Some(Payload {
            message,
            details: details.unwrap_or_default(),
        }),
        (None, Some(stored)) => {
            let read = if payload::is_reference(&stored) {
                rebuilt(&stored, at_ms, r)?
            } else {
                codec.inflate(&stored)
            };
            Some(read.unwrap_or_else(|| Payload {
                message: UNREADABLE.into(),
                details: String::new(),
            }))
        }
        (None, None) => None,
    };
    let payload_sha256 = match (digest, &payload) {
        (Some(digest), _) => hex::encode(digest),
        (None, Some(payload)) => payload.sha256(),
        (None, None) => String::new(),
    };
    let record = AuditRecord {
        sequence: r.get::<_, i64>(0)? as u64,
        at_ms,
        kind: Kind::AgentStarted,
        principal: r.get(3)?,
        grant_id: r.get::<_, i64>(4)? as u64,
        payload,
        payload_sha256,
        hash: hex::encode(r.get::<_, Vec<u8>>(9)?),
    };
    Ok((record, r.get(2)?))
}

/// Records above `after`, oldest first, at most `limit`, that pass `filter`.
fn page(
    conn: &Connection,
    codec: &Codec,
    filter: &AuditFilter,
    after: u64,
    limit: u32,
) -> Result<Vec<AuditRecord>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM {FROM} WHERE audit.seq > ?1 \
         AND (?2 IS NULL OR kind IN (SELECT value FROM json_each(?2))) \
         AND (?3 IS NULL OR at_ms >= ?3) AND (?4 IS NULL OR at_ms < ?4) \
         AND (?5 IS NULL OR audit.principal = ?5) \
         AND (?6 IS NULL OR audit.port = ?6 \
              OR audit.grant_id IN (SELECT id FROM grants WHERE port = ?6)) \
         ORDER BY audit.seq LIMIT ?7"
    ))?;
    let kinds = (!filter.kinds.is_empty()).then(|| {
        serde_json::to_string(&filter.kinds.iter().map(|k| k.code()).collect::<Vec<_>>())
            .expect("kind codes serialise")
    });
    let rows = stmt.query_map(
        params![
            after as i64,
            kinds,
            filter.since_ms,
            filter.until_ms,
            filter.principal,
            filter.port,
            limit
        ],
        |r| record(codec, r),
    )?;
    let mut out = Vec::new();
    for row in rows {
        let (mut record, kind) = row?;
        record.kind = Kind::from_code(kind).ok_or(StoreError::Corrupt {
            what: "audit kind",
            value: kind.to_string(),
        })?;
        out.push(record);
    }
    Ok(out)
}

impl Store {
    /// Audit records above `after`, oldest first, at most `limit`.
    pub fn audit_after(&self, after: u64, limit: u32) -> Result<Vec<AuditRecord>> {
        page(
            &self.conn,
            &self.codec,
            &AuditFilter::default(),
            after,
            limit,
        )
    }

    /// Drops the payload of `ACCESS_DENIED` records older than `before`, at
    /// most `limit` of them; returns how many. Their digests stay (stored
    /// now if the row held none), so the chain still verifies.
    pub fn prune_denied(&mut self, before: SystemTime, limit: u32) -> Result<usize> {
        let tx = self.conn.transaction()?;
        let due = {
            // The kind as a literal: the partial index `audit_denied` serves it.
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM {FROM} WHERE audit.kind = {} AND audit.at_ms < ?1 \
                 AND (audit.message IS NOT NULL OR audit.payload IS NOT NULL) \
                 ORDER BY audit.seq LIMIT ?2",
                Kind::AccessDenied.code()
            ))?;
            stmt.query_map(params![to_ms(before), limit], |r| record(&self.codec, r))?
                .collect::<rusqlite::Result<Vec<_>>>()?
        };
        {
            let mut prune = tx.prepare_cached(
                "UPDATE audit SET message = NULL, details = NULL, payload = NULL, \
                 payload_sha256 = ?1 WHERE seq = ?2",
            )?;
            for (record, _) in &due {
                let digest = hex::decode(&record.payload_sha256).unwrap_or_default();
                prune.execute(params![digest, record.sequence as i64])?;
            }
        }
        tx.commit()?;
        Ok(due.len())
    }

    pub fn save_checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO audit_checkpoints (seq, hash, at_ms, signature) VALUES (?1, ?2, ?3, ?4)",
            params![
                checkpoint.sequence as i64,
                checkpoint.hash,
                checkpoint.at_ms,
                checkpoint.signature
            ],
        )?;
        Ok(())
    }

    /// Checkpoints kept in the database, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        checkpoints(&self.conn)
    }
}

fn checkpoints(conn: &Connection) -> Result<Vec<Checkpoint>> {
    let mut stmt = conn
        .prepare_cached("SELECT seq, hash, at_ms, signature FROM audit_checkpoints ORDER BY seq")?;
    let rows = stmt.query_map([], |r| {
        Ok(Checkpoint {
            sequence: r.get::<_, i64>(0)? as u64,
            hash: r.get(1)?,
            at_ms: r.get(2)?,
            signature: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

impl Batch<'_> {
    /// Appends an audit record chained to the previous one.
    pub fn audit(&mut self, event: Event, at: SystemTime) -> Result<()> {
        self.append(event, at, |_| None)
    }

    /// Appends the `grant-created` record of `grant`, a grant this batch
    /// wrote, asked for by `principal`. Its payload is made here from the
    /// grant's facts, so it is kept as a reference to the grant's row
    /// whenever the row rebuilds its end (`payload::by_reference`).
    pub fn audit_grant_created(
        &mut self,
        grant: &Grant,
        principal: &str,
        at: SystemTime,
    ) -> Result<()> {
        let facts = GrantFacts::of(grant);
        self.append(facts.event(principal), at, |record| {
            payload::by_reference(&facts, record.at_ms)
        })
    }

    /// Appends `event`, its payload stored as `reference` gives it, or else
    /// deflated.
    fn append(
        &mut self,
        event: Event,
        at: SystemTime,
        reference: impl FnOnce(&AuditRecord) -> Option<Vec<u8>>,
    ) -> Result<()> {
        let sequence = self.head.0 + 1;
        let port = event
            .details
            .get("port")
            .and_then(serde_json::Value::as_u64)
            .and_then(|p| u16::try_from(p).ok());
        let record = audit::seal(sequence, at, event, &self.head.1);
        let payload = record
            .payload
            .as_ref()
            .expect("a new record has its payload");
        let stored = reference(&record).unwrap_or_else(|| self.codec.deflate(payload));
        let mut stmt = self.tx.prepare_cached(
            "INSERT INTO audit (seq, at_ms, kind, principal, grant_id, port, payload, hash) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        stmt.execute(params![
            sequence as i64,
            record.at_ms,
            record.kind.code(),
            record.principal,
            record.grant_id as i64,
            port,
            stored,
            crate::digest_hex::decode(&record.hash).expect("a sealed hash is 32 bytes of hex"),
        ])?;
        self.head = (sequence, record.hash.clone());
        self.appended.push(record);
        Ok(())
    }
}

/// A read-only connection to the database for the API's readers (replay,
/// export, verification), shared and used one page at a time.
#[derive(Clone)]
pub struct AuditReader {
    conn: Arc<Mutex<(Connection, Codec)>>,
}

impl AuditReader {
    pub fn open(path: &Path) -> Result<AuditReader> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let codec = Codec::open(&conn, false)?;
        Ok(AuditReader {
            conn: Arc::new(Mutex::new((conn, codec))),
        })
    }

    /// Blocks: call from a blocking thread.
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        checkpoints(&self.conn.lock().expect("audit reader lock").0)
    }

    /// Blocks: call from a blocking thread.
    pub fn page(&self, filter: &AuditFilter, after: u64, limit: u32) -> Result<Vec<AuditRecord>> {
        let guard = self.conn.lock().expect("audit reader lock");
        let (conn, codec) = &*guard;
        page(conn, codec, filter, after, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(store: &mut Store, event: Event, at: SystemTime) {
        let mut batch = store.batch().unwrap();
        batch.audit(event, at).unwrap();
        batch.commit().unwrap();
    }

    fn verify(records: &[AuditRecord]) -> std::result::Result<audit::Verifier, audit::Broken> {
        let mut verifier = audit::Verifier::default();
        for record in records {
            verifier.check(record)?;
        }
        Ok(verifier)
    }

    #[test]
    fn chain_survives_reopen_detects_tampering_and_pruning_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let old = SystemTime::now() - Duration::from_hours(1);
        {
            let mut store = Store::open(&path).unwrap();
            append(
                &mut store,
                Event::new(Kind::AccessDenied, "agent", 0, "denied")
                    .with_details(serde_json::json!({ "port": 22 })),
                old,
            );
        }
        let mut store = Store::open(&path).unwrap();
        append(
            &mut store,
            Event::new(Kind::PolicyChanged, "uid:0", 0, "change"),
            SystemTime::now(),
        );
        let records = store.audit_after(0, 10).unwrap();
        assert_eq!(records.len(), 2);
        verify(&records).unwrap();
        assert_eq!(store.audit_head().1, records[1].hash);

        // Filters: by port (details), by kind, by time.
        let reader = AuditReader::open(&path).unwrap();
        let by_port = AuditFilter {
            port: Some(22),
            ..Default::default()
        };
        assert_eq!(reader.page(&by_port, 0, 10).unwrap().len(), 1);
        let by_kind = AuditFilter {
            kinds: vec![Kind::PolicyChanged],
            ..Default::default()
        };
        assert_eq!(reader.page(&by_kind, 0, 10).unwrap()[0].sequence, 2);
        let recent = AuditFilter {
            since_ms: Some(to_ms(old) + 1),
            ..Default::default()
        };
        assert_eq!(reader.page(&recent, 0, 10).unwrap().len(), 1);

        // Retention drops the old denial's payload; the chain holds.
        assert_eq!(
            store
                .prune_denied(SystemTime::now() - Duration::from_mins(1), 100)
                .unwrap(),
            1
        );
        let records = store.audit_after(0, 10).unwrap();
        assert!(records[0].payload.is_none());
        assert_eq!(verify(&records).unwrap().pruned, 1);

        store
            .conn
            .execute("UPDATE audit SET message = 'forged' WHERE seq = 2", [])
            .unwrap();
        let records = store.audit_after(0, 10).unwrap();
        assert_eq!(verify(&records).unwrap_err().sequence, 2);
    }
}
