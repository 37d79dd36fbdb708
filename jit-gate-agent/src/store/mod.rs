//! Persistence: grants, policy and the audit log in `SQLite` (WAL mode,
//! synchronous=FULL, bundled `SQLite`). Every change goes through a `Batch`,
//! one transaction, so a request's grants and their audit records are
//! committed together or not at all. The audit tables are in `audit_log`,
//! the approval tables in `requests`.

mod audit_log;
mod fleet_progress;
mod payload;
mod requests;
mod upgrade;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use ipnet::IpNet;
use rusqlite::{Connection, OptionalExtension, Row, Transaction, params, types::Value};

pub use audit_log::{AuditFilter, AuditReader};
pub use fleet_progress::FleetCursor;
pub use payload::CodecError;

use crate::{
    audit::AuditRecord,
    clock::Deadline,
    grants::{Grant, GrantState},
    net::{GrantTarget, Protocol},
    policy::Policy,
    time::{from_ms, to_ms},
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("creating {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("database holds a malformed {what}: {value:?}")]
    Corrupt { what: &'static str, value: String },
    #[error("audit payloads: {0}")]
    Codec(#[from] CodecError),
    #[error("stored JSON (policy or held request): {0}")]
    Policy(#[from] serde_json::Error),
    #[error(
        "database {path} was made by an earlier development version (schema {found}, this agent needs {SCHEMA_VERSION}); move it aside and start with --reinitialize"
    )]
    OldSchema { path: PathBuf, found: i64 },
}

/// `PRAGMA user_version` of databases this agent writes: 2 is the audit
/// layout of README "Audit log" (payload digests); 3 adds the grants'
/// boot-clock deadlines and 4 their limit on connections opened
/// (`GRANT_COLUMNS_ADDED`), to which version-2 and -3 databases are brought
/// up to date in place; 5 adds the approval tables (`requests`), 6 adds
/// `fleet_progress`, each created when missing. 7 stores less per grant
/// and record (README "Audit log"; `upgrade`,
/// `audit_log::create_or_upgrade`): fingerprints, digests and hashes as
/// bytes, boot ids once in `boots`, kinds by code, new payloads deflated.
/// 8 (`upgrade`) keeps grant states and protocols by number
/// and a `grant-created` record's payload as a reference to its grant's
/// row (`payload::by_reference`).
const SCHEMA_VERSION: i64 = 8;
/// The oldest version brought up to date rather than refused.
const UPGRADABLE_FROM: i64 = 2;

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The grants table of schema 8 under `name`: the protocol as its IANA
/// number, the state as `state_code`, the fingerprint as bytes (text if
/// it was not lower-case hex).
pub(super) fn grants_table(name: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {name} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    request_fingerprint BLOB NOT NULL,
    source TEXT NOT NULL,
    protocol INTEGER NOT NULL,
    port INTEGER NOT NULL,
    requester TEXT NOT NULL,
    justification TEXT NOT NULL,
    ticket TEXT NOT NULL,
    principal TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    state INTEGER NOT NULL,
    ended_ms INTEGER,
    granted_ms INTEGER,
    deadline_boot_ns INTEGER,
    max_connections INTEGER NOT NULL DEFAULT 0,
    boot INTEGER
);"
    )
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS boots (boot INTEGER PRIMARY KEY, boot_id TEXT NOT NULL UNIQUE);
";

/// The grants indexes of schema 8: by idempotency key, the active ones
/// (state 0), by port (in id order within a port).
const GRANT_INDEXES: &str = "
CREATE INDEX IF NOT EXISTS grants_by_request ON grants (principal, request_id);
CREATE INDEX IF NOT EXISTS grants_active ON grants (state) WHERE state = 0;
CREATE INDEX IF NOT EXISTS grants_by_port_id ON grants (port);
";

/// The fingerprint as stored: its bytes if it is lower-case hex (as
/// `AccessRequest::fingerprint` makes it), else its text.
fn fingerprint_column(fingerprint: &str) -> Value {
    match crate::digest_hex::decode_canonical(fingerprint) {
        Some(bytes) => Value::Blob(bytes.to_vec()),
        None => Value::Text(fingerprint.to_owned()),
    }
}

/// The stored fingerprint back as text (SQL).
const FINGERPRINT_TEXT: &str = "CASE typeof(request_fingerprint) \
     WHEN 'blob' THEN lower(hex(request_fingerprint)) ELSE request_fingerprint END";

/// A boot id's row of `boots`, added if missing.
const ADD_BOOT: &str = "INSERT OR IGNORE INTO boots (boot_id) VALUES (?1)";
const BOOT_OF: &str = "SELECT boot FROM boots WHERE boot_id = ?1";

const POLICY_KEY: &str = "policy";

/// The number the grants table keeps for a state (schema 8); never
/// reused or changed (`GRANTS_TO_8` spells them too).
const fn state_code(state: GrantState) -> i64 {
    match state {
        GrantState::Active => 0,
        GrantState::Expired => 1,
        GrantState::Revoked => 2,
        GrantState::EndedByPolicy => 3,
    }
}

fn state_of_code(code: i64) -> Option<GrantState> {
    [
        GrantState::Active,
        GrantState::Expired,
        GrantState::Revoked,
        GrantState::EndedByPolicy,
    ]
    .into_iter()
    .find(|s| state_code(*s) == code)
}

/// `state_code(GrantState::Active)` as SQL.
const ACTIVE: &str = "state = 0";

/// The grants of one port, for the status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortActivity {
    pub port: u16,
    pub protocol: Protocol,
    /// Grants created since the instant asked about, by the minute since
    /// the epoch (`ACTIVITY_MINUTE_MS`), oldest first.
    pub by_minute: Vec<(i64, u32)>,
    pub last: LastAccess,
}

