//! `cargo xtask bench`, control plane: a release-built agent gating a
//! namespace, driven over its Unix socket as a broker drives it.
//!
//! - grant-to-enforced: a `RequestAccess` returns, then a TCP connection from
//!   the newly granted source is timed until it is established; beside it,
//!   in the same loop, a connection to an unprotected port (the handshake
//!   floor) and a no-op RPC (`GetPolicy`, the RPC floor);
//! - sustained grants/s through the API with concurrent brokers (each grant
//!   a `RequestAccess` of its own, or `--batch` of them in one
//!   `RequestAccessBatch`), up to
//!   `--grants` active grants, the agent's CPU time per grant meanwhile
//!   (all threads, and the engine's; a rate on a shared machine measures
//!   the machine) and the bench's own (its client shares the cores), then
//!   the agent's resident memory;
//! - expiry lateness: short grants among all the others, the time from each
//!   grant's expiry to the agent's `GRANT_EXPIRED` record;
//! - at full scale (1,000,000 grants by default): the database's size, and
//!   the latency of a probe RPC stream (`GetPolicy`, answered by the engine,
//!   one call started every 5 ms whatever the previous ones do, so a stall
//!   delays every call that arrives during it) across full reconciliations,
//!   each proven by a drift repair: an XDP entry and an nftables element
//!   removed by hand, timed until the agent's `DRIFT_REPAIRED` record; the
//!   agent's resident memory, sampled every 100 ms meanwhile, and each
//!   reconciliation cycle's length and the engine's time in it (from the
//!   agent's debug log).
//!
//! Either way the agent commits the requests waiting at once together.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use jit_gate_agent::{
    net::GrantTarget,
    proto::{self, Protocol, jit_gate_client::JitGateClient},
};
use jit_gate_tests::{
    agent::{Agent, AgentFiles, PinnedGrants, access, client},
    interruption::Interruption,
    measure::{Percentiles, connect_time, cpu_time, database_bytes, percentiles, rss_mib},
    netns::{GATED_V4, Netns, Topology, enter},
    traffic::TcpEcho,
};
use serde::Serialize;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    /// Grant-to-enforced samples.
    #[arg(long, default_value_t = 300)]
    samples: usize,
    /// Active grants to reach (throughput, memory and reconciliation phase).
    #[arg(long, default_value_t = 1_000_000)]
    grants: u32,
    /// Requests in flight in the throughput phase, over one connection:
    /// a broker loading many grants keeps many in flight, and the agent
    /// commits the requests waiting at once in one transaction (one
    /// `fsync`, ~4 ms here, so 64 in flight could not pass 16k grants/s).
    #[arg(long, default_value_t = 500)]
    concurrency: u32,
    /// Requests per call in the throughput phase: 1 sends each grant as a
    /// `RequestAccess` of its own, more sends them in `RequestAccessBatch`
    /// calls (`concurrency / batch` calls in flight), as a broker loading
    /// grants in bulk would.
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u32).range(1..=1000))]
    batch: u32,
    /// Short grants whose expiry lateness is measured.
    #[arg(long, default_value_t = 500)]
    expiring: u32,
    /// Drift repairs (each a full reconciliation) the probe stream spans.
    #[arg(long, default_value_t = 2)]
    repairs: u32,
    #[arg(long, default_value = "target/bench/control.json")]
    output: PathBuf,
}

const SSH: u16 = 22;
const OPEN_PORT: u16 = 8080;
/// Client addresses used as fresh sources in the latency loop (192.0.2.10
/// and up, clear of the topology's own client addresses).
const LATENCY_SOURCES: u8 = 100;
/// The agent's engine thread, as `comm` names it.
const ENGINE_THREAD: &str = "jit-gate-engine";
/// One probe RPC is started this often.
const PROBE_EVERY: Duration = Duration::from_millis(5);
/// The agent's resident memory is sampled this often across the
/// reconciliations.
const RSS_EVERY: Duration = Duration::from_millis(100);
/// `GetStatus` calls timed at full scale.
const STATUS_SAMPLES: usize = 5;
/// Longest wait for a drift repair (the agent's interval may stretch).
const REPAIR_TIMEOUT: Duration = Duration::from_mins(10);

