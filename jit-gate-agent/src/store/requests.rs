//! The approval tables (schema 5): access requests held for approval, as
//! the requester sent them, and each approver's decision. A pending request
//! lives here until it is approved (its grants then go to `grants`, under
//! the same principal and request id), denied, refused or expired.

use std::time::SystemTime;

use rusqlite::{Connection, Row, params};

use super::{Batch, Result, Store, StoreError, request as grants_of_request};
use crate::{
    approvals::{ApprovalRequest, ApprovalState, Decision, RequestFilter},
    time::{from_ms, to_ms},
};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    principal TEXT NOT NULL,
    request_id TEXT NOT NULL,
    request_fingerprint TEXT NOT NULL,
    request_json TEXT NOT NULL,
    approvals_needed INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    decided_ms INTEGER,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX IF NOT EXISTS requests_by_key ON requests (principal, request_id);
CREATE INDEX IF NOT EXISTS requests_pending ON requests (expires_ms) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS request_decisions (
    request INTEGER NOT NULL REFERENCES requests (id),
    principal TEXT NOT NULL,
    approved INTEGER NOT NULL,
    comment TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (request, principal)
);
";

const COLUMNS: &str = "id, principal, request_id, request_fingerprint, request_json, \
    approvals_needed, state, created_ms, expires_ms, decided_ms, reason";

/// A requests row before its JSON and state are parsed.
struct RawRequest {
    id: i64,
    principal: String,
    fingerprint: String,
    json: String,
    needed: u8,
    state: String,
    created_ms: i64,
    expires_ms: i64,
    decided_ms: Option<i64>,
    reason: String,
}

impl RawRequest {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<RawRequest> {
        Ok(RawRequest {
            id: r.get(0)?,
            principal: r.get(1)?,
            fingerprint: r.get(3)?,
            json: r.get(4)?,
            needed: r.get(5)?,
            state: r.get(6)?,
            created_ms: r.get(7)?,
            expires_ms: r.get(8)?,
            decided_ms: r.get(9)?,
            reason: r.get(10)?,
        })
    }

