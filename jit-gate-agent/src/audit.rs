//! Audit records and their hash chain: what happened, who did it, sealed so
//! that changing, inserting or deleting a stored record is detectable. The
//! chain covers the stored bytes; README "Audit log" documents the layout
//! so that anyone can verify it. `store` persists records; the API streams
//! and exports them.
//!
//! Layout (all integers big-endian, `len` a u64 byte count, text UTF-8):
//! - `payload_sha256 = SHA-256(len(message) ‖ message ‖ len(details) ‖ details)`
//! - `hash = SHA-256(previous hash (32 bytes, zeros for the first record) ‖
//!   u64 sequence ‖ i64 at_ms ‖ len(kind) ‖ kind ‖ len(principal) ‖ principal ‖
//!   u64 grant_id ‖ payload_sha256 (32 bytes))`
//!
//! The chain covers each payload through its digest, so retention can drop
//! the payload of an old `ACCESS_DENIED` record (message and details become
//! NULL) and the chain still verifies; no other kind may lose its payload.

use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::{
    digest_hex,
    grants::Grant,
    net::GrantTarget,
    time::{from_ms, to_ms},
};

/// The hash the first record chains to (hex of 32 zero bytes).
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

macro_rules! kinds {
    ($($variant:ident = $name:literal / $code:literal),+ $(,)?) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Kind { $($variant),+ }
        impl Kind {
            pub const ALL: &[Kind] = &[$(Kind::$variant),+];
            pub const fn name(self) -> &'static str {
                match self { $(Kind::$variant => $name),+ }
            }
            /// The number the database stores for this kind (table
            /// `audit_kinds` maps it to the name the chain covers); never
            /// reused or changed.
            pub const fn code(self) -> i64 {
                match self { $(Kind::$variant => $code),+ }
            }
            pub fn from_name(name: &str) -> Option<Kind> {
                Kind::ALL.iter().copied().find(|k| k.name() == name)
            }
            pub fn from_code(code: i64) -> Option<Kind> {
                Kind::ALL.iter().copied().find(|k| k.code() == code)
            }
        }
    };
}

kinds! {
    GrantCreated = "grant-created" / 1,
    RequestRefused = "request-refused" / 2,
    GrantRevoked = "grant-revoked" / 3,
    GrantExpired = "grant-expired" / 4,
    GrantEndedByPolicy = "grant-ended-by-policy" / 5,
    PolicyChanged = "policy-changed" / 6,
    AccessDenied = "access-denied" / 7,
    AgentStarted = "agent-started" / 8,
    ConfigReloaded = "config-reloaded" / 9,
    DriftRepaired = "drift-repaired" / 10,
    ConnectionOpened = "connection-opened" / 11,
    ConnectionsTerminated = "connections-terminated" / 12,
    CallRefused = "call-refused" / 13,
    AuditChainBroken = "audit-chain-broken" / 14,
    DatabaseReinitialized = "database-reinitialized" / 15,
    GrantUsedUp = "grant-used-up" / 16,
    RequestPending = "request-pending" / 17,
    RequestApproved = "request-approved" / 18,
    RequestDenied = "request-denied" / 19,
    RequestExpired = "request-expired" / 20,
    DecisionRefused = "decision-refused" / 21,
    FleetConnected = "fleet-connected" / 22,
    FleetDisconnected = "fleet-disconnected" / 23,
    FleetResynchronized = "fleet-resynchronized" / 24,
}

impl Kind {
    /// Whether retention may drop the payload of records of this kind.
    pub fn prunable(self) -> bool {
        self == Kind::AccessDenied
    }
}

/// An event before it is sealed into the chain.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub kind: Kind,
    /// The API principal, or "agent" for what the agent does by itself.
    pub principal: String,
    /// The grant concerned, 0 if none.
    pub grant_id: u64,
    pub message: String,
    /// Structured details (a JSON object).
    pub details: serde_json::Value,
}

pub const AGENT: &str = "agent";

impl Event {
    pub fn new(kind: Kind, principal: &str, grant_id: u64, message: impl Into<String>) -> Event {
        Event {
            kind,
            principal: principal.to_owned(),
            grant_id,
            message: message.into(),
            details: serde_json::Value::Object(serde_json::Map::default()),
        }
    }

    pub fn with_details(mut self, details: serde_json::Value) -> Event {
        self.details = details;
        self
    }
}

