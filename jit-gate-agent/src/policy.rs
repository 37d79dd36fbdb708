//! Policy: which (port, protocol) pairs are protected, and the rules a
//! request to open one must satisfy. Pure data and validation; nothing here
//! touches the kernel or the store.

use std::{collections::BTreeSet, fmt, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    net::Protocol,
    refusal::{Refusal, RefusalKind},
};

/// Longest grant any rule may allow.
pub const DURATION_CEILING: Duration = Duration::from_hours(24);
/// Shortest maximum a rule may set.
pub const DURATION_FLOOR: Duration = Duration::from_mins(1);
/// Maximum duration of a rule that does not set one.
pub const DEFAULT_MAX_DURATION: Duration = Duration::from_hours(3);
/// Management ports protected by the default policy (SSH, RDP, `WinRM`).
pub const DEFAULT_TCP_PORTS: [u16; 4] = [22, 3389, 5985, 5986];
/// A policy holds at most this many rules (the XDP program counts per port in
/// a fixed table of 1024 slots; two protocols per port fit).
pub const MAX_RULES: usize = 512;
/// A rule lists at most this many allowed prefixes.
pub const MAX_ALLOWED_PREFIXES: usize = 256;
/// A rule requires at most this many distinct approvers.
pub const MAX_APPROVALS: u8 = 3;

/// The protocols a rule covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleProtocol {
    Tcp,
    Udp,
    Both,
}

impl RuleProtocol {
    pub fn protocols(self) -> &'static [Protocol] {
        match self {
            RuleProtocol::Tcp => &[Protocol::Tcp],
            RuleProtocol::Udp => &[Protocol::Udp],
            RuleProtocol::Both => &[Protocol::Tcp, Protocol::Udp],
        }
    }

    pub fn covers(self, protocol: Protocol) -> bool {
        self.protocols().contains(&protocol)
    }

    pub fn name(self) -> &'static str {
        match self {
            RuleProtocol::Tcp => "tcp",
            RuleProtocol::Udp => "udp",
            RuleProtocol::Both => "both",
        }
    }
}

impl fmt::Display for RuleProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for RuleProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(RuleProtocol::Tcp),
            "udp" => Ok(RuleProtocol::Udp),
            "both" => Ok(RuleProtocol::Both),
            _ => Err(format!(
                "unknown protocol {s:?} (expected tcp, udp or both)"
            )),
        }
    }
}

/// One protected port and the conditions for opening it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRule {
    pub port: u16,
    pub protocol: RuleProtocol,
    /// Requested sources must lie inside one of these; empty means any.
    #[serde(default)]
    pub allowed_sources: Vec<IpNet>,
    #[serde(with = "humantime_serde", default = "default_max_duration")]
    pub max_duration: Duration,
    #[serde(default)]
    pub require_justification: bool,
    #[serde(default)]
    pub require_ticket: bool,
    /// Distinct approvers a request must have before it is granted (0: none,
    /// granted at once). Left out when 0, so policies stored before the field
    /// existed compare and fingerprint as they did.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub approvals: u8,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(value: &u8) -> bool {
    *value == 0
}

fn default_max_duration() -> Duration {
    DEFAULT_MAX_DURATION
}

impl PortRule {
    /// A rule with the defaults: any source, 3 h, nothing required.
    pub fn open(port: u16, protocol: RuleProtocol) -> Self {
        PortRule {
            port,
            protocol,
            allowed_sources: Vec::new(),
            max_duration: DEFAULT_MAX_DURATION,
            require_justification: false,
            require_ticket: false,
            approvals: 0,
        }
    }

    /// The (protocol, port) pairs this rule protects.
    pub fn protected(&self) -> impl Iterator<Item = (Protocol, u16)> + '_ {
        self.protocol.protocols().iter().map(|p| (*p, self.port))
    }

    pub fn allows_source(&self, source: &IpNet) -> bool {
        self.allowed_sources.is_empty() || self.allowed_sources.iter().any(|a| a.contains(source))
    }

    /// Checks the rule on its own; `Err` names the problem.
    pub fn validate(&self) -> Result<(), Refusal> {
        let here = format!("rule {}/{}", self.port, self.protocol);
        crate::validate::port(u32::from(self.port))
            .map_err(|e| Refusal::invalid(format!("{here}: {e}")))?;
        if self.max_duration < DURATION_FLOOR || self.max_duration > DURATION_CEILING {
            return Err(Refusal::invalid(format!(
                "{here}: max_duration {} is outside 1m..=24h",
                humantime::format_duration(self.max_duration)
            )));
        }
        if self.approvals > MAX_APPROVALS {
            return Err(Refusal::invalid(format!(
                "{here}: approvals {} is above the maximum of {MAX_APPROVALS}",
                self.approvals
            )));
        }
        if self.allowed_sources.len() > MAX_ALLOWED_PREFIXES {
            return Err(Refusal::invalid(format!(
                "{here}: {} allowed prefixes, at most {MAX_ALLOWED_PREFIXES}",
                self.allowed_sources.len()
            )));
        }
        for prefix in &self.allowed_sources {
            crate::validate::prefix(*prefix)
                .map_err(|e| Refusal::invalid(format!("{here}: allowed prefix {e}")))?;
        }
        Ok(())
    }
}

/// The host's policy: rules with distinct (port, protocol) coverage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub rules: Vec<PortRule>,
    /// Increases with every change.
    pub revision: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            rules: DEFAULT_TCP_PORTS
                .iter()
                .map(|p| PortRule::open(*p, RuleProtocol::Tcp))
                .collect(),
            revision: 1,
        }
    }
}

