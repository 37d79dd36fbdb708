//! `cargo xtask demo`: the end-to-end demonstration of the gate.

use anyhow::Result;

use crate::cmd::{self, cargo};

pub fn run() -> Result<()> {
    cmd::run(cargo().args([
        "run",
        "--release",
        "-p",
        "jit-gate-tests",
        "--bin",
        "jit-gate-demo",
    ]))
}