/// The length of the minutes `PortActivity` counts grants by.
pub const ACTIVITY_MINUTE_MS: i64 = 60_000;

/// The latest grant on a port: when, for whom, asked by whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastAccess {
    pub at: SystemTime,
    pub requester: String,
    pub principal: String,
}

pub struct Store {
    conn: Connection,
    codec: payload::Codec,
    /// Sequence and hash of the last audit record: the chain's head.
    audit_head: (u64, String),
    /// The boot id grants were last written with, and its committed row
    /// of `boots` (one boot a run: not looked up for every grant).
    boot: Option<(String, i64)>,
    /// False while no access request was ever held for approval: an
    /// access request's key then need not be looked up among them.
    holds_requests: bool,
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(open_err)?;
        let has_tables: bool = conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'grants')",
                [],
                |r| r.get(0),
            )
            .map_err(open_err)?;
        if has_tables && !(UPGRADABLE_FROM..=SCHEMA_VERSION).contains(&version) {
            return Err(StoreError::OldSchema {
                path: path.to_owned(),
                found: version,
            });
        }
        conn.execute_batch(SCHEMA).map_err(open_err)?;
        if has_tables && version < SCHEMA_VERSION {
            upgrade::grants(&conn).map_err(open_err)?;
        }
        conn.execute_batch(&grants_table("grants"))
            .map_err(open_err)?;
        conn.execute_batch(GRANT_INDEXES).map_err(open_err)?;
        audit_log::create_or_upgrade(&conn)?;
        let codec = payload::Codec::open(&conn, true)?;
        conn.execute_batch(requests::SCHEMA).map_err(open_err)?;
        conn.execute_batch(fleet_progress::SCHEMA)
            .map_err(open_err)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(open_err)?;
        // The database, its WAL and shared-memory files: the agent's alone,
        // whatever the umask was when they were created.
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.as_os_str().to_owned();
            file.push(suffix);
            if let Err(source) =
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                && source.kind() != std::io::ErrorKind::NotFound
            {
                return Err(StoreError::Dir {
                    path: file.into(),
                    source,
                });
            }
        }
        let audit_head = audit_log::head(&conn).map_err(open_err)?;
        let holds_requests = requests::any(&conn).map_err(open_err)?;
        Ok(Store {
            conn,
            codec,
            audit_head,
            boot: None,
            holds_requests,
        })
    }

    /// The last audit record's sequence and hash ((0, genesis) if none).
    pub fn audit_head(&self) -> (u64, String) {
        self.audit_head.clone()
    }

    /// Starts a transaction; nothing is visible until `Batch::commit`.
    pub fn batch(&mut self) -> Result<Batch<'_>> {
        let head = self.audit_head.clone();
        Ok(Batch {
            tx: self.conn.transaction()?,
            codec: &mut self.codec,
            head,
            head_slot: &mut self.audit_head,
            boot: self.boot.clone(),
            boot_slot: &mut self.boot,
            holds_requests: &mut self.holds_requests,
            appended: Vec::new(),
        })
    }

    pub fn policy(&self) -> Result<Option<Policy>> {
        self.meta(POLICY_KEY)?
            .map(|json| serde_json::from_str(&json).map_err(StoreError::from))
            .transpose()
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn active_grants(&self) -> Result<Vec<Grant>> {
        grants_where(&self.conn, ACTIVE, params![])
    }

    /// The wall-clock end last shown for each of the grants `ids`.
    pub fn expiry_shown(
        &self,
        ids: impl IntoIterator<Item = u64>,
    ) -> Result<std::collections::HashMap<u64, SystemTime>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT expires_ms FROM grants WHERE id = ?1")?;
        let mut out = std::collections::HashMap::new();
        for id in ids {
            let ms: Option<i64> = stmt.query_row([id as i64], |r| r.get(0)).optional()?;
            if let Some(ms) = ms {
                out.insert(id, from_ms(ms));
            }
        }
        Ok(out)
    }

    /// The fingerprint and grants of an earlier request with this id by
    /// this principal (idempotency keys are per principal).
    pub fn request(
        &self,
        principal: &str,
        request_id: &str,
    ) -> Result<Option<(String, Vec<Grant>)>> {
        request(&self.conn, principal, request_id)
    }

    pub fn grant(&self, id: u64) -> Result<Option<Grant>> {
        Ok(grants_where(&self.conn, "id = ?1", params![id as i64])?
            .into_iter()
            .next())
    }

    /// Grants, newest first: active only, or every state; on one port or
    /// all; with an id below `before` if given; at most `limit`.
    pub fn list_grants(
        &self,
        include_ended: bool,
        port: Option<u16>,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<Grant>> {
        let state = if include_ended { "1" } else { ACTIVE };
        let port_filter = if port.is_some() {
            "port = ?1"
        } else {
            "?1 IS NULL"
        };
        grants_where(
            &self.conn,
            &format!("{state} AND {port_filter} AND id < ?2 ORDER BY id DESC LIMIT ?3"),
            params![port, before.map_or(i64::MAX, |b| b as i64), limit],
        )
    }

    /// Per (port, protocol): grants created since `since`, by the minute,
    /// and the latest grant. Reads every grant ever written: the engine
    /// asks once, at start, and keeps it up itself.
    pub fn port_activity(&self, since: SystemTime) -> Result<Vec<PortActivity>> {
        // With MAX(), SQLite takes the bare columns from the row holding
        // the maximum: the latest grant (ids grow with creation).
        let mut latest = self.conn.prepare(
            "SELECT port, protocol, MAX(id), created_ms, requester, principal \
             FROM grants GROUP BY port, protocol",
        )?;
        let mut out = Vec::new();
        for row in latest.query_map([], |r| {
            Ok((
                r.get::<_, u16>(0)?,
                r.get::<_, i64>(1)?,
                LastAccess {
                    at: from_ms(r.get(3)?),
                    requester: r.get(4)?,
                    principal: r.get(5)?,
                },
            ))
        })? {
            let (port, protocol, last) = row?;
            out.push(PortActivity {
                port,
                protocol: protocol_of_code(protocol)?,
                by_minute: Vec::new(),
                last,
            });
        }
        let mut recent = self.conn.prepare(
            "SELECT port, protocol, created_ms / ?2, COUNT(*) FROM grants \
             WHERE created_ms >= ?1 GROUP BY port, protocol, created_ms / ?2 \
             ORDER BY port, protocol, created_ms / ?2",
        )?;
        for row in recent.query_map(params![to_ms(since), ACTIVITY_MINUTE_MS], |r| {
            Ok((
                r.get::<_, u16>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, u32>(3)?,
            ))
        })? {
            let (port, protocol, minute, count) = row?;
            let protocol = protocol_of_code(protocol)?;
            if let Some(activity) = out
                .iter_mut()
                .find(|a| (a.port, a.protocol) == (port, protocol))
            {
                activity.by_minute.push((minute, count));
            }
        }
        Ok(out)
    }
}

