//! `cargo xtask bench`, fleet mode on etcd: the test harness's 3-member
//! etcd cluster (TLS, client certificates, access control) and release-built
//! agents, each gating its own namespace (mode xdp+nftables), grown step by
//! step (20, 100, then on while the machine holds them). Per step:
//!
//! - write-to-enforced latency per host: a grant for every host (one label)
//!   written through the library `jit-gate fleet request` uses; from the
//!   answer to the etcd transaction holding a host's copy to the send time
//!   of the first SYN that got through that host's gate (raw SYNs from the
//!   broker's namespace to each host still closed, one per host per round
//!   of `--probe-period`; the SYN-ACK names the SYN). Each sample then
//!   proves the path with a real TCP connection that the host's listening
//!   socket accepts;
//! - idle cost while watching: each agent's and etcd member's CPU time
//!   (utime + stime from /proc) over `--idle` with nothing written, and
//!   their resident memory; etcd's database size.
//!
//! Stepping stops at the first step that would not fit in memory (from the
//! memory each added agent took), took longer than `--step-budget`, or
//! failed; the report says which.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    panic::AssertUnwindSafe,
    path::PathBuf,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use etcd_client::Client;
use jit_gate_agent::fleet::{
    broker::{self, GrantAsk},
    layout::FleetPort,
};
use jit_gate_tests::{
    agent::Agent,
    etcd::Cluster,
    fleet::{Broker, ClientCert, Host, Pki, add_host},
    interruption::Interruption,
    measure::{connect_time, rss_mib},
    netns::enter,
    receiver_stats::cpu_seconds,
    syn_probe::{Opened, SynProbe},
};
use serde::Serialize;

#[derive(Parser)]
struct Args {
    /// Agent counts, grown in this order; stepping stops at the first step
    /// that does not fit (memory, time budget, failure).
    #[arg(long, value_delimiter = ',', default_value = "20,100,200,300,400")]
    steps: Vec<usize>,
    /// Grants written per step (each gives one latency per host).
    #[arg(long, default_value_t = 5)]
    samples: usize,
    /// One SYN to every host not yet open per this period.
    #[arg(long, default_value = "2ms", value_parser = humantime::parse_duration)]
    probe_period: Duration,
    /// How long the idle cost is measured, per step.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    idle: Duration,
    /// No further step once one took longer than this.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    step_budget: Duration,
    /// Memory (MiB) a step must leave available, judged from what each
    /// agent added so far took.
    #[arg(long, default_value_t = 3072.0)]
    reserve_mib: f64,
    #[arg(long, default_value = "target/bench/fleet.json")]
    output: PathBuf,
}

const PORT: u16 = 2222;
const LABEL: &str = "bench";
const BROKER: &str = "bench-broker";
/// A host not enforcing a grant by then fails the step.
const ENFORCE_WITHIN: Duration = Duration::from_mins(1);
/// Sample n's source is 198.19.0.0 + n + 1 (the broker's, on its bridge).
const SAMPLE_SOURCES: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);
/// Agents started at once (two shared cores: more outlast the start
/// timeout).
const START_BATCH: usize = 4;
/// Threads setting up etcd users and roles with etcdctl (each `user add`
/// costs etcd a bcrypt hash: more at once make its commits time out on
/// two shared cores).
const ROLE_THREADS: usize = 2;

fn host_name(index: usize) -> String {
    format!("h{index}")
}

/// Nearest-rank quantiles of signed values.
#[derive(Clone, Copy, Serialize)]
struct Quantiles {
    min: f64,
    p50: f64,
    p99: f64,
    max: f64,
}

fn quantiles(mut xs: Vec<f64>) -> Quantiles {
    xs.sort_by(f64::total_cmp);
    let at = |q: f64| xs[((xs.len() - 1) as f64 * q).round() as usize];
    Quantiles {
        min: at(0.0),
        p50: at(0.5),
        p99: at(0.99),
        max: at(1.0),
    }
}

/// `later - earlier` in milliseconds, negative if `later` came first.
fn signed_ms(later: Instant, earlier: Instant) -> f64 {
    match later.checked_duration_since(earlier) {
        Some(after) => after.as_secs_f64() * 1e3,
        None => -(earlier - later).as_secs_f64() * 1e3,
    }
}