#[derive(Serialize)]
struct Results {
    grant_rpc: Percentiles,
    noop_rpc: Percentiles,
    grant_to_enforced: Percentiles,
    handshake_floor: Percentiles,
    revoke_rpc: Percentiles,
    grants_per_second: f64,
    /// The agent's CPU time per grant during the fill, all threads and the
    /// engine's (which applies the grants one batch after another).
    fill_cpu_us_per_grant: f64,
    fill_engine_cpu_us_per_grant: f64,
    /// This bench's own CPU time per grant during the fill (its client
    /// shares the machine's cores with the agent).
    fill_client_cpu_us_per_grant: f64,
    throughput_rpc: Percentiles,
    /// `GetStatus` with every grant active.
    status_rpc: Percentiles,
    active_grants: u32,
    agent_rss_mib: f64,
    agent_peak_rss_mib: f64,
    /// `VmRSS` sampled across the reconciliations: median and largest.
    agent_rss_reconciling_median_mib: f64,
    agent_rss_reconciling_max_mib: f64,
    database_mib: f64,
    /// Bytes per active grant of each table and index (WAL not included).
    database_bytes_per_grant: Vec<(String, f64)>,
    probe_rpc_during_reconciliation: Percentiles,
    /// Each layer's cycles across the probe stream: how long each took
    /// (start to end, the read included) and the engine's time in it.
    xdp_cycle_ms: Vec<Cycle>,
    nft_cycle_ms: Vec<Cycle>,
    probe_samples: usize,
    xdp_drift_repaired_after: Percentiles,
    nft_drift_repaired_after: Percentiles,
    expiry_lateness: Percentiles,
}

/// The client namespace's veth, where the extra source addresses go.
fn client_interface(ns: &Netns) -> Result<String> {
    let out = std::process::Command::new("ip")
        .args(["-n", &ns.name, "-o", "link", "show", "type", "veth"])
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    text.split(": ")
        .nth(1)
        .and_then(|name| name.split('@').next())
        .map(str::to_owned)
        .context("no veth in the client namespace")
}

fn latency_source(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 10 + (i % usize::from(LATENCY_SOURCES)) as u8)
}

struct Latency {
    grant_rpc: Vec<Duration>,
    noop_rpc: Vec<Duration>,
    enforced: Vec<Duration>,
    handshake: Vec<Duration>,
    revoke_rpc: Vec<Duration>,
}

/// The latency loop, on a thread inside the client namespace so that the
/// connections start there without a namespace switch per sample.
fn measure_latency(
    ns: String,
    socket: PathBuf,
    samples: usize,
    interruption: Interruption,
) -> Result<Latency> {
    std::thread::spawn(move || {
        enter(&ns);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let mut api = JitGateClient::new(jit_gate_tests::agent::connect(&socket).await?);
            let mut out = Latency {
                grant_rpc: Vec::new(),
                noop_rpc: Vec::new(),
                enforced: Vec::new(),
                handshake: Vec::new(),
                revoke_rpc: Vec::new(),
            };
            let ssh = SocketAddr::new(GATED_V4.into(), SSH);
            let open = SocketAddr::new(GATED_V4.into(), OPEN_PORT);
            for i in 0..samples {
                interruption.check()?;
                let src = IpAddr::V4(latency_source(i));
                out.handshake.push(connect_time(src, open)?);
                let start = Instant::now();
                api.get_policy(proto::GetPolicyRequest {}).await?;
                out.noop_rpc.push(start.elapsed());
                let start = Instant::now();
                let grant = api
                    .request_access(access(
                        &format!("latency-{i}"),
                        &[(SSH, Protocol::Tcp, &src.to_string())],
                        600,
                    ))
                    .await?
                    .into_inner();
                out.grant_rpc.push(start.elapsed());
                out.enforced.push(connect_time(src, ssh)?);
                let start = Instant::now();
                api.revoke_grant(proto::RevokeGrantRequest {
                    grant_id: grant.grants[0].id,
                    terminate_connections: false,
                    reason: "bench".into(),
                })
                .await?;
                out.revoke_rpc.push(start.elapsed());
            }
            Ok(out)
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("latency thread panicked"))?
}

/// Distinct /32 sources for the bulk phase (10.0.0.0/8 and 172.16.0.0/12).
fn bulk_source(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

fn expiring_source(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0xac10_0000 + i))
}

