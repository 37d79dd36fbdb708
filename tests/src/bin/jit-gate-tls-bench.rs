//! `cargo xtask bench`, remote brokers: the API over mutual TLS beside the
//! Unix socket, in the same run.
//!
//! - per call, one connection reused: the health check (the transport
//!   alone: it does not reach the engine), a no-op RPC (`GetPolicy`, which
//!   waits for the engine thread), `RequestAccess`, and grant-to-enforced (`RequestAccess` returns → a TCP
//!   connection from the newly granted source is established), alternating
//!   Unix socket and mTLS
//!   sample by sample, from a broker namespace to a release-built agent in
//!   mode xdp+nftables;
//! - fan-out: the release-built `jit-gate` CLI sends one request to 50 and to
//!   200 agents (mode nftables, each in its own namespace), over mTLS and
//!   over their Unix sockets, alternating; per-agent latency (from the CLI's
//!   JSON rows) and the CLI's wall time.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use jit_gate_agent::{
    config::Mode,
    proto::{self, Protocol, jit_gate_client::JitGateClient},
    tls::client::{TlsTarget, channel},
};
use jit_gate_tests::{
    agent::{access, connect, workspace_binary},
    fleet::{ClientCert, Fleet, Host},
    measure::{Percentiles, connect_time, percentiles},
    netns::{enter, nsenter},
    traffic::TcpEcho,
};
use rustls::ClientConfig;
use serde::Serialize;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[derive(Parser)]
struct Args {
    /// Per-call samples for each transport (each takes a fresh source
    /// address: the gated host's neighbour table holds 1024).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u16).range(1..=500))]
    samples: u16,
    /// Fan-out sizes.
    #[arg(long, value_delimiter = ',', default_value = "50,200")]
    fleets: Vec<usize>,
    /// Fan-out runs per size and transport.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value = "target/bench/tls.json")]
    output: PathBuf,
}

const SSH: u16 = 22;
const PRINCIPALS: &str = r#"[{ uri = "urn:jit-gate:bench", role = "broker" }]"#;

#[derive(Serialize)]
struct PerCall {
    health_unix: Percentiles,
    health_mtls: Percentiles,
    noop_unix: Percentiles,
    noop_mtls: Percentiles,
    request_unix: Percentiles,
    request_mtls: Percentiles,
    enforced_unix: Percentiles,
    enforced_mtls: Percentiles,
}

#[derive(Serialize)]
struct FanOut {
    agents: usize,
    transport: &'static str,
    per_agent: Percentiles,
    /// Median of the rounds' wall times, and the slowest.
    wall_ms_median: f64,
    wall_ms_max: f64,
}

#[derive(Serialize)]
struct Results {
    per_call: PerCall,
    fan_out: Vec<FanOut>,
}

/// A fresh source address of the broker for sample `i` (198.19.0.0/16, on
/// the broker's bridge).
fn source(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0xc613_0000 + u32::try_from(i).expect("sample") + 1)
}