#[derive(Serialize)]
struct Idle {
    seconds: f64,
    /// Per agent: percent of one CPU.
    agent_cpu_percent: Quantiles,
    agent_rss_mib: Quantiles,
    /// Per etcd member.
    etcd_cpu_percent: Vec<f64>,
    etcd_rss_mib: Vec<f64>,
    etcd_db_bytes: u64,
    /// The machine's 1-minute load average at the end (other work on it
    /// included).
    load_average: f64,
}

#[derive(Serialize)]
struct Step {
    agents: usize,
    samples: usize,
    /// Starting the agents this step added (namespaces, etcd users and
    /// roles, agents, registration).
    grow_seconds: f64,
    /// `MemAvailable`'s drop per agent added.
    memory_per_agent_mib: f64,
    /// The broker's `request`: inventory read, lease, transactions.
    write_ms: Quantiles,
    /// Commit of a host's copy → first packet through its gate, all hosts
    /// of all samples.
    enforced_ms: Quantiles,
    /// Mean probe round (the resolution of `enforced_ms`).
    probe_round_ms: f64,
    idle: Idle,
}

#[derive(Serialize)]
struct Machine {
    cpus: usize,
    memory_total_mib: f64,
    kernel: String,
    etcd: String,
}

#[derive(Serialize)]
struct Results {
    machine: Machine,
    steps: Vec<Step>,
    /// Why stepping stopped.
    limit: String,
}

/// The cluster, the broker and the hosts.
struct Bench {
    // Field order is drop order: agents and their namespaces, listeners,
    // the cluster, the broker's namespace, the PKI's files.
    hosts: Vec<Host>,
    listeners: Vec<TcpListener>,
    cluster: Cluster,
    broker: Broker,
    pki: Pki,
    /// The broker's etcd client certificate.
    cert: ClientCert,
    samples_taken: u32,
}

impl Bench {
    fn new() -> Bench {
        let broker = Broker::new();
        let pki = Pki::new("fleet bench CA");
        let cluster = Cluster::start(&broker, &pki, 3);
        cluster.add_broker_role(BROKER);
        let cert = pki.client(BROKER);
        // Every sample source is the broker's (on-link for the hosts).
        broker
            .ns
            .exec_ip(&["route", "add", "local", "198.19.0.0/16", "dev", "lo"]);
        Bench {
            hosts: Vec::new(),
            listeners: Vec::new(),
            cluster,
            broker,
            pki,
            cert,
            samples_taken: 0,
        }
    }

    /// Runs `call` with an etcd client in the broker's namespace.
    fn etcd<T: Send>(&self, call: impl AsyncFnOnce(&mut Client) -> Result<T> + Send) -> Result<T> {
        self.cluster.with_client(&self.broker.ns, &self.cert, call)
    }