/// What a `grant-created` record states: fields of the grant's row (none
/// of which changes after it is written) and its end as first shown. The
/// record's payload is a function of them alone, so the store can keep it
/// as a reference to the row (`store::payload`);
/// `tests/python/verify_audit.py` rebuilds it the same way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantFacts<'a> {
    pub id: u64,
    pub target: GrantTarget,
    pub expires_at: SystemTime,
    pub granted: Duration,
    pub request_id: &'a str,
    pub requester: &'a str,
    pub justification: &'a str,
    pub ticket: &'a str,
    pub max_connections: u32,
}

impl<'a> GrantFacts<'a> {
    pub fn of(grant: &'a Grant) -> GrantFacts<'a> {
        GrantFacts {
            id: grant.id,
            target: grant.target,
            expires_at: grant.expires_at,
            granted: grant.granted,
            request_id: &grant.request_id,
            requester: &grant.requester,
            justification: &grant.justification,
            ticket: &grant.ticket,
            max_connections: grant.max_connections,
        }
    }

    /// The `grant-created` event of the grant, asked for by `principal`.
    pub fn event(&self, principal: &str) -> Event {
        Event::new(Kind::GrantCreated, principal, self.id, self.message())
            .with_details(self.details())
    }

    /// The payload `event` stores.
    pub fn payload(&self) -> Payload {
        Payload {
            message: self.message(),
            details: self.details().to_string(),
        }
    }

    fn message(&self) -> String {
        format!(
            "grant {} for {} until {} to {}{}",
            self.id,
            self.target,
            humantime::format_rfc3339_seconds(self.expires_at),
            self.requester,
            match self.max_connections {
                0 => String::new(),
                n => format!(", at most {n} connections"),
            }
        )
    }

    fn details(&self) -> serde_json::Value {
        serde_json::json!({
            "request_id": self.request_id,
            "requester": self.requester,
            "justification": self.justification,
            "ticket": self.ticket,
            "duration_ms": u64::try_from(self.granted.as_millis()).unwrap_or(u64::MAX),
            "max_connections": self.max_connections,
        })
    }
}

/// What a record says, as stored: the message and the details' JSON text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payload {
    pub message: String,
    pub details: String,
}

impl Payload {
    /// The bytes its digest covers: `len(message) ‖ message ‖ len(details)
    /// ‖ details` (layout above); the database stores them deflated.
    pub fn preimage(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(16 + self.message.len() + self.details.len());
        for part in [self.message.as_bytes(), self.details.as_bytes()] {
            bytes.extend_from_slice(&(part.len() as u64).to_be_bytes());
            bytes.extend_from_slice(part);
        }
        bytes
    }

    /// The payload whose preimage `bytes` are, if they are one.
    pub fn from_preimage(bytes: &[u8]) -> Option<Payload> {
        let (message, rest) = length_prefixed(bytes)?;
        let (details, rest) = length_prefixed(rest)?;
        rest.is_empty().then(|| Payload {
            message: message.to_owned(),
            details: details.to_owned(),
        })
    }

    /// Hex SHA-256 over the payload's preimage.
    pub fn sha256(&self) -> String {
        digest_hex::encode(&Sha256::digest(self.preimage()))
    }
}

/// A u64 length, that many bytes of UTF-8, and what follows.
fn length_prefixed(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let (len, rest) = bytes.split_first_chunk::<8>()?;
    let len = usize::try_from(u64::from_be_bytes(*len)).ok()?;
    let (text, rest) = (rest.get(..len)?, rest.get(len..)?);
    Some((std::str::from_utf8(text).ok()?, rest))
}

/// A stored record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    pub sequence: u64,
    /// Milliseconds since the epoch, as stored and hashed.
    pub at_ms: i64,
    pub kind: Kind,
    pub principal: String,
    pub grant_id: u64,
    /// `None` once retention dropped it.
    pub payload: Option<Payload>,
    /// Hex SHA-256 of the payload, kept when the payload is dropped.
    pub payload_sha256: String,
    /// Hex SHA-256 chaining this record to the previous one.
    pub hash: String,
}

impl AuditRecord {
    pub fn at(&self) -> SystemTime {
        from_ms(self.at_ms)
    }