/// The per-call loop, on a thread inside the broker namespace.
fn per_call(
    broker_ns: String,
    socket: PathBuf,
    tls: Arc<ClientConfig>,
    target: TlsTarget,
    samples: usize,
) -> Result<PerCall> {
    std::thread::spawn(move || {
        enter(&broker_ns);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let unix_channel = connect(&socket).await?;
            let mtls_channel: Channel = channel(tls, &target).await?;
            let mut unix = JitGateClient::new(unix_channel.clone());
            let mut mtls = JitGateClient::new(mtls_channel.clone());
            let mut health = [
                HealthClient::new(unix_channel),
                HealthClient::new(mtls_channel),
            ];
            let ssh = SocketAddr::new(target.host.parse()?, SSH);
            let mut times: [Vec<Duration>; 8] = Default::default();
            // Warm both connections up before timing.
            for _ in 0..20 {
                unix.get_policy(proto::GetPolicyRequest {}).await?;
                mtls.get_policy(proto::GetPolicyRequest {}).await?;
            }
            for i in 0..samples {
                for (offset, api) in [(0, &mut unix), (1, &mut mtls)] {
                    let start = Instant::now();
                    health[offset].check(HealthCheckRequest::default()).await?;
                    times[6 + offset].push(start.elapsed());
                    let start = Instant::now();
                    api.get_policy(proto::GetPolicyRequest {}).await?;
                    times[offset].push(start.elapsed());
                    let src = IpAddr::V4(source(2 * i + offset));
                    let start = Instant::now();
                    api.request_access(access(
                        &format!("bench-{i}-{offset}"),
                        &[(SSH, Protocol::Tcp, &src.to_string())],
                        600,
                    ))
                    .await?;
                    times[2 + offset].push(start.elapsed());
                    times[4 + offset].push(connect_time(src, ssh)?);
                }
            }
            let [
                noop_unix,
                noop_mtls,
                request_unix,
                request_mtls,
                enforced_unix,
                enforced_mtls,
                health_unix,
                health_mtls,
            ] = times.map(percentiles);
            Ok(PerCall {
                health_unix,
                health_mtls,
                noop_unix,
                noop_mtls,
                request_unix,
                request_mtls,
                enforced_unix,
                enforced_mtls,
            })
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("per-call thread panicked"))?
}

/// One fan-out by the CLI: per-agent latencies and the wall time.
fn fan_out(
    fleet: &Fleet,
    agents: &[String],
    client: &ClientCert,
) -> Result<(Vec<Duration>, Duration)> {
    let file = fleet.pki.dir.path().join("bench-agents.txt");
    std::fs::write(&file, agents.join("\n"))?;
    let started = Instant::now();
    let out = nsenter(&fleet.broker.ns.name, workspace_binary("jit-gate"))
        .arg("--agents-file")
        .arg(&file)
        .arg("--ca")
        .arg(fleet.pki.ca_path())
        .arg("--cert")
        .arg(&client.certificate)
        .arg("--key")
        .arg(&client.key)
        .args([
            "--json",
            "request",
            "22",
            "--source",
            "198.18.0.1",
            "--duration",
            "10m",
        ])
        .output()
        .context("run jit-gate")?;
    let wall = started.elapsed();
    ensure!(
        out.status.success(),
        "fan-out failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let latencies = rows
        .as_array()
        .context("rows")?
        .iter()
        .map(|row| Duration::from_secs_f64(row["latency_ms"].as_f64().unwrap_or(f64::NAN) / 1e3))
        .collect::<Vec<_>>();
    ensure!(latencies.len() == agents.len(), "one row per agent");
    Ok((latencies, wall))
}

fn median_ms(mut walls: Vec<Duration>) -> (f64, f64) {
    walls.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (
        ms(walls[walls.len() / 2]),
        ms(*walls.last().expect("rounds")),
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    let client_name = "bench";

    println!(
        "per call: one agent (xdp+nftables), {} samples per transport",
        args.samples
    );
    let per_call = {
        let mut fleet = Fleet::new(1, Mode::XdpAndNftables, PRINCIPALS);
        fleet.start();
        let client = fleet.pki.client(client_name);
        let host = &fleet.hosts[0];
        let _ssh = TcpEcho::start(&host.ns, SocketAddr::new(host.address.into(), SSH));
        // Every 198.19.x.y is the broker's (on-link for the gated host).
        fleet
            .broker
            .ns
            .exec_ip(&["route", "add", "local", "198.19.0.0/16", "dev", "lo"]);
        per_call(
            fleet.broker.ns.name.clone(),
            host.files.socket(),
            fleet.pki.client_config(Some(&client)),
            host.url().parse().map_err(anyhow::Error::msg)?,
            args.samples.into(),
        )?
    };

    let mut fan_outs = Vec::new();
    let largest = args.fleets.iter().copied().max().unwrap_or(0);
    if largest > 0 {
        println!("fan-out: starting {largest} agents (nftables), each in its own namespace");
        let mut fleet = Fleet::new(largest, Mode::Nftables, PRINCIPALS);
        fleet.start();
        let client = fleet.pki.client(client_name);
        for &size in &args.fleets {
            let hosts = &fleet.hosts[..size];
            let lists = [
                (
                    "unix",
                    hosts
                        .iter()
                        .map(|h| h.files.socket().display().to_string())
                        .collect::<Vec<_>>(),
                ),
                ("mtls", hosts.iter().map(Host::url).collect()),
            ];
            let mut samples: [(Vec<Duration>, Vec<Duration>); 2] = Default::default();
            for _ in 0..args.rounds {
                for (slot, (_, agents)) in lists.iter().enumerate() {
                    let (latencies, wall) = fan_out(&fleet, agents, &client)?;
                    samples[slot].0.extend(latencies);
                    samples[slot].1.push(wall);
                }
            }
            for ((transport, _), (latencies, walls)) in lists.iter().zip(samples) {
                let (wall_ms_median, wall_ms_max) = median_ms(walls);
                fan_outs.push(FanOut {
                    agents: size,
                    transport,
                    per_agent: percentiles(latencies),
                    wall_ms_median,
                    wall_ms_max,
                });
            }
        }
    }

    let us = |p: &Percentiles| format!("{:>8.0} {:>8.0} {:>8.0}", p.p50_us, p.p99_us, p.max_us);
    println!("\nper call, µs (one connection reused)      p50      p99      max");
    for (what, p) in [
        ("health check, Unix socket", &per_call.health_unix),
        ("health check, mTLS", &per_call.health_mtls),
        ("GetPolicy, Unix socket", &per_call.noop_unix),
        ("GetPolicy, mTLS", &per_call.noop_mtls),
        ("RequestAccess, Unix socket", &per_call.request_unix),
        ("RequestAccess, mTLS", &per_call.request_mtls),
        ("grant-to-enforced, Unix socket", &per_call.enforced_unix),
        ("grant-to-enforced, mTLS", &per_call.enforced_mtls),
    ] {
        println!("{what:<40} {}", us(p));
    }
    println!(
        "mTLS adds {:.0} µs p50 and {:.0} µs p99 to the transport alone (health check), {:.0} µs p99 to a no-op call and {:.0} µs p99 to RequestAccess",
        per_call.health_mtls.p50_us - per_call.health_unix.p50_us,
        per_call.health_mtls.p99_us - per_call.health_unix.p99_us,
        per_call.noop_mtls.p99_us - per_call.noop_unix.p99_us,
        per_call.request_mtls.p99_us - per_call.request_unix.p99_us
    );
    println!(
        "\nfan-out of one request            per agent ms: p50      p99   wall ms: median      max"
    );
    for f in &fan_outs {
        println!(
            "{:>4} agents, {:<5}                     {:>8.1} {:>8.1}          {:>8.0} {:>8.0}",
            f.agents,
            f.transport,
            f.per_agent.p50_us / 1e3,
            f.per_agent.p99_us / 1e3,
            f.wall_ms_median,
            f.wall_ms_max
        );
    }
    let results = Results {
        per_call,
        fan_out: fan_outs,
    };
    if let Some(dir) = args.output.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.output, serde_json::to_string_pretty(&results)?)?;
    println!("\nwritten to {}", args.output.display());
    Ok(())
}
