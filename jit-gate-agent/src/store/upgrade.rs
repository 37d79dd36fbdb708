//! Schema upgrades of the grants table, in place: columns added since
//! schema 2, schema 7's bytes for text and boots by number, schema 8's
//! states and protocols by number (a new table). Each step leaves a table
//! already there alone, so opening again changes nothing more.

use rusqlite::Connection;

use super::grants_table;

/// Brings the grants table of a schema 2 to 7 database to schema 8.
pub(super) fn grants(conn: &Connection) -> rusqlite::Result<()> {
    add_grant_columns(conn)?;
    upgrade_grants_to_7(conn)?;
    upgrade_grants_to_8(conn)
}

/// Grant columns added since schema 2 (column, type, how to fill rows
/// written before). Schema 3: the granted duration from the wall-clock
/// times then recorded; no deadline and no boot id, so such a grant counts
/// as set on an unknown earlier boot (see `clock::carry_across_reboot`).
/// Schema 4: no limit on connections (the column's default). (Schema 3's
/// `boot_id` is `boot` since schema 7, left NULL.)
const GRANT_COLUMNS_ADDED: [(&str, &str, &str); 3] = [
    (
        "granted_ms",
        "INTEGER",
        "UPDATE grants SET granted_ms = MAX(expires_ms - created_ms, 0)",
    ),
    ("deadline_boot_ns", "INTEGER", ""),
    ("max_connections", "INTEGER NOT NULL DEFAULT 0", ""),
];

/// Schema 7's grants (brought there first) as schema 8's, in one
/// transaction: a new table (`grants_table`) filled from the old one,
/// names turned into numbers (one not known stays as it was: reading it
/// reports it as malformed, as before), the old table and its indexes
/// dropped, AUTOINCREMENT's counter kept.
const GRANTS_TO_8: &str = "
INSERT INTO grants_8 SELECT id, request_id, request_fingerprint, source,
    CASE protocol WHEN 'tcp' THEN 6 WHEN 'udp' THEN 17 ELSE protocol END,
    port, requester, justification, ticket, principal, created_ms, expires_ms,
    CASE state WHEN 'active' THEN 0 WHEN 'expired' THEN 1 WHEN 'revoked' THEN 2
        WHEN 'ended-by-policy' THEN 3 ELSE state END,
    ended_ms, granted_ms, deadline_boot_ns, max_connections, boot
FROM grants ORDER BY id;
UPDATE sqlite_sequence SET seq = MAX(seq, coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'grants'), 0))
    WHERE name = 'grants_8';
DROP TABLE grants;
ALTER TABLE grants_8 RENAME TO grants;
";

/// Schema 7's grants from earlier ones: the request fingerprint as its 32
/// bytes (text that is not lower-case hex stays text), the port index
/// without the creation time; then `BOOTS_TO_7`.
const GRANTS_UPGRADE_TO_7: &str = "
UPDATE grants SET request_fingerprint = unhex(request_fingerprint)
    WHERE typeof(request_fingerprint) = 'text'
      AND lower(hex(unhex(request_fingerprint))) = request_fingerprint;
DROP INDEX IF EXISTS grants_by_port;
ALTER TABLE grants ADD COLUMN boot INTEGER;
";

/// Schema 3 to 6's boot ids (text on every grant) once in `boots`.
const BOOTS_TO_7: &str = "
INSERT OR IGNORE INTO boots (boot_id)
    SELECT DISTINCT boot_id FROM grants WHERE boot_id IS NOT NULL AND boot_id != '';
UPDATE grants SET boot = (SELECT boot FROM boots WHERE boots.boot_id = grants.boot_id);
ALTER TABLE grants DROP COLUMN boot_id;
";

/// Brings an earlier grants table to schema 7 (`GRANTS_UPGRADE_TO_7`,
/// `BOOTS_TO_7`) in one transaction; a table already there is left alone.
fn upgrade_grants_to_7(conn: &Connection) -> rusqlite::Result<()> {
    let present = grant_columns(conn)?;
    if present.iter().any(|c| c == "boot") {
        return Ok(());
    }
    let boots = if present.iter().any(|c| c == "boot_id") {
        BOOTS_TO_7
    } else {
        ""
    };
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE; {GRANTS_UPGRADE_TO_7} {boots} COMMIT;"
    ))
}

