//! Fleet key layout and value format (version 1), shared by the agent and
//! the broker CLI, and documented in README "Fleet mode" so that brokers in
//! other languages can write them. Every value is a JSON object with
//! `"version": 1`; every name that becomes part of a key is checked here.
//!
//! ```text
//! /jit-gate/v1/inventory/<host>          agent: its labels (no lease)
//! /jit-gate/v1/presence/<host>           agent: alive (lease, 10 s)
//! /jit-gate/v1/hosts/<host>/grants/<id>  broker: a grant for <host> (lease = lifetime)
//! /jit-gate/v1/grants/<id>               broker: what it asked and of whom (same lease)
//! /jit-gate/v1/status/<host>/<id>        agent: the grant's outcome on <host>
//! ```

use serde::{Deserialize, Serialize};

use crate::{
    request::{AccessRequest, Lifetime, PortAccess, RequestedProtocol},
    validate,
};

/// Every key starts with this; the `v1` changes with an incompatible layout.
pub const ROOT: &str = "/jit-gate/v1/";
/// The value format's version.
pub const VALUE_VERSION: u32 = 1;
/// Largest value the agent reads; a bigger one is refused unread.
pub const MAX_VALUE_BYTES: usize = 16 * 1024;
/// Largest grant record, which only brokers read: it names every host
/// targeted (about 1,500 host names fill `MAX_VALUE_BYTES`), and stays
/// under etcd's default request limit of 1.5 MiB.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// Longest host name, grant id, broker name and label.
pub const MAX_NAME_LEN: usize = 63;
/// Labels one host may carry and one grant may address.
pub const MAX_LABELS: usize = 32;
/// Hosts one grant may name directly.
pub const MAX_HOSTS_PER_GRANT: usize = 10_000;

pub fn inventory_prefix() -> String {
    format!("{ROOT}inventory/")
}

pub fn inventory_key(host: &str) -> String {
    format!("{ROOT}inventory/{host}")
}

pub fn presence_prefix() -> String {
    format!("{ROOT}presence/")
}

pub fn presence_key(host: &str) -> String {
    format!("{ROOT}presence/{host}")
}

/// Where the grants addressed to `host` live (the agent reads only these).
pub fn host_grants_prefix(host: &str) -> String {
    format!("{ROOT}hosts/{host}/grants/")
}

pub fn host_grant_key(host: &str, id: &str) -> String {
    format!("{}{id}", host_grants_prefix(host))
}

pub fn grant_record_key(id: &str) -> String {
    format!("{ROOT}grants/{id}")
}

/// Where `host` writes its outcomes (the agent writes only these).
pub fn status_prefix(host: &str) -> String {
    format!("{ROOT}status/{host}/")
}

pub fn status_key(host: &str, id: &str) -> String {
    format!("{}{id}", status_prefix(host))
}

/// A host name, grant id, broker name or label: 1–63 characters of ASCII
/// letters, digits, `.`, `_` and `-`, not starting with `.` — so a name can
/// never reach into another key (`/`) or mean `..`.
pub fn name(what: &str, value: &str) -> Result<(), String> {
    let valid = !value.is_empty()
        && value.len() <= MAX_NAME_LEN
        && !value.starts_with('.')
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{what} \"{}\" must be 1–{MAX_NAME_LEN} characters of letters, digits, '.', '_', '-' (not starting with '.')",
            validate::excerpt(value)
        ))
    }
}

/// A list of labels, each a name, at most `MAX_LABELS`.
pub fn labels(what: &str, values: &[String]) -> Result<(), String> {
    if values.len() > MAX_LABELS {
        return Err(format!(
            "{what}: {} labels, at most {MAX_LABELS}",
            values.len()
        ));
    }
    values.iter().try_for_each(|label| name(what, label))
}

/// `/jit-gate/v1/inventory/<host>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    pub version: u32,
    pub host: String,
    pub labels: Vec<String>,
}

/// One port of a fleet grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetPort {
    pub port: u32,
    /// "tcp" or "udp"; absent: every protocol the host's rule covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// How a broker ends a grant before its time: the value is rewritten with
