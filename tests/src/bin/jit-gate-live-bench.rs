//! `cargo xtask bench`: the live benchmark. A sender namespace floods a
//! receiver namespace over a veth pair with the project's own generator
//! (`packet_sender`), and each contender (nothing, a bare `XDP_DROP`
//! program, jit-gate's paths, xdp-filter, nftables and iptables drops)
//! takes its turn on the receiving side. Per contender: packets per second
//! the receiving interface took, the XDP program's cost per packet from BPF
//! run-time statistics, and the verdict checked on the receiver's TCP
//! counters (a drop delivers nothing to the stack, a pass delivers what
//! came). Rounds are interleaved and shuffled; medians with min and max.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun, TestRunOptions, Xdp, XdpMode, xdp::XdpLinkId},
};
use clap::Parser;
use jit_gate_agent::{
    clock::boot_now_ns,
    enforce::{
        nft::{NftGate, NftState},
        xdp::XdpGate,
    },
    net::{GrantTarget, Protocol},
};
use jit_gate_common::verdict::tcp_flags;
use jit_gate_tests::{
    bar_chart::{Bar, Panel, write_svg},
    env::PinDir,
    interruption::Interruption,
    netns::{CLIENT_V4, GATED_V4, Netns, Topology, nsenter},
    packet_sender::{PacketSender, Sent},
    packets::Packet,
    receiver_stats::{
        RunTimeStats, Snapshot, cpu_seconds, napi_threads, pin_threads, snapshot, thread_napi,
    },
    scenario::XDP_PASS,
};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
use serde::Serialize;

static FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("JIT_GATE_EBPF_OBJECTS"), "/jit-gate-floor"));

#[derive(Parser)]
struct Args {
    /// Interleaved rounds (each runs every contender once, in a new random order).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// How long the sender sends per contender and round.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    period: Duration,
    /// At most this many frames per contender and round.
    #[arg(long, default_value_t = 10_000_000)]
    max_frames: u64,
    /// Exact grants of the largest gate.
    #[arg(long, default_value_t = 1_000_000)]
    most_grants: u32,
    #[arg(long, default_value = "target/bench/live.json")]
    output: PathBuf,
    #[arg(long, default_value = "target/bench/live.svg")]
    chart: PathBuf,
    /// Run only these contenders, by key (comma-separated): nothing,
    /// ceiling, drop-1, drop-10k, flood, granted, unprotected, xdp-filter,
    /// nft-ingress, iptables, nft-conntrack, nft-only, read-floor, tracked,
    /// drop-most. Ratios whose two sides did not both run are left out.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

const SSH: u16 = 22;
const UNPROTECTED: u16 = 8080;
/// A source without a grant.
const STRANGER: Ipv4Addr = Ipv4Addr::new(203, 0, 114, 1);
/// Sources of the random-source flood: 100.64.0.0/10, outside every grant.
const FLOOD_SOURCES: usize = 65_536;

/// What the sender sends.
#[derive(Clone, Copy)]
enum Traffic {
    /// SYNs to the SSH port from a source without a grant.
    Stranger,
    /// SYNs to the SSH port from the client, which holds a grant.
    Granted,
    /// SYNs to an unprotected port.
    Unprotected,
    /// SYNs to the SSH port, each from one of 65,536 random sources.
    RandomSources,
    /// ACKs of the client's connection to the SSH port, established in the
    /// flow table before the run.
    TrackedFlow,
}

/// The floor object's bare drop: the ceiling of any XDP filter.
const CEILING: &str = "floor_drop";
/// The floor object's drop after reading the headers a port filter reads.
const READ_FLOOR: &str = "floor_read_drop";

fn floor_program<'a>(floor: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    Ok(floor
        .program_mut(name)
        .with_context(|| format!("{name} in the floor object"))?
        .try_into()?)
}

