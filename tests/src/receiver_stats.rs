//! What the live benchmark reads on the receiving side: the interface's
//! receive counter, the TCP segments that reached the stack, and the BPF
//! run-time statistics of the XDP program on the interface; the
//! interface's threaded NAPI: pinned to one CPU, its CPU time read.

use std::{io, os::fd::OwnedFd};

use anyhow::{Context as _, Result, bail};
use aya::{
    programs::loaded_programs,
    sys::{Stats, enable_stats},
};
use serde_json::Value;

use crate::{netns::Netns, packet_sender::pin};

/// Counters of the receiving interface at one instant.
#[derive(Clone, Copy, Debug)]
pub struct Snapshot {
    /// Frames the interface received (whatever happened to them next).
    pub received: u64,
    /// TCP segments that reached the stack (`Tcp: InSegs`).
    pub tcp_segments: u64,
    /// The attached XDP program's run count and total run time.
    pub program: Option<ProgramStats>,
}

#[derive(Clone, Copy, Debug)]
pub struct ProgramStats {
    pub id: u32,
    pub runs: u64,
    pub run_time_ns: u64,
}

/// Keeps BPF run-time statistics on while held (`BPF_ENABLE_STATS`: they
/// go off again when the last holder closes its descriptor, unlike the
/// global sysctl).
pub struct RunTimeStats {
    _fd: OwnedFd,
}

impl RunTimeStats {
    pub fn enable() -> Result<Self> {
        let fd = enable_stats(Stats::RunTime).context("BPF_ENABLE_STATS")?;
        Ok(RunTimeStats { _fd: fd })
    }
}

/// Reads the counters of `ifname` in `ns`.
pub fn snapshot(ns: &Netns, ifname: &str) -> Result<Snapshot> {
    let link = ns.exec("ip", &["-s", "-d", "-j", "link", "show", "dev", ifname]);
    let link: Value = serde_json::from_str(&link).context("ip -j link")?;
    let received = link[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .context("rx packets in `ip -s -j link`")?;
    let program = match link[0]["xdp"]["prog"]["id"].as_u64() {
        Some(id) => Some(program_stats(u32::try_from(id)?)?),
        None => None,
    };
    let snmp = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))?;
    Ok(Snapshot {
        received,
        tcp_segments: tcp_in_segments(&snmp)?,
        program,
    })
}

fn program_stats(id: u32) -> Result<ProgramStats> {
    for info in loaded_programs() {
        let info = info?;
        if info.id() == id {
            return Ok(ProgramStats {
                id,
                runs: info.run_count(),
                run_time_ns: info.run_time().as_nanos() as u64,
            });
        }
    }
    bail!("no loaded program with id {id}")
}

/// `InSegs` of the `Tcp:` lines of /proc/net/snmp (a header line, then values).
fn tcp_in_segments(snmp: &str) -> Result<u64> {
    let mut tcp = snmp.lines().filter(|line| line.starts_with("Tcp:"));
    let (names, values) = (tcp.next(), tcp.next());
    let (Some(names), Some(values)) = (names, values) else {
        bail!("no Tcp lines in /proc/net/snmp");
    };
    let at = names
        .split_whitespace()
        .position(|name| name == "InSegs")
        .context("no InSegs in /proc/net/snmp")?;
    values
        .split_whitespace()
        .nth(at)
        .context("short Tcp line")?
        .parse()
        .context("InSegs")
}

/// Makes `ifname` in `ns` receive through NAPI in a kernel thread of its
/// own even without XDP (GRO on; veth then uses NAPI for frames from a
/// peer without TSO), so that the receiving work is done off the sender's
/// CPU, in threads that can be pinned and whose CPU time can be read.
pub fn thread_napi(ns: &Netns, ifname: &str) {
    ns.exec("ethtool", &["-K", ifname, "gro", "on"]);
    let threaded = format!("/sys/class/net/{ifname}/threaded");
    // `ip netns exec` mounts the namespace's own /sys.
    ns.exec("sh", &["-c", &format!("echo 1 > {threaded}")]);
}

/// The process ids of the NAPI threads of `ifname`; fails if there are none.
pub fn napi_threads(ifname: &str) -> Result<Vec<libc::pid_t>> {
    // Thread names are cut to 15 bytes.
    let name = format!("napi/{ifname}-");
    let prefix = &name[..name.len().min(15)];
    let mut threads = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.starts_with(prefix) {
            threads.push(pid);
        }
    }
    if threads.is_empty() {
        bail!(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no NAPI thread of {ifname} (threaded NAPI not on?)")
        ));
    }
    Ok(threads)
}

/// Pins `threads` to `cpu`.
pub fn pin_threads(threads: &[libc::pid_t], cpu: usize) -> Result<()> {
    for &pid in threads {
        pin(pid, cpu).with_context(|| format!("pin thread {pid}"))?;
    }
    Ok(())
}

/// CPU time `threads` used so far (user and system), in seconds.
pub fn cpu_seconds(threads: &[libc::pid_t]) -> Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut ticks = 0u64;
    for pid in threads {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces): state is
        // field 3, utime and stime fields 14 and 15.
        let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        for at in [11, 12] {
            ticks += fields.get(at).context("short /proc stat")?.parse::<u64>()?;
        }
    }
    Ok(ticks as f64 / ticks_per_second)
}