/// this set (a deleted key ends it too, without terminating connections).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    pub terminate: bool,
    pub reason: String,
}

/// `/jit-gate/v1/hosts/<host>/grants/<id>`: one host's copy of a grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetGrant {
    pub version: u32,
    pub id: String,
    /// The broker's name; the agent records the grant as principal
    /// `fleet:<broker>`.
    pub broker: String,
    pub source: String,
    pub ports: Vec<FleetPort>,
    /// The grant's end, milliseconds since the Unix epoch: a host that
    /// applies it late gets only what is left.
    pub until_ms: i64,
    #[serde(default)]
    pub requester: String,
    #[serde(default)]
    pub justification: String,
    #[serde(default)]
    pub ticket: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<Revocation>,
}

impl FleetGrant {
    /// Parses a stored value, bounded before it is read.
    pub fn parse(bytes: &[u8]) -> Result<FleetGrant, String> {
        let grant: FleetGrant = parse_bounded(bytes)?;
        name("grant id", &grant.id)?;
        name("broker", &grant.broker)?;
        if let Some(revocation) = &grant.revoked {
            validate::text("reason", &revocation.reason, validate::MAX_REASON_LEN)?;
        }
        Ok(grant)
    }

    /// The principal the host's engine records and checks.
    pub fn principal(&self) -> String {
        principal_for(&self.broker)
    }

    /// The grant as an access request, validated by the engine like any
    /// other; the grant id is its idempotency key.
    pub fn request(&self) -> AccessRequest {
        let protocol = |p: &FleetPort| match p.protocol.as_deref() {
            None => RequestedProtocol::Covered,
            Some("tcp") => RequestedProtocol::Only(crate::net::Protocol::Tcp),
            Some("udp") => RequestedProtocol::Only(crate::net::Protocol::Udp),
            // Refused by validation as an unknown protocol.
            Some(_) => RequestedProtocol::Unknown(-1),
        };
        AccessRequest {
            request_id: self.id.clone(),
            ports: self
                .ports
                .iter()
                .map(|p| PortAccess {
                    port: p.port,
                    protocol: protocol(p),
                    source: self.source.clone(),
                })
                .collect(),
            lifetime: Lifetime::Until {
                seconds: self.until_ms.div_euclid(1000),
                nanos: (self.until_ms.rem_euclid(1000) * 1_000_000) as i32,
            },
            requester: self.requester.clone(),
            justification: self.justification.clone(),
            ticket: self.ticket.clone(),
            max_connections: 0,
        }
    }
}

/// The principal name of fleet grants written by `broker`.
pub fn principal_for(broker: &str) -> String {
    format!("fleet:{broker}")
}

/// `/jit-gate/v1/grants/<id>`: what the broker asked, for `fleet status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRecord {
    pub version: u32,
    pub id: String,
    pub broker: String,
    /// Hosts named directly.
    pub hosts: Vec<String>,
    /// Labels, each resolved against the inventory when written.
    pub labels: Vec<String>,
    /// Every host a copy was written for.
    pub targeted: Vec<String>,
    pub until_ms: i64,
}

/// What happened to a grant on one host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Enforced until `enforced_until_ms`.
    Applied,
    /// Local policy or validation refused it (`reason`).
    Refused,
    /// Ended early: revoked by the broker, or its key was deleted.
    Revoked,
}

/// `/jit-gate/v1/status/<host>/<id>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusValue {
    pub version: u32,
    pub host: String,
    pub id: String,
    pub outcome: Outcome,
    #[serde(default)]
    pub reason: String,
    /// The host's grant ids (one per port and protocol).
    #[serde(default)]
    pub grant_ids: Vec<u64>,
    /// When enforcement ends on this host (milliseconds since the epoch).
    #[serde(default)]
    pub enforced_until_ms: i64,
    /// When the host wrote this outcome.
    pub at_ms: i64,
    /// The grant key's modification revision the outcome answers.
    pub grant_revision: i64,
}

/// Parses a JSON value of at most `MAX_VALUE_BYTES` with `"version": 1`.
pub fn parse_bounded<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    parse_within(bytes, MAX_VALUE_BYTES)
}