    /// Writes the committed record to the log too (journald, a collector),
    /// with its sequence number to find it in the audit log: at INFO when
    /// it was committed alone, at DEBUG when `together` with others (their
    /// INFO line is `log_committed`'s summary); warnings and errors always
    /// at their level.
    fn log(&self, together: bool) {
        let (message, details) = self
            .payload
            .as_ref()
            .map_or(("", ""), |p| (p.message.as_str(), p.details.as_str()));
        macro_rules! at_level {
            ($level:ident) => {
                tracing::$level!(
                    target: "jit_gate::audit",
                    sequence = self.sequence,
                    kind = self.kind.name(),
                    principal = %self.principal,
                    grant_id = self.grant_id,
                    details,
                    "{message}"
                )
            };
        }
        match self.kind {
            Kind::AuditChainBroken => at_level!(error),
            Kind::DriftRepaired | Kind::DatabaseReinitialized | Kind::FleetDisconnected => {
                at_level!(warn);
            }
            _ if together => at_level!(debug),
            _ => at_level!(info),
        }
    }

    /// Logs the records one transaction committed: a record alone is its
    /// own INFO line; several (a broker loading grants in bulk, thousands
    /// a second) are one INFO line counting them by kind, each record at
    /// DEBUG (`RUST_LOG=info,jit_gate::audit=debug` shows them all).
    pub fn log_committed(records: &[AuditRecord]) {
        let together = records.len() > 1;
        for record in records {
            record.log(together);
        }
        if let (true, Some(first), Some(last)) = (together, records.first(), records.last()) {
            let mut counts = std::collections::BTreeMap::<&str, usize>::new();
            for record in records {
                *counts.entry(record.kind.name()).or_default() += 1;
            }
            let kinds = counts
                .iter()
                .map(|(kind, n)| format!("{kind}: {n}"))
                .collect::<Vec<_>>()
                .join(", ");
            tracing::info!(
                target: "jit_gate::audit",
                first_sequence = first.sequence,
                last_sequence = last.sequence,
                kinds,
                "{} audit records committed together",
                records.len()
            );
        }
    }

    /// The hash this record must carry if it follows `previous` (hex).
    pub fn expected_hash(&self, previous: &str) -> Option<String> {
        let previous = digest_hex::decode(previous)?;
        let payload = digest_hex::decode(&self.payload_sha256)?;
        let mut hasher = Sha256::new();
        hasher.update(previous);
        hasher.update(self.sequence.to_be_bytes());
        hasher.update(self.at_ms.to_be_bytes());
        for part in [self.kind.name().as_bytes(), self.principal.as_bytes()] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        hasher.update(self.grant_id.to_be_bytes());
        hasher.update(payload);
        Some(digest_hex::encode(&hasher.finalize()))
    }
}

/// Seals `event` as record `sequence` at `at` (kept to the millisecond),
/// chained to `previous`.
pub fn seal(sequence: u64, at: SystemTime, event: Event, previous: &str) -> AuditRecord {
    let payload = Payload {
        message: event.message,
        details: event.details.to_string(),
    };
    let mut record = AuditRecord {
        sequence,
        at_ms: to_ms(at),
        kind: event.kind,
        principal: event.principal,
        grant_id: event.grant_id,
        payload_sha256: payload.sha256(),
        payload: Some(payload),
        hash: String::new(),
    };
    record.hash = record
        .expected_hash(previous)
        .expect("previous hashes are 32-byte hex");
    record
}

/// Where and why a chain does not verify.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("record {sequence}: {problem}")]
pub struct Broken {
    pub sequence: u64,
    pub problem: String,
}

/// Checks records fed oldest first, from the first one.
#[derive(Clone, Debug)]
pub struct Verifier {
    previous: String,
    next_sequence: u64,
    /// Records checked, and how many of them had their payload dropped.
    pub records: u64,
    pub pruned: u64,
}

impl Default for Verifier {
    fn default() -> Self {
        Verifier {
            previous: GENESIS_HASH.to_owned(),
            next_sequence: 1,
            records: 0,
            pruned: 0,
        }
    }
}