impl Policy {
    /// Checks every rule and that no (protocol, port) is covered twice.
    pub fn validate_rules(rules: &[PortRule]) -> Result<(), Refusal> {
        if rules.len() > MAX_RULES {
            return Err(Refusal::invalid(format!(
                "{} rules, at most {MAX_RULES}",
                rules.len()
            )));
        }
        let mut seen = BTreeSet::new();
        for rule in rules {
            rule.validate()?;
            for key in rule.protected() {
                if !seen.insert(key) {
                    return Err(Refusal::invalid(format!(
                        "port {}/{} is covered by more than one rule",
                        key.1, key.0
                    )));
                }
            }
        }
        Ok(())
    }

    /// Every protected (protocol, port).
    pub fn protected(&self) -> BTreeSet<(Protocol, u16)> {
        self.rules.iter().flat_map(PortRule::protected).collect()
    }

    /// The rule covering (protocol, port), if any.
    pub fn rule_for(&self, protocol: Protocol, port: u16) -> Option<&PortRule> {
        self.rules
            .iter()
            .find(|r| r.port == port && r.protocol.covers(protocol))
    }

    /// Rules on `port`, whatever their protocol.
    pub fn rules_on(&self, port: u16) -> impl Iterator<Item = &PortRule> {
        self.rules.iter().filter(move |r| r.port == port)
    }

    /// The policy with `rule` added, or replacing the rule with the same
    /// port and protocol.
    pub fn with_rule(&self, rule: PortRule) -> Vec<PortRule> {
        let mut rules: Vec<PortRule> = self
            .rules
            .iter()
            .filter(|r| !(r.port == rule.port && r.protocol == rule.protocol))
            .cloned()
            .collect();
        rules.push(rule);
        rules.sort_by_key(|r| (r.port, r.protocol));
        rules
    }

    /// The policy without the rule for (port, protocol); `NotFound` if absent.
    pub fn without_rule(
        &self,
        port: u16,
        protocol: RuleProtocol,
    ) -> Result<Vec<PortRule>, Refusal> {
        if !self
            .rules
            .iter()
            .any(|r| r.port == port && r.protocol == protocol)
        {
            return Err(Refusal::new(
                RefusalKind::NotFound,
                format!("no rule for port {port}/{protocol}"),
            ));
        }
        Ok(self
            .rules
            .iter()
            .filter(|r| !(r.port == port && r.protocol == protocol))
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_protects_management_ports_over_tcp() {
        let policy = Policy::default();
        Policy::validate_rules(&policy.rules).unwrap();
        let protected: Vec<_> = policy.protected().into_iter().collect();
        assert_eq!(
            protected,
            DEFAULT_TCP_PORTS
                .iter()
                .map(|p| (Protocol::Tcp, *p))
                .collect::<Vec<_>>()
        );
        assert!(
            policy
                .rules
                .iter()
                .all(|r| r.max_duration == DEFAULT_MAX_DURATION)
        );
    }

    #[test]
    fn overlapping_rules_are_refused() {
        let rules = vec![
            PortRule::open(22, RuleProtocol::Both),
            PortRule::open(22, RuleProtocol::Tcp),
        ];
        let err = Policy::validate_rules(&rules).unwrap_err();
        assert_eq!(err.kind, RefusalKind::InvalidArgument);
        assert!(err.message.contains("22/tcp"), "{err}");
    }

    #[test]
    fn rule_limits_are_enforced() {
        let mut rule = PortRule::open(22, RuleProtocol::Tcp);
        rule.max_duration = Duration::from_secs(59);
        assert!(rule.validate().is_err());
        rule.max_duration = DURATION_CEILING + Duration::from_secs(1);
        assert!(rule.validate().is_err());
        rule.max_duration = DURATION_CEILING;
        rule.validate().unwrap();
        rule.allowed_sources = vec!["10.0.0.1/8".parse().unwrap()];
        let err = rule.validate().unwrap_err();
        assert!(err.message.contains("10.0.0.0/8"), "{err}");
        assert!(PortRule::open(0, RuleProtocol::Udp).validate().is_err());
        let mut rule = PortRule::open(22, RuleProtocol::Tcp);
        rule.approvals = MAX_APPROVALS;
        rule.validate().unwrap();
        rule.approvals = MAX_APPROVALS + 1;
        let err = rule.validate().unwrap_err();
        assert!(err.message.contains("approvals 4"), "{err}");
    }

    #[test]
    fn with_and_without_rule() {
        let policy = Policy::default();
        let rules = policy.with_rule(PortRule::open(53, RuleProtocol::Udp));
        assert_eq!(rules.len(), 5);
        let changed = Policy { rules, revision: 2 };
        assert!(changed.rule_for(Protocol::Udp, 53).is_some());
        assert!(changed.rule_for(Protocol::Tcp, 53).is_none());
        assert_eq!(
            changed.without_rule(53, RuleProtocol::Udp).unwrap().len(),
            4
        );
        assert_eq!(
            changed
                .without_rule(53, RuleProtocol::Tcp)
                .unwrap_err()
                .kind,
            RefusalKind::NotFound
        );
    }

    #[test]
    fn allowed_sources_contain_requests() {
        let mut rule = PortRule::open(22, RuleProtocol::Tcp);
        assert!(rule.allows_source(&"203.0.113.9/32".parse().unwrap()));
        rule.allowed_sources = vec!["198.51.100.0/24".parse().unwrap()];
        assert!(rule.allows_source(&"198.51.100.128/25".parse().unwrap()));
        assert!(!rule.allows_source(&"198.51.0.0/16".parse().unwrap()));
        assert!(!rule.allows_source(&"2001:db8::1/128".parse().unwrap()));
    }
}
