//! Access requests: the broker's ask, validated as a whole against the
//! policy. Either every port is acceptable and the request becomes grant
//! specifications, or the first problem found is returned and nothing is
//! granted.

use std::{
    collections::BTreeSet,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    net::{GrantTarget, Protocol},
    policy::Policy,
    refusal::{Refusal, RefusalKind},
    validate::{
        self, MAX_JUSTIFICATION_LEN, MAX_REQUEST_ID_LEN, MAX_REQUESTER_LEN, MAX_TICKET_LEN,
    },
};

/// Ports one request may name.
pub const MAX_PORTS_PER_REQUEST: usize = 64;

/// How long the access should last, as the client sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Lifetime {
    Missing,
    /// A signed duration (seconds, nanoseconds), as protobuf carries it.
    For {
        seconds: i64,
        nanos: i32,
    },
    /// An end time in seconds and nanoseconds since the Unix epoch.
    Until {
        seconds: i64,
        nanos: i32,
    },
}

/// The protocol a port is asked for. Untagged, so a request serialises
/// (and fingerprints) as it did when this was an `Option<Protocol>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RequestedProtocol {
    /// Every protocol the port's rule covers.
    Covered,
    Only(Protocol),
    /// BOTH, which names a rule's coverage, not what to open: refused by
    /// validation (leave the protocol unset for every covered one).
    Both,
    /// A wire value the API does not know: refused by validation, so that
    /// the refusal is audited like any other.
    Unknown(i32),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortAccess {
    pub port: u32,
    pub protocol: RequestedProtocol,
    pub source: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRequest {
    pub request_id: String,
    pub ports: Vec<PortAccess>,
    pub lifetime: Lifetime,
    pub requester: String,
    pub justification: String,
    pub ticket: String,
    /// Connections the grants may open in all, each; 0: no limit. Left out
    /// of the fingerprint when 0, so requests made before the field existed
    /// keep their fingerprints.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_connections: u32,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(value: &u32) -> bool {
    *value == 0
}

/// One grant to create.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantSpec {
    pub target: GrantTarget,
    /// How long it lasts. An end time is turned into a duration once, here,
    /// against the wall clock at validation: a later wall-clock step changes
    /// neither the duration nor the boot-clock deadline derived from it.
    pub duration: Duration,
}

impl AccessRequest {
    /// A digest of everything the client sent, to tell a retry (same
    /// digest) from a different request reusing an id.
    pub fn fingerprint(&self) -> String {
        // The canonical JSON goes straight into the hash, unbuffered.
        let mut digest = Sha256::new();
        serde_json::to_writer(&mut digest, self).expect("requests serialise");
        crate::digest_hex::encode(&digest.finalize())
    }

    /// Validates the whole request at `now` against `policy`.
    pub fn validate(&self, policy: &Policy, now: SystemTime) -> Result<Vec<GrantSpec>, Refusal> {
        self.validate_text()?;
        if self.ports.is_empty() {
            return Err(Refusal::invalid("the request names no ports"));
        }
        if self.ports.len() > MAX_PORTS_PER_REQUEST {
            return Err(Refusal::invalid(format!(
                "the request names {} ports, at most {MAX_PORTS_PER_REQUEST}",
                self.ports.len()
            )));
        }
        let duration = self.duration(now)?;
        let mut specs = Vec::new();
        let mut seen = BTreeSet::new();
        for (index, access) in self.ports.iter().enumerate() {
            let port = valid_port(access.port)?;
            let source = parse_source(&access.source)?;
            for protocol in protocols_for(policy, port, access.protocol, index)? {
                let rule = policy
                    .rule_for(protocol, port)
                    .expect("protocols_for returns covered protocols only");
                let here = format!("port {port}/{protocol}");
                if !seen.insert((protocol, port)) {
                    return Err(Refusal::invalid(format!("{here} is named more than once")));
                }
                if !rule.allows_source(&source) {
                    return Err(Refusal::new(
                        RefusalKind::PermissionDenied,
                        format!("source {source} is outside the prefixes allowed for {here}"),
                    ));
                }
                if duration > rule.max_duration {
                    return Err(Refusal::invalid(format!(
                        "duration {} exceeds the maximum of {} for {here}",
                        humantime::format_duration(duration),
                        humantime::format_duration(rule.max_duration)
                    )));
                }
                if rule.require_justification && self.justification.trim().is_empty() {
                    return Err(Refusal::invalid(format!("{here} requires a justification")));
                }
                if rule.require_ticket && self.ticket.trim().is_empty() {
                    return Err(Refusal::invalid(format!(
                        "{here} requires a ticket reference"
                    )));
                }
                specs.push(GrantSpec {
                    target: GrantTarget {
                        source,
                        protocol,
                        port,
                    },
                    duration,
                });
            }
        }
        Ok(specs)
    }