    /// The request with its decisions and, once approved, its grants.
    fn load(self, conn: &Connection) -> Result<ApprovalRequest> {
        let request: crate::request::AccessRequest =
            serde_json::from_str(&self.json).map_err(|_| StoreError::Corrupt {
                what: "held access request",
                value: crate::validate::excerpt(&self.json),
            })?;
        let state = ApprovalState::from_name(&self.state).ok_or(StoreError::Corrupt {
            what: "request state",
            value: self.state,
        })?;
        let id = self.id as u64;
        let grants = if state == ApprovalState::Approved {
            grants_of_request(conn, &self.principal, &request.request_id)?
                .map(|(_, grants)| grants)
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        Ok(ApprovalRequest {
            id,
            decisions: decisions(conn, id)?,
            principal: self.principal,
            request,
            fingerprint: self.fingerprint,
            needed: self.needed,
            state,
            created_at: from_ms(self.created_ms),
            expires_at: from_ms(self.expires_ms),
            decided_at: self.decided_ms.map(from_ms),
            reason: self.reason,
            grants,
        })
    }
}

fn decisions(conn: &Connection, id: u64) -> Result<Vec<Decision>> {
    let mut stmt = conn.prepare_cached(
        "SELECT principal, approved, comment, at_ms FROM request_decisions \
         WHERE request = ?1 ORDER BY at_ms, rowid",
    )?;
    let rows = stmt.query_map([id as i64], |r| {
        Ok(Decision {
            principal: r.get(0)?,
            approved: r.get(1)?,
            comment: r.get(2)?,
            at: from_ms(r.get(3)?),
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn requests_where(
    conn: &Connection,
    condition: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<ApprovalRequest>> {
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {COLUMNS} FROM requests WHERE {condition}"))?;
    let raw = stmt
        .query_map(params, RawRequest::from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    raw.into_iter().map(|r| r.load(conn)).collect()
}

/// Whether any request was ever held (the table has a row).
pub(super) fn any(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row("SELECT EXISTS (SELECT 1 FROM requests)", [], |r| r.get(0))
}

fn by_key(conn: &Connection, principal: &str, request_id: &str) -> Result<Option<ApprovalRequest>> {
    Ok(requests_where(
        conn,
        "principal = ?1 AND request_id = ?2",
        params![principal, request_id],
    )?
    .pop())
}

/// Pending requests of `principal`, and of everyone.
fn pending_counts(conn: &Connection, principal: &str) -> Result<(u32, u32)> {
    Ok(conn.query_row(
        "SELECT COALESCE(SUM(principal = ?1), 0), COUNT(*) FROM requests WHERE state = 'pending'",
        [principal],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?)
}

impl Store {
    pub fn approval_request(&self, id: u64) -> Result<Option<ApprovalRequest>> {
        Ok(requests_where(&self.conn, "id = ?1", params![id as i64])?.pop())
    }

    /// Pending requests of `principal`, and of everyone.
    pub fn pending_counts(&self, principal: &str) -> Result<(u32, u32)> {
        pending_counts(&self.conn, principal)
    }

    /// Pending requests whose time to be decided ran out at `now`.
    pub fn pending_due(&self, now: SystemTime) -> Result<Vec<ApprovalRequest>> {
        requests_where(
            &self.conn,
            "state = 'pending' AND expires_ms <= ?1 ORDER BY expires_ms LIMIT 1000",
            params![to_ms(now)],
        )
    }

    /// Requests newest first: pending, decided or all; with an id below
    /// `before` if given; at most `limit`.
    pub fn list_requests(
        &self,
        filter: RequestFilter,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<ApprovalRequest>> {
        let state = match filter {
            RequestFilter::Pending => "state = 'pending'",
            RequestFilter::Decided => "state != 'pending'",
            RequestFilter::All => "1",
        };
        requests_where(
            &self.conn,
            &format!("{state} AND id < ?1 ORDER BY id DESC LIMIT ?2"),
            params![before.map_or(i64::MAX, |b| b as i64), limit],
        )
    }
}

impl Batch<'_> {
    /// The request `principal` made under `request_id`, seeing this
    /// transaction's inserts.
    pub fn approval_request_by_key(
        &self,
        principal: &str,
        request_id: &str,
    ) -> Result<Option<ApprovalRequest>> {
        if !*self.holds_requests {
            return Ok(None);
        }
        by_key(&self.tx, principal, request_id)
    }

    pub fn pending_counts(&self, principal: &str) -> Result<(u32, u32)> {
        pending_counts(&self.tx, principal)
    }

    /// Inserts a pending request (its `id`, decisions and grants are
    /// ignored) and returns the id assigned.
    pub fn insert_approval_request(&mut self, held: &ApprovalRequest) -> Result<u64> {
        // Set before the insert: if this transaction rolls back, a
        // needless lookup is all it costs.
        *self.holds_requests = true;
        self.tx.execute(
            "INSERT INTO requests (principal, request_id, request_fingerprint, request_json, \
             approvals_needed, state, created_ms, expires_ms, decided_ms, reason) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL, '')",
            params![
                held.principal,
                held.request.request_id,
                held.fingerprint,
                serde_json::to_string(&held.request)?,
                held.needed,
                held.state.name(),
                to_ms(held.created_at),
                to_ms(held.expires_at),
            ],
        )?;
        Ok(self.tx.last_insert_rowid() as u64)
    }

    /// Records an approver's decision; false if that approver already
    /// decided this request.
    pub fn add_decision(&mut self, request: u64, decision: &Decision) -> Result<bool> {
        Ok(self.tx.execute(
            "INSERT INTO request_decisions (request, principal, approved, comment, at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
            params![
                request as i64,
                decision.principal,
                decision.approved,
                decision.comment,
                to_ms(decision.at)
            ],
        )? == 1)
    }

    /// Raises the approvals a pending request needs (its rule was made
    /// stricter since it was held).
    pub fn raise_approvals_needed(&mut self, id: u64, needed: u8) -> Result<()> {
        self.tx.execute(
            "UPDATE requests SET approvals_needed = MAX(approvals_needed, ?1) \
             WHERE id = ?2 AND state = 'pending'",
            params![needed, id as i64],
        )?;
        Ok(())
    }

    /// Closes a pending request in `state`; false if it was not pending.
    pub fn decide_request(
        &mut self,
        id: u64,
        state: ApprovalState,
        at: SystemTime,
        reason: &str,
    ) -> Result<bool> {
        Ok(self.tx.execute(
            "UPDATE requests SET state = ?1, decided_ms = ?2, reason = ?3 \
             WHERE id = ?4 AND state = 'pending'",
            params![state.name(), to_ms(at), reason, id as i64],
        )? == 1)
    }

    /// Like `Store::approval_request`, seeing this transaction's writes.
    pub fn approval_request(&self, id: u64) -> Result<Option<ApprovalRequest>> {
        Ok(requests_where(&self.tx, "id = ?1", params![id as i64])?.pop())
    }
}
