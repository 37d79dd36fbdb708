//! The agent's configuration: TOML, validated as a whole before anything
//! is applied. Errors name the field and the problem.

use std::{
    collections::BTreeSet,
    ffi::CString,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    auth::UidRole,
    enforce::xdp::GateOptions,
    policy::{Policy, PortRule},
    tls::config::TlsConfig,
};

pub const DEFAULT_PATH: &str = "/etc/jit-gate/agent.toml";

/// Which enforcers run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum Mode {
    /// XDP on the configured interfaces, nftables behind it.
    #[default]
    #[serde(rename = "xdp+nftables")]
    XdpAndNftables,
    #[serde(rename = "xdp")]
    Xdp,
    #[serde(rename = "nftables")]
    Nftables,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::XdpAndNftables => "xdp+nftables",
            Mode::Xdp => "xdp",
            Mode::Nftables => "nftables",
        }
    }

    pub fn uses_xdp(self) -> bool {
        self != Mode::Nftables
    }

    /// nftables runs in every mode but "xdp"; in that mode it still takes
    /// over, reported, on interfaces where XDP cannot attach.
    pub fn uses_nftables(self) -> bool {
        self != Mode::Xdp
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Api {
    #[serde(default = "default_socket")]
    pub unix_socket: PathBuf,
    /// Unix users other than root allowed on the socket, with their role.
    /// The socket's group must let them connect (`socket_group`).
    #[serde(default)]
    pub principals: Vec<UidRole>,
    /// Group owning the socket (mode 0660); unset: root only (0600).
    #[serde(default)]
    pub socket_group: Option<String>,
    /// The TCP listener with mutual TLS; unset: none.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Event streams (`WatchEvents`, `ExportAudit`) one principal may hold open.
    #[serde(default = "default_streams_per_principal")]
    pub max_streams_per_principal: u32,
    /// A stream whose reader takes nothing for this long is ended.
    #[serde(with = "humantime_serde", default = "default_stall_timeout")]
    pub stream_stall_timeout: Duration,
}

impl Default for Api {
    fn default() -> Self {
        Api {
            unix_socket: default_socket(),
            principals: Vec::new(),
            socket_group: None,
            tls: None,
            max_streams_per_principal: default_streams_per_principal(),
            stream_stall_timeout: default_stall_timeout(),
        }
    }
}

fn default_streams_per_principal() -> u32 {
    16
}
fn default_stall_timeout() -> Duration {
    Duration::from_secs(30)
}

/// The audit log's signing key, checkpoints and retention.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    /// Ed25519 key signing checkpoints; generated at first start (0600).
    /// Unset: `audit-signing.key` beside the database.
    #[serde(default)]
    pub signing_key: Option<PathBuf>,
    /// A checkpoint after this many new records...
    #[serde(default = "default_checkpoint_records")]
    pub checkpoint_every_records: u64,
    /// ...or this long after the last one, if the log grew.
    #[serde(with = "humantime_serde", default = "default_checkpoint_interval")]
    pub checkpoint_interval: Duration,
    /// `ACCESS_DENIED` records older than this lose their payload (the chain
    /// keeps its digest).
    #[serde(with = "humantime_serde", default = "default_denied_retention")]
    pub denied_retention: Duration,
}

impl Default for Audit {
    fn default() -> Self {
        Audit {
            signing_key: None,
            checkpoint_every_records: default_checkpoint_records(),
            checkpoint_interval: default_checkpoint_interval(),
            denied_retention: default_denied_retention(),
        }
    }
}

fn default_checkpoint_records() -> u64 {
    1000
}
fn default_checkpoint_interval() -> Duration {
    Duration::from_mins(10)
}
fn default_denied_retention() -> Duration {
    Duration::from_hours(720)
}

