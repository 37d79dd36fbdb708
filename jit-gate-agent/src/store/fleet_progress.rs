//! Fleet progress (schema 6): per host name, the etcd cluster and the last
//! revision whose grants this agent applied and answered, so that a
//! restart or reconnection resumes the watch there.

use rusqlite::{Connection, OptionalExtension, params};

use super::{Batch, Result, Store};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS fleet_progress (
    host TEXT PRIMARY KEY,
    cluster_id INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
";

/// Where a host's watch resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FleetCursor {
    /// etcd's cluster id (a revision means nothing in another cluster).
    pub cluster_id: u64,
    /// Every event up to this revision has been applied and answered.
    pub revision: i64,
}

fn read(conn: &Connection, host: &str) -> Result<Option<FleetCursor>> {
    Ok(conn
        .query_row(
            "SELECT cluster_id, revision FROM fleet_progress WHERE host = ?1",
            [host],
            |r| {
                Ok(FleetCursor {
                    cluster_id: r.get::<_, i64>(0)? as u64,
                    revision: r.get(1)?,
                })
            },
        )
        .optional()?)
}

impl Store {
    pub fn fleet_cursor(&self, host: &str) -> Result<Option<FleetCursor>> {
        read(&self.conn, host)
    }
}

impl Batch<'_> {
    pub fn set_fleet_cursor(&mut self, host: &str, cursor: FleetCursor, now_ms: i64) -> Result<()> {
        self.tx.execute(
            "INSERT INTO fleet_progress (host, cluster_id, revision, updated_ms) \
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT (host) DO UPDATE SET \
             cluster_id = excluded.cluster_id, revision = excluded.revision, \
             updated_ms = excluded.updated_ms",
            params![host, cursor.cluster_id as i64, cursor.revision, now_ms],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_survive_reopening_per_host() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let mut store = Store::open(&path).unwrap();
        assert_eq!(store.fleet_cursor("h1").unwrap(), None);
        let cursor = FleetCursor {
            cluster_id: u64::MAX - 3,
            revision: 42,
        };
        let mut batch = store.batch().unwrap();
        batch.set_fleet_cursor("h1", cursor, 1).unwrap();
        batch.commit().unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.fleet_cursor("h1").unwrap(), Some(cursor));
        assert_eq!(store.fleet_cursor("h2").unwrap(), None);
    }
}
