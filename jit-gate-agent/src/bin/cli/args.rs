//! Command line: the options and subcommands, and the parsers that turn
//! their text into typed values so mistakes are reported before any agent
//! is contacted (clap exits with status 2).

use std::{path::PathBuf, str::FromStr, time::Duration};

use clap::{ArgGroup, Args, Parser, Subcommand};
use ipnet::IpNet;
use jit_gate_agent::{net::Protocol, policy::RuleProtocol, proto::EventKind, validate};

use crate::{connect::Agent, convert, tls::TlsArgs};

/// Operator client of the jit-gate agent: opens management ports for a
/// source for a bounded time, and shows and changes the gate's state.
#[derive(Debug, Parser)]
#[command(name = "jit-gate", version)]
pub(crate) struct Cli {
    /// Agent: a socket (a path, `unix:/path` or `unix:///path`) or a
    /// mutual-TLS listener (`https://host:port`); repeat to run the command
    /// on several agents at once. Before the subcommand. Default:
    /// /run/jit-gate/agent.sock unless --agents-file is given.
    // Not global: clap keeps only the values after the subcommand when a
    // global option is given on both sides, which would drop agents.
    #[arg(long = "agent", value_name = "SOCKET|URL")]
    pub agents: Vec<Agent>,
    /// A file of agents, one per line, as --agent takes them (`#` starts a
    /// comment); added to the --agent ones. Before the subcommand.
    #[arg(long, value_name = "FILE")]
    pub agents_file: Option<PathBuf>,
    /// Agents contacted at once at most.
    #[arg(long, value_name = "N", default_value_t = 64, global = true,
          value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub concurrency: u16,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Machine-readable output (JSON).
    #[arg(long, global = true)]
    pub json: bool,
    /// Longest wait for each agent (connect and answer), e.g. "10s", "500ms".
    #[arg(long, value_name = "DURATION", global = true, default_value = "10s", value_parser = parse_timeout)]
    pub timeout: Duration,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Enforcement per interface, figures per port, active grants.
    Status,
    /// Show or change the policy (which ports are protected, and how).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Open ports for a source for a bounded time (all or nothing).
    Request(RequestArgs),
    /// End a grant early.
    Revoke(RevokeArgs),
    /// List grants (active ones unless --all).
    Grants(GrantsArgs),
    /// Connections to protected ports that the gate lets through.
    Connections,
    /// Stream audit events until interrupted.
    Watch(WatchArgs),
    /// List access requests waiting for approval (all with --all).
    Requests(crate::approvals::RequestsArgs),
    /// Approve another principal's pending access request (role approver).
    Approve(crate::approvals::ApproveArgs),
    /// Deny another principal's pending access request (role approver).
    Deny(crate::approvals::DenyArgs),
    /// Verify, checkpoint or export the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Fleet mode: write grants into etcd for hosts and labels, revoke them,
    /// and read each host's outcome (no agent is contacted).
    Fleet(crate::fleet::FleetArgs),
}

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Verify the hash chain and any kept checkpoints. Exit status 3 if the
    /// log is broken (1 if the agent could not be asked).
    Verify {
        /// A file of checkpoints kept from `audit checkpoint` (one JSON
        /// object per line); repeatable.
        #[arg(long = "checkpoint", value_name = "FILE")]
        checkpoints: Vec<PathBuf>,
    },
    /// Print a signed checkpoint of the log's head as one JSON line, to keep.
    Checkpoint,
    /// Print stored events matching the filters, then exit.
    Export(ExportArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ExportFormat {
    Csv,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Args)]