impl Verifier {
    pub fn check(&mut self, record: &AuditRecord) -> Result<(), Broken> {
        let broken = |problem: String| Broken {
            sequence: record.sequence,
            problem,
        };
        if record.sequence != self.next_sequence {
            return Err(broken(format!(
                "expected sequence {} here: records are missing or out of place",
                self.next_sequence
            )));
        }
        match &record.payload {
            Some(payload) if payload.sha256() != record.payload_sha256 => {
                return Err(broken("its message or details were changed".into()));
            }
            Some(_) => {}
            None if record.kind.prunable() => self.pruned += 1,
            None => {
                return Err(broken(format!(
                    "the payload of a {} record was removed; only access-denied payloads are pruned",
                    record.kind.name()
                )));
            }
        }
        if record.expected_hash(&self.previous).as_deref() != Some(record.hash.as_str()) {
            return Err(broken(
                "its hash does not chain to the previous record (a field was changed, or records before it)"
                    .into(),
            ));
        }
        self.previous.clone_from(&record.hash);
        self.next_sequence += 1;
        self.records += 1;
        Ok(())
    }

    /// The head verified so far: (sequence, hash); (0, genesis) if none.
    pub fn head(&self) -> (u64, &str) {
        (self.next_sequence - 1, &self.previous)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain() -> Vec<AuditRecord> {
        let now = SystemTime::now();
        let first = seal(
            1,
            now,
            Event::new(Kind::AgentStarted, AGENT, 0, "up"),
            GENESIS_HASH,
        );
        let second = seal(
            2,
            now,
            Event::new(Kind::AccessDenied, AGENT, 0, "denied")
                .with_details(serde_json::json!({ "port": 22 })),
            &first.hash,
        );
        let third = seal(
            3,
            now,
            Event::new(Kind::GrantCreated, "uid:0", 7, "granted"),
            &second.hash,
        );
        vec![first, second, third]
    }

    fn verify(records: &[AuditRecord]) -> Result<Verifier, Broken> {
        let mut verifier = Verifier::default();
        for record in records {
            verifier.check(record)?;
        }
        Ok(verifier)
    }

    #[test]
    fn chain_detects_changes_gaps_and_removed_payloads() {
        let chain = chain();
        let verifier = verify(&chain).unwrap();
        assert_eq!(verifier.head(), (3, chain[2].hash.as_str()));

        let mut forged = chain.clone();
        forged[2].grant_id = 8;
        assert_eq!(verify(&forged).unwrap_err().sequence, 3);

        let mut forged = chain.clone();
        forged[0].payload.as_mut().unwrap().message = "down".into();
        assert!(verify(&forged).unwrap_err().problem.contains("changed"));

        // Dropping a record leaves a gap.
        let gap = [chain[0].clone(), chain[2].clone()];
        assert!(
            verify(&gap)
                .unwrap_err()
                .problem
                .contains("expected sequence 2")
        );

        // A pruned access-denied payload still verifies; other kinds do not.
        let mut pruned = chain.clone();
        pruned[1].payload = None;
        assert_eq!(verify(&pruned).unwrap().pruned, 1);
        pruned[2].payload = None;
        assert!(
            verify(&pruned)
                .unwrap_err()
                .problem
                .contains("grant-created")
        );
    }

    /// The log lines `log_committed` writes for `records`, DEBUG and up.
    fn logged(records: &[AuditRecord]) -> Vec<String> {
        #[derive(Clone, Default)]
        struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .without_time()
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || AuditRecord::log_committed(records));
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn records_committed_together_are_one_info_line_and_each_a_debug_line() {
        let mut records = chain();
        let alone = logged(&records[2..]);
        assert_eq!(alone.len(), 1, "{alone:?}");
        assert!(alone[0].starts_with(" INFO") && alone[0].contains("grant-created"));

        records.push(seal(
            4,
            SystemTime::now(),
            Event::new(Kind::DriftRepaired, AGENT, 0, "repaired"),
            &records[2].hash,
        ));
        let lines = logged(&records);
        let at = |level: &str| lines.iter().filter(|l| l.starts_with(level)).count();
        assert_eq!(
            (at("DEBUG"), at(" WARN"), at(" INFO")),
            (3, 1, 1),
            "{lines:#?}"
        );
        let summary = lines.iter().find(|l| l.starts_with(" INFO")).unwrap();
        assert!(
            summary.contains("4 audit records committed together")
                && summary.contains("first_sequence=1")
                && summary.contains("last_sequence=4")
                && summary.contains(
                    "access-denied: 1, agent-started: 1, drift-repaired: 1, grant-created: 1"
                ),
            "{summary}"
        );
    }

    #[test]
    fn kind_names_round_trip() {
        for kind in Kind::ALL {
            assert_eq!(Kind::from_name(kind.name()), Some(*kind));
            assert_eq!(Kind::from_code(kind.code()), Some(*kind));
        }
    }
}
