//! Each subcommand as an API request, run on every agent through the fleet.

use std::path::Path;

use anyhow::Context as _;
use jit_gate_agent::{
    policy,
    proto::{
        self, AccessRequest, GetPolicyRequest, GetStatusRequest, ListConnectionsRequest,
        ListGrantsRequest, PortAccess, RevokeGrantRequest, RuleKey, UpdatePolicyRequest,
        access_request::Lifetime, update_policy_request::Change,
    },
    wire,
};
use serde::Deserialize;

use crate::{
    approvals,
    args::{Cli, Command, PolicyChange, PolicyCommand, RequestArgs},
    audit,
    connect::{Agent, Fleet, read_agents_file},
    output::report,
    watch,
};

const DEFAULT_SOCKET: &str = "/run/jit-gate/agent.sock";

/// How a command ended, beyond "every agent answered".
pub(crate) enum Outcome {
    Success,
    /// A call failed on some agent.
    Failure,
    /// An agent's audit log does not verify.
    AuditBroken,
    /// `request --wait` ended without a grant: how (its exit status).
    NotGranted(approvals::WaitEnd),
}

impl From<bool> for Outcome {
    fn from(ok: bool) -> Self {
        if ok {
            Outcome::Success
        } else {
            Outcome::Failure
        }
    }
}

/// Runs the command. `Err` is a local problem found before any agent was
/// contacted.
pub(crate) async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let mut agents = cli.agents;
    if let Some(file) = &cli.agents_file {
        agents.extend(read_agents_file(file)?);
    }
    if agents.is_empty() && cli.agents_file.is_none() {
        agents.push(Agent::Unix(DEFAULT_SOCKET.into()));
    }
    anyhow::ensure!(!agents.is_empty(), "no agent to contact");
    let tls = if agents.iter().any(Agent::is_tls) {
        Some(cli.tls.client_config()?)
    } else {
        None
    };
    let fleet = Fleet {
        agents,
        timeout: cli.timeout,
        concurrency: cli.concurrency.into(),
        tls,
    };
    let json = cli.json;
    Ok(match cli.command {
        Command::Status => report(
            &fleet
                .call(GetStatusRequest {}, |mut c, r| async move {
                    c.get_status(r).await
                })
                .await,
            json,
        ),
        Command::Policy(PolicyCommand::Show) => report(
            &fleet
                .call(GetPolicyRequest {}, |mut c, r| async move {
                    c.get_policy(r).await
                })
                .await,
            json,
        ),
        Command::Policy(PolicyCommand::Change(change)) => {
            let request = policy_change(change)?;
            report(
                &fleet
                    .call(request, |mut c, r| async move { c.update_policy(r).await })
                    .await,
                json,
            )
        }
        Command::Request(args) if args.wait => {
            let timeout = args.wait_timeout;
            return approvals::request_and_wait(&fleet, access_request(args), timeout, json).await;
        }
        Command::Request(args) => report(
            &fleet
                .call(access_request(args), |mut c, r| async move {
                    c.request_access(r).await
                })
                .await,
            json,
        ),
        Command::Requests(args) => approvals::list(&fleet, &args, json).await,
        Command::Approve(args) => approvals::approve(&fleet, args, json).await,
        Command::Deny(args) => approvals::deny(&fleet, args, json).await,
        Command::Revoke(args) => {
            let request = RevokeGrantRequest {
                grant_id: args.grant_id,
                terminate_connections: args.terminate,
                reason: args.reason.unwrap_or_default(),
            };
            report(
                &fleet
                    .call(request, |mut c, r| async move { c.revoke_grant(r).await })
                    .await,
                json,
            )
        }
        Command::Grants(args) => {
            let request = ListGrantsRequest {
                include_ended: args.all,
                port: args.port.map_or(0, u32::from),
                limit: 0,
                page_size: 0,
                page_token: String::new(),
            };
            let wanted = args.limit.map_or(usize::MAX, |n| n as usize);
            report(
                &fleet.call(request, |c, r| all_pages(c, r, wanted)).await,
                json,
            )
        }
        Command::Audit(command) => return audit::run(&fleet, command, json).await,
        Command::Connections => report(
            &fleet
                .call(ListConnectionsRequest {}, |mut c, r| async move {
                    c.list_connections(r).await
                })
                .await,
            json,
        ),
        Command::Watch(args) => watch::run(&fleet, args, json).await,
        // etcd, not the agents, is contacted.
        Command::Fleet(args) => return crate::fleet::run(args, json).await,
    }
    .into())
}

/// Grants page after page until `wanted` or the last page; the response's
/// `next_page_token` is set if `wanted` cut the list short.
async fn all_pages(
    mut client: crate::connect::Client,
    mut request: ListGrantsRequest,
    wanted: usize,
) -> Result<tonic::Response<proto::ListGrantsResponse>, tonic::Status> {
    let mut all = proto::ListGrantsResponse::default();
    loop {
        let page = client.list_grants(request.clone()).await?.into_inner();
        all.grants.extend(page.grants);
        all.next_page_token = page.next_page_token;
        if all.grants.len() >= wanted {
            // A cut list says so: the last page token stays set.
            if all.grants.len() > wanted {
                all.next_page_token = all.grants[wanted - 1].id.to_string();
                all.grants.truncate(wanted);
            }
            break;
        }
        if all.next_page_token.is_empty() {
            break;
        }
        request.page_token.clone_from(&all.next_page_token);
    }
    Ok(tonic::Response::new(all))
}