fn grants_where(
    conn: &Connection,
    condition: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Grant>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT id, request_id, source, protocol, port, requester, justification, ticket, \
         principal, created_ms, expires_ms, state, ended_ms, granted_ms, deadline_boot_ns, \
         boot_id, max_connections FROM grants LEFT JOIN boots USING (boot) WHERE {condition}"
    ))?;
    let raw = stmt
        .query_map(params, RawGrant::from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    raw.into_iter().map(RawGrant::into_grant).collect()
}

fn request(
    conn: &Connection,
    principal: &str,
    request_id: &str,
) -> Result<Option<(String, Vec<Grant>)>> {
    // Asked once per request: prepared once (parsing it cost more than running it).
    let fingerprint: Option<String> = conn
        .prepare_cached(&format!(
            "SELECT {FINGERPRINT_TEXT} FROM grants WHERE principal = ?1 AND request_id = ?2 LIMIT 1"
        ))?
        .query_row([principal, request_id], |r| r.get(0))
        .optional()?;
    let Some(fingerprint) = fingerprint else {
        return Ok(None);
    };
    let grants = grants_where(
        conn,
        "principal = ?1 AND request_id = ?2 ORDER BY id",
        params![principal, request_id],
    )?;
    Ok(Some((fingerprint, grants)))
}