pub(crate) struct ExportArgs {
    #[arg(long, value_enum, default_value = "csv")]
    pub format: ExportFormat,
    /// Events at or after this time (RFC 3339).
    #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp)]
    pub since: Option<prost_types::Timestamp>,
    /// Events before this time (RFC 3339).
    #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp)]
    pub until: Option<prost_types::Timestamp>,
    /// Events about this port.
    #[arg(long, value_name = "N", value_parser = parse_port)]
    pub port: Option<u16>,
    /// Events of this principal ("uid:1001", "agent").
    #[arg(long, value_name = "NAME")]
    pub principal: Option<String>,
    /// Only events of this kind; repeatable.
    #[arg(long = "kind", value_name = "KIND", value_parser = parse_event_kind)]
    pub kinds: Vec<EventKind>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCommand {
    /// Show the policy.
    Show,
    #[command(flatten)]
    Change(PolicyChange),
}

#[derive(Debug, Subcommand)]
pub(crate) enum PolicyChange {
    /// Replace the whole policy with the `[[policy]]` rules of a TOML file.
    Set {
        /// TOML file with `[[policy]]` tables, as in the agent's configuration.
        #[arg(long, value_name = "POLICY.TOML")]
        file: PathBuf,
        #[command(flatten)]
        revision: ExpectRevision,
    },
    /// Protect a port, or change the rule of a protected port.
    AddPort {
        #[arg(value_parser = parse_port)]
        port: u16,
        /// tcp, udp or both.
        #[arg(long, default_value = "tcp")]
        protocol: RuleProtocol,
        /// Sources requests may open the port for (address or prefix);
        /// repeatable. None: any source.
        #[arg(long = "allow", value_name = "PREFIX", value_parser = parse_prefix)]
        allow: Vec<IpNet>,
        /// Longest grant on this port (1m to 24h). Default: 3h.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        max_duration: Option<Duration>,
        /// Requests must give a justification.
        #[arg(long)]
        require_justification: bool,
        /// Requests must give a ticket.
        #[arg(long)]
        require_ticket: bool,
        /// Distinct approvers a request needs before it is granted (0 to 3).
        #[arg(long, value_name = "N", default_value_t = 0,
              value_parser = clap::value_parser!(u8).range(0..=3))]
        approvals: u8,
        #[command(flatten)]
        revision: ExpectRevision,
    },
    /// Stop protecting a port; ends its grants.
    RemovePort {
        #[arg(value_parser = parse_port)]
        port: u16,
        /// The protocol of the rule to remove: tcp, udp or both.
        #[arg(long, default_value = "tcp")]
        protocol: RuleProtocol,
        #[command(flatten)]
        revision: ExpectRevision,
    },
}

#[derive(Debug, Args)]
pub(crate) struct ExpectRevision {
    /// Apply only if the policy is at this revision (compare-and-set).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub expect_revision: Option<u64>,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("lifetime").required(true).args(["duration", "until"])))]
pub(crate) struct RequestArgs {
    /// Ports to open: `22`, `22/tcp`, `53/udp`. Without a protocol: every
    /// protocol the port's rule covers.
    #[arg(required = true, value_name = "PORT[/PROTO]")]
    pub ports: Vec<PortSpec>,
    /// Source address or prefix the ports are opened for.
    #[arg(long, value_name = "ADDR|PREFIX", value_parser = parse_prefix)]
    pub source: IpNet,
    /// How long the grant lasts, e.g. "30m", "2h".
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// When the grant ends (RFC 3339, e.g. 2030-01-31T18:00:00Z).
    #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp)]
    pub until: Option<prost_types::Timestamp>,
    /// Who the access is for. Default: $USER, else "uid:<uid>".
    #[arg(long, value_name = "NAME")]
    pub requester: Option<String>,
    /// Why the access is needed (the port's rule may require it).
    #[arg(long, value_name = "TEXT")]
    pub justification: Option<String>,
    /// Change or incident ticket (the port's rule may require it).
    #[arg(long, value_name = "TICKET")]
    pub ticket: Option<String>,
    /// Idempotency key; a retry with the same id returns the first grants.
    /// Default: a random UUID, shared by all agents of this invocation.
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
    /// Each grant admits at most N new connections in all (1: single use);
    /// those opened continue until they end. Default: no limit.
    #[arg(long, value_name = "N", value_parser = parse_max_connections)]
    pub max_connections: Option<u32>,
    /// If the request is held for approval, wait until it is approved,
    /// denied or expires (one agent only). Exit status: 0 granted, 4 denied,
    /// 5 expired, 6 refused by the policy when approved, 7 still pending
    /// after --wait-timeout.
    #[arg(long)]
    pub wait: bool,
    /// Longest wait with --wait, e.g. "15m".
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_timeout,
          requires = "wait")]
    pub wait_timeout: Duration,
}

