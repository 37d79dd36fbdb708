//! `jit-gate fleet`: its options and what it does — write a grant into etcd
//! for hosts and labels, revoke it, show each host's outcome, and with
//! `--wait` follow the outcomes as they arrive (README "Fleet mode").

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use ipnet::IpNet;
use jit_gate_agent::fleet::{
    EtcdOptions,
    broker::{self, GrantAsk, HostOutcome},
    layout::{FleetPort, GrantRecord, Outcome, StatusValue},
    retry::retrying,
};

use crate::{
    args::{PortSpec, parse_duration, parse_prefix, parse_timeout},
    commands::{Outcome as Exit, random_request_id},
};

#[derive(Debug, Args)]
pub(crate) struct FleetArgs {
    /// etcd client URL (`https://host:2379`); repeatable.
    #[arg(
        long = "etcd",
        value_name = "URL",
        env = "JIT_GATE_ETCD",
        value_delimiter = ',',
        required = true
    )]
    pub endpoints: Vec<String>,
    /// PEM file of the CA that signed etcd's certificates (with --etcd-cert
    /// and --etcd-key: TLS with this broker's client certificate).
    #[arg(long, value_name = "PEM", env = "JIT_GATE_ETCD_CA", requires_all = ["etcd_cert", "etcd_key"])]
    pub etcd_ca: Option<PathBuf>,
    #[arg(
        long,
        value_name = "PEM",
        env = "JIT_GATE_ETCD_CERT",
        requires = "etcd_ca"
    )]
    pub etcd_cert: Option<PathBuf>,
    #[arg(
        long,
        value_name = "PEM",
        env = "JIT_GATE_ETCD_KEY",
        requires = "etcd_ca"
    )]
    pub etcd_key: Option<PathBuf>,
    /// Longest wait for each etcd call.
    #[arg(long = "etcd-timeout", value_name = "DURATION", default_value = "5s", value_parser = parse_timeout)]
    pub etcd_timeout: Duration,
    /// How long a command whose etcd call met an election or a member that
    /// went away keeps retrying (on the next member, with backoff).
    #[arg(long = "etcd-retry", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub etcd_retry: Duration,
    #[command(subcommand)]
    pub command: FleetCommand,
}

