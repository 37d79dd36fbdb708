//! `cargo xtask bench`: the benchmarks, in release mode: per-packet costs
//! of the XDP program, then the control plane through a real agent.

use anyhow::Result;

use crate::cmd::{self, cargo};

pub(crate) fn run(args: &[String]) -> Result<()> {
    cmd::run(cargo().args(["build", "--release", "-p", "jit-gate-agent", "--bins"]))?;
    for bench in ["jit-gate-bench", "jit-gate-control-bench"] {
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
