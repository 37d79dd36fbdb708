//! `cargo xtask bench`: the benchmarks; release mode because per-packet costs are measured.

use anyhow::Result;

use crate::cmd::{self, cargo};

pub fn run(args: &[String]) -> Result<()> {
    cmd::run(
        cargo()
            .args([
                "run",
                "--release",
                "-p",
                "jit-gate-tests",
                "--bin",
                "jit-gate-bench",
                "--",
            ])
            .args(args),
    )
}