/// The `UpdatePolicy` request for `policy set|add-port|remove-port`.
fn policy_change(command: PolicyChange) -> anyhow::Result<UpdatePolicyRequest> {
    let (change, revision) = match command {
        PolicyChange::Set { file, revision } => {
            let rules = read_policy_file(&file)?;
            let replace = proto::Policy {
                rules: rules.iter().map(proto::PortRule::from).collect(),
                revision: 0,
            };
            (Change::Replace(replace), revision)
        }
        PolicyChange::AddPort {
            port,
            protocol,
            allow,
            max_duration,
            require_justification,
            require_ticket,
            approvals,
            revision,
        } => {
            let rule = policy::PortRule {
                allowed_sources: allow,
                max_duration: max_duration.unwrap_or(policy::DEFAULT_MAX_DURATION),
                require_justification,
                require_ticket,
                approvals,
                ..policy::PortRule::open(port, protocol)
            };
            // Same checks as the agent, so a bad rule is refused once here
            // rather than once per agent.
            rule.validate().map_err(|r| anyhow::anyhow!(r.message))?;
            (Change::UpsertRule(proto::PortRule::from(&rule)), revision)
        }
        PolicyChange::RemovePort {
            port,
            protocol,
            revision,
        } => {
            let key = RuleKey {
                port: port.into(),
                protocol: proto::Protocol::from(protocol) as i32,
            };
            (Change::RemoveRule(key), revision)
        }
    };
    Ok(UpdatePolicyRequest {
        change: Some(change),
        expected_revision: revision.expect_revision.unwrap_or(0),
    })
}

/// The `[[policy]]` tables of a TOML file, in the agent configuration's
/// format, validated as the agent would.
fn read_policy_file(path: &Path) -> anyhow::Result<Vec<policy::PortRule>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct PolicyFile {
        policy: Vec<policy::PortRule>,
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: PolicyFile = toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: {}",
            path.display(),
            e.to_string().trim_end().replace('\n', " | ")
        )
    })?;
    policy::Policy::validate_rules(&file.policy)
        .map_err(|r| anyhow::anyhow!("{}: {}", path.display(), r.message))?;
    Ok(file.policy)
}

fn access_request(args: RequestArgs) -> AccessRequest {
    // An address goes out as an address, a prefix in canonical form.
    let source = if args.source.prefix_len() == args.source.max_prefix_len() {
        args.source.addr().to_string()
    } else {
        args.source.to_string()
    };
    AccessRequest {
        // Generated once, so every agent of a fan-out (and any retry of it
        // through --request-id) sees the same id.
        request_id: args.request_id.unwrap_or_else(random_request_id),
        ports: args
            .ports
            .iter()
            .map(|spec| PortAccess {
                port: spec.port.into(),
                protocol: spec
                    .protocol
                    .map_or(proto::Protocol::Unspecified, proto::Protocol::from)
                    as i32,
                source: source.clone(),
            })
            .collect(),
        // clap lets exactly one of the two through.
        lifetime: args
            .duration
            .map(|d| Lifetime::Duration(wire::duration(d)))
            .or(args.until.map(Lifetime::EndTime)),
        requester: args.requester.unwrap_or_else(default_requester),
        justification: args.justification.unwrap_or_default(),
        ticket: args.ticket.unwrap_or_default(),
        max_connections: args.max_connections.unwrap_or(0),
    }
}

fn default_requester() -> String {
    match std::env::var("USER") {
        Ok(user) if !user.is_empty() => user,
        // SAFETY: getuid has no preconditions and cannot fail.
        _ => format!("uid:{}", unsafe { libc::getuid() }),
    }
}

