//! `cargo xtask test`: what CI runs (through `.ci/run`) and what the README tells people to run.

use anyhow::Result;

use crate::cmd::{self, cargo};

/// jit-gate-ebpf only builds for bpfel (through jit-gate-agent's build.rs), never for the host.
const EXCLUDE: [&str; 3] = ["--workspace", "--exclude", "jit-gate-ebpf"];

pub fn run(args: &[String]) -> Result<()> {
    let extra: String = args.iter().map(|a| format!(" {a}")).collect();
    println!(
        "xtask test: cargo fmt --check, cargo clippy -D warnings, then cargo test --workspace --exclude jit-gate-ebpf --no-fail-fast{extra}"
    );
    // Cheapest checks first, so a formatting slip fails in seconds rather than after a build.
    cmd::run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    cmd::run(
        cargo()
            .arg("clippy")
            .args(EXCLUDE)
            .args(["--all-targets", "--", "-D", "warnings"]),
    )?;
    // --no-fail-fast: one failing test binary should not hide the results of the others.
    cmd::run(
        cargo()
            .arg("test")
            .args(EXCLUDE)
            .arg("--no-fail-fast")
            .args(args),
    )
}