    fn validate_text(&self) -> Result<(), Refusal> {
        if self.request_id.is_empty() {
            return Err(Refusal::invalid("request_id is empty"));
        }
        for (field, value, max) in [
            ("request_id", &self.request_id, MAX_REQUEST_ID_LEN),
            ("requester", &self.requester, MAX_REQUESTER_LEN),
            ("justification", &self.justification, MAX_JUSTIFICATION_LEN),
            ("ticket", &self.ticket, MAX_TICKET_LEN),
        ] {
            validate::text(field, value, max).map_err(Refusal::invalid)?;
        }
        if self.requester.trim().is_empty() {
            return Err(Refusal::invalid("requester is empty"));
        }
        validate::max_connections(self.max_connections).map_err(Refusal::invalid)?;
        Ok(())
    }

    fn duration(&self, now: SystemTime) -> Result<Duration, Refusal> {
        match self.lifetime {
            Lifetime::Missing => Err(Refusal::invalid("give a duration or an end time")),
            Lifetime::For { seconds, nanos } => {
                let total = i128::from(seconds) * 1_000_000_000 + i128::from(nanos);
                if total <= 0 {
                    return Err(Refusal::invalid("duration must be positive"));
                }
                Ok(Duration::from_nanos(
                    u64::try_from(total).unwrap_or(u64::MAX),
                ))
            }
            Lifetime::Until { seconds, nanos } => {
                let end = u64::try_from(seconds)
                    .ok()
                    .zip(u32::try_from(nanos).ok())
                    .map(|(s, n)| UNIX_EPOCH + Duration::new(s, n))
                    .ok_or_else(|| Refusal::invalid("end time is before 1970"))?;
                end.duration_since(now)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| {
                        Refusal::invalid(format!(
                            "end time {} is in the past",
                            humantime::format_rfc3339_seconds(end)
                        ))
                    })
            }
        }
    }
}

fn valid_port(port: u32) -> Result<u16, Refusal> {
    validate::port(port).map_err(Refusal::invalid)
}

/// A source address or canonical prefix a grant may name.
fn parse_source(text: &str) -> Result<IpNet, Refusal> {
    validate::address_or_prefix(text)
        .and_then(validate::grantable_source)
        .map_err(Refusal::invalid)
}