/// A random version-4 UUID in its usual text form.
pub(crate) fn random_request_id() -> String {
    let bits: u128 = rand::random();
    // Version 4 (bits 76..80) and the RFC 4122 variant (bits 62..64).
    let bits = (bits & !(0xf << 76) & !(0b11 << 62)) | (0x4 << 76) | (0b10 << 62);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        bits >> 96,
        (bits >> 80) & 0xffff,
        (bits >> 64) & 0xffff,
        (bits >> 48) & 0xffff,
        bits & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use clap::Parser as _;

    use super::*;

    fn command(args: &[&str]) -> Command {
        Cli::try_parse_from(std::iter::once("jit-gate").chain(args.iter().copied()))
            .unwrap()
            .command
    }

    fn policy_request(args: &[&str]) -> anyhow::Result<UpdatePolicyRequest> {
        match command(args) {
            Command::Policy(PolicyCommand::Change(change)) => policy_change(change),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn request_ids_are_uuid_v4() {
        let a = random_request_id();
        assert_ne!(a, random_request_id());
        let groups: Vec<&str> = a.split('-').collect();
        assert_eq!(
            groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(groups[2].starts_with('4'), "{a}");
        assert!(
            matches!(groups[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'),
            "{a}"
        );
    }

    #[test]
    fn access_request_fields() {
        let Command::Request(args) = command(&[
            "request",
            "22/tcp",
            "53",
            "--source",
            "2001:db8::/48",
            "--duration",
            "90m",
            "--requester",
            "alice",
            "--ticket",
            "OPS-7",
            "--request-id",
            "r-1",
        ]) else {
            panic!()
        };
        let r = access_request(args);
        assert_eq!(r.request_id, "r-1");
        assert_eq!(r.requester, "alice");
        assert_eq!(r.ticket, "OPS-7");
        assert_eq!(r.justification, "");
        assert_eq!(
            r.lifetime,
            Some(Lifetime::Duration(prost_types::Duration {
                seconds: 5400,
                nanos: 0
            }))
        );
        assert_eq!(
            r.ports,
            [
                PortAccess {
                    port: 22,
                    protocol: proto::Protocol::Tcp as i32,
                    source: "2001:db8::/48".into()
                },
                PortAccess {
                    port: 53,
                    protocol: proto::Protocol::Unspecified as i32,
                    source: "2001:db8::/48".into()
                },
            ]
        );
        let Command::Request(args) = command(&[
            "request",
            "22",
            "--source",
            "10.1.2.3",
            "--until",
            "2030-01-01T00:00:00Z",
        ]) else {
            panic!()
        };
        let r = access_request(args);
        assert_eq!(r.ports[0].source, "10.1.2.3");
        assert!(matches!(r.lifetime, Some(Lifetime::EndTime(_))));
        assert!(!r.requester.is_empty());
        assert_eq!(r.request_id.len(), 36);
    }

    #[test]
    fn add_and_remove_port() {
        let r = policy_request(&[
            "policy",
            "add-port",
            "2222",
            "--allow",
            "10.0.0.0/8",
            "--expect-revision",
            "4",
        ])
        .unwrap();
        assert_eq!(r.expected_revision, 4);
        assert_eq!(
            r.change,
            Some(Change::UpsertRule(proto::PortRule {
                port: 2222,
                protocol: proto::Protocol::Tcp as i32,
                allowed_source_prefixes: vec!["10.0.0.0/8".into()],
                max_duration: Some(prost_types::Duration {
                    seconds: 3 * 3600,
                    nanos: 0
                }),
                require_justification: false,
                require_ticket: false,
                approvals: 0,
            }))
        );
        let err = policy_request(&["policy", "add-port", "22", "--max-duration", "25h"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("outside 1m..=24h"), "{err}");
        let r = policy_request(&["policy", "remove-port", "53", "--protocol", "udp"]).unwrap();
        assert_eq!(r.expected_revision, 0);
        assert_eq!(
            r.change,
            Some(Change::RemoveRule(RuleKey {
                port: 53,
                protocol: proto::Protocol::Udp as i32
            }))
        );
    }

    #[test]
    fn policy_file() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "[[policy]]\nport = 22\nprotocol = \"tcp\"\nallowed_sources = [\"198.51.100.0/24\"]\n\
             max_duration = \"1h\"\nrequire_justification = true\n\
             [[policy]]\nport = 500\nprotocol = \"both\""
        )
        .unwrap();
        let path = file.path().to_str().unwrap();
        let r = policy_request(&["policy", "set", "--file", path]).unwrap();
        let Some(Change::Replace(policy)) = r.change else {
            panic!("{:?}", r.change)
        };
        assert_eq!(policy.rules.len(), 2);
        assert_eq!(policy.rules[0].allowed_source_prefixes, ["198.51.100.0/24"]);
        assert_eq!(policy.rules[0].max_duration.unwrap().seconds, 3600);
        assert!(policy.rules[0].require_justification);
        assert_eq!(policy.rules[1].protocol, proto::Protocol::Both as i32);

        for (text, needle) in [
            (
                "[[policy]]\nport = 22\nprotocol = \"tcp\"\ncolour = 1",
                "unknown field `colour`",
            ),
            (
                "[[policy]]\nport = 22\nprotocol = \"sctp\"",
                "unknown variant `sctp`",
            ),
            (
                "[[policy]]\nport = 22\nprotocol = \"both\"\n[[policy]]\nport = 22\nprotocol = \"tcp\"",
                "port 22/tcp is covered by more than one rule",
            ),
            ("rules = []", "unknown field `rules`"),
        ] {
            std::fs::write(file.path(), text).unwrap();
            let err = policy_request(&["policy", "set", "--file", path])
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(path) && err.contains(needle),
                "{text:?}: {err}"
            );
        }
        let err = policy_request(&["policy", "set", "--file", "/nonexistent/p.toml"]).unwrap_err();
        assert!(
            format!("{err:#}").contains("reading /nonexistent/p.toml: No such file"),
            "{err:#}"
        );
    }
}