/// A grants row before its source, protocol and state are parsed.
struct RawGrant {
    grant: Grant,
    source: String,
    protocol: i64,
    state: i64,
}

impl RawGrant {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<RawGrant> {
        let placeholder = GrantTarget {
            source: IpNet::default(),
            protocol: Protocol::Tcp,
            port: r.get(4)?,
        };
        Ok(RawGrant {
            grant: Grant {
                id: r.get::<_, i64>(0)? as u64,
                request_id: r.get(1)?,
                target: placeholder,
                requester: r.get(5)?,
                justification: r.get(6)?,
                ticket: r.get(7)?,
                principal: r.get(8)?,
                created_at: from_ms(r.get(9)?),
                granted: Duration::from_millis(
                    r.get::<_, Option<i64>>(13)?.unwrap_or(0).max(0) as u64
                ),
                deadline: Deadline::from_boot_ns(
                    r.get::<_, Option<i64>>(14)?.unwrap_or(0).max(0) as u64
                ),
                boot_id: r.get::<_, Option<String>>(15)?.unwrap_or_default(),
                expires_at: from_ms(r.get(10)?),
                state: GrantState::Active,
                ended_at: r.get::<_, Option<i64>>(12)?.map(from_ms),
                max_connections: r.get(16)?,
                used_up: false,
            },
            source: r.get(2)?,
            protocol: r.get(3)?,
            state: r.get(11)?,
        })
    }

    fn into_grant(self) -> Result<Grant> {
        let mut grant = self.grant;
        grant.target.source = self.source.parse().map_err(|_| StoreError::Corrupt {
            what: "grant source",
            value: self.source.clone(),
        })?;
        grant.target.protocol = protocol_of_code(self.protocol)?;
        grant.state = state_of_code(self.state).ok_or(StoreError::Corrupt {
            what: "grant state",
            value: self.state.to_string(),
        })?;
        Ok(grant)
    }
}

/// A boot-clock instant as `SQLite`'s signed integer (it fits: 2^63 ns is
/// 292 years of uptime).
fn boot_ns_column(deadline: Deadline) -> i64 {
    i64::try_from(deadline.boot_ns()).unwrap_or(i64::MAX)
}

fn protocol_of_code(code: i64) -> Result<Protocol> {
    u8::try_from(code)
        .ok()
        .and_then(Protocol::from_number)
        .ok_or(StoreError::Corrupt {
            what: "protocol",
            value: code.to_string(),
        })
}

/// One transaction.
pub struct Batch<'a> {
    tx: Transaction<'a>,
    codec: &'a mut payload::Codec,
    head: (u64, String),
    head_slot: &'a mut (u64, String),
    appended: Vec<AuditRecord>,
    /// `Store::boot` as this transaction sees it, and where it goes on commit.
    boot: Option<(String, i64)>,
    boot_slot: &'a mut Option<(String, i64)>,
    /// `Store::holds_requests`, set as soon as this batch holds one.
    holds_requests: &'a mut bool,
}