fn bulk_request(i: u32) -> proto::AccessRequest {
    access(
        &format!("bulk-{i}"),
        &[(SSH, Protocol::Tcp, &bulk_source(i).to_string())],
        3600,
    )
}

/// Grants `first..end`, one call for them all (`RequestAccessBatch`), or
/// one `RequestAccess` when it is a single grant; each must be granted.
async fn grant_bulk(api: &mut JitGateClient<Channel>, first: u32, end: u32) -> Result<()> {
    if end - first == 1 {
        api.request_access(bulk_request(first)).await?;
        return Ok(());
    }
    let results = api
        .request_access_batch(proto::AccessBatchRequest {
            requests: (first..end).map(bulk_request).collect(),
        })
        .await?
        .into_inner()
        .results;
    ensure!(
        results.len() == (end - first) as usize,
        "{} results for {} requests",
        results.len(),
        end - first
    );
    for (i, result) in (first..).zip(results) {
        match result.outcome {
            Some(proto::access_result::Outcome::Response(r)) if r.grants.len() == 1 => {}
            other => bail!("bulk request {i} not granted: {other:?}"),
        }
    }
    Ok(())
}

/// Grants `total` sources, `concurrency` requests in flight, `batch` a call.
async fn fill(
    api: &JitGateClient<Channel>,
    total: u32,
    concurrency: u32,
    batch: u32,
) -> Result<(f64, Vec<Duration>)> {
    let start = Instant::now();
    let calls = (concurrency / batch).max(1);
    let mut tasks = Vec::new();
    for worker in 0..calls {
        let mut api = api.clone();
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::new();
            let mut first = worker * batch;
            while first < total {
                let t = Instant::now();
                let end = (first + batch).min(total);
                grant_bulk(&mut api, first, end)
                    .await
                    .with_context(|| format!("bulk requests {first}..{end}"))?;
                times.push(t.elapsed());
                first += calls * batch;
            }
            Ok::<_, anyhow::Error>(times)
        }));
    }
    let mut times = Vec::new();
    for task in tasks {
        times.extend(task.await??);
    }
    Ok((f64::from(total) / start.elapsed().as_secs_f64(), times))
}

/// `GetStatus` (what a metrics scrape asks the engine for too) timed
/// `STATUS_SAMPLES` times with every grant active; the active grants it
/// reports.
async fn status_at_scale(api: &mut JitGateClient<Channel>) -> Result<(u32, Vec<Duration>)> {
    let mut times = Vec::new();
    let mut listed = 0;
    for _ in 0..STATUS_SAMPLES {
        let t = Instant::now();
        listed = api
            .get_status(proto::GetStatusRequest {})
            .await?
            .into_inner()
            .active_grants;
        times.push(t.elapsed());
    }
    Ok((listed, times))
}

/// Size of the database with its write-ahead log.
fn database_mib(files: &AgentFiles) -> Result<f64> {
    let db = files.database();
    let mut bytes = 0;
    for suffix in ["", "-wal", "-shm"] {
        let path = PathBuf::from(format!("{}{suffix}", db.display()));
        bytes += std::fs::metadata(&path).map_or(0, |m| m.len());
    }
    Ok(bytes as f64 / (1024.0 * 1024.0))
}