#[derive(Debug, Args)]
pub(crate) struct RevokeArgs {
    /// The grant's id, as `request` and `grants` show it.
    pub grant_id: u64,
    /// Also end the connections opened under the grant.
    #[arg(long)]
    pub terminate: bool,
    /// Recorded in the audit log.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct GrantsArgs {
    /// Include grants that have ended (newest first).
    #[arg(long)]
    pub all: bool,
    /// Only grants on this port.
    #[arg(long, value_name = "N", value_parser = parse_port)]
    pub port: Option<u16>,
    /// At most this many grants (default: all, read page by page).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: Option<u32>,
}

#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    /// Replay stored events after this sequence number first.
    #[arg(long, value_name = "SEQ")]
    pub after: Option<u64>,
    /// Only events of this kind (e.g. grant-created); repeatable.
    #[arg(long = "kind", value_name = "KIND", value_parser = parse_event_kind)]
    pub kinds: Vec<EventKind>,
}

/// A port to open and, optionally, the one protocol to open it for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PortSpec {
    pub port: u16,
    pub protocol: Option<Protocol>,
}

impl FromStr for PortSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (port, protocol) = match s.split_once('/') {
            Some((port, protocol)) => (port, Some(protocol.parse().map_err(|e| format!("{e}"))?)),
            None => (s, None),
        };
        Ok(PortSpec {
            port: parse_port(port)?,
            protocol,
        })
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    let value = s
        .parse::<u32>()
        .map_err(|_| format!("{s:?} is not a port (1 to 65535)"))?;
    validate::port(value).map_err(|e| format!("{e} (1 to 65535)"))
}

/// A limit on connections: 1 to the agent's bound (0 is "no limit", which
/// leaving the option out says).
fn parse_max_connections(s: &str) -> Result<u32, String> {
    let value = s
        .parse::<u32>()
        .map_err(|_| format!("{s:?} is not a number of connections"))?;
    if value == 0 {
        return Err("0 would mean no limit: leave --max-connections out instead".into());
    }
    validate::max_connections(value)
}

/// An address (taken as a host prefix) or a prefix without host bits.
pub(crate) fn parse_prefix(s: &str) -> Result<IpNet, String> {
    validate::address_or_prefix(s)
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like \"90s\", \"30m\" or \"2h\": {e}"))
}

/// A wait for an answer: a duration above zero (0 would fail every call
/// before it is sent).
pub(crate) fn parse_timeout(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(
            "a timeout of 0 would give up before any agent answers: give a duration like \"10s\""
                .into(),
        ),
        d => Ok(d),
    }
}

/// An RFC 3339 time with its time zone (`Z` or an offset): a time without
/// one is refused rather than read as UTC, which the person may not mean.
fn parse_timestamp(s: &str) -> Result<prost_types::Timestamp, String> {
    let example = "like 2030-01-31T18:00:00Z or 2030-01-31T19:00:00+01:00";
    let at = s
        .parse()
        .map_err(|_| format!("{s:?} is not an RFC 3339 time {example}"))?;
    // After the fixed-width date (YYYY-MM-DD) and its separator.
    let time_of_day = s.get(11..).unwrap_or_default();
    if !(time_of_day.ends_with(['Z', 'z']) || time_of_day.contains(['+', '-'])) {
        return Err(format!(
            "{s:?} has no time zone: add Z for UTC or an offset, {example}"
        ));
    }
    Ok(at)
}

