//! `cargo xtask bench`: per-packet cost of each verdict path of the loaded
//! gate through `BPF_PROG_TEST_RUN`, beside bare `XDP_PASS/XDP_DROP` programs
//! (the floor) measured in the same run, with 1, 10,000 and 1,000,000 exact
//! grants loaded. Rounds interleave all programs so machine noise hits each
//! alike; the median of the rounds is reported, as ns/packet and as a ratio
//! to the floor of the same verdict.
//!
//! Then the drop path under a flood: denied SYNs from one source against
//! SYNs from a new random source each, one frame per run (the program must
//! see each source once, as a spoofed flood makes it), beside the floor
//! measured the same way.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use serde::Serialize;

use anyhow::{Context, Result, ensure};
use aya::{
    Ebpf, EbpfLoader,
    programs::{ProgramError, TestRun, TestRunOptions, Xdp},
};
use clap::Parser;
use jit_gate_agent::{
    clock::boot_now_ns,
    enforce::xdp::XdpGate,
    net::{GrantTarget, Protocol},
};
use jit_gate_common::maps::{FlowKey, FlowValue, flow_state};
use jit_gate_common::verdict::{Address, Transport, tcp_flags};
use jit_gate_tests::{env::PinDir, packets::Packet, scenario::XDP_PASS};
use rand::{Rng, SeedableRng, rngs::StdRng};

static FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("JIT_GATE_EBPF_OBJECTS"), "/jit-gate-floor"));

#[derive(Parser)]
struct Args {
    /// Packets per measurement (`BPF_PROG_TEST_RUN` repeat count).
    #[arg(long, default_value_t = 200_000)]
    repeat: u32,
    /// Interleaved rounds; the median is reported.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Grant-table sizes to measure with.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 10_000, 1_000_000])]
    grants: Vec<u32>,
    /// Frames per round of the flood measurement (one `BPF_PROG_TEST_RUN` each).
    #[arg(long, default_value_t = 20_000)]
    flood_frames: usize,
    /// Where the machine-readable results go.
    #[arg(long, default_value = "target/bench/xdp.json")]
    output: PathBuf,
}

const SSH: u16 = 22;
const CLIENT_PORT: u16 = 40_000;
const GATED: [u8; 4] = [192, 0, 2, 1];
const GRANTED: [u8; 4] = [198, 51, 100, 7];
const FLOW_SOURCE: [u8; 4] = [198, 51, 100, 8];
const CIDR_SOURCE: [u8; 4] = [203, 0, 113, 9];
const STRANGER: [u8; 4] = [203, 0, 114, 1];
const GRANTED_V6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
const GATED_V6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// A TCP segment from `src` to the gated host: a SYN, or an ACK of an open connection.
fn tcp(src: IpAddr, dst_port: u16, syn: bool) -> Vec<u8> {
    let dst = if src.is_ipv4() {
        IpAddr::from(GATED)
    } else {
        IpAddr::from(GATED_V6)
    };
    let flags = if syn { tcp_flags::SYN } else { tcp_flags::ACK };
    Packet::tcp(src, dst, dst_port, flags)
        .src_port(CLIENT_PORT)
        .build()
        .bytes
}

fn arp() -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend([2, 0, 0, 0, 0, 2, 0x08, 0x06]);
    frame.resize(60, 0);
    frame
}

/// One measured path: the frame, the program it runs through, the verdict
/// it must get (checked, so a path cannot silently measure the wrong thing).
struct Path {
    name: &'static str,
    frame: Vec<u8>,
    expect_pass: bool,
}

fn paths() -> Vec<Path> {
    let path = |name, frame, expect_pass| Path {
        name,
        frame,
        expect_pass,
    };
    vec![
        path("pass: not IP (ARP)", arp(), true),
        path(
            "pass: unprotected port",
            tcp(STRANGER.into(), 8080, true),
            true,
        ),
        path(
            "drop: no grant (SYN)",
            tcp(STRANGER.into(), SSH, true),
            false,
        ),
        path(
            "drop: no grant (ACK)",
            tcp(STRANGER.into(), SSH, false),
            false,
        ),
        path(
            "pass: exact grant v4 (ACK, no flow)",
            tcp(GRANTED.into(), SSH, false),
            true,
        ),
        path(
            "pass: exact grant v6 (ACK, no flow)",
            tcp(GRANTED_V6.into(), SSH, false),
            true,
        ),
        path(
            "pass: CIDR grant v4 (ACK, no flow)",
            tcp(CIDR_SOURCE.into(), SSH, false),
            true,
        ),
        path(
            "pass: tracked flow",
            tcp(FLOW_SOURCE.into(), SSH, false),
            true,
        ),
    ]
}

