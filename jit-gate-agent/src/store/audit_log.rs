//! The audit tables: records stored as `audit` (README "Audit log" gives the
//! layout the chain covers), signed checkpoints, retention of `ACCESS_DENIED`
//! payloads, and a read-only connection for the API's paged readers, so
//! that replaying or exporting the log never waits for the engine.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};

use super::{Batch, Result, Store, StoreError};
use crate::{
    audit::{self, AuditRecord, Event, Kind, Payload},
    checkpoint::Checkpoint,
    time::to_ms,
};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    principal TEXT NOT NULL,
    grant_id INTEGER NOT NULL,
    message TEXT,
    details TEXT,
    payload_sha256 TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_kind ON audit (kind, at_ms);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    seq INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    signature TEXT NOT NULL
);
";

const COLUMNS: &str =
    "seq, at_ms, kind, principal, grant_id, message, details, payload_sha256, hash";

pub(super) fn head(conn: &Connection) -> rusqlite::Result<(u64, String)> {
    Ok(conn
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
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

fn record(r: &Row<'_>) -> rusqlite::Result<(AuditRecord, String)> {
    let kind: String = r.get(2)?;
    let message: Option<String> = r.get(5)?;
    let details: Option<String> = r.get(6)?;
    let record = AuditRecord {
        sequence: r.get::<_, i64>(0)? as u64,
        at_ms: r.get(1)?,
        kind: Kind::AgentStarted,
        principal: r.get(3)?,
        grant_id: r.get::<_, i64>(4)? as u64,
        payload: message
            .zip(details)
            .map(|(message, details)| Payload { message, details }),
        payload_sha256: r.get(7)?,
        hash: r.get(8)?,
    };
    Ok((record, kind))
}

/// Records above `after`, oldest first, at most `limit`, that pass `filter`.
fn page(
    conn: &Connection,
    filter: &AuditFilter,
    after: u64,
    limit: u32,
) -> Result<Vec<AuditRecord>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM audit WHERE seq > ?1 \
         AND (?2 IS NULL OR kind IN (SELECT value FROM json_each(?2))) \
         AND (?3 IS NULL OR at_ms >= ?3) AND (?4 IS NULL OR at_ms < ?4) \
         AND (?5 IS NULL OR principal = ?5) \
         AND (?6 IS NULL OR grant_id IN (SELECT id FROM grants WHERE port = ?6) \
              OR json_extract(details, '$.port') = ?6) \
         ORDER BY seq LIMIT ?7"
    ))?;
    let kinds = (!filter.kinds.is_empty()).then(|| {
        serde_json::to_string(&filter.kinds.iter().map(|k| k.name()).collect::<Vec<_>>())
            .expect("kind names serialise")
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
        record,
    )?;
    let mut out = Vec::new();
    for row in rows {
        let (mut record, kind) = row?;
        record.kind = Kind::from_name(&kind).ok_or(StoreError::Corrupt {
            what: "audit kind",
            value: kind,
        })?;
        out.push(record);
    }
    Ok(out)
}

impl Store {
    /// Audit records above `after`, oldest first, at most `limit`.
    pub fn audit_after(&self, after: u64, limit: u32) -> Result<Vec<AuditRecord>> {
        page(&self.conn, &AuditFilter::default(), after, limit)
    }

    /// Drops the payload of `ACCESS_DENIED` records older than `before`, at
    /// most `limit` of them; returns how many. Their digests stay, so the
    /// chain still verifies.
    pub fn prune_denied(&mut self, before: SystemTime, limit: u32) -> Result<usize> {
        Ok(self.conn.execute(
            "UPDATE audit SET message = NULL, details = NULL WHERE seq IN \
             (SELECT seq FROM audit WHERE kind = ?1 AND at_ms < ?2 AND message IS NOT NULL \
              ORDER BY seq LIMIT ?3)",
            params![Kind::AccessDenied.name(), to_ms(before), limit],
        )?)
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
        let sequence = self.head.0 + 1;
        let record = audit::seal(sequence, at, event, &self.head.1);
        let payload = record
            .payload
            .as_ref()
            .expect("a new record has its payload");
        let mut stmt = self.tx.prepare_cached(&format!(
            "INSERT INTO audit ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
        ))?;
        stmt.execute(params![
            sequence as i64,
            record.at_ms,
            record.kind.name(),
            record.principal,
            record.grant_id as i64,
            payload.message,
            payload.details,
            record.payload_sha256,
            record.hash,
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
    conn: Arc<Mutex<Connection>>,
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
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(AuditReader {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Blocks: call from a blocking thread.
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        checkpoints(&self.conn.lock().expect("audit reader lock"))
    }

    /// Blocks: call from a blocking thread.
    pub fn page(&self, filter: &AuditFilter, after: u64, limit: u32) -> Result<Vec<AuditRecord>> {
        page(
            &self.conn.lock().expect("audit reader lock"),
            filter,
            after,
            limit,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