impl Batch<'_> {
    /// Like `Store::request`, seeing this transaction's inserts.
    pub fn request(
        &self,
        principal: &str,
        request_id: &str,
    ) -> Result<Option<(String, Vec<Grant>)>> {
        request(&self.tx, principal, request_id)
    }

    /// Inserts a grant (its `id` is ignored) and returns the id assigned.
    pub fn insert_grant(&mut self, grant: &Grant, fingerprint: &str) -> Result<u64> {
        let boot = self.boot_row(&grant.boot_id)?;
        let mut stmt = self.tx.prepare_cached(
            "INSERT INTO grants (request_id, request_fingerprint, source, protocol, port, requester, \
             justification, ticket, principal, created_ms, expires_ms, state, ended_ms, \
             granted_ms, deadline_boot_ns, boot, max_connections) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
        )?;
        stmt.execute(params![
            grant.request_id,
            fingerprint_column(fingerprint),
            grant.target.source.to_string(),
            grant.target.protocol.number(),
            grant.target.port,
            grant.requester,
            grant.justification,
            grant.ticket,
            grant.principal,
            to_ms(grant.created_at),
            to_ms(grant.expires_at),
            state_code(grant.state),
            grant.ended_at.map(to_ms),
            i64::try_from(grant.granted.as_millis()).unwrap_or(i64::MAX),
            boot_ns_column(grant.deadline),
            boot,
            grant.max_connections,
        ])?;
        Ok(self.tx.last_insert_rowid() as u64)
    }

    /// Moves an active grant's deadline to the boot clock now running
    /// (after a reboot), with the wall-clock instant that now shows it.
    pub fn set_deadline(
        &mut self,
        id: u64,
        boot_id: &str,
        deadline: Deadline,
        expires_at: SystemTime,
    ) -> Result<()> {
        let boot = self.boot_row(boot_id)?;
        let mut stmt = self.tx.prepare_cached(&format!(
            "UPDATE grants SET deadline_boot_ns = ?1, boot = ?2, expires_ms = ?3 \
             WHERE id = ?4 AND {ACTIVE}"
        ))?;
        stmt.execute(params![
            boot_ns_column(deadline),
            boot,
            to_ms(expires_at),
            id as i64
        ])?;
        Ok(())
    }

    /// Marks an active grant ended at `at`; an expired grant also gets
    /// `at` as the end it showed. Returns false if it was not active.
    pub fn end_grant(&mut self, id: u64, state: GrantState, at: SystemTime) -> Result<bool> {
        let mut stmt = self.tx.prepare_cached(&format!(
            "UPDATE grants SET state = ?1, ended_ms = ?2, \
             expires_ms = CASE WHEN ?4 THEN ?2 ELSE expires_ms END \
             WHERE id = ?3 AND {ACTIVE}"
        ))?;
        Ok(stmt.execute(params![
            state_code(state),
            to_ms(at),
            id as i64,
            state == GrantState::Expired
        ])? == 1)
    }

    /// The row of `boots` for `boot_id` (added if missing); none for an
    /// unknown boot (empty).
    fn boot_row(&mut self, boot_id: &str) -> Result<Option<i64>> {
        if boot_id.is_empty() {
            return Ok(None);
        }
        if let Some((known, row)) = &self.boot
            && known == boot_id
        {
            return Ok(Some(*row));
        }
        self.tx.prepare_cached(ADD_BOOT)?.execute([boot_id])?;
        let row = self
            .tx
            .prepare_cached(BOOT_OF)?
            .query_row([boot_id], |r| r.get(0))?;
        self.boot = Some((boot_id.to_owned(), row));
        Ok(Some(row))
    }

    pub fn save_policy(&mut self, policy: &Policy) -> Result<()> {
        self.set_meta(POLICY_KEY, &serde_json::to_string(policy)?)
    }

    pub fn set_meta(&mut self, key: &str, value: &str) -> Result<()> {
        self.tx.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// Commits; returns the audit records it appended, for watchers.
    pub fn commit(self) -> Result<Vec<AuditRecord>> {
        self.tx.commit()?;
        *self.head_slot = self.head;
        *self.boot_slot = self.boot;
        Ok(self.appended)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn temp_db() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("agent.db")).unwrap();
        (dir, store)
    }

    pub(crate) fn grant(request_id: &str, source: &str) -> Grant {
        let now = crate::time::now_ms();
        Grant {
            id: 0,
            request_id: request_id.into(),
            target: GrantTarget {
                source: source.parse().unwrap(),
                protocol: Protocol::Tcp,
                port: 22,
            },
            requester: "alice".into(),
            justification: "why".into(),
            ticket: String::new(),
            principal: "uid:0".into(),
            created_at: now,
            granted: Duration::from_mins(1),
            deadline: Deadline::from_boot_ns(123_000_000_000),
            boot_id: "boot-a".into(),
            expires_at: now + Duration::from_mins(1),
            state: GrantState::Active,
            ended_at: None,
            max_connections: 0,
            used_up: false,
        }
    }

    #[test]
    fn deadlines_round_trip_and_move_to_a_new_boot() {
        let (_dir, mut store) = temp_db();
        let mut batch = store.batch().unwrap();
        let limited = Grant {
            max_connections: 3,
            ..grant("r1", "192.0.2.7/32")
        };
        let id = batch.insert_grant(&limited, "fp").unwrap();
        batch.commit().unwrap();
        let stored = store.grant(id).unwrap().unwrap();
        assert_eq!(stored.max_connections, 3);
        assert_eq!(stored.deadline, Deadline::from_boot_ns(123_000_000_000));
        assert_eq!(stored.boot_id, "boot-a");
        assert_eq!(stored.granted, Duration::from_mins(1));

        let shown = from_ms(to_ms(SystemTime::now()));
        let mut batch = store.batch().unwrap();
        batch
            .set_deadline(id, "boot-b", Deadline::from_boot_ns(5), shown)
            .unwrap();
        batch.commit().unwrap();
        let moved = store.grant(id).unwrap().unwrap();
        assert_eq!(
            (moved.boot_id.as_str(), moved.deadline, moved.expires_at),
            ("boot-b", Deadline::from_boot_ns(5), shown)
        );
    }

    #[test]
    fn port_activity_names_the_latest_grant_and_counts_recent_ones() {
        let (_dir, mut store) = temp_db();
        let now = crate::time::now_ms();
        let mut batch = store.batch().unwrap();
        for (request_id, requester, principal, age) in [
            ("old", "carol", "uid:0", Duration::from_hours(200)),
            ("recent", "alice", "uid:0", Duration::from_hours(1)),
            ("newest", "bob", "uid:1001", Duration::ZERO),
        ] {
            let g = Grant {
                requester: requester.into(),
                principal: principal.into(),
                created_at: now - age,
                ..grant(request_id, "192.0.2.7/32")
            };
            batch.insert_grant(&g, "fp").unwrap();
        }
        batch.commit().unwrap();
        let activity = store
            .port_activity(now - Duration::from_hours(168))
            .unwrap();
        assert_eq!(
            activity,
            vec![PortActivity {
                port: 22,
                protocol: Protocol::Tcp,
                by_minute: vec![
                    (to_ms(now - Duration::from_hours(1)) / ACTIVITY_MINUTE_MS, 1),
                    (to_ms(now) / ACTIVITY_MINUTE_MS, 1)
                ],
                last: LastAccess {
                    at: now,
                    requester: "bob".into(),
                    principal: "uid:1001".into(),
                },
            }]
        );
    }

    #[test]
    fn held_requests_round_trip_with_their_decisions() {
        use crate::{
            approvals::{ApprovalRequest, ApprovalState, Decision, RequestFilter},
            request::{AccessRequest, Lifetime, PortAccess, RequestedProtocol},
        };
        let (_dir, mut store) = temp_db();
        let now = crate::time::now_ms();
        let request = AccessRequest {
            request_id: "held-1".into(),
            ports: vec![PortAccess {
                port: 22,
                protocol: RequestedProtocol::Covered,
                source: "192.0.2.7".into(),
            }],
            lifetime: Lifetime::For {
                seconds: 600,
                nanos: 0,
            },
            requester: "alice".into(),
            justification: "deploy".into(),
            ticket: String::new(),
            max_connections: 1,
        };
        let held = ApprovalRequest {
            id: 0,
            principal: "uid:1001".into(),
            fingerprint: request.fingerprint(),
            request,
            needed: 2,
            state: ApprovalState::Pending,
            created_at: now,
            expires_at: now + Duration::from_mins(5),
            decided_at: None,
            reason: String::new(),
            decisions: Vec::new(),
            grants: Vec::new(),
        };
        let mut batch = store.batch().unwrap();
        let id = batch.insert_approval_request(&held).unwrap();
        let approval = Decision {
            principal: "uid:1002".into(),
            approved: true,
            comment: "ok".into(),
            at: now,
        };
        assert!(batch.add_decision(id, &approval).unwrap());
        assert!(!batch.add_decision(id, &approval).unwrap(), "once each");
        batch.commit().unwrap();
        let stored = store.approval_request(id).unwrap().unwrap();
        assert_eq!(
            stored,
            ApprovalRequest {
                id,
                decisions: vec![approval],
                ..held.clone()
            }
        );
        assert_eq!(store.pending_counts("uid:1001").unwrap(), (1, 1));
        assert_eq!(store.pending_counts("uid:1003").unwrap(), (0, 1));
        assert!(store.pending_due(now).unwrap().is_empty());
        assert_eq!(
            store.pending_due(now + Duration::from_mins(5)).unwrap()[0].id,
            id
        );
        let mut batch = store.batch().unwrap();
        assert!(
            batch
                .decide_request(id, ApprovalState::Denied, now, "no")
                .unwrap()
        );
        assert!(
            !batch
                .decide_request(id, ApprovalState::Expired, now, "late")
                .unwrap()
        );
        batch.commit().unwrap();
        assert!(
            store
                .list_requests(RequestFilter::Pending, None, 10)
                .unwrap()
                .is_empty()
        );
        let decided = store
            .list_requests(RequestFilter::Decided, None, 10)
            .unwrap();
        assert_eq!(
            (decided[0].state, decided[0].reason.as_str()),
            (ApprovalState::Denied, "no")
        );
    }

    #[test]
    fn grants_round_trip_and_end() {
        let (_dir, mut store) = temp_db();
        let mut batch = store.batch().unwrap();
        let first = grant("r1", "192.0.2.7/32");
        let a = batch.insert_grant(&first, "fp1").unwrap();
        let b = batch
            .insert_grant(&grant("r1", "2001:db8::/64"), "fp1")
            .unwrap();
        batch.commit().unwrap();
        assert!(b > a);
        let (fp, grants) = store.request("uid:0", "r1").unwrap().unwrap();
        assert_eq!(fp, "fp1");
        assert_eq!(grants.len(), 2);
        assert_eq!(grants[0], Grant { id: a, ..first });
        assert!(store.request("uid:0", "r2").unwrap().is_none());
        // Idempotency keys are per principal.
        assert!(store.request("uid:1001", "r1").unwrap().is_none());

        let mut batch = store.batch().unwrap();
        assert!(
            batch
                .end_grant(a, GrantState::Revoked, SystemTime::now())
                .unwrap()
        );
        assert!(
            !batch
                .end_grant(a, GrantState::Expired, SystemTime::now())
                .unwrap()
        );
        batch.commit().unwrap();
        assert_eq!(store.active_grants().unwrap().len(), 1);
        assert_eq!(store.grant(a).unwrap().unwrap().state, GrantState::Revoked);
        assert_eq!(
            store.list_grants(true, Some(22), None, 10).unwrap().len(),
            2
        );
        assert_eq!(store.list_grants(false, None, None, 10).unwrap().len(), 1);
        assert_eq!(
            store.list_grants(true, Some(23), None, 10).unwrap().len(),
            0
        );
        // Pages: newest first, then below the last id seen.
        let page = store.list_grants(true, None, None, 1).unwrap();
        assert_eq!(page[0].id, b);
        let next = store.list_grants(true, None, Some(b), 1).unwrap();
        assert_eq!(next[0].id, a);
        assert!(
            store
                .list_grants(true, None, Some(a), 1)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn uncommitted_batches_leave_nothing() {
        let (_dir, mut store) = temp_db();
        {
            let mut batch = store.batch().unwrap();
            batch
                .insert_grant(&grant("r1", "192.0.2.7/32"), "fp")
                .unwrap();
        }
        assert!(store.active_grants().unwrap().is_empty());
    }

    #[test]
    fn files_are_private_and_old_schemas_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        drop(Store::open(&path).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        drop(conn);
        let err = Store::open(&path).err().unwrap().to_string();
        assert!(
            err.contains("schema 1") && err.contains("--reinitialize"),
            "{err}"
        );
    }

    #[test]
    fn policy_round_trip() {
        let (_dir, mut store) = temp_db();
        assert!(store.policy().unwrap().is_none());
        let mut batch = store.batch().unwrap();
        batch.save_policy(&Policy::default()).unwrap();
        batch.commit().unwrap();
        assert_eq!(store.policy().unwrap(), Some(Policy::default()));
    }
}