#[derive(Debug, Subcommand)]
pub(crate) enum FleetCommand {
    /// Write a grant for the hosts named and every host carrying all the
    /// labels given, under a lease that covers its lifetime.
    Request(FleetRequestArgs),
    /// Revoke a fleet grant on every host it was written for.
    Revoke(FleetRevokeArgs),
    /// Each targeted host's outcome (applied, refused, revoked, or none).
    Status {
        /// The fleet grant's id.
        id: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct FleetRequestArgs {
    /// Ports to open: `22`, `22/tcp`, `53/udp`.
    #[arg(required = true, value_name = "PORT[/PROTO]")]
    pub ports: Vec<PortSpec>,
    #[arg(long, value_name = "ADDR|PREFIX", value_parser = parse_prefix)]
    pub source: IpNet,
    /// How long, e.g. "30m": each host enforces what is left of it when it
    /// applies the grant.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Duration,
    /// A host to address; repeatable.
    #[arg(long = "host", value_name = "NAME")]
    pub hosts: Vec<String>,
    /// A label every addressed host carries; repeatable (all must match).
    #[arg(long = "label", value_name = "LABEL")]
    pub labels: Vec<String>,
    /// This broker's name (hosts record the grant as `fleet:<name>`).
    #[arg(long, value_name = "NAME", env = "JIT_GATE_BROKER")]
    pub broker: String,
    /// Who the access is for. Default: $USER, else the broker's name.
    #[arg(long, value_name = "NAME")]
    pub requester: Option<String>,
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub justification: String,
    #[arg(long, value_name = "TICKET", default_value = "")]
    pub ticket: String,
    /// The grant's id (default: a random UUID).
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub(crate) struct FleetRevokeArgs {
    pub id: String,
    /// Also end connections opened under it.
    #[arg(long)]
    pub terminate: bool,
    #[arg(long, default_value = "revoked by the broker")]
    pub reason: String,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub(crate) struct WaitArgs {
    /// Show each live host's outcome as it arrives, until all answered.
    #[arg(long)]
    pub wait: bool,
    /// Longest wait for all live hosts.
    #[arg(long = "wait-timeout", value_name = "DURATION", default_value = "30s", value_parser = parse_timeout)]
    pub wait_timeout: Duration,
}

pub(crate) async fn run(args: FleetArgs, json: bool) -> anyhow::Result<Exit> {
    let tls = match (&args.etcd_ca, &args.etcd_cert, &args.etcd_key) {
        (Some(ca), Some(cert), Some(key)) => Some((ca.as_path(), cert.as_path(), key.as_path())),
        _ => None,
    };
    let options = EtcdOptions::new(args.endpoints.clone(), tls, args.etcd_timeout)?;
    let retry = args.etcd_retry;
    match args.command {
        FleetCommand::Request(request) => {
            let requester = request
                .requester
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| request.broker.clone());
            let ask = GrantAsk {
                id: request.id.unwrap_or_else(random_request_id),
                broker: request.broker,
                hosts: request.hosts,
                labels: request.labels,
                source: request.source.to_string(),
                ports: request
                    .ports
                    .iter()
                    .map(|p| FleetPort {
                        port: p.port.into(),
                        protocol: p.protocol.map(|p| p.name().to_owned()),
                    })
                    .collect(),
                duration: request.duration,
                requester,
                justification: request.justification,
                ticket: request.ticket,
            };
            // Planned once: a retried write writes the same grant, which
            // hosts apply once (`broker::write`).
            let (_, planned) = retrying(&options, retry, async |client| {
                broker::plan(client, &ask).await
            })
            .await?;
            let (mut client, written) = retrying(&options, retry, async |client| {
                broker::write(client, &planned).await
            })
            .await?;
            print_written(&written.record, json);
            finish(
                &mut client,
                &written.record.id,
                &written.record.targeted,
                written.revision,
                &[Outcome::Applied, Outcome::Refused],
                &request.wait,
                json,
            )
            .await
        }
        FleetCommand::Revoke(revoke) => {
            let (mut client, revoked) = retrying(&options, retry, async |client| {
                broker::revoke(client, &revoke.id, revoke.terminate, &revoke.reason).await
            })
            .await?;
            if !json {
                println!(
                    "revoked {} on {} hosts (of {} targeted; the others' copies are gone)",
                    revoked.record.id,
                    revoked.hosts.len(),
                    revoked.record.targeted.len()
                );
            }
            finish(
                &mut client,
                &revoked.record.id,
                &revoked.hosts,
                revoked.revision,
                &[Outcome::Revoked],
                &revoke.wait,
                json,
            )
            .await
        }
        FleetCommand::Status { id } => {
            let (_, (record, outcomes)) = retrying(&options, retry, async |client| {
                broker::status(client, &id).await
            })
            .await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "grant": record, "hosts": outcomes })
                );
            } else {
                for outcome in &outcomes {
                    print_outcome(outcome);
                }
            }
            Ok(Exit::Success)
        }
    }
}

fn print_written(record: &GrantRecord, json: bool) {
    if json {
        println!("{}", serde_json::json!({ "grant": record }));
    } else {
        println!(
            "fleet grant {} written for {} hosts: {}",
            record.id,
            record.targeted.len(),
            record.targeted.join(" ")
        );
    }
}

fn print_status(status: &StatusValue, json: bool) {
    if json {
        println!("{}", serde_json::json!({ "status": status }));
        return;
    }
    let outcome = match status.outcome {
        Outcome::Applied => format!(
            "applied until {}",
            humantime::format_rfc3339_millis(jit_gate_agent::time::from_ms(
                status.enforced_until_ms
            ))
        ),
        Outcome::Refused => format!("refused: {}", status.reason),
        Outcome::Revoked => format!("revoked: {}", status.reason),
    };
    println!("{}\t{outcome}", status.host);
}

fn print_outcome(outcome: &HostOutcome) {
    let live = if outcome.live { "live" } else { "not live" };
    match &outcome.status {
        Some(status) => print_status(status, false),
        None => println!("{}\tno answer yet ({live})", outcome.host),
    }
}

/// With `--wait`: outcomes as they arrive; failure if a live host did not
/// answer in time or any refused.
async fn finish(
    client: &mut etcd_client::Client,
    id: &str,
    hosts: &[String],
    revision: i64,
    wanted: &[Outcome],
    wait: &WaitArgs,
    json: bool,
) -> anyhow::Result<Exit> {
    if !wait.wait {
        return Ok(Exit::Success);
    }
    let mut refused = 0;
    let silent = broker::wait(
        client,
        id,
        hosts,
        revision,
        wanted,
        wait.wait_timeout,
        |status| {
            if status.outcome == Outcome::Refused {
                refused += 1;
            }
            print_status(status, json);
        },
    )
    .await
    .context("waiting for outcomes")?;
    for host in &silent {
        if json {
            println!("{}", serde_json::json!({ "no_answer": host }));
        } else {
            println!(
                "{host}\tno answer within {}",
                humantime::format_duration(wait.wait_timeout)
            );
        }
    }
    Ok((silent.is_empty() && refused == 0).into())
}