    /// Adds hosts up to `target`, each with its etcd user and role, a
    /// listener on the gated port and a running agent; waits until all are
    /// present in etcd.
    fn grow(&mut self, target: usize, interruption: &Interruption) -> Result<()> {
        let first = self.hosts.len();
        let names: Vec<String> = (first..target).map(host_name).collect();
        std::thread::scope(|scope| {
            for chunk in names.chunks(names.len().div_ceil(ROLE_THREADS).max(1)) {
                scope.spawn(|| chunk.iter().for_each(|n| self.cluster.add_agent_role(n)));
            }
        });
        for (index, name) in (first..target).zip(&names) {
            interruption.check()?;
            let host = add_host(&self.broker, &self.pki, index);
            let cert = self.pki.client(name);
            host.files.write_config(
                &[&host.interface],
                &format!(
                    "reconcile_interval = \"5s\"\n[[policy]]\nport = {PORT}\nprotocol = \"tcp\"\nmax_duration = \"1h\"\n\n{}",
                    self.cluster.fleet_table(name, &[LABEL], &cert)
                ),
            );
            let listener = host
                .ns
                .run(|| TcpListener::bind(("0.0.0.0", PORT)))
                .context("listener on the gated port")?;
            listener.set_nonblocking(true)?;
            self.listeners.push(listener);
            self.hosts.push(host);
        }
        for batch in self.hosts[first..].chunks_mut(START_BATCH) {
            interruption.check()?;
            std::thread::scope(|scope| {
                for host in batch {
                    scope.spawn(|| host.agent = Some(Agent::start(&host.files)));
                }
            });
        }
        let deadline = Instant::now() + ENFORCE_WITHIN;
        loop {
            interruption.check()?;
            let present = self.etcd(async |client| broker::live_hosts(client).await)?;
            if present.len() == target {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{} of {target} agents present in etcd after {ENFORCE_WITHIN:?}",
                present.len()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// One grant for every host: (write duration, per-host latencies, probe).
    fn sample(&mut self, period: Duration) -> Result<(f64, Vec<f64>, Opened)> {
        self.samples_taken += 1;
        let source = Ipv4Addr::from(u32::from(SAMPLE_SOURCES) + self.samples_taken);
        let ask = GrantAsk {
            id: format!("bench-{}", self.samples_taken),
            broker: BROKER.into(),
            hosts: Vec::new(),
            labels: vec![LABEL.into()],
            source: source.to_string(),
            ports: vec![FleetPort {
                port: PORT.into(),
                protocol: Some("tcp".into()),
            }],
            duration: Duration::from_mins(10),
            requester: "bench".into(),
            justification: String::new(),
            ticket: String::new(),
        };
        let addresses: Vec<Ipv4Addr> = self.hosts.iter().map(|h| h.address).collect();
        let broker_ns = self.broker.ns.name.clone();
        let (ready, probing) = mpsc::channel();
        let (write, opened) = std::thread::scope(|scope| {
            let probe = scope.spawn(|| {
                enter(&broker_ns);
                SynProbe::open()?.run(
                    source,
                    &addresses,
                    PORT,
                    period,
                    Instant::now() + ENFORCE_WITHIN,
                    move || {
                        let _ = ready.send(());
                    },
                )
            });
            let write = probing.recv().map_err(anyhow::Error::from).and_then(|()| {
                self.etcd(async |client| {
                    let started = Instant::now();
                    let written = broker::request(client, &ask).await?;
                    Ok((started, Instant::now(), written))
                })
            });
            let opened = probe
                .join()
                .map_err(|_| anyhow::anyhow!("the probe panicked"))
                .and_then(|opened| opened);
            (write, opened)
        });
        let (started, returned, written) = write.context("writing the grant")?;
        let opened = opened.context("probing")?;
        let mut latencies = Vec::new();
        for (index, at) in opened.at.iter().enumerate() {
            let name = host_name(index);
            let at = at.with_context(|| {
                format!("{name} did not let the grant's source through within {ENFORCE_WITHIN:?}")
            })?;
            let committed = written
                .committed
                .get(&name)
                .with_context(|| format!("the grant was not written for {name}"))?;
            latencies.push(signed_ms(at, *committed));
        }
        self.verify(source)?;
        Ok((signed_ms(returned, started), latencies, opened))
    }

    /// A real connection from `source` to every host reaches its listening
    /// socket (the SYN-ACKs came from the host's stack; this proves it).
    fn verify(&self, source: Ipv4Addr) -> Result<()> {
        for (host, listener) in self.hosts.iter().zip(&self.listeners) {
            let to = SocketAddr::new(host.address.into(), PORT);
            self.broker
                .ns
                .run(|| connect_time(IpAddr::V4(source), to))?;
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                match listener.accept() {
                    Ok((_, peer)) if peer.ip() == IpAddr::V4(source) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        ensure!(
                            Instant::now() < deadline,
                            "{to}: the connection from {source} never reached the listener"
                        );
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(e).context("accept"),
                }
            }
        }
        Ok(())
    }

    /// CPU and memory of the agents and etcd members with nothing written.
    fn idle(&self, length: Duration, interruption: &Interruption) -> Result<Idle> {
        // Let the last sample's answers and the verification settle.
        std::thread::sleep(Duration::from_secs(3));
        let agents: Vec<i32> = self
            .hosts
            .iter()
            .map(|h| {
                h.agent
                    .as_ref()
                    .map(Agent::pid)
                    .context("agent not running")
            })
            .collect::<Result<_>>()?;
        let members: Vec<i32> = self
            .cluster
            .members
            .iter()
            .map(|m| m.pid().context("etcd member not running"))
            .collect::<Result<_>>()?;
        let all: Vec<i32> = agents.iter().chain(&members).copied().collect();
        let cpu = |pids: &[i32]| -> Result<Vec<f64>> {
            pids.iter().map(|pid| cpu_seconds(&[*pid])).collect()
        };
        let before = cpu(&all)?;
        let started = Instant::now();
        while started.elapsed() < length {
            interruption.check()?;
            std::thread::sleep(Duration::from_millis(250));
        }
        let seconds = started.elapsed().as_secs_f64();
        let percent: Vec<f64> = cpu(&all)?
            .iter()
            .zip(&before)
            .map(|(after, before)| (after - before) / seconds * 100.0)
            .collect();
        let rss: Vec<f64> = all
            .iter()
            .map(|pid| rss_mib(*pid).map(|(now, _)| now))
            .collect::<Result<_>>()?;
        let status = self
            .cluster
            .etcdctl_ok(&["endpoint", "status", "--write-out=json"]);
        let members_status: serde_json::Value = serde_json::from_str(&status)?;
        let etcd_db_bytes = members_status
            .as_array()
            .context("endpoint status")?
            .iter()
            .filter_map(|m| m["Status"]["dbSize"].as_u64())
            .max()
            .unwrap_or(0);
        let loadavg = std::fs::read_to_string("/proc/loadavg")?;
        let load_average = loadavg
            .split_whitespace()
            .next()
            .context("/proc/loadavg")?
            .parse()?;
        let n = agents.len();
        Ok(Idle {
            seconds,
            agent_cpu_percent: quantiles(percent[..n].to_vec()),
            agent_rss_mib: quantiles(rss[..n].to_vec()),
            etcd_cpu_percent: percent[n..].to_vec(),
            etcd_rss_mib: rss[n..].to_vec(),
            etcd_db_bytes,
            load_average,
        })
    }
}

/// `MemAvailable`, MiB.
fn memory_available_mib() -> Result<f64> {
    meminfo_mib("MemAvailable:")
}

fn meminfo_mib(field: &str) -> Result<f64> {
    let info = std::fs::read_to_string("/proc/meminfo")?;
    let line = info
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("{field} missing from /proc/meminfo"))?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .context("meminfo value")?
        .parse()?;
    Ok(kib / 1024.0)
}

fn machine() -> Result<Machine> {
    let output = |program: &str, arg: &str| -> Result<String> {
        let out = std::process::Command::new(program).arg(arg).output()?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned())
    };
    Ok(Machine {
        cpus: std::thread::available_parallelism()?.get(),
        memory_total_mib: meminfo_mib("MemTotal:")?,
        kernel: output("uname", "-r")?,
        etcd: output("/usr/bin/etcd", "--version")?,
    })
}