/// The protocols to open on `port` (named by `ports[index]`): the one asked
/// for, or all the port's rules cover.
fn protocols_for(
    policy: &Policy,
    port: u16,
    asked: RequestedProtocol,
    index: usize,
) -> Result<Vec<Protocol>, Refusal> {
    let asked = match asked {
        RequestedProtocol::Covered => None,
        RequestedProtocol::Only(p) => Some(p),
        RequestedProtocol::Both => {
            return Err(Refusal::invalid(format!(
                "ports[{index}]: BOTH names a rule's protocols; ask for TCP or UDP, or leave the protocol unset for every protocol the rule covers"
            )));
        }
        RequestedProtocol::Unknown(value) => {
            return Err(Refusal::invalid(format!(
                "ports[{index}]: unknown protocol value {value}"
            )));
        }
    };
    let covered: Vec<Protocol> = policy
        .rules_on(port)
        .flat_map(|r| r.protocol.protocols().iter().copied())
        .collect();
    if covered.is_empty() {
        return Err(Refusal::new(
            RefusalKind::NotFound,
            format!("port {port} is not protected by the policy"),
        ));
    }
    match asked {
        None => Ok(covered),
        Some(p) if covered.contains(&p) => Ok(vec![p]),
        Some(p) => Err(Refusal::invalid(format!(
            "port {port} is protected for {} only, not {p}",
            covered
                .iter()
                .map(|c| c.name())
                .collect::<Vec<_>>()
                .join(" and ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PortRule, RuleProtocol};

    fn policy() -> Policy {
        let mut strict = PortRule::open(3389, RuleProtocol::Tcp);
        strict.allowed_sources = vec!["198.51.100.0/24".parse().unwrap()];
        strict.require_justification = true;
        strict.require_ticket = true;
        strict.max_duration = Duration::from_mins(10);
        Policy {
            rules: vec![
                PortRule::open(22, RuleProtocol::Tcp),
                strict,
                PortRule::open(500, RuleProtocol::Both),
            ],
            revision: 1,
        }
    }

    fn request(ports: &[(u32, Option<Protocol>, &str)]) -> AccessRequest {
        AccessRequest {
            request_id: "r-1".into(),
            ports: ports
                .iter()
                .map(|(port, protocol, source)| PortAccess {
                    port: *port,
                    protocol: protocol.map_or(RequestedProtocol::Covered, RequestedProtocol::Only),
                    source: (*source).into(),
                })
                .collect(),
            lifetime: Lifetime::For {
                seconds: 300,
                nanos: 0,
            },
            requester: "alice".into(),
            justification: String::new(),
            ticket: String::new(),
            max_connections: 0,
        }
    }

    fn refusal(req: &AccessRequest) -> Refusal {
        req.validate(&policy(), SystemTime::now()).unwrap_err()
    }

    #[test]
    fn valid_request_expands_both_protocols() {
        let now = SystemTime::now();
        let specs = request(&[(22, None, "192.0.2.7"), (500, None, "2001:db8::/64")])
            .validate(&policy(), now)
            .unwrap();
        let targets: Vec<_> = specs.iter().map(|s| s.target.to_string()).collect();
        assert_eq!(
            targets,
            [
                "192.0.2.7/32 -> 22/tcp",
                "2001:db8::/64 -> 500/tcp",
                "2001:db8::/64 -> 500/udp"
            ]
        );
        assert!(specs.iter().all(|s| s.duration == Duration::from_mins(5)));
    }

    #[test]
    fn each_bad_input_gets_its_own_refusal() {
        use RefusalKind::*;
        let cases: Vec<(AccessRequest, RefusalKind, &str)> = vec![
            (request(&[]), InvalidArgument, "names no ports"),
            (
                request(&[(23, None, "192.0.2.7")]),
                NotFound,
                "not protected",
            ),
            (
                request(&[(22, Some(Protocol::Udp), "192.0.2.7")]),
                InvalidArgument,
                "tcp only",
            ),
            (
                request(&[(22, None, "192.0.2.300")]),
                InvalidArgument,
                "not an IPv4",
            ),
            (
                request(&[(22, None, "192.0.2.7/16")]),
                InvalidArgument,
                "host bits",
            ),
            (
                request(&[(22, None, "10.0.0.0/8")]),
                InvalidArgument,
                "too broad",
            ),
            (request(&[(22, None, "::/0")]), InvalidArgument, "too broad"),
            (
                request(&[(22, None, "0.0.0.0/16")]),
                InvalidArgument,
                "special-purpose",
            ),
            (
                request(&[(22, None, "::ffff:0:0/96")]),
                InvalidArgument,
                "IPv4-mapped",
            ),
            (
                AccessRequest {
                    ports: vec![PortAccess {
                        port: 22,
                        protocol: RequestedProtocol::Both,
                        source: "192.0.2.7".into(),
                    }],
                    ..request(&[])
                },
                InvalidArgument,
                "ports[0]: BOTH names a rule's protocols",
            ),
            (
                request(&[(0, None, "192.0.2.7")]),
                InvalidArgument,
                "1..=65535",
            ),
            (
                request(&[(70000, None, "192.0.2.7")]),
                InvalidArgument,
                "1..=65535",
            ),
            (
                request(&[
                    (22, None, "192.0.2.7"),
                    (22, Some(Protocol::Tcp), "192.0.2.8"),
                ]),
                InvalidArgument,
                "more than once",
            ),
            (
                request(&[(3389, None, "203.0.113.1")]),
                PermissionDenied,
                "outside the prefixes",
            ),
            (
                AccessRequest {
                    ports: vec![PortAccess {
                        port: 22,
                        protocol: RequestedProtocol::Unknown(7),
                        source: "192.0.2.7".into(),
                    }],
                    ..request(&[])
                },
                InvalidArgument,
                "ports[0]: unknown protocol value 7",
            ),
            (
                request(
                    &vec![(22, None, "192.0.2.7"); MAX_PORTS_PER_REQUEST + 1]
                        .iter()
                        .map(|&(p, pr, s)| (p, pr, s))
                        .collect::<Vec<_>>(),
                ),
                InvalidArgument,
                "at most 64",
            ),
        ];
        for (req, kind, needle) in cases {
            let r = refusal(&req);
            assert_eq!(r.kind, kind, "{req:?} → {r}");
            assert!(r.message.contains(needle), "{req:?} → {r}");
        }
    }

    #[test]
    fn lifetimes_are_checked() {
        let mut req = request(&[(22, None, "192.0.2.7")]);
        for (lifetime, needle) in [
            (Lifetime::Missing, "duration or an end time"),
            (
                Lifetime::For {
                    seconds: 0,
                    nanos: 0,
                },
                "positive",
            ),
            (
                Lifetime::For {
                    seconds: -5,
                    nanos: 0,
                },
                "positive",
            ),
            (
                Lifetime::For {
                    seconds: 4 * 3600,
                    nanos: 0,
                },
                "exceeds the maximum of 3h",
            ),
            (
                Lifetime::Until {
                    seconds: 1_000,
                    nanos: 0,
                },
                "in the past",
            ),
            (
                Lifetime::Until {
                    seconds: -1,
                    nanos: 0,
                },
                "before 1970",
            ),
        ] {
            req.lifetime = lifetime;
            let r = refusal(&req);
            assert!(r.message.contains(needle), "{lifetime:?} → {r}");
        }
        let now = SystemTime::now();
        let end = now + Duration::from_mins(2);
        let secs = end.duration_since(UNIX_EPOCH).unwrap();
        req.lifetime = Lifetime::Until {
            seconds: secs.as_secs() as i64,
            nanos: secs.subsec_nanos() as i32,
        };
        let specs = req.validate(&policy(), now).unwrap();
        assert_eq!(specs[0].duration, Duration::from_mins(2));
    }

    #[test]
    fn required_fields_and_text_limits() {
        let mut req = request(&[(3389, None, "198.51.100.0/25")]);
        assert!(refusal(&req).message.contains("requires a justification"));
        req.justification = "incident 7".into();
        assert!(refusal(&req).message.contains("requires a ticket"));
        req.ticket = "INC-7".into();
        req.validate(&policy(), SystemTime::now()).unwrap();
        req.requester = " ".into();
        assert!(refusal(&req).message.contains("requester is empty"));
        req.requester = "a".repeat(MAX_REQUESTER_LEN + 1);
        assert!(refusal(&req).message.contains("longer than"));
        req.requester = "bob\n".into();
        assert!(refusal(&req).message.contains("control characters"));
        req.requester = "bob".into();
        req.request_id = String::new();
        assert!(refusal(&req).message.contains("request_id is empty"));
    }

    #[test]
    fn requested_protocols_serialise_as_options_did() {
        let ports = request(&[
            (22, None, "192.0.2.7"),
            (500, Some(Protocol::Udp), "192.0.2.7"),
        ]);
        let json = serde_json::to_value(&ports.ports).unwrap();
        assert_eq!(json[0]["protocol"], serde_json::Value::Null);
        assert_eq!(
            json[1]["protocol"],
            serde_json::to_value(Some(Protocol::Udp)).unwrap()
        );
    }

    #[test]
    fn fingerprint_tells_retries_from_new_requests() {
        let a = request(&[(22, None, "192.0.2.7")]);
        let mut b = a.clone();
        assert_eq!(a.fingerprint(), b.fingerprint());
        b.ports[0].source = "192.0.2.8".into();
        assert_ne!(a.fingerprint(), b.fingerprint());
        let mut limited = a.clone();
        limited.max_connections = 1;
        assert_ne!(a.fingerprint(), limited.fingerprint());
        // Without a limit the request serialises as before the field existed.
        let json = serde_json::to_value(&a).unwrap();
        assert!(json.get("max_connections").is_none());
    }

    #[test]
    fn max_connections_is_bounded() {
        let mut r = request(&[(22, None, "192.0.2.7")]);
        r.max_connections = validate::MAX_CONNECTIONS_PER_GRANT + 1;
        let err = r.validate(&policy(), SystemTime::now()).unwrap_err();
        assert_eq!(err.kind, RefusalKind::InvalidArgument);
        assert!(err.message.contains("max_connections"), "{}", err.message);
        r.max_connections = 1;
        assert!(r.validate(&policy(), SystemTime::now()).is_ok());
    }
}
