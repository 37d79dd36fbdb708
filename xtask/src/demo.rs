//! `cargo xtask demo`: the end-to-end demonstration of the gate, through
//! the real agent and CLI binaries.

use anyhow::Result;

use crate::cmd::{self, cargo};

pub(crate) fn run() -> Result<()> {
    // The demo finds jit-gate-agent and jit-gate beside itself in target/release.
    cmd::run(cargo().args(["build", "--release", "-p", "jit-gate-agent", "--bins"]))?;
    cmd::run(cargo().args([
        "run",
        "--release",
        "-p",
        "jit-gate-tests",
        "--bin",
        "jit-gate-demo",
    ]))
}