/// One line of the machine-readable results.
#[derive(Serialize)]
struct Row {
    grants: u32,
    path: &'static str,
    ns_per_packet: f64,
    floor_ns: f64,
    ratio: f64,
}

/// The flood measurement.
#[derive(Serialize)]
struct Flood {
    grants: u32,
    frames_per_round: usize,
    one_source_ns: f64,
    random_sources_ns: f64,
    floor_ns: f64,
    /// Random sources against one source: the cost of a spoofed flood.
    random_over_one: f64,
}

#[derive(Serialize)]
struct Results {
    paths: Vec<Row>,
    flood: Vec<Flood>,
}

fn run(program: &Xdp, frame: &[u8], repeat: u32) -> Result<(f64, bool), ProgramError> {
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..Default::default()
    })?;
    // The kernel reports the mean duration of one repetition.
    Ok((
        result.duration.as_nanos() as f64,
        result.return_value == XDP_PASS,
    ))
}

/// Mean ns per packet over `frames`, one run each.
fn per_frame(program: &Xdp, frames: &[Vec<u8>], expect_pass: bool) -> Result<f64> {
    let mut total = 0.0;
    for frame in frames {
        let (ns, passed) = run(program, frame, 1)?;
        ensure!(passed == expect_pass, "a flood frame got the wrong verdict");
        total += ns;
    }
    Ok(total / frames.len() as f64)
}

/// Denied SYNs from one source, and each from a new source of 100.64.0.0/10
/// (outside every granted range) on a random port.
fn flood_frames(count: usize) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut rng = StdRng::seed_from_u64(1);
    let one = vec![tcp(STRANGER.into(), SSH, true); count];
    let random = (0..count)
        .map(|_| {
            let source = Ipv4Addr::from(0x6440_0000 | (rng.random::<u32>() >> 10));
            Packet::tcp(source.into(), GATED.into(), SSH, tcp_flags::SYN)
                .src_port(rng.random_range(1024..=65_535))
                .build()
                .bytes
        })
        .collect();
    (one, random)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Fills the exact-grant map up to `total` entries with addresses outside
/// every range the paths use.
fn fill_grants(gate: &mut XdpGate, have: u32, total: u32, expires: u64) -> Result<()> {
    for i in have..total {
        let addr = Ipv4Addr::from(0x0a00_0000u32 + i);
        let target = GrantTarget {
            source: IpAddr::V4(addr).into(),
            protocol: Protocol::Tcp,
            port: SSH,
        };
        gate.upsert_grant(&target, expires, u64::from(i) + 1000)?;
    }
    Ok(())
}