/// One step: grow to `target`, take the samples, measure the idle cost.
fn step(
    bench: &mut Bench,
    target: usize,
    args: &Args,
    interruption: &Interruption,
) -> Result<Step> {
    let started = Instant::now();
    let available = memory_available_mib()?;
    let added = target - bench.hosts.len();
    println!("growing to {target} agents");
    std::panic::catch_unwind(AssertUnwindSafe(|| bench.grow(target, interruption))).map_err(
        |panic| {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied());
            anyhow::anyhow!("{}", message.unwrap_or("a panic (see above)"))
        },
    )??;
    let grow_seconds = started.elapsed().as_secs_f64();
    let memory_per_agent_mib = (available - memory_available_mib()?) / added as f64;
    let mut writes = Vec::new();
    let mut latencies = Vec::new();
    let mut rounds = Vec::new();
    for number in 0..args.samples {
        interruption.check()?;
        let (write, each, opened) = bench.sample(args.probe_period)?;
        println!(
            "  sample {}: write {write:.1} ms, enforced p50 {:.1} ms, max {:.1} ms ({} SYNs)",
            number + 1,
            quantiles(each.clone()).p50,
            quantiles(each.clone()).max,
            opened.sent
        );
        writes.push(write);
        latencies.extend(each);
        rounds.push(opened.mean_round.as_secs_f64() * 1e3);
    }
    println!("  idle for {:?}", args.idle);
    let idle = bench.idle(args.idle, interruption)?;
    Ok(Step {
        agents: target,
        samples: args.samples,
        grow_seconds,
        memory_per_agent_mib,
        write_ms: quantiles(writes),
        enforced_ms: quantiles(latencies),
        probe_round_ms: rounds.iter().sum::<f64>() / rounds.len() as f64,
        idle,
    })
}