fn default_socket() -> PathBuf {
    PathBuf::from("/run/jit-gate/agent.sock")
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub mode: Mode,
    /// Interfaces XDP attaches to: names, or patterns (`*`, `?`, `[…]`;
    /// `"all"` is `"*"`) that also cover interfaces created later.
    #[serde(default = "default_interfaces")]
    pub interfaces: Vec<String>,
    /// Interfaces (names or patterns) XDP leaves alone even if `interfaces`
    /// covers them; reported as not covered by XDP.
    #[serde(default)]
    pub exclude_interfaces: Vec<String>,
    #[serde(default = "default_database")]
    pub database: PathBuf,
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    #[serde(default = "default_nft_table")]
    pub nft_table: String,
    /// How often store, kernel maps and nftables are compared and repaired.
    #[serde(with = "humantime_serde", default = "default_reconcile")]
    pub reconcile_interval: Duration,
    #[serde(default)]
    pub api: Api,
    #[serde(default)]
    pub audit: Audit,
    #[serde(default)]
    pub flows: Flows,
    #[serde(default)]
    pub denials: Denials,
    #[serde(default)]
    pub approvals: Approvals,
    /// Prometheus metrics; off unless `enabled`.
    #[serde(default)]
    pub metrics: crate::metrics::MetricsConfig,
    /// The policy; applied when it differs from the last one read from the
    /// configuration. Unset: the default policy on first start.
    #[serde(default)]
    pub policy: Option<Vec<PortRule>>,
    /// Fleet mode: grants read from etcd (README "Fleet mode"); absent: off
    /// (restart).
    #[serde(default)]
    pub fleet: Option<crate::fleet::FleetConfig>,
}

/// Every interface, also those created later: a path into the host that
/// the configuration forgot is a way around the gate.
fn default_interfaces() -> Vec<String> {
    vec![ALL_INTERFACES.to_owned()]
}

/// The word for every interface in `interfaces`.
const ALL_INTERFACES: &str = "all";

fn default_database() -> PathBuf {
    PathBuf::from("/var/lib/jit-gate/agent.db")
}
fn default_pin_dir() -> PathBuf {
    PathBuf::from(crate::enforce::xdp::DEFAULT_PIN_DIR)
}
fn default_nft_table() -> String {
    crate::enforce::nft::DEFAULT_TABLE.to_owned()
}
fn default_reconcile() -> Duration {
    Duration::from_secs(5)
}

/// The XDP flow table: connections opened under grants (restart).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flows {
    /// Entries of the flow table; when it is full, new connections are
    /// refused (existing ones are never evicted). Changing it rebuilds the
    /// kernel state at the next start.
    #[serde(default = "default_flow_capacity")]
    pub capacity: u32,
    /// Connections one grant may hold open at once.
    #[serde(default = "default_flow_quota")]
    pub per_grant_quota: u32,
    /// A TCP connection whose handshake has not completed this long after
    /// its SYN passed no longer passes as a tracked flow, and is removed.
    #[serde(with = "humantime_serde", default = "default_half_open_timeout")]
    pub half_open_timeout: Duration,
}

impl Default for Flows {
    fn default() -> Self {
        let gate = GateOptions::default();
        Flows {
            capacity: gate.flow_capacity,
            per_grant_quota: gate.flow_quota,
            half_open_timeout: gate.half_open_timeout,
        }
    }
}

impl Flows {
    /// The XDP gate's options.
    pub fn gate_options(&self) -> GateOptions {
        GateOptions {
            flow_capacity: self.capacity,
            flow_quota: self.per_grant_quota,
            half_open_timeout: self.half_open_timeout,
        }
    }
}

fn default_flow_capacity() -> u32 {
    Flows::default().capacity
}
fn default_flow_quota() -> u32 {
    Flows::default().per_grant_quota
}
fn default_half_open_timeout() -> Duration {
    Flows::default().half_open_timeout
}

/// How denied packets are audited (restart).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Denials {
    /// Each protected port with denials gets one summary record per interval.
    #[serde(with = "humantime_serde", default = "default_summary_interval")]
    pub summary_interval: Duration,
}

impl Default for Denials {
    fn default() -> Self {
        Denials {
            summary_interval: default_summary_interval(),
        }
    }
}

fn default_summary_interval() -> Duration {
    Duration::from_mins(1)
}

/// Access requests held for approval: how long they wait and how many may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approvals {
    /// A pending request not decided this long after it was made expires.
    #[serde(with = "humantime_serde", default = "default_pending_timeout")]
    pub pending_timeout: Duration,
    /// Pending requests one API principal may have at once.
    #[serde(default = "default_max_pending_per_principal")]
    pub max_pending_per_principal: u32,
    /// Pending requests the agent holds at once, from every principal.
    #[serde(default = "default_max_pending")]
    pub max_pending: u32,
}

