//! What the benchmarks measure with: latency percentiles, the time a TCP
//! handshake from a given source takes, a process's memory and CPU time,
//! and what a database's bytes are.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use serde::Serialize;

#[derive(Clone, Copy, Serialize)]
pub struct Percentiles {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// Percentiles of `xs` (nearest rank), in microseconds.
pub fn percentiles(mut xs: Vec<Duration>) -> Percentiles {
    xs.sort();
    let at = |q: f64| xs[((xs.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
    Percentiles {
        p50_us: at(0.5),
        p99_us: at(0.99),
        p999_us: at(0.999),
        max_us: at(1.0),
    }
}

/// Times a TCP handshake from `src`; fails if it does not complete in 1 s.
pub fn connect_time(src: IpAddr, dst: SocketAddr) -> Result<Duration> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&SocketAddr::new(src, 0).into())?;
    let start = Instant::now();
    socket
        .connect_timeout(&dst.into(), Duration::from_secs(1))
        .with_context(|| format!("connect from {src} to {dst}"))?;
    let took = start.elapsed();
    drop(TcpStream::from(socket));
    Ok(took)
}

/// A process's resident memory now and at its peak (`VmRSS`, `VmHWM`), MiB.
pub fn rss_mib(pid: i32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{name} missing"))?;
        let kib: f64 = line.split_whitespace().nth(1).context("value")?.parse()?;
        Ok(kib / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time (user and system) a process has used so far: all its threads,
/// and those named `thread` (as `comm` shows them). Unlike a rate, it
/// hardly changes with what else the machine runs.
pub fn cpu_time(pid: i32, thread: &str) -> Result<(Duration, Duration)> {
    // SAFETY: sysconf only reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(ticks > 0, "no clock tick rate");
    let used = |stat: &str| -> Result<Duration> {
        // Fields after the parenthesised name: state is the 3rd, utime the 14th.
        let rest = stat.rsplit_once(')').context("stat without a name")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field =
            |i: usize| -> Result<u64> { Ok(fields.get(i - 3).context("short stat")?.parse()?) };
        let ticks_used = field(14)? + field(15)?;
        Ok(Duration::from_secs_f64(ticks_used as f64 / ticks as f64))
    };
    let process = used(&std::fs::read_to_string(format!("/proc/{pid}/stat"))?)?;
    let mut named = Duration::ZERO;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = task?.path();
        if std::fs::read_to_string(dir.join("comm"))?.trim_end() == thread {
            named += used(&std::fs::read_to_string(dir.join("stat"))?)?;
        }
    }
    Ok((process, named))
}

/// Bytes of each table and index of the `SQLite` database at `path`
/// (pages, from its `dbstat` table), largest first.
pub fn database_bytes(path: &std::path::Path) -> Result<Vec<(String, i64)>> {
    let db =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("open {}", path.display()))?;
    let mut stmt =
        db.prepare("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY SUM(pgsize) DESC")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}