fn print(results: &Results) {
    println!(
        "\nfleet on etcd ({} CPUs, {:.0} MiB, Linux {}, {})",
        results.machine.cpus,
        results.machine.memory_total_mib,
        results.machine.kernel,
        results.machine.etcd
    );
    println!(
        "agents | write ms p50/max | enforced ms p50/p99/max (probe round ms) | agent idle CPU % median/max | agent RSS MiB median/max | MiB per agent | etcd CPU % | etcd RSS MiB | etcd DB MiB | load"
    );
    for s in &results.steps {
        let list = |xs: &[f64]| {
            xs.iter()
                .map(|x| format!("{x:.1}"))
                .collect::<Vec<_>>()
                .join("/")
        };
        println!(
            "{:>6} | {:.0}/{:.0} | {:.1}/{:.1}/{:.1} ({:.1}) | {:.2}/{:.2} | {:.1}/{:.1} | {:.1} | {} | {} | {:.1} | {:.1}",
            s.agents,
            s.write_ms.p50,
            s.write_ms.max,
            s.enforced_ms.p50,
            s.enforced_ms.p99,
            s.enforced_ms.max,
            s.probe_round_ms,
            s.idle.agent_cpu_percent.p50,
            s.idle.agent_cpu_percent.max,
            s.idle.agent_rss_mib.p50,
            s.idle.agent_rss_mib.max,
            s.memory_per_agent_mib,
            list(&s.idle.etcd_cpu_percent),
            list(&s.idle.etcd_rss_mib),
            s.idle.etcd_db_bytes as f64 / 1_048_576.0,
            s.idle.load_average
        );
    }
    println!("stepping stopped: {}", results.limit);
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.samples > 0, "--samples must be at least 1");
    let interruption = Interruption::register()?;
    let machine = machine()?;
    println!("starting a 3-member etcd cluster");
    let mut bench = Bench::new();
    let mut steps: Vec<Step> = Vec::new();
    let mut limit = None;
    for &target in &args.steps {
        // Interrupted: the steps done are reported, then all is removed.
        if let Err(e) = interruption.check() {
            limit = Some(format!("{e:#}"));
            break;
        }
        if target <= bench.hosts.len() {
            continue;
        }
        if let Some(last) = steps.last() {
            let needed = last.memory_per_agent_mib * (target - bench.hosts.len()) as f64;
            let available = memory_available_mib()?;
            if available - needed < args.reserve_mib {
                limit = Some(format!(
                    "memory: {target} agents would take about {needed:.0} MiB more ({:.1} MiB per agent added so far) of {available:.0} MiB available, leaving less than {:.0} MiB",
                    last.memory_per_agent_mib, args.reserve_mib
                ));
                break;
            }
        }
        let started = Instant::now();
        match step(&mut bench, target, &args, &interruption) {
            Ok(done) => steps.push(done),
            Err(e) => {
                limit = Some(format!("the step to {target} agents failed: {e:#}"));
                break;
            }
        }
        if started.elapsed() > args.step_budget {
            limit = Some(format!(
                "time: the step to {target} agents took {:.0} s, over the budget of {}",
                started.elapsed().as_secs_f64(),
                humantime::format_duration(args.step_budget)
            ));
            break;
        }
    }
    if steps.is_empty() {
        bail!(
            "no step completed: {}",
            limit.unwrap_or_else(|| "no steps".into())
        );
    }
    let results = Results {
        machine,
        steps,
        limit: limit.unwrap_or_else(|| "the last step asked for (--steps)".into()),
    };
    print(&results);
    if let Some(dir) = args.output.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.output, serde_json::to_string_pretty(&results)?)?;
    println!("\nwritten to {}", args.output.display());
    drop(bench);
    Ok(())
}
