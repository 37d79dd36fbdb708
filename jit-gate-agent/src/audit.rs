//! Audit records: what happened, who did it, hash-chained so that changing
//! or deleting a stored record is detectable. `store` persists them; the API
//! streams them to watchers.

use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::store::to_ms;

/// The hash the first record chains to.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

macro_rules! kinds {
    ($($variant:ident = $name:literal),+ $(,)?) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Kind { $($variant),+ }
        impl Kind {
            pub const ALL: &[Kind] = &[$(Kind::$variant),+];
            pub const fn name(self) -> &'static str {
                match self { $(Kind::$variant => $name),+ }
            }
            pub fn from_name(name: &str) -> Option<Kind> {
                Kind::ALL.iter().copied().find(|k| k.name() == name)
            }
        }
    };
}

kinds! {
    GrantCreated = "grant-created",
    RequestRefused = "request-refused",
    GrantRevoked = "grant-revoked",
    GrantExpired = "grant-expired",
    GrantEndedByPolicy = "grant-ended-by-policy",
    PolicyChanged = "policy-changed",
    AccessDenied = "access-denied",
    AgentStarted = "agent-started",
    ConfigReloaded = "config-reloaded",
    DriftRepaired = "drift-repaired",
    ConnectionOpened = "connection-opened",
    ConnectionsTerminated = "connections-terminated",
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

/// A stored record.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditRecord {
    pub sequence: u64,
    pub at: SystemTime,
    pub event: Event,
    /// Hex SHA-256 over the previous hash and this record's fields.
    pub hash: String,
}

fn chain_hash(previous: &str, sequence: u64, at_ms: i64, event: &Event) -> String {
    let mut hasher = Sha256::new();
    for part in [
        previous.as_bytes(),
        &sequence.to_be_bytes(),
        &at_ms.to_be_bytes(),
        event.kind.name().as_bytes(),
        event.principal.as_bytes(),
        &event.grant_id.to_be_bytes(),
        event.message.as_bytes(),
        event.details.to_string().as_bytes(),
    ] {
        // Length-prefixed so that field boundaries cannot be shifted.
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

/// Seals `event` as record `sequence`, chained to `previous`. The time is
/// kept at millisecond precision, as stored.
pub fn seal(sequence: u64, at: SystemTime, event: Event, previous: &str) -> AuditRecord {
    let at_ms = to_ms(at);
    AuditRecord {
        sequence,
        at: crate::store::from_ms(at_ms),
        hash: chain_hash(previous, sequence, at_ms, &event),
        event,
    }
}

/// Checks that `records` (consecutive, oldest first) chain from `previous`;
/// `Err(sequence)` names the first record that does not.
pub fn verify_chain(records: &[AuditRecord], previous: &str) -> Result<(), u64> {
    let mut previous = previous.to_owned();
    for record in records {
        if chain_hash(&previous, record.sequence, to_ms(record.at), &record.event) != record.hash {
            return Err(record.sequence);
        }
        previous.clone_from(&record.hash);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_detects_changed_fields() {
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
            Event::new(Kind::GrantCreated, "uid:0", 7, "granted"),
            &first.hash,
        );
        let chain = vec![first, second];
        verify_chain(&chain, GENESIS_HASH).unwrap();
        let mut forged = chain.clone();
        forged[1].event.grant_id = 8;
        assert_eq!(verify_chain(&forged, GENESIS_HASH), Err(2));
        // Dropping a record breaks the link of the next one.
        assert_eq!(verify_chain(&chain[1..], GENESIS_HASH), Err(2));
    }

    #[test]
    fn kind_names_round_trip() {
        for kind in Kind::ALL {
            assert_eq!(Kind::from_name(kind.name()), Some(*kind));
        }
    }
}