impl GrantRecord {
    /// Parses a record of at most `MAX_RECORD_BYTES`.
    pub fn parse(bytes: &[u8]) -> Result<GrantRecord, String> {
        parse_within(bytes, MAX_RECORD_BYTES)
    }
}

fn parse_within<T: for<'de> Deserialize<'de>>(bytes: &[u8], limit: usize) -> Result<T, String> {
    if bytes.len() > limit {
        return Err(format!("value of {} bytes, at most {limit}", bytes.len()));
    }
    let probe: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    match probe.get("version").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(VALUE_VERSION) => {}
        other => {
            return Err(format!(
                "value version {other:?}, this agent reads version {VALUE_VERSION}"
            ));
        }
    }
    serde_json::from_value(probe).map_err(|e| format!("malformed value: {e}"))
}

/// The last path segment of `key` below `prefix`, if it is a valid name.
pub fn id_below<'k>(prefix: &str, key: &'k str) -> Option<&'k str> {
    key.strip_prefix(prefix)
        .filter(|id| name("grant id", id).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_thousands_of_hosts_parse_and_their_bound_holds() {
        let record = |hosts: usize| GrantRecord {
            version: VALUE_VERSION,
            id: "g".into(),
            broker: "b".into(),
            hosts: Vec::new(),
            labels: vec!["db".into()],
            targeted: (0..hosts).map(|i| format!("host-{i:05}")).collect(),
            until_ms: 1,
        };
        let ten_thousand = serde_json::to_vec(&record(10_000)).unwrap();
        assert!(ten_thousand.len() > MAX_VALUE_BYTES);
        assert_eq!(GrantRecord::parse(&ten_thousand), Ok(record(10_000)));
        let too_big = serde_json::to_vec(&record(MAX_RECORD_BYTES / 10)).unwrap();
        assert!(
            GrantRecord::parse(&too_big)
                .unwrap_err()
                .contains("at most")
        );
    }

    #[test]
    fn names_cannot_escape_their_key() {
        for bad in ["", ".", "..", "a/b", "host name", &"x".repeat(64), "é"] {
            assert!(name("host", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["db-1", "web.example", "A_b-9", &"x".repeat(63)] {
            assert!(name("host", good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn values_are_bounded_and_versioned() {
        let grant = FleetGrant {
            version: 1,
            id: "g1".into(),
            broker: "alice".into(),
            source: "198.51.100.7".into(),
            ports: vec![FleetPort {
                port: 22,
                protocol: Some("tcp".into()),
            }],
            until_ms: 1_700_000_000_123,
            requester: "ops".into(),
            justification: String::new(),
            ticket: String::new(),
            revoked: None,
        };
        let bytes = serde_json::to_vec(&grant).unwrap();
        assert_eq!(FleetGrant::parse(&bytes).unwrap(), grant);
        let request = grant.request();
        assert_eq!(request.request_id, "g1");
        assert_eq!(
            request.lifetime,
            Lifetime::Until {
                seconds: 1_700_000_000,
                nanos: 123_000_000
            }
        );
        let v2 = String::from_utf8(bytes.clone())
            .unwrap()
            .replace("\"version\":1", "\"version\":2");
        assert!(
            FleetGrant::parse(v2.as_bytes())
                .unwrap_err()
                .contains("version")
        );
        let mut big = grant.clone();
        big.justification = "x".repeat(MAX_VALUE_BYTES);
        let err = FleetGrant::parse(&serde_json::to_vec(&big).unwrap()).unwrap_err();
        assert!(err.contains("at most"), "{err}");
        let mut escaping = grant;
        escaping.id = "../x".into();
        assert!(FleetGrant::parse(&serde_json::to_vec(&escaping).unwrap()).is_err());
    }

    #[test]
    fn ids_below_a_prefix() {
        let prefix = host_grants_prefix("h1");
        assert_eq!(id_below(&prefix, &host_grant_key("h1", "g-1")), Some("g-1"));
        assert_eq!(id_below(&prefix, &format!("{prefix}a/b")), None);
        assert_eq!(id_below(&prefix, "/jit-gate/v1/hosts/h2/grants/g"), None);
    }
}