impl Default for Approvals {
    fn default() -> Self {
        Approvals {
            pending_timeout: default_pending_timeout(),
            max_pending_per_principal: default_max_pending_per_principal(),
            max_pending: default_max_pending(),
        }
    }
}

fn default_pending_timeout() -> Duration {
    Duration::from_hours(24)
}
fn default_max_pending_per_principal() -> u32 {
    16
}
fn default_max_pending() -> u32 {
    10_000
}

/// Bounds of the `[approvals]` keys.
const PENDING_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_hours(168);
const MAX_PENDING_CEILING: u32 = 100_000;

impl Approvals {
    fn validate(&self) -> Result<(), (String, String)> {
        let field = |name: &str, problem: String| Err((format!("approvals.{name}"), problem));
        if !PENDING_TIMEOUT_RANGE.contains(&self.pending_timeout) {
            return field("pending_timeout", "must be between 1s and 7days".into());
        }
        if !(1..=MAX_PENDING_CEILING).contains(&self.max_pending) {
            return field("max_pending", format!("must be 1 to {MAX_PENDING_CEILING}"));
        }
        if !(1..=self.max_pending).contains(&self.max_pending_per_principal) {
            return field(
                "max_pending_per_principal",
                "must be 1 to approvals.max_pending".into(),
            );
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: field `{field}`: {problem}")]
    Invalid {
        path: PathBuf,
        field: String,
        problem: String,
    },
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text` (read from `path`, for messages).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            // As the parser lays it out: the line, a caret under the column.
            message: e.to_string().trim_end().to_owned(),
        })?;
        config
            .validate()
            .map_err(|(field, problem)| ConfigError::Invalid {
                path: path.to_owned(),
                field,
                problem,
            })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let field = |name: &str, problem: String| Err((name.to_owned(), problem));
        if self.mode.uses_xdp() && self.interfaces.is_empty() {
            return field(
                "interfaces",
                format!(
                    "mode \"{}\" needs at least one interface or pattern (default: \"all\")",
                    self.mode.name()
                ),
            );
        }
        for (key, list) in [
            ("interfaces", &self.interfaces),
            ("exclude_interfaces", &self.exclude_interfaces),
        ] {
            let mut seen = BTreeSet::new();
            for (i, name) in list.iter().enumerate() {
                let here = format!("{key}[{i}]");
                if !seen.insert(name) {
                    return field(&here, format!("{name:?} is listed twice"));
                }
                match InterfacePattern::parse(name) {
                    Err(problem) => return field(&here, problem),
                    // A plain name must exist: most likely a typo otherwise.
                    Ok(InterfacePattern::Name(_)) if interface_index(name).is_none() => {
                        return field(
                            &here,
                            format!("no interface named {name:?} in this network namespace"),
                        );
                    }
                    Ok(_) => {}
                }
            }
        }
        if !(Duration::from_secs(1)..=Duration::from_hours(1)).contains(&self.reconcile_interval) {
            return field("reconcile_interval", "must be between 1s and 1h".into());
        }
        let table_ok = !self.nft_table.is_empty()
            && self.nft_table.len() <= 64
            && self
                .nft_table
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !table_ok {
            return field(
                "nft_table",
                "1 to 64 characters among letters, digits and '_'".into(),
            );
        }
        for (name, path) in [
            ("database", &self.database),
            ("pin_dir", &self.pin_dir),
            ("api.unix_socket", &self.api.unix_socket),
        ] {
            if !path.is_absolute() {
                return field(name, format!("{} is not an absolute path", path.display()));
            }
        }
        if let Some(key) = &self.audit.signing_key
            && !key.is_absolute()
        {
            return field(
                "audit.signing_key",
                format!("{} is not an absolute path", key.display()),
            );
        }
        if let Some(group) = &self.api.socket_group
            && let Err(problem) = group_id(group)
        {
            return field("api.socket_group", problem);
        }
        if !(1..=4096).contains(&self.api.max_streams_per_principal) {
            return field("api.max_streams_per_principal", "must be 1 to 4096".into());
        }
        if !(Duration::from_secs(1)..=Duration::from_hours(1))
            .contains(&self.api.stream_stall_timeout)
        {
            return field(
                "api.stream_stall_timeout",
                "must be between 1s and 1h".into(),
            );
        }
        if !(1..=1_000_000).contains(&self.audit.checkpoint_every_records) {
            return field(
                "audit.checkpoint_every_records",
                "must be 1 to 1000000".into(),
            );
        }
        if !(Duration::from_secs(1)..=Duration::from_hours(24))
            .contains(&self.audit.checkpoint_interval)
        {
            return field(
                "audit.checkpoint_interval",
                "must be between 1s and 24h".into(),
            );
        }
        if self.audit.denied_retention < Duration::from_secs(1) {
            return field("audit.denied_retention", "must be at least 1s".into());
        }
        let mut uids = BTreeSet::new();
        for (i, principal) in self.api.principals.iter().enumerate() {
            if principal.uid == 0 || !uids.insert(principal.uid) {
                return field(
                    &format!("api.principals[{i}].uid"),
                    format!("uid {} is root or listed twice", principal.uid),
                );
            }
        }
        if let Some(rules) = &self.policy {
            Policy::validate_rules(rules).or_else(|r| field("policy", r.message))?;
        }
        self.approvals.validate()?;
        if let Some(tls) = &self.api.tls {
            tls.validate()?;
            // Without a [[policy]], the default one applies on a first start.
            let default_rules = Policy::default().rules;
            let rules = self.policy.as_deref().unwrap_or(&default_rules);
            tls.check_policy(rules)
                .or_else(|r| field("policy", r.message))?;
        }
        if let Some(fleet) = &self.fleet {
            fleet.validate()?;
        }
        self.validate_flows()
    }

    fn validate_flows(&self) -> Result<(), (String, String)> {
        let field = |name: &str, problem: String| Err((name.to_owned(), problem));
        let flows = &self.flows;
        if !(1_024..=16_777_216).contains(&flows.capacity) {
            return field("flows.capacity", "must be between 1024 and 16777216".into());
        }
        if !(1..=flows.capacity).contains(&flows.per_grant_quota) {
            return field(
                "flows.per_grant_quota",
                format!("must be between 1 and flows.capacity ({})", flows.capacity),
            );
        }
        if !(Duration::from_secs(1)..=Duration::from_mins(5)).contains(&flows.half_open_timeout) {
            return field(
                "flows.half_open_timeout",
                "must be between 1s and 5m".into(),
            );
        }
        if !(Duration::from_secs(1)..=Duration::from_hours(1))
            .contains(&self.denials.summary_interval)
        {
            return field(
                "denials.summary_interval",
                "must be between 1s and 1h".into(),
            );
        }
        Ok(())
    }
}

/// One entry of `interfaces` or `exclude_interfaces`.
#[derive(Clone, Debug)]
enum InterfacePattern {
    Name(String),
    Pattern(glob::Pattern),
}

impl InterfacePattern {
    fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() || text.len() > 64 || text.contains(['/', '\0']) {
            return Err(format!("{text:?} is not an interface name or pattern"));
        }
        if text == ALL_INTERFACES {
            return Ok(InterfacePattern::Pattern(
                glob::Pattern::new("*").expect("a valid pattern"),
            ));
        }
        if text.contains(['*', '?', '[']) {
            return glob::Pattern::new(text)
                .map(InterfacePattern::Pattern)
                .map_err(|e| format!("pattern {text:?}: {e}"));
        }
        Ok(InterfacePattern::Name(text.to_owned()))
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            InterfacePattern::Name(n) => n == name,
            InterfacePattern::Pattern(p) => p.matches(name),
        }
    }
}

/// Whether the configuration puts an interface under XDP, and why not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coverage {
    Covered,
    /// No entry of `interfaces` matches it.
    NotListed,
    /// An entry of `exclude_interfaces` matches it.
    Excluded,
    /// Loopback, not named: it carries this host's own traffic, which is
    /// inside the gate already. Naming it puts it under XDP.
    Loopback,
}

impl Config {
    /// Whether XDP should gate interface `name` (a loopback one if `loopback`).
    pub fn coverage(&self, name: &str, loopback: bool) -> Coverage {
        let entries = |list: &[String]| -> Vec<InterfacePattern> {
            list.iter()
                .filter_map(|text| InterfacePattern::parse(text).ok())
                .collect()
        };
        if entries(&self.exclude_interfaces)
            .iter()
            .any(|p| p.matches(name))
        {
            return Coverage::Excluded;
        }
        let include = entries(&self.interfaces);
        if include
            .iter()
            .any(|p| matches!(p, InterfacePattern::Name(n) if n == name))
        {
            return Coverage::Covered;
        }
        if loopback {
            Coverage::Loopback
        } else if include.iter().any(|p| p.matches(name)) {
            Coverage::Covered
        } else {
            Coverage::NotListed
        }
    }
}

impl Config {
    /// The audit signing key's path: configured, or beside the database.
    pub fn signing_key(&self) -> PathBuf {
        self.audit
            .signing_key
            .clone()
            .unwrap_or_else(|| self.database.with_file_name("audit-signing.key"))
    }
}

/// The id of group `name`, or why there is none.
pub fn group_id(name: &str) -> Result<u32, String> {
    let c_name = CString::new(name).map_err(|_| format!("{name:?} contains NUL"))?;
    // SAFETY: getgrnam reads a NUL-terminated string and returns a pointer
    // to static storage or null; the gid is copied out at once (the agent
    // calls it from one thread at start and reload).
    let entry = unsafe { libc::getgrnam(c_name.as_ptr()) };
    if entry.is_null() {
        return Err(format!("no group named {name:?} on this host"));
    }
    // SAFETY: non-null pointer to a valid struct group, see above.
    Ok(unsafe { (*entry).gr_gid })
}

/// The kernel's index of interface `name` in this namespace, if it exists.
pub fn interface_index(name: &str) -> Option<u32> {
    let c_name = CString::new(name).ok()?;
    // SAFETY: c_name is a valid NUL-terminated string for the call's duration.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    (index != 0).then_some(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/jit-gate/agent.toml"))
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let config = parse("interfaces = [\"lo\"]").unwrap();
        assert_eq!(config.mode, Mode::XdpAndNftables);
        assert_eq!(
            config.api.unix_socket,
            PathBuf::from("/run/jit-gate/agent.sock")
        );
        assert_eq!(config.nft_table, "jit_gate");
        assert_eq!(config.reconcile_interval, Duration::from_secs(5));
        assert!(config.policy.is_none());
        assert_eq!(config.flows.capacity, 262_144);
        assert_eq!(config.flows.per_grant_quota, 64);
        assert_eq!(config.flows.half_open_timeout, Duration::from_secs(30));
        assert_eq!(config.denials.summary_interval, Duration::from_mins(1));
        assert_eq!(config.approvals.pending_timeout, Duration::from_hours(24));
        assert_eq!(config.approvals.max_pending_per_principal, 16);
        assert_eq!(config.approvals.max_pending, 10_000);
    }

    #[test]
    fn every_interface_is_covered_by_default_but_loopback() {
        let config = parse("").unwrap();
        assert_eq!(config.interfaces, ["all"]);
        assert_eq!(config.coverage("eth0", false), Coverage::Covered);
        assert_eq!(config.coverage("vxlan7", false), Coverage::Covered);
        assert_eq!(config.coverage("lo", true), Coverage::Loopback);
        let config =
            parse("interfaces = [\"veth*\", \"lo\"]\nexclude_interfaces = [\"veth9*\"]").unwrap();
        assert_eq!(config.coverage("veth1", false), Coverage::Covered);
        assert_eq!(config.coverage("veth91", false), Coverage::Excluded);
        assert_eq!(config.coverage("eth0", false), Coverage::NotListed);
        assert_eq!(config.coverage("lo", true), Coverage::Covered, "named");
    }

    #[test]
    fn full_config() {
        let config = parse(
            r#"
            mode = "nftables"
            database = "/tmp/x.db"
            reconcile_interval = "2s"
            [api]
            unix_socket = "/tmp/agent.sock"
            principals = [{ uid = 1001, role = "broker" }]
            [[policy]]
            port = 22
            protocol = "tcp"
            max_duration = "1h"
            allowed_sources = ["198.51.100.0/24"]
            [[policy]]
            port = 500
            protocol = "both"
            require_ticket = true
            "#,
        )
        .unwrap();
        let rules = config.policy.unwrap();
        assert_eq!(rules[0].max_duration, Duration::from_hours(1));
        assert_eq!(rules[1].max_duration, crate::policy::DEFAULT_MAX_DURATION);
        assert!(rules[1].require_ticket);
        assert_eq!(config.api.principals[0].role, Role::Broker);
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/agent.toml"));
        let text = std::fs::read_to_string(path).unwrap();
        let config = Config::parse(&text, path).unwrap();
        assert_eq!(config.interfaces, ["all"]);
        assert_eq!(config.policy.unwrap().len(), 4);
    }

    #[test]
    fn errors_name_the_field() {
        for (text, needle) in [
            ("interfaces = []", "field `interfaces`"),
            ("interfaces = [\"eth[\"]", "field `interfaces[0]`: pattern"),
            (
                "exclude_interfaces = [\"nosuch0\"]",
                "field `exclude_interfaces[0]`: no interface named",
            ),
            (
                "interfaces = [\"nosuch0\"]",
                "field `interfaces[0]`: no interface named",
            ),
            ("interfaces = [\"lo\", \"lo\"]", "listed twice"),
            (
                "interfaces = [\"lo\"]\nmode = \"ebpf\"",
                "unknown variant `ebpf`",
            ),
            (
                "interfaces = [\"lo\"]\ncolour = 1",
                "unknown field `colour`",
            ),
            (
                "interfaces = [\"lo\"]\nreconcile_interval = \"0s\"",
                "field `reconcile_interval`",
            ),
            (
                "interfaces = [\"lo\"]\nnft_table = \"a b\"",
                "field `nft_table`",
            ),
            (
                "interfaces = [\"lo\"]\ndatabase = \"rel.db\"",
                "field `database`",
            ),
            (
                "interfaces = [\"lo\"]\n[[policy]]\nport = 22\nprotocol = \"tcp\"\nmax_duration = \"25h\"",
                "field `policy`: rule 22/tcp: max_duration 1day 1h is outside",
            ),
            (
                "interfaces = [\"lo\"]\n[[policy]]\nport = 22\nprotocol = \"tcp\"\nmax_duration = \"soon\"",
                "max_duration = \"soon\"",
            ),
            (
                "interfaces = [\"lo\"]\n[api]\nprincipals = [{ uid = 0, role = \"admin\" }]",
                "api.principals[0].uid",
            ),
            (
                "interfaces = [\"lo\"]\n[api]\nprincipals = [{ uid = 5, role = \"god\" }]",
                "unknown variant `god`",
            ),
            (
                "interfaces = [\"lo\"]\n[api]\nsocket_group = \"no-such-group-here\"",
                "field `api.socket_group`: no group named \"no-such-group-here\"",
            ),
            (
                "interfaces = [\"lo\"]\n[audit]\nsigning_key = \"key\"",
                "field `audit.signing_key`",
            ),
            (
                "interfaces = [\"lo\"]\n[flows]\ncapacity = 10",
                "field `flows.capacity`",
            ),
            (
                "interfaces = [\"lo\"]\n[flows]\ncapacity = 2048\nper_grant_quota = 4096",
                "field `flows.per_grant_quota`: must be between 1 and flows.capacity (2048)",
            ),
            (
                "interfaces = [\"lo\"]\n[flows]\nhalf_open_timeout = \"0s\"",
                "field `flows.half_open_timeout`",
            ),
            (
                "interfaces = [\"lo\"]\n[denials]\nsummary_interval = \"2h\"",
                "field `denials.summary_interval`",
            ),
            (
                "interfaces = [\"lo\"]\n[approvals]\npending_timeout = \"8days\"",
                "field `approvals.pending_timeout`",
            ),
            (
                "interfaces = [\"lo\"]\n[approvals]\nmax_pending = 4\nmax_pending_per_principal = 5",
                "field `approvals.max_pending_per_principal`",
            ),
            (
                "interfaces = [\"lo\"]\n[[policy]]\nport = 22\nprotocol = \"tcp\"\napprovals = 4",
                "field `policy`: rule 22/tcp: approvals 4 is above the maximum of 3",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(err.starts_with("/etc/jit-gate/agent.toml: "), "{err}");
        }
    }
}