fn setup(gate: &mut XdpGate) -> Result<u64> {
    gate.set_protected_ports(&BTreeSet::from([(Protocol::Tcp, SSH)]))?;
    let expires = boot_now_ns() + 3_600_000_000_000;
    let grant = |source: IpAddr| GrantTarget {
        source: source.into(),
        protocol: Protocol::Tcp,
        port: SSH,
    };
    gate.upsert_grant(&grant(Ipv4Addr::from(GRANTED).into()), expires, 1)?;
    gate.upsert_grant(
        &grant(std::net::Ipv6Addr::from(GRANTED_V6).into()),
        expires,
        2,
    )?;
    let cidr = GrantTarget {
        source: "203.0.113.0/24".parse()?,
        protocol: Protocol::Tcp,
        port: SSH,
    };
    gate.upsert_grant(&cidr, expires, 3)?;
    let transport = Transport {
        protocol: Protocol::Tcp.number(),
        src_port: CLIENT_PORT,
        dst_port: SSH,
        tcp_flags: 0,
    };
    let key = FlowKey::of(&Address::v4(FLOW_SOURCE), &Address::v4(GATED), &transport);
    gate.insert_flow(
        key,
        FlowValue {
            grant_id: 4,
            opened_at_boot_ns: boot_now_ns(),
            last_seen_boot_ns: boot_now_ns(),
            state: flow_state::ESTABLISHED,
            _pad: 0,
        },
    )?;
    Ok(expires)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let pins = PinDir::new();
    let mut gate = pins.open_gate();
    let expires = setup(&mut gate)?;
    let mut floor: Ebpf = EbpfLoader::new()
        .load(FLOOR_OBJECT)
        .context("load floor programs")?;
    for name in ["floor_pass", "floor_drop"] {
        let p: &mut Xdp = floor.program_mut(name).context(name)?.try_into()?;
        p.load()?;
    }
    let floor_pass: &Xdp = floor
        .program("floor_pass")
        .context("floor_pass")?
        .try_into()?;
    let floor_drop: &Xdp = floor
        .program("floor_drop")
        .context("floor_drop")?
        .try_into()?;
    let probe = tcp(STRANGER.into(), SSH, true);

    let mut rows = Vec::new();
    let mut floods = Vec::new();
    let mut loaded = 2u32; // the v4 and v6 exact grants of setup()
    println!(
        "BPF_PROG_TEST_RUN, {} packets per run, median of {} interleaved rounds\n",
        args.repeat, args.rounds
    );
    println!(
        "{:>9}  {:<36} {:>9} {:>9} {:>9}",
        "grants", "path", "ns/pkt", "floor", "ratio"
    );
    for &total in &args.grants {
        fill_grants(&mut gate, loaded, total.max(loaded), expires)?;
        loaded = total.max(loaded);
        let paths = paths();
        let mut samples = vec![Vec::new(); paths.len()];
        let (mut pass_floor, mut drop_floor) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            pass_floor.push(run(floor_pass, &probe, args.repeat)?.0);
            drop_floor.push(run(floor_drop, &probe, args.repeat)?.0);
            for (path, sample) in paths.iter().zip(&mut samples) {
                let (ns, passed) = run(gate.program(), &path.frame, args.repeat)?;
                ensure!(passed == path.expect_pass, "{}: wrong verdict", path.name);
                sample.push(ns);
            }
        }
        let (pass_floor, drop_floor) = (median(pass_floor), median(drop_floor));
        for (path, sample) in paths.iter().zip(samples) {
            let ns = median(sample);
            let floor = if path.expect_pass {
                pass_floor
            } else {
                drop_floor
            };
            println!(
                "{:>9}  {:<36} {:>9.1} {:>9.1} {:>8.2}x",
                loaded,
                path.name,
                ns,
                floor,
                ns / floor
            );
            rows.push(Row {
                grants: loaded,
                path: path.name,
                ns_per_packet: ns,
                floor_ns: floor,
                ratio: ns / floor,
            });
        }
        floods.push(measure_flood(&gate, floor_drop, loaded, &args)?);
    }
    for flood in &floods {
        println!(
            "\ndrop path under a flood, {} grants, one frame per run, {} frames per round, \
             median of {} rounds: one source {:.1} ns, random sources {:.1} ns, floor {:.1} ns, \
             random/one {:.2}x",
            flood.grants,
            flood.frames_per_round,
            args.rounds,
            flood.one_source_ns,
            flood.random_sources_ns,
            flood.floor_ns,
            flood.random_over_one
        );
    }
    if let Some(dir) = args.output.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let results = Results {
        paths: rows,
        flood: floods,
    };
    std::fs::write(&args.output, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("write {}", args.output.display()))?;
    println!("\nresults written to {}", args.output.display());
    Ok(())
}

fn measure_flood(gate: &XdpGate, floor_drop: &Xdp, grants: u32, args: &Args) -> Result<Flood> {
    let (one, random) = flood_frames(args.flood_frames);
    let (mut floor, mut one_ns, mut random_ns) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        floor.push(per_frame(floor_drop, &one, false)?);
        one_ns.push(per_frame(gate.program(), &one, false)?);
        random_ns.push(per_frame(gate.program(), &random, false)?);
    }
    let flood = Flood {
        grants,
        frames_per_round: args.flood_frames,
        one_source_ns: median(one_ns),
        random_sources_ns: median(random_ns),
        floor_ns: median(floor),
        random_over_one: 0.0,
    };
    Ok(Flood {
        random_over_one: flood.random_sources_ns / flood.one_source_ns,
        ..flood
    })
}
