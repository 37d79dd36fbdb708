//! `cargo xtask bench`: the benchmarks, in release mode: per-packet costs
//! of the XDP program, live traffic against the gate's peers, the control
//! plane through a real agent, remote brokers (mutual TLS beside the Unix
//! socket, and fan-outs), then fleet mode on etcd (write-to-enforced
//! latency and idle cost, stepping up the number of agents).

use anyhow::Result;

use crate::cmd::{self, cargo};

pub(crate) fn run(args: &[String]) -> Result<()> {
    cmd::run(cargo().args(["build", "--release", "-p", "jit-gate-agent", "--bins"]))?;
    for bench in [
        "jit-gate-bench",
        "jit-gate-live-bench",
        "jit-gate-control-bench",
        "jit-gate-tls-bench",
        "jit-gate-fleet-bench",
    ] {
        let mut command = cargo();
        command.args([
            "run",
            "--release",
            "-p",
            "jit-gate-tests",
            "--bin",
            bench,
            "--",
        ]);
        if bench == "jit-gate-bench" {
            command.args(args);
        }
        cmd::run(&mut command)?;
    }
    Ok(())
}