/// Starts one `GetPolicy` every `PROBE_EVERY`, each timed from the moment
/// it was due, until `stop` is set; returns every latency.
async fn probe_stream(
    api: JitGateClient<Channel>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<Duration>> {
    let mut ticks = tokio::time::interval(PROBE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut calls = tokio::task::JoinSet::new();
    while !*stop.borrow() {
        let due = ticks.tick().await;
        let mut api = api.clone();
        calls.spawn(async move {
            api.get_policy(proto::GetPolicyRequest {}).await?;
            Ok::<_, anyhow::Error>(due.elapsed())
        });
    }
    let mut out = Vec::new();
    while let Some(call) = calls.join_next().await {
        out.push(call??);
    }
    Ok(out)
}

/// Removes one granted source's XDP entry and nftables element by hand,
/// then waits for the agent's record of the repair; returns how long it took.
async fn drift_repair(
    events: &mut tonic::Streaming<proto::Event>,
    files: &AgentFiles,
    gated: &Netns,
    source: IpAddr,
) -> Result<Repaired> {
    let target = GrantTarget {
        source: source.into(),
        protocol: jit_gate_agent::net::Protocol::Tcp,
        port: SSH,
    };
    let started = Instant::now();
    PinnedGrants::open(&files.pins.path).remove_v4(&target);
    gated.exec(
        "nft",
        &[
            "delete",
            "element",
            "inet",
            "jit_gate",
            &jit_gate_agent::enforce::nft::NftGate::set_holding(&target),
            &format!("{{ {source} . tcp . {SSH} }}"),
        ],
    );
    let (mut xdp, mut nft) = (None, None);
    while xdp.is_none() || nft.is_none() {
        let event = tokio::time::timeout(REPAIR_TIMEOUT, events.next())
            .await
            .context("no drift repair recorded")?
            .context("event stream ended")??;
        if event.message.contains("XDP: 1 grant entries missing") {
            xdp = xdp.or(Some(started.elapsed()));
        }
        if event.message.contains("nftables: 1 elements missing") {
            nft = nft.or(Some(started.elapsed()));
        }
    }
    Ok(Repaired {
        xdp: xdp.expect("loop ends with both"),
        nft: nft.expect("loop ends with both"),
    })
}

/// A reconciliation cycle as the agent logs it.
#[derive(Serialize)]
struct Cycle {
    took: u64,
    engine: u64,
}

/// The cycles of `layer` ("Xdp", "Nftables") the agent logged in `log`,
/// as `engine/cycles.rs` writes them: `reconciled layer=Xdp took_ms=.. engine_ms=..`.
fn logged_cycles(log: &str, layer: &str) -> Vec<Cycle> {
    let field = |line: &str, name: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    log.lines()
        .filter(|line| line.contains(" reconciled ") && line.contains(&format!("layer={layer} ")))
        .filter_map(|line| {
            Some(Cycle {
                took: field(line, "took_ms")?,
                engine: field(line, "engine_ms")?,
            })
        })
        .collect()
}

/// How long after the drift each layer's repair was recorded.
struct Repaired {
    xdp: Duration,
    nft: Duration,
}

/// The probe stream across `repairs` full reconciliations (each proven by
/// a drift repair); returns the probe latencies and the repair times.
async fn during_reconciliation(
    api: &mut JitGateClient<Channel>,
    files: &AgentFiles,
    gated: &Netns,
    agent: i32,
    repairs: u32,
    grants: u32,
) -> Result<(Vec<Duration>, Vec<Repaired>, Vec<f64>)> {
    let mut events = api
        .watch_events(proto::WatchEventsRequest {
            after_sequence: None,
            kinds: vec![proto::EventKind::DriftRepaired as i32],
        })
        .await?
        .into_inner();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let probe = tokio::spawn(probe_stream(api.clone(), stopped.clone()));
    let resident = tokio::spawn(sample_rss(agent, stopped));
    let mut repaired = Vec::new();
    for round in 0..repairs {
        let source = bulk_source((round * 7919 + 1) % grants);
        repaired.push(drift_repair(&mut events, files, gated, source).await?);
    }
    stop.send(true)?;
    Ok((probe.await??, repaired, resident.await??))
}

/// The agent's `VmRSS` (MiB) every `RSS_EVERY` until `stop` is set.
async fn sample_rss(agent: i32, stop: tokio::sync::watch::Receiver<bool>) -> Result<Vec<f64>> {
    let mut ticks = tokio::time::interval(RSS_EVERY);
    let mut samples = Vec::new();
    while !*stop.borrow() {
        ticks.tick().await;
        samples.push(rss_mib(agent)?.0);
    }
    Ok(samples)
}

/// The median and the largest of `samples`.
fn median_and_max(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_unstable_by(f64::total_cmp);
    let median = samples.get(samples.len() / 2).copied().unwrap_or(f64::NAN);
    (median, samples.last().copied().unwrap_or(f64::NAN))
}

async fn expiry_lateness(api: &mut JitGateClient<Channel>, count: u32) -> Result<Vec<Duration>> {
    let mut events = api
        .watch_events(proto::WatchEventsRequest {
            after_sequence: None,
            kinds: vec![proto::EventKind::GrantExpired as i32],
        })
        .await?
        .into_inner();
    let mut expires = std::collections::HashMap::new();
    for i in 0..count {
        let grant = api
            .request_access(access(
                &format!("expiring-{i}"),
                &[(SSH, Protocol::Tcp, &expiring_source(i).to_string())],
                2,
            ))
            .await?
            .into_inner();
        let g = &grant.grants[0];
        expires.insert(
            g.id,
            SystemTime::try_from(g.expires_at.context("expires_at")?)?,
        );
    }
    let mut lateness = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while lateness.len() < expires.len() {
        let event = tokio::time::timeout_at(deadline, events.next())
            .await
            .context("expiry events did not all arrive in 30 s")?
            .context("event stream ended")??;
        if let Some(expired_at) = expires.get(&event.grant_id) {
            let at = SystemTime::try_from(event.at.context("event time")?)?;
            lateness.push(at.duration_since(*expired_at).unwrap_or_default());
        }
    }
    Ok(lateness)
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.samples > 0 && args.expiring > 0 && args.repairs > 0 && args.grants > 0,
        "samples, expiring, repairs and grants must be positive"
    );
    // Registered before anything is set up: from here on a signal ends the
    // run with an error, and the drops remove what it made.
    let interruption = Interruption::register()?;
    let topo = Topology::new();
    let mut files = AgentFiles::new(&topo.gated);
    // The production defaults (reconcile every 5 s), not the tests' 1 s.
    std::fs::write(
        files.config_path(),
        format!(
            "interfaces = [{:?}]\ndatabase = {:?}\npin_dir = {:?}\n[api]\nunix_socket = {:?}\n",
            topo.gated_if,
            files.database(),
            files.pins.path,
            files.socket()
        ),
    )?;
    let client_if = client_interface(&topo.client)?;
    for i in 0..LATENCY_SOURCES {
        topo.client.exec_ip(&[
            "addr",
            "add",
            &format!("{}/24", latency_source(i.into())),
            "dev",
            &client_if,
        ]);
    }
    let _servers = [SSH, OPEN_PORT]
        .map(|port| TcpEcho::start(&topo.gated, SocketAddr::new(GATED_V4.into(), port)));
    // Each reconciliation cycle's length, logged at debug.
    files.env.push((
        "RUST_LOG".into(),
        "info,jit_gate_agent::engine::cycles=debug".into(),
    ));
    let agent = Agent::start(&files);
    println!(
        "agent {} gating {} (XDP + nftables)\n",
        agent.pid(),
        topo.gated_if
    );

    let latency = measure_latency(
        topo.client.name.clone(),
        files.socket(),
        args.samples,
        interruption.clone(),
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let own_pid = i32::try_from(std::process::id())?;
    let run = async {
        let mut api = client(&files).await;
        let cpu_before = cpu_time(agent.pid(), ENGINE_THREAD)?;
        let client_before = cpu_time(own_pid, ENGINE_THREAD)?.0;
        let (grants_per_second, throughput_rpc) =
            fill(&api, args.grants, args.concurrency, args.batch).await?;
        let cpu_after = cpu_time(agent.pid(), ENGINE_THREAD)?;
        let client_after = cpu_time(own_pid, ENGINE_THREAD)?.0;
        let per_grant = |before: Duration, after: Duration| {
            after.saturating_sub(before).as_secs_f64() * 1e6 / f64::from(args.grants)
        };
        let (listed, status_rpc) = status_at_scale(&mut api).await?;
        if listed != args.grants {
            bail!(
                "{listed} active grants after the fill, expected {}",
                args.grants
            );
        }
        let (rss, peak) = rss_mib(agent.pid())?;
        let database_mib = database_mib(&files)?;
        let database_bytes_per_grant = database_bytes(&files.database())?
            .into_iter()
            .map(|(name, bytes)| (name, bytes as f64 / f64::from(listed)))
            .collect();
        let logged_before = agent.log_text().len();
        let (probe, repaired, resident) = during_reconciliation(
            &mut api,
            &files,
            &topo.gated,
            agent.pid(),
            args.repairs,
            args.grants,
        )
        .await?;
        let (rss_median, rss_max) = median_and_max(resident);
        let cycles_log = agent
            .log_text()
            .get(logged_before..)
            .unwrap_or_default()
            .to_owned();
        let lateness = expiry_lateness(&mut api, args.expiring).await?;
        Ok::<_, anyhow::Error>(Results {
            grant_rpc: percentiles(latency.grant_rpc),
            noop_rpc: percentiles(latency.noop_rpc),
            grant_to_enforced: percentiles(latency.enforced),
            handshake_floor: percentiles(latency.handshake),
            revoke_rpc: percentiles(latency.revoke_rpc),
            grants_per_second,
            fill_cpu_us_per_grant: per_grant(cpu_before.0, cpu_after.0),
            fill_engine_cpu_us_per_grant: per_grant(cpu_before.1, cpu_after.1),
            fill_client_cpu_us_per_grant: per_grant(client_before, client_after),
            throughput_rpc: percentiles(throughput_rpc),
            status_rpc: percentiles(status_rpc),
            active_grants: listed,
            agent_rss_mib: rss,
            agent_peak_rss_mib: peak,
            agent_rss_reconciling_median_mib: rss_median,
            agent_rss_reconciling_max_mib: rss_max,
            database_mib,
            database_bytes_per_grant,
            probe_samples: probe.len(),
            probe_rpc_during_reconciliation: percentiles(probe),
            xdp_cycle_ms: logged_cycles(&cycles_log, "Xdp"),
            nft_cycle_ms: logged_cycles(&cycles_log, "Nftables"),
            xdp_drift_repaired_after: percentiles(repaired.iter().map(|r| r.xdp).collect()),
            nft_drift_repaired_after: percentiles(repaired.iter().map(|r| r.nft).collect()),
            expiry_lateness: percentiles(lateness),
        })
    };
    let results = runtime.block_on(async {
        tokio::select! {
            results = run => results,
            interrupted = interruption.signalled() => Err(interrupted),
        }
    })?;
    print_table(&args, &results);
    if let Some(dir) = args.output.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.output, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("write {}", args.output.display()))?;
    println!("\nresults written to {}", args.output.display());
    Ok(())
}

fn print_table(args: &Args, r: &Results) {
    let row = |name: &str, p: &Percentiles| {
        println!(
            "{name:<48} {:>9.0} {:>9.0} {:>9.0} {:>9.0}",
            p.p50_us, p.p99_us, p.p999_us, p.max_us
        );
    };
    println!(
        "{:<48} {:>9} {:>9} {:>9} {:>9}",
        "latency (µs)", "p50", "p99", "p99.9", "max"
    );
    row(
        &format!("RequestAccess RPC ({} samples)", args.samples),
        &r.grant_rpc,
    );
    row("GetPolicy RPC (no-op floor)", &r.noop_rpc);
    row(
        "grant-to-enforced: RPC return → TCP established",
        &r.grant_to_enforced,
    );
    row(
        "TCP handshake to an unprotected port (floor)",
        &r.handshake_floor,
    );
    row("RevokeGrant RPC", &r.revoke_rpc);
    let under_load = if args.batch == 1 {
        format!(
            "RequestAccess RPC under load ({} in flight)",
            args.concurrency
        )
    } else {
        format!(
            "RequestAccessBatch RPC of {} under load ({} in flight)",
            args.batch, args.concurrency
        )
    };
    row(&under_load, &r.throughput_rpc);
    row(
        &format!(
            "GetStatus RPC at {} grants ({STATUS_SAMPLES} samples)",
            r.active_grants
        ),
        &r.status_rpc,
    );
    row(
        &format!("expiry lateness ({} grants)", args.expiring),
        &r.expiry_lateness,
    );
    row(
        &format!(
            "GetPolicy every 5 ms across {} reconciliations",
            args.repairs
        ),
        &r.probe_rpc_during_reconciliation,
    );
    row(
        "XDP entry removed → DRIFT_REPAIRED",
        &r.xdp_drift_repaired_after,
    );
    row(
        "nftables element removed → DRIFT_REPAIRED",
        &r.nft_drift_repaired_after,
    );
    println!(
        "\ngrant-to-enforced p99 / handshake p99: {:.2}x",
        r.grant_to_enforced.p99_us / r.handshake_floor.p99_us
    );
    println!(
        "sustained: {:.0} grants/s ({} requests in flight, {} a call, {} grants)",
        r.grants_per_second, args.concurrency, args.batch, r.active_grants
    );
    println!(
        "agent CPU per grant during the fill: {:.1} µs, of which the engine thread {:.1} µs; \
         this bench's client {:.1} µs",
        r.fill_cpu_us_per_grant, r.fill_engine_cpu_us_per_grant, r.fill_client_cpu_us_per_grant
    );
    println!(
        "agent memory with {} active grants: RSS {:.1} MiB (peak {:.1} MiB)",
        r.active_grants, r.agent_rss_mib, r.agent_peak_rss_mib
    );
    println!(
        "agent memory across the reconciliations: RSS median {:.1} MiB, largest {:.1} MiB",
        r.agent_rss_reconciling_median_mib, r.agent_rss_reconciling_max_mib
    );
    println!(
        "database with {} active grants: {:.1} MiB (with WAL); {} probe RPCs",
        r.active_grants, r.database_mib, r.probe_samples
    );
    for (layer, cycles) in [("XDP", &r.xdp_cycle_ms), ("nftables", &r.nft_cycle_ms)] {
        let list = |of: fn(&Cycle) -> u64| {
            cycles
                .iter()
                .map(|c| format!("{:.2}", of(c) as f64 / 1000.0))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "{layer} cycles across the probe stream, s: took {}; the engine's time in each {}",
            list(|c| c.took),
            list(|c| c.engine)
        );
    }
    println!("database bytes per active grant, by table and index:");
    for (name, bytes) in &r.database_bytes_per_grant {
        println!("  {name:<24} {bytes:>8.1}");
    }
}