/// Brings a schema-7 grants table to schema 8 (`GRANTS_TO_8`); one there
/// already (its state declared INTEGER) is left alone.
fn upgrade_grants_to_8(conn: &Connection) -> rusqlite::Result<()> {
    let state_type: String = conn.query_row(
        "SELECT type FROM pragma_table_info('grants') WHERE name = 'state'",
        [],
        |r| r.get(0),
    )?;
    if state_type.eq_ignore_ascii_case("INTEGER") {
        return Ok(());
    }
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE; DROP TABLE IF EXISTS grants_8; {} {GRANTS_TO_8} COMMIT;",
        grants_table("grants_8")
    ))
}

fn grant_columns(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('grants')")?;
    stmt.query_map([], |r| r.get::<_, String>(0))?.collect()
}

/// Brings a schema-2 or -3 database up to date (`GRANT_COLUMNS_ADDED`).
fn add_grant_columns(conn: &Connection) -> rusqlite::Result<()> {
    let present = grant_columns(conn)?;
    for (column, kind, fill) in GRANT_COLUMNS_ADDED {
        if !present.iter().any(|c| c == column) {
            conn.execute_batch(&format!("ALTER TABLE grants ADD COLUMN {column} {kind}"))?;
            if !fill.is_empty() {
                conn.execute_batch(fill)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use rusqlite::{Connection, params};

    use super::super::{AuditFilter, AuditReader, SCHEMA_VERSION, Store, tests::grant};
    use crate::{
        audit::{Broken, GrantFacts, Verifier},
        clock::Deadline,
        grants::{Grant, GrantState},
        net::{GrantTarget, Protocol},
        time::{from_ms, to_ms},
    };

    #[test]
    fn schema_2_databases_get_boot_deadline_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE grants (id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL, \
                 request_fingerprint TEXT NOT NULL, source TEXT NOT NULL, protocol TEXT NOT NULL, \
                 port INTEGER NOT NULL, requester TEXT NOT NULL, justification TEXT NOT NULL, \
                 ticket TEXT NOT NULL, principal TEXT NOT NULL, created_ms INTEGER NOT NULL, \
                 expires_ms INTEGER NOT NULL, state TEXT NOT NULL, ended_ms INTEGER);
                 INSERT INTO grants VALUES (1, 'r', 'fp', '192.0.2.7/32', 'tcp', 22, 'a', '', '', \
                 'uid:0', 1000, 91000, 'active', NULL);
                 PRAGMA user_version = 2;",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let old = store.grant(1).unwrap().unwrap();
        assert_eq!(old.granted, Duration::from_secs(90));
        assert_eq!(old.boot_id, "", "an unknown boot");
        assert_eq!(old.expires_at, from_ms(91000));
        assert_eq!(old.max_connections, 0, "no limit");
        drop(store);
        // Opening again changes nothing more.
        let store = Store::open(&path).unwrap();
        assert_eq!(store.grant(1).unwrap().unwrap(), old);
    }

    #[test]
    fn schema_4_databases_get_the_approval_tables_and_keep_their_grants() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let id = {
            let mut store = Store::open(&path).unwrap();
            let mut batch = store.batch().unwrap();
            let id = batch
                .insert_grant(&grant("r1", "192.0.2.7/32"), "fp")
                .unwrap();
            batch.commit().unwrap();
            id
        };
        {
            // What a schema-4 agent left: no approval tables.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "DROP TABLE request_decisions; DROP TABLE requests; PRAGMA user_version = 4;",
            )
            .unwrap();
        }
        let store = upgraded(&path);
        assert_eq!(store.grant(id).unwrap().unwrap().request_id, "r1");
        assert_eq!(store.pending_counts("uid:0").unwrap(), (0, 0));
        assert!(
            store
                .list_requests(crate::approvals::RequestFilter::All, None, 10)
                .unwrap()
                .is_empty()
        );
    }

    /// Schema 6 as agents before schema 7 wrote it (the tables this
    /// upgrade changes).
    const SCHEMA_6: &str = "
        CREATE TABLE grants (id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL,
            request_fingerprint TEXT NOT NULL, source TEXT NOT NULL, protocol TEXT NOT NULL,
            port INTEGER NOT NULL, requester TEXT NOT NULL, justification TEXT NOT NULL,
            ticket TEXT NOT NULL, principal TEXT NOT NULL, created_ms INTEGER NOT NULL,
            expires_ms INTEGER NOT NULL, state TEXT NOT NULL, ended_ms INTEGER,
            granted_ms INTEGER, deadline_boot_ns INTEGER, boot_id TEXT,
            max_connections INTEGER NOT NULL DEFAULT 0);
        CREATE INDEX grants_by_request ON grants (principal, request_id);
        CREATE INDEX grants_active ON grants (state) WHERE state = 'active';
        CREATE INDEX grants_by_port ON grants (port, created_ms);
        CREATE TABLE audit (seq INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, kind TEXT NOT NULL,
            principal TEXT NOT NULL, grant_id INTEGER NOT NULL, message TEXT, details TEXT,
            payload_sha256 TEXT NOT NULL, hash TEXT NOT NULL);
        CREATE INDEX audit_by_kind ON audit (kind, at_ms);
        PRAGMA user_version = 6;";

    #[test]
    fn schema_6_databases_upgrade_keeping_grants_and_a_verifiable_chain() {
        use crate::audit::{self, Event, Kind, Verifier};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let fingerprint = "ab".repeat(32);
        let old_at = SystemTime::now() - Duration::from_hours(2);
        let events = [
            Event::new(Kind::AgentStarted, "agent", 0, "started"),
            Event::new(Kind::GrantCreated, "uid:0", 1, "grant 1")
                .with_details(serde_json::json!({ "request_id": "r1" })),
            Event::new(Kind::AccessDenied, "agent", 0, "denied")
                .with_details(serde_json::json!({ "port": 2222 })),
            Event::new(Kind::GrantCreated, "uid:1001", 2, "grant 2"),
            Event::new(Kind::AccessDenied, "agent", 0, "denied again")
                .with_details(serde_json::json!({ "port": 2222 })),
        ];
        let mut previous = audit::GENESIS_HASH.to_owned();
        let mut sealed = Vec::new();
        for (i, event) in events.into_iter().enumerate() {
            let record = audit::seal(i as u64 + 1, old_at, event, &previous);
            previous.clone_from(&record.hash);
            sealed.push(record);
        }
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_6).unwrap();
            for (id, boot, state) in [(1, "boot-a", "active"), (2, "boot-b", "revoked")] {
                conn.execute(
                    "INSERT INTO grants VALUES (?1, 'r1', ?2, '192.0.2.7/32', 'tcp', 22, 'alice', \
                     'why', 'T-1', 'uid:0', 1000, 91000, ?3, NULL, 90000, 5000, ?4, 2)",
                    params![id, fingerprint, state, boot],
                )
                .unwrap();
            }
            for (i, record) in sealed.iter().enumerate() {
                let payload = record.payload.as_ref().unwrap();
                // The first denial's payload was pruned: its digest stays.
                let (message, details) = if i == 2 {
                    (None, None)
                } else {
                    (Some(&payload.message), Some(&payload.details))
                };
                conn.execute(
                    "INSERT INTO audit VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    params![
                        i as i64 + 1,
                        record.at_ms,
                        record.kind.name(),
                        record.principal,
                        record.grant_id as i64,
                        message,
                        details,
                        record.payload_sha256,
                        record.hash
                    ],
                )
                .unwrap();
            }
        }
        let mut store = upgraded(&path);
        let (kept_fingerprint, grants) = store.request("uid:0", "r1").unwrap().unwrap();
        assert_eq!(kept_fingerprint, fingerprint);
        assert_eq!(
            grants
                .iter()
                .map(|g| (g.id, g.boot_id.as_str(), g.state, g.max_connections))
                .collect::<Vec<_>>(),
            [
                (1, "boot-a", GrantState::Active, 2),
                (2, "boot-b", GrantState::Revoked, 2)
            ]
        );
        assert_eq!(grants[0].deadline, Deadline::from_boot_ns(5000));
        assert_eq!(store.active_grants().unwrap().len(), 1);
        assert_eq!(store.audit_head(), (5, sealed[4].hash.clone()));

        // New records (deflated) follow the old ones (text) in one chain.
        let mut batch = store.batch().unwrap();
        batch
            .audit(
                Event::new(Kind::PolicyChanged, "uid:0", 0, "after the upgrade"),
                SystemTime::now(),
            )
            .unwrap();
        batch.commit().unwrap();
        let records = store.audit_after(0, 10).unwrap();
        let mut expected = sealed.clone();
        expected[2].payload = None;
        assert_eq!(records[..5], expected[..]);
        let mut verifier = Verifier::default();
        for record in &records {
            verifier.check(record).unwrap();
        }
        assert_eq!((verifier.records, verifier.pruned), (6, 1));
        let by_port = AuditFilter {
            port: Some(2222),
            ..AuditFilter::default()
        };
        let reader = AuditReader::open(&path).unwrap();
        let about_the_port: Vec<u64> = reader
            .page(&by_port, 0, 10)
            .unwrap()
            .iter()
            .map(|r| r.sequence)
            .collect();
        assert_eq!(about_the_port, [5], "a pruned record's port is not known");

        // An old record edited after the upgrade is still found.
        store
            .conn
            .execute("UPDATE audit SET details = '{}' WHERE seq = 2", [])
            .unwrap();
        let mut verifier = Verifier::default();
        let broken = store
            .audit_after(0, 10)
            .unwrap()
            .iter()
            .try_for_each(|r| verifier.check(r))
            .unwrap_err();
        assert_eq!(broken.sequence, 2);
        drop(store);
        // Opening again changes nothing more.
        let store = Store::open(&path).unwrap();
        assert_eq!(store.request("uid:0", "r1").unwrap().unwrap().1, grants);
    }

    /// The store at `path`, opened and so brought to this schema.
    fn upgraded(path: &std::path::Path) -> Store {
        let store = Store::open(path).unwrap();
        let version: i64 = store
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        store
    }

    /// Schema 7's grants table and indexes, from schema 8's rows (what a
    /// schema-7 agent left: names for protocols and states), its
    /// AUTOINCREMENT counter past the last id.
    const BACK_TO_7: &str = "
        ALTER TABLE grants RENAME TO grants_8;
        DROP INDEX grants_by_request; DROP INDEX grants_active; DROP INDEX grants_by_port_id;
        CREATE TABLE grants (id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL,
            request_fingerprint TEXT NOT NULL, source TEXT NOT NULL, protocol TEXT NOT NULL,
            port INTEGER NOT NULL, requester TEXT NOT NULL, justification TEXT NOT NULL,
            ticket TEXT NOT NULL, principal TEXT NOT NULL, created_ms INTEGER NOT NULL,
            expires_ms INTEGER NOT NULL, state TEXT NOT NULL, ended_ms INTEGER,
            granted_ms INTEGER, deadline_boot_ns INTEGER,
            max_connections INTEGER NOT NULL DEFAULT 0, boot INTEGER);
        INSERT INTO grants SELECT id, request_id, request_fingerprint, source,
            CASE protocol WHEN 6 THEN 'tcp' ELSE 'udp' END, port, requester, justification,
            ticket, principal, created_ms, expires_ms,
            CASE state WHEN 0 THEN 'active' ELSE 'revoked' END, ended_ms, granted_ms,
            deadline_boot_ns, max_connections, boot FROM grants_8;
        DROP TABLE grants_8;
        UPDATE sqlite_sequence SET seq = 10 WHERE name = 'grants';
        CREATE INDEX grants_by_request ON grants (principal, request_id);
        CREATE INDEX grants_active ON grants (state) WHERE state = 'active';
        CREATE INDEX grants_by_port_id ON grants (port);
        PRAGMA user_version = 7;";

    /// `tests/python/verify_audit.py`'s verdict on the database at `path`.
    fn independent(path: &std::path::Path) -> serde_json::Value {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/python/verify_audit.py"
        );
        let out = std::process::Command::new("python3")
            .arg(script)
            .arg(path)
            .output()
            .expect("python3");
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn verified(store: &Store) -> Result<Verifier, Broken> {
        let mut verifier = Verifier::default();
        for record in store.audit_after(0, 100).unwrap() {
            verifier.check(&record)?;
        }
        Ok(verifier)
    }

    #[test]
    fn schema_7_databases_upgrade_keeping_grants_and_a_verifiable_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let udp = Grant {
            target: GrantTarget {
                protocol: Protocol::Udp,
                ..grant("r2", "2001:db8::/64").target
            },
            max_connections: 3,
            ..grant("r2", "2001:db8::/64")
        };
        let before = {
            let mut store = Store::open(&path).unwrap();
            let mut batch = store.batch().unwrap();
            let tcp_id = batch
                .insert_grant(&grant("r1", "192.0.2.7/32"), "fp1")
                .unwrap();
            let udp_id = batch.insert_grant(&udp, &"ab".repeat(32)).unwrap();
            batch.commit().unwrap();
            // As schema 7 stored them: deflated (`audit`, not
            // `audit_grant_created`).
            let created = [tcp_id, udp_id].map(|id| store.grant(id).unwrap().unwrap());
            let mut batch = store.batch().unwrap();
            for grant in &created {
                batch
                    .audit(GrantFacts::of(grant).event("uid:0"), SystemTime::now())
                    .unwrap();
            }
            assert!(
                batch
                    .end_grant(udp_id, GrantState::Revoked, SystemTime::now())
                    .unwrap()
            );
            batch.commit().unwrap();
            let grants = store.list_grants(true, None, None, 10).unwrap();
            assert_eq!(grants.len(), 2);
            grants
        };
        Connection::open(&path)
            .unwrap()
            .execute_batch(BACK_TO_7)
            .unwrap();

        let mut store = upgraded(&path);
        assert_eq!(store.list_grants(true, None, None, 10).unwrap(), before);
        assert_eq!(store.active_grants().unwrap(), before[1..]);
        assert_eq!(
            store.request("uid:0", "r2").unwrap().unwrap(),
            ("ab".repeat(32), vec![before[0].clone()])
        );

        // A grant written now: the counter went on past the last id, and
        // its record refers to its row (4 bytes or fewer).
        let mut batch = store.batch().unwrap();
        let new = Grant {
            requester: "zoë \"quoted\"\n\u{7f}".into(),
            justification: "tab\there, ünïcode ✓, back\\slash, </script>".into(),
            ticket: "\u{1}".into(),
            max_connections: 2,
            ..grant("r3", "198.51.100.0/24")
        };
        let id = batch.insert_grant(&new, "fp3").unwrap();
        let new = Grant { id, ..new };
        let at = SystemTime::now();
        batch.audit_grant_created(&new, "uid:0", at).unwrap();
        batch.commit().unwrap();
        assert_eq!(id, 11);
        let stored: Vec<u8> = store
            .conn
            .query_row(
                "SELECT payload FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(stored.len() <= 4 && stored[0] == 0, "{stored:?}");
        let records = store.audit_after(0, 100).unwrap();
        let shown = GrantFacts {
            expires_at: from_ms(to_ms(new.expires_at) / 1000 * 1000),
            ..GrantFacts::of(&new)
        };
        assert_eq!(records[2].payload, Some(shown.payload()));
        assert_eq!(verified(&store).unwrap().records, 3);
        assert_eq!(
            independent(&path),
            serde_json::json!({ "intact": true, "records": 3, "pruned": 0 })
        );

        // The row it refers to, changed: the record no longer verifies.
        store
            .conn
            .execute(
                "UPDATE grants SET ticket = 'T-2' WHERE id = ?1",
                [id as i64],
            )
            .unwrap();
        assert_eq!(verified(&store).unwrap_err().sequence, 3);
        assert_eq!(independent(&path)["broken_sequence"], 3);
        store
            .conn
            .execute(
                "UPDATE grants SET ticket = ?1 WHERE id = ?2",
                params![new.ticket, id as i64],
            )
            .unwrap();
        assert_eq!(verified(&store).unwrap().records, 3);
        drop(store);
        // Opening again changes nothing more.
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.list_grants(true, None, None, 10).unwrap()[1..],
            before[..]
        );
        assert_eq!(verified(&store).unwrap().records, 3);
    }
}