/// What sits on the receiving side.
#[derive(Clone, Copy)]
enum Enforcer {
    Nothing,
    /// A program of the floor object: the bare `XDP_DROP` (the ceiling of
    /// any XDP filter), or the drop after reading the headers.
    Floor(&'static str),
    /// jit-gate's XDP program; the index of the gate (by grant count).
    Gate(usize),
    XdpFilter,
    NftIngress,
    IptablesRaw,
    NftConntrack,
    /// jit-gate's nftables table alone (its mode without XDP).
    NftOnly,
}

struct Contender {
    /// Short and stable: what `--only` and `ratios` name it by.
    key: &'static str,
    name: String,
    enforcer: Enforcer,
    traffic: Traffic,
    drops: bool,
}

fn contenders(grant_counts: &[u32]) -> Vec<Contender> {
    let c = |key, name: String, enforcer, traffic, drops| Contender {
        key,
        name,
        enforcer,
        traffic,
        drops,
    };
    let count = |i: usize| format_count(grant_counts[i]);
    let last = grant_counts.len() - 1;
    vec![
        c(
            "nothing",
            "nothing attached".into(),
            Enforcer::Nothing,
            Traffic::Stranger,
            false,
        ),
        c(
            "ceiling",
            "bare XDP_DROP (ceiling)".into(),
            Enforcer::Floor(CEILING),
            Traffic::Stranger,
            true,
        ),
        c(
            "drop-1",
            format!("jit-gate drop, {} grant", count(0)),
            Enforcer::Gate(0),
            Traffic::Stranger,
            true,
        ),
        c(
            "drop-10k",
            format!("jit-gate drop, {} grants", count(1)),
            Enforcer::Gate(1),
            Traffic::Stranger,
            true,
        ),
        c(
            "flood",
            format!("jit-gate drop, {FLOOD_SOURCES} random sources"),
            Enforcer::Gate(0),
            Traffic::RandomSources,
            true,
        ),
        c(
            "granted",
            "jit-gate granted SYN (pass)".into(),
            Enforcer::Gate(0),
            Traffic::Granted,
            false,
        ),
        c(
            "unprotected",
            "jit-gate unprotected port (pass)".into(),
            Enforcer::Gate(0),
            Traffic::Unprotected,
            false,
        ),
        c(
            "xdp-filter",
            "xdp-filter, port 22".into(),
            Enforcer::XdpFilter,
            Traffic::Stranger,
            true,
        ),
        c(
            "nft-ingress",
            "nft netdev ingress drop".into(),
            Enforcer::NftIngress,
            Traffic::Stranger,
            true,
        ),
        c(
            "iptables",
            "iptables raw drop".into(),
            Enforcer::IptablesRaw,
            Traffic::Stranger,
            true,
        ),
        c(
            "nft-conntrack",
            "nft inet input drop, conntrack".into(),
            Enforcer::NftConntrack,
            Traffic::Stranger,
            true,
        ),
        c(
            "nft-only",
            "jit-gate nftables-only mode".into(),
            Enforcer::NftOnly,
            Traffic::Stranger,
            true,
        ),
        c(
            "read-floor",
            "XDP_DROP after reading the headers".into(),
            Enforcer::Floor(READ_FLOOR),
            Traffic::Stranger,
            true,
        ),
        c(
            "tracked",
            "jit-gate tracked flow (pass)".into(),
            Enforcer::Gate(0),
            Traffic::TrackedFlow,
            false,
        ),
        c(
            "drop-most",
            format!("jit-gate drop, {} grants", count(last)),
            Enforcer::Gate(last),
            Traffic::Stranger,
            true,
        ),
    ]
}

fn format_count(n: u32) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// The receiving side: everything a contender may attach or install.
struct Receiver {
    // Field order is drop order: gates, their pins, the floor program, then
    // the namespaces (which takes whatever is left with them).
    // By grant count; none where no selected contender uses it.
    gates: Vec<Option<XdpGate>>,
    // Held for their drop, which removes the pins.
    _pins: Vec<PinDir>,
    floor: Ebpf,
    topo: Topology,
}

fn loaded(gates: &mut [Option<XdpGate>], i: usize) -> Result<&mut XdpGate> {
    gates[i]
        .as_mut()
        .context("a gate no selected contender uses")
}

/// What a contender left to undo.
enum Installed {
    Nothing,
    Floor(&'static str, XdpLinkId),
    Gate(usize),
    XdpFilter(Child),
    Nft(&'static str),
    Iptables,
    NftGate(NftGate),
}

/// `iptables -t raw` with `-A` or `-D` and this rule.
const IPTABLES_RULE: [&str; 7] = ["PREROUTING", "-p", "tcp", "--dport", "22", "-j", "DROP"];

fn iptables(ns: &Netns, op: &str) {
    let mut args = vec!["-w", "-t", "raw", op];
    args.extend(IPTABLES_RULE);
    ns.exec("iptables", &args);
}

impl Receiver {
    fn ns(&self) -> &Netns {
        &self.topo.gated
    }

    fn install(&mut self, enforcer: Enforcer) -> Result<Installed> {
        let ifname = self.topo.gated_if.clone();
        Ok(match enforcer {
            Enforcer::Nothing => Installed::Nothing,
            Enforcer::Floor(name) => {
                let program = floor_program(&mut self.floor, name)?;
                let link = self
                    .topo
                    .gated
                    .run(|| program.attach(&ifname, XdpMode::Driver))?;
                Installed::Floor(name, link)
            }
            Enforcer::Gate(i) => {
                let gate = loaded(&mut self.gates, i)?;
                self.topo.gated.run(|| gate.attach(&ifname))?;
                Installed::Gate(i)
            }
            Enforcer::XdpFilter => Installed::XdpFilter(xdp_filter(&self.topo.gated, &ifname)?),
            Enforcer::NftIngress => {
                self.ns().exec("nft", &[&format!(
                    "add table netdev jgbench; add chain netdev jgbench in {{ type filter hook ingress device \"{ifname}\" priority 0; }}; add rule netdev jgbench in tcp dport 22 drop"
                )]);
                Installed::Nft("netdev jgbench")
            }
            Enforcer::IptablesRaw => {
                iptables(self.ns(), "-A");
                Installed::Iptables
            }
            Enforcer::NftConntrack => {
                self.ns().exec("nft", &[
                    "add table inet jgbench; add chain inet jgbench input { type filter hook input priority 0; }; add rule inet jgbench input ct state established,related accept; add rule inet jgbench input tcp dport 22 drop",
                ]);
                Installed::Nft("inet jgbench")
            }
            Enforcer::NftOnly => {
                let gate = NftGate::new("jgbench_gate");
                let state = NftState {
                    protected: BTreeSet::from([(Protocol::Tcp, SSH)]),
                    allowed: BTreeMap::new(),
                };
                self.ns().run(|| gate.install(&state))?;
                Installed::NftGate(gate)
            }
        })
    }

    fn remove(&mut self, installed: Installed) -> Result<()> {
        match installed {
            Installed::Nothing => {}
            Installed::Floor(name, link) => floor_program(&mut self.floor, name)?.detach(link)?,
            Installed::Gate(i) => {
                loaded(&mut self.gates, i)?.detach(&self.topo.gated_if)?;
            }
            Installed::XdpFilter(mut child) => {
                drop(child.stdin.take()); // lets the shell go on to unload
                let status = child.wait()?;
                ensure!(status.success(), "xdp-filter unload failed: {status}");
            }
            Installed::Nft(table) => {
                self.ns().exec("nft", &[&format!("delete table {table}")]);
            }
            Installed::Iptables => iptables(self.ns(), "-D"),
            Installed::NftGate(gate) => {
                self.ns().run(|| gate.remove())?;
            }
        }
        self.wait_for_no_xdp()
    }

    /// A link whose last reference was its pin is released by the kernel
    /// a little later, off the unlink: the next contender may attach only then.
    fn wait_for_no_xdp(&self) -> Result<()> {
        for _ in 0..200 {
            if snapshot(self.ns(), &self.topo.gated_if)?.program.is_none() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!(
            "an XDP program stayed on {} for 2 s after removal",
            self.topo.gated_if
        )
    }
}

/// xdp-filter dropping TCP port 22, run from a shell in a mount namespace
/// of its own (xdp-filter and libxdp keep their state under /sys/fs/bpf,
/// which gets a private bpffs there). The shell holds that state until its
/// stdin closes, then unloads.
fn xdp_filter(ns: &Netns, ifname: &str) -> Result<Child> {
    let script = format!(
        "mount -t bpf bpf /sys/fs/bpf && xdp-filter load -m native {ifname} && xdp-filter port 22 && echo ready && (read _ || true) && xdp-filter unload {ifname}"
    );
    let mut child = nsenter(&ns.name, "unshare")
        .args(["--mount", "--propagation", "private", "sh", "-ec", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running xdp-filter (installed by `cargo xtask bootstrap`)")?;
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().context("stdout")?).read_line(&mut line)?;
    if line.trim() != "ready" {
        let status = child.wait()?;
        bail!("xdp-filter did not load: {status}");
    }
    Ok(child)
}

fn interface_mac(ns: &Netns, ifname: &str) -> Result<[u8; 6]> {
    let link: serde_json::Value =
        serde_json::from_str(&ns.exec("ip", &["-j", "link", "show", "dev", ifname]))?;
    let text = link[0]["address"].as_str().context("no address")?;
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("odd MAC {text}"))
}

fn frames(traffic: Traffic, macs: ([u8; 6], [u8; 6])) -> Vec<Vec<u8>> {
    let syn = |source: Ipv4Addr, port: u16, src_port: u16| {
        Packet::tcp(source.into(), GATED_V4.into(), port, tcp_flags::SYN)
            .src_port(src_port)
            .macs(macs.0, macs.1)
            .build()
            .bytes
    };
    match traffic {
        Traffic::Stranger => vec![syn(STRANGER, SSH, 40_000)],
        Traffic::Granted => vec![syn(CLIENT_V4, SSH, 40_000)],
        Traffic::Unprotected => vec![syn(CLIENT_V4, UNPROTECTED, 40_000)],
        Traffic::TrackedFlow => vec![tracked_flow_ack(macs)],
        Traffic::RandomSources => {
            let mut rng = StdRng::seed_from_u64(1);
            (0..FLOOD_SOURCES)
                .map(|_| {
                    let source = Ipv4Addr::from(0x6440_0000 | (rng.random::<u32>() >> 10));
                    syn(source, SSH, rng.random_range(1024..=65_535))
                })
                .collect()
        }
    }
}

/// The client's source port of the tracked connection.
const TRACKED_PORT: u16 = 40_001;

/// A segment of the client's tracked connection (`macs` none: the frame
/// the gate is primed with, through `BPF_PROG_TEST_RUN`).
fn tracked_flow_frame(flags: u8, macs: Option<([u8; 6], [u8; 6])>) -> Vec<u8> {
    let packet = Packet::tcp(CLIENT_V4.into(), GATED_V4.into(), SSH, flags).src_port(TRACKED_PORT);
    match macs {
        Some((src, dst)) => packet.macs(src, dst),
        None => packet,
    }
    .build()
    .bytes
}

fn tracked_flow_ack(macs: ([u8; 6], [u8; 6])) -> Vec<u8> {
    tracked_flow_frame(tcp_flags::ACK, Some(macs))
}

/// Opens and establishes the client's tracked connection in the gate's
/// flow table, as its handshake would: a SYN under the grant, then an ACK.
fn establish_tracked_flow(gate: &XdpGate) -> Result<()> {
    let program: &Xdp = gate.program();
    for flags in [tcp_flags::SYN, tcp_flags::ACK] {
        let frame = tracked_flow_frame(flags, None);
        let result = program.test_run(TestRunOptions {
            data_in: Some(&frame),
            ..Default::default()
        })?;
        ensure!(
            result.return_value == XDP_PASS,
            "the tracked connection's segment (flags {flags:#x}) was dropped"
        );
    }
    Ok(())
}

/// A gate protecting the SSH port with a grant for the client and
/// `total - 1` more for other sources.
fn gate_with_grants(pins: &PinDir, total: u32) -> Result<XdpGate> {
    let mut gate = pins.open_gate();
    gate.set_protected_ports(&BTreeSet::from([(Protocol::Tcp, SSH)]))?;
    let expires = boot_now_ns() + 3_600_000_000_000;
    let sources =
        std::iter::once(CLIENT_V4).chain((1..total).map(|i| Ipv4Addr::from(0x0a00_0000 + i)));
    for (id, source) in sources.enumerate() {
        let target = GrantTarget {
            source: IpAddr::V4(source).into(),
            protocol: Protocol::Tcp,
            port: SSH,
        };
        gate.upsert_grant(&target, expires, id as u64 + 1)?;
    }
    Ok(gate)
}

/// One contender in one round.
struct Sample {
    sent: Sent,
    received: u64,
    delivered: u64,
    ns_per_packet: Option<f64>,
    /// CPU time of the receiving NAPI threads.
    napi_cpu_s: f64,
}

fn measure(before: &Snapshot, after: &Snapshot, sent: Sent, napi_cpu_s: f64) -> Sample {
    let ns_per_packet = match (before.program, after.program) {
        (Some(b), Some(a)) if a.id == b.id && a.runs > b.runs => {
            Some((a.run_time_ns - b.run_time_ns) as f64 / (a.runs - b.runs) as f64)
        }
        _ => None,
    };
    Sample {
        sent,
        received: after.received - before.received,
        delivered: after.tcp_segments - before.tcp_segments,
        ns_per_packet,
        napi_cpu_s,
    }
}

/// The verdict, checked: a drop delivers nothing to the stack, a pass
/// delivers (nearly) all that the interface received.
fn check_verdict(contender: &Contender, sample: &Sample) -> Result<()> {
    ensure!(
        sample.received > 0,
        "{}: the receiver got nothing",
        contender.name
    );
    if contender.drops {
        ensure!(
            sample.delivered == 0,
            "{}: {} of {} segments reached the stack",
            contender.name,
            sample.delivered,
            sample.received
        );
    } else {
        ensure!(
            sample.delivered as f64 >= 0.95 * sample.received as f64,
            "{}: only {} of {} segments reached the stack",
            contender.name,
            sample.delivered,
            sample.received
        );
    }
    Ok(())
}

#[derive(Serialize, Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(mut xs: Vec<f64>) -> Spread {
    xs.sort_by(f64::total_cmp);
    Spread {
        median: xs[xs.len() / 2],
        min: xs[0],
        max: xs[xs.len() - 1],
    }
}

#[derive(Serialize)]
struct Row {
    contender: String,
    verdict: &'static str,
    offered_pps: Spread,
    received_pps: Spread,
    /// Packets received per CPU-second of the receiving NAPI threads (none
    /// if a round was too short for the clock tick that CPU time is counted in).
    packets_per_napi_cpu_s: Option<Spread>,
    program_ns_per_packet: Option<Spread>,
    delivered_to_stack: u64,
}

#[derive(Serialize)]
struct Ratio {
    what: &'static str,
    ratio: f64,
}

#[derive(Serialize)]
struct Results {
    rounds: usize,
    period_s: f64,
    sender_cpu: Option<usize>,
    napi_cpu: Option<usize>,
    contenders: Vec<Row>,
    ratios: Vec<Ratio>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    let interruption = Interruption::register()?;
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let (sender_cpu, napi_cpu) = if cpus >= 2 {
        (Some(0), Some(1))
    } else {
        (None, None)
    };
    let grant_counts = [1, 10_000, args.most_grants];
    let _stats = RunTimeStats::enable()?;

    let topo = Topology::new();
    topo.client
        .exec("ethtool", &["-K", &topo.client_if, "tso", "off"]);
    thread_napi(&topo.gated, &topo.gated_if);
    let macs = (
        interface_mac(&topo.client, &topo.client_if)?,
        interface_mac(&topo.gated, &topo.gated_if)?,
    );
    let client_if = topo.client_if.clone();
    let sender = topo.client.run(|| PacketSender::open(&client_if))?;
    let contenders = selected(contenders(&grant_counts), &args.only)?;
    let pins: Vec<PinDir> = grant_counts.iter().map(|_| PinDir::new()).collect();
    let mut gates = Vec::new();
    for (i, (pins, &count)) in pins.iter().zip(&grant_counts).enumerate() {
        let used = contenders
            .iter()
            .any(|c| matches!(c.enforcer, Enforcer::Gate(g) if g == i));
        if !used {
            gates.push(None);
            continue;
        }
        eprintln!("loading a gate with {} grants", format_count(count));
        gates.push(Some(gate_with_grants(pins, count)?));
        interruption.check()?;
    }
    if let Some(gate) = &gates[0] {
        establish_tracked_flow(gate)?;
    }
    let mut floor = EbpfLoader::new()
        .load(FLOOR_OBJECT)
        .context("load floor programs")?;
    for name in [CEILING, READ_FLOOR] {
        floor_program(&mut floor, name)?.load()?;
    }
    let mut receiver = Receiver {
        gates,
        _pins: pins,
        floor,
        topo,
    };

    let traffic: Vec<Vec<Vec<u8>>> = contenders.iter().map(|c| frames(c.traffic, macs)).collect();
    let mut samples: Vec<Vec<Sample>> = contenders.iter().map(|_| Vec::new()).collect();
    let mut order: Vec<usize> = (0..contenders.len()).collect();
    let mut rng = rand::rng();
    for round in 1..=args.rounds {
        order.shuffle(&mut rng);
        eprintln!("round {round} of {}", args.rounds);
        let names: Vec<&str> = order.iter().map(|&i| contenders[i].name.as_str()).collect();
        eprintln!("  order: {}", names.join("; "));
        for &i in &order {
            let contender = &contenders[i];
            let installed = receiver
                .install(contender.enforcer)
                .with_context(|| format!("installing {}", contender.name))?;
            let ifname = receiver.topo.gated_if.clone();
            // Attaching XDP may have made new NAPI threads.
            let napi = napi_threads(&ifname)?;
            if let Some(cpu) = napi_cpu {
                pin_threads(&napi, cpu)?;
            }
            let (before, napi_before) = (snapshot(receiver.ns(), &ifname)?, cpu_seconds(&napi)?);
            let sent = sender.send(&traffic[i], sender_cpu, args.period, args.max_frames)?;
            let (after, napi_after) = (snapshot(receiver.ns(), &ifname)?, cpu_seconds(&napi)?);
            receiver
                .remove(installed)
                .with_context(|| format!("removing {}", contender.name))?;
            let sample = measure(&before, &after, sent, napi_after - napi_before);
            check_verdict(contender, &sample)?;
            samples[i].push(sample);
            interruption.check()?;
        }
    }
    let rows: Vec<Row> = contenders
        .iter()
        .zip(samples)
        .map(|(c, s)| summarize(c, &s))
        .collect();
    let ratios = ratios(&rows, &contenders);
    print_table(&rows, &ratios, &args, sender_cpu, napi_cpu);
    write_outputs(&args, rows, ratios, sender_cpu, napi_cpu)
}

fn summarize(contender: &Contender, samples: &[Sample]) -> Row {
    let per_second = |n: u64, s: &Sample| n as f64 / s.sent.elapsed.as_secs_f64();
    let costs: Vec<f64> = samples.iter().filter_map(|s| s.ns_per_packet).collect();
    Row {
        contender: contender.name.clone(),
        verdict: if contender.drops { "drop" } else { "pass" },
        offered_pps: spread(
            samples
                .iter()
                .map(|s| per_second(s.sent.accepted, s))
                .collect(),
        ),
        received_pps: spread(samples.iter().map(|s| per_second(s.received, s)).collect()),
        packets_per_napi_cpu_s: samples.iter().all(|s| s.napi_cpu_s > 0.0).then(|| {
            spread(
                samples
                    .iter()
                    .map(|s| s.received as f64 / s.napi_cpu_s)
                    .collect(),
            )
        }),
        program_ns_per_packet: (costs.len() == samples.len()).then(|| spread(costs)),
        delivered_to_stack: samples.iter().map(|s| s.delivered).sum(),
    }
}

/// The ratios of program cost per packet that issue 10 sets targets for,
/// by contender key.
const RATIOS: [(&str, &str, &str); 8] = [
    (
        "jit-gate drop (1 grant) / xdp-filter",
        "drop-1",
        "xdp-filter",
    ),
    (
        "random-source flood / single-source drop",
        "flood",
        "drop-1",
    ),
    ("granted SYN pass / drop", "granted", "drop-1"),
    ("unprotected port / ceiling", "unprotected", "ceiling"),
    ("drop with 10,000 grants / 1 grant", "drop-10k", "drop-1"),
    ("drop with the most grants / 1 grant", "drop-most", "drop-1"),
    ("tracked-flow pass / drop", "tracked", "drop-1"),
    (
        "unprotected port / drop after reading the headers",
        "unprotected",
        "read-floor",
    ),
];

/// The ratios of the medians of the contenders that ran.
fn ratios(rows: &[Row], contenders: &[Contender]) -> Vec<Ratio> {
    let cost = |key: &str| {
        let i = contenders.iter().position(|c| c.key == key)?;
        rows[i].program_ns_per_packet.map(|s| s.median)
    };
    RATIOS
        .into_iter()
        .filter_map(|(what, a, b)| {
            Some(Ratio {
                what,
                ratio: cost(a)? / cost(b)?,
            })
        })
        .collect()
}

/// The contenders `--only` names (all if it names none); an unknown key
/// is an error.
fn selected(all: Vec<Contender>, only: &[String]) -> Result<Vec<Contender>> {
    if let Some(unknown) = only
        .iter()
        .find(|k| !all.iter().any(|c| c.key == k.as_str()))
    {
        let keys: Vec<&str> = all.iter().map(|c| c.key).collect();
        bail!(
            "--only: no contender {unknown:?}; keys: {}",
            keys.join(", ")
        );
    }
    Ok(all
        .into_iter()
        .filter(|c| only.is_empty() || only.iter().any(|k| k == c.key))
        .collect())
}

fn print_table(
    rows: &[Row],
    ratios: &[Ratio],
    args: &Args,
    sender: Option<usize>,
    napi: Option<usize>,
) {
    println!(
        "\nlive: TCP floods over veth, {} shuffled rounds of {:?} each, sender on CPU {}, receiving NAPI on CPU {}; median [min-max]\n",
        args.rounds,
        args.period,
        sender.map_or("any".into(), |c| c.to_string()),
        napi.map_or("any".into(), |c| c.to_string()),
    );
    println!(
        "{:<42} {:>7} {:>9} {:>22} {:>22} {:>16}",
        "contender", "verdict", "sent Mpps", "received Mpps", "M per NAPI CPU-s", "prog ns/packet"
    );
    for row in rows {
        let mpps = |s: Spread| {
            format!(
                "{:.3} [{:.3}-{:.3}]",
                s.median / 1e6,
                s.min / 1e6,
                s.max / 1e6
            )
        };
        let cost = row.program_ns_per_packet.map_or("-".into(), |s| {
            format!("{:.0} [{:.0}-{:.0}]", s.median, s.min, s.max)
        });
        println!(
            "{:<42} {:>7} {:>9.3} {:>22} {:>22} {:>16}",
            row.contender,
            row.verdict,
            row.offered_pps.median / 1e6,
            mpps(row.received_pps),
            row.packets_per_napi_cpu_s.map_or("-".into(), mpps),
            cost
        );
    }
    println!("\nprogram cost per packet, ratios of medians:");
    for ratio in ratios {
        println!("  {:<44} {:.2}x", ratio.what, ratio.ratio);
    }
}

fn write_outputs(
    args: &Args,
    rows: Vec<Row>,
    ratios: Vec<Ratio>,
    sender_cpu: Option<usize>,
    napi_cpu: Option<usize>,
) -> Result<()> {
    for path in [&args.output, &args.chart] {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
    }
    let bar = |label: &str, s: Spread, scale: f64| Bar {
        label: label.to_owned(),
        median: s.median / scale,
        min: s.min / scale,
        max: s.max / scale,
    };
    let panels = [
        Panel {
            title: "packets received per second (millions)".into(),
            bars: rows
                .iter()
                .map(|r| bar(&r.contender, r.received_pps, 1e6))
                .collect(),
        },
        Panel {
            title: "packets received per CPU-second of the receiving NAPI thread (millions)".into(),
            bars: rows
                .iter()
                .filter_map(|r| Some(bar(&r.contender, r.packets_per_napi_cpu_s?, 1e6)))
                .collect(),
        },
        Panel {
            title: "XDP program cost, ns per packet (BPF run-time statistics)".into(),
            bars: rows
                .iter()
                .filter_map(|r| Some(bar(&r.contender, r.program_ns_per_packet?, 1.0)))
                .collect(),
        },
    ];
    write_svg(&args.chart, &panels)?;
    let results = Results {
        rounds: args.rounds,
        period_s: args.period.as_secs_f64(),
        sender_cpu,
        napi_cpu,
        contenders: rows,
        ratios,
    };
    std::fs::write(&args.output, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("write {}", args.output.display()))?;
    println!(
        "\nresults written to {} and {}",
        args.output.display(),
        args.chart.display()
    );
    Ok(())
}