/// Options of `jit-gate` itself that are not global: given after the
/// subcommand, clap reports them as unknown there. The hint says where they
/// go; `None` for any other error.
pub(crate) fn misplaced_option_hint(error: &clap::Error) -> Option<String> {
    use clap::{
        CommandFactory as _,
        error::{ContextKind, ContextValue, ErrorKind},
    };
    if error.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(given)) = error.get(ContextKind::InvalidArg) else {
        return None;
    };
    let name = given
        .split('=')
        .next()
        .unwrap_or(given)
        .strip_prefix("--")?;
    let command = Cli::command();
    command
        .get_arguments()
        .find(|arg| !arg.is_global_set() && arg.get_long() == Some(name))?;
    Some(format!(
        "--{name} is an option of jit-gate itself: give it before the command, as in `jit-gate --{name} ... status`"
    ))
}

fn parse_event_kind(s: &str) -> Result<EventKind, String> {
    let wire = format!("EVENT_KIND_{}", s.to_ascii_uppercase().replace('-', "_"));
    match EventKind::from_str_name(&wire) {
        Some(kind) if kind != EventKind::Unspecified => Ok(kind),
        _ => {
            let known: Vec<String> = (1..)
                .map_while(|n| EventKind::try_from(n).ok())
                .map(|kind| convert::event_kind(kind as i32))
                .collect();
            Err(format!(
                "unknown event kind {s:?} (one of: {})",
                known.join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("jit-gate").chain(args.iter().copied()))
    }

    fn error(args: &[&str]) -> String {
        parse(args).unwrap_err().to_string()
    }

    fn request(args: &[&str]) -> RequestArgs {
        match parse(args).unwrap().command {
            Command::Request(request) => request,
            other => panic!("{other:?}"),
        }
    }

    fn path(agent: &Agent) -> &Path {
        match agent {
            Agent::Unix(path) => path,
            Agent::Tls(target) => panic!("{target} is not a socket"),
        }
    }

    #[test]
    fn defaults() {
        let cli = parse(&["status"]).unwrap();
        assert!(cli.agents.is_empty() && cli.agents_file.is_none());
        assert!(!cli.json);
        assert_eq!(cli.timeout, Duration::from_secs(10));
        assert_eq!(cli.concurrency, 64);
    }

    #[test]
    fn tls_agents_mix_with_sockets() {
        let cli = parse(&[
            "--agent",
            "https://agent-1.example.org:9443",
            "--agent",
            "/run/a.sock",
            "--agent",
            "https://[2001:db8::7]",
            "--concurrency",
            "8",
            "status",
        ])
        .unwrap();
        let shown: Vec<String> = cli.agents.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "https://agent-1.example.org:9443",
                "/run/a.sock",
                "https://[2001:db8::7]:7443"
            ]
        );
        assert_eq!(cli.concurrency, 8);
        let err = error(&["--concurrency", "0", "status"]);
        assert!(err.contains("--concurrency"), "{err}");
    }

    #[test]
    fn agent_forms_and_global_options_after_the_subcommand() {
        let cli = parse(&[
            "--agent",
            "/run/a.sock",
            "--agent",
            "unix:/run/b.sock",
            "--agent",
            "unix:///run/c.sock",
            "--agent",
            "relative.sock",
            "status",
            "--json",
            "--timeout",
            "1500ms",
        ])
        .unwrap();
        let paths: Vec<&Path> = cli.agents.iter().map(path).collect();
        assert_eq!(
            paths,
            ["/run/a.sock", "/run/b.sock", "/run/c.sock", "relative.sock"].map(Path::new)
        );
        assert!(cli.json);
        assert_eq!(cli.timeout, Duration::from_millis(1500));
        let err = parse(&["status", "--agent", "/run/a.sock"]).unwrap_err();
        assert!(
            err.to_string().contains("unexpected argument '--agent'"),
            "{err}"
        );
        let hint = misplaced_option_hint(&err).expect("a hint");
        assert!(hint.contains("before the command"), "{hint}");
        let err = parse(&["grants", "--agents-file=fleet.txt"]).unwrap_err();
        assert!(misplaced_option_hint(&err).is_some_and(|h| h.contains("--agents-file")));
        // Not a misplaced option of jit-gate: no hint.
        let err = parse(&["grants", "--frobnicate"]).unwrap_err();
        assert_eq!(misplaced_option_hint(&err), None);
        let err = error(&["--timeout", "soon", "status"]);
        assert!(err.contains("is not a duration"), "{err}");
        let err = error(&["--timeout", "0", "status"]);
        assert!(err.contains("timeout of 0"), "{err}");
        let err = error(&["status", "--timeout", "0s"]);
        assert!(err.contains("timeout of 0"), "{err}");
    }

    #[test]
    fn bad_agents_are_refused() {
        for (agent, needle) in [
            ("http://10.0.0.1:50051", "plaintext TCP is never used"),
            ("https://10.0.0.1:7443/x", "without a path"),
            ("unix://host/run/a.sock", "unix:///path"),
            ("unix:", "empty"),
            ("", "empty"),
        ] {
            let err = error(&["--agent", agent, "status"]);
            assert!(err.contains(needle), "{agent:?}: {err}");
        }
    }

    #[test]
    fn ports_with_and_without_protocol() {
        let r = request(&[
            "request",
            "22",
            "53/udp",
            "3389/TCP",
            "--source",
            "198.51.100.7",
            "--duration",
            "30m",
        ]);
        assert_eq!(
            r.ports,
            [
                PortSpec {
                    port: 22,
                    protocol: None
                },
                PortSpec {
                    port: 53,
                    protocol: Some(Protocol::Udp)
                },
                PortSpec {
                    port: 3389,
                    protocol: Some(Protocol::Tcp)
                },
            ]
        );
        assert_eq!(r.source, "198.51.100.7/32".parse::<IpNet>().unwrap());
        assert_eq!(r.duration, Some(Duration::from_mins(30)));
        assert!(r.until.is_none() && r.requester.is_none() && r.request_id.is_none());
    }

    #[test]
    fn bad_ports_and_sources_say_what_is_wrong() {
        for (args, needle) in [
            (&["0"][..], "port 0 is not in 1..=65535 (1 to 65535)"),
            (&["65536"], "port 65536 is not in 1..=65535"),
            (&["ssh"], "\"ssh\" is not a port"),
            (&["22/sctp"], "unknown protocol \"sctp\""),
            (&["22/"], "unknown protocol \"\""),
        ] {
            let mut full = vec!["request"];
            full.extend_from_slice(args);
            full.extend(["--source", "10.0.0.1", "--duration", "1h"]);
            let err = error(&full);
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        for (source, needle) in [
            ("10.0.0.300", "is not an IPv4/IPv6 address or prefix"),
            (
                "198.51.100.7/24",
                "host bits set (did you mean 198.51.100.0/24?)",
            ),
        ] {
            let err = error(&["request", "22", "--source", source, "--duration", "1h"]);
            assert!(err.contains(needle), "{source}: {err}");
        }
    }

    #[test]
    fn duration_and_until_are_exclusive_and_one_is_required() {
        let r = request(&[
            "request",
            "22",
            "--source",
            "2001:db8::/32",
            "--until",
            "2030-01-31T19:00:00+01:00",
        ]);
        assert_eq!(r.until.unwrap().to_string(), "2030-01-31T18:00:00Z");
        let both = error(&[
            "request",
            "22",
            "--source",
            "10.0.0.1",
            "--duration",
            "1h",
            "--until",
            "2030-01-31T18:00:00Z",
        ]);
        assert!(both.contains("cannot be used with"), "{both}");
        let neither = error(&["request", "22", "--source", "10.0.0.1"]);
        assert!(
            neither.contains("--duration <DURATION>|--until <RFC3339>"),
            "{neither}"
        );
        let no_port = error(&["request", "--source", "10.0.0.1", "--duration", "1h"]);
        assert!(no_port.contains("PORT[/PROTO]"), "{no_port}");
        let bad_duration = error(&[
            "request",
            "22",
            "--source",
            "10.0.0.1",
            "--duration",
            "soon",
        ]);
        assert!(bad_duration.contains("is not a duration"), "{bad_duration}");
        let bad_time = error(&[
            "request", "22", "--source", "10.0.0.1", "--until", "tomorrow",
        ]);
        assert!(bad_time.contains("is not an RFC 3339 time"), "{bad_time}");
        for local in [
            "2030-01-31T18:00:00",
            "2030-01-31 18:00:00",
            "2030-01-31t18:00:00.5",
        ] {
            let no_zone = error(&["request", "22", "--source", "10.0.0.1", "--until", local]);
            assert!(no_zone.contains("has no time zone"), "{local}: {no_zone}");
        }
        let utc = request(&[
            "request",
            "22",
            "--source",
            "10.0.0.1",
            "--until",
            "2030-01-31T18:00:00-02:30",
        ]);
        assert_eq!(utc.until.unwrap().to_string(), "2030-01-31T20:30:00Z");
    }

    #[test]
    fn policy_subcommands() {
        let cli = parse(&[
            "policy",
            "add-port",
            "5986",
            "--protocol",
            "both",
            "--allow",
            "10.0.0.0/8",
            "--allow",
            "2001:db8::1",
            "--max-duration",
            "1h",
            "--require-ticket",
            "--approvals",
            "2",
            "--expect-revision",
            "7",
        ])
        .unwrap();
        let Command::Policy(PolicyCommand::Change(PolicyChange::AddPort {
            port,
            protocol,
            allow,
            max_duration,
            require_justification,
            require_ticket,
            approvals,
            revision,
        })) = cli.command
        else {
            panic!("{:?}", cli.command)
        };
        assert_eq!((port, protocol), (5986, RuleProtocol::Both));
        assert_eq!(
            allow,
            ["10.0.0.0/8", "2001:db8::1/128"].map(|p| p.parse::<IpNet>().unwrap())
        );
        assert_eq!(max_duration, Some(Duration::from_hours(1)));
        assert!(!require_justification && require_ticket);
        assert_eq!(approvals, 2);
        assert_eq!(revision.expect_revision, Some(7));
        let err = error(&["policy", "add-port", "22", "--approvals", "4"]);
        assert!(err.contains("0..=3"), "{err}");

        let err = error(&["policy", "remove-port", "22", "--protocol", "icmp"]);
        assert!(err.contains("expected tcp, udp or both"), "{err}");
        let err = error(&[
            "policy",
            "set",
            "--file",
            "p.toml",
            "--expect-revision",
            "0",
        ]);
        assert!(err.contains("--expect-revision"), "{err}");
        assert!(error(&["policy", "set"]).contains("--file"));
    }

    #[test]
    fn event_kinds() {
        let Command::Watch(watch) = parse(&[
            "watch",
            "--after",
            "41",
            "--kind",
            "grant-created",
            "--kind",
            "ACCESS_DENIED",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(watch.after, Some(41));
        assert_eq!(
            watch.kinds,
            [EventKind::GrantCreated, EventKind::AccessDenied]
        );
        for kind in ["unspecified", "granted"] {
            let err = error(&["watch", "--kind", kind]);
            assert!(
                err.contains("unknown event kind")
                    && err.contains("grant-created, request-refused"),
                "{err}"
            );
        }
    }

    #[test]
    fn grants_and_revoke() {
        let Command::Grants(grants) = parse(&["grants", "--all", "--port", "22", "--limit", "5"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert!(grants.all);
        assert_eq!((grants.port, grants.limit), (Some(22), Some(5)));
        assert!(error(&["grants", "--limit", "0"]).contains("--limit"));
        assert!(error(&["revoke", "-3"]).contains("GRANT_ID"));
        let Command::Revoke(revoke) = parse(&["revoke", "12", "--terminate", "--reason", "done"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(revoke.grant_id, 12);
        assert!(revoke.terminate);
        assert_eq!(revoke.reason.as_deref(), Some("done"));
    }
}
