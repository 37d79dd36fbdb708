//! `cargo xtask test`: what CI runs (through `.ci/run`) and what the README tells people to run.

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader},
    process::Stdio,
};

use anyhow::{Context, Result};

use crate::cmd::{self, cargo, command};

/// jit-gate-ebpf only builds for bpfel (through jit-gate-agent's build.rs), never for the host.
const EXCLUDE: [&str; 3] = ["--workspace", "--exclude", "jit-gate-ebpf"];

pub(crate) fn run(args: &[String]) -> Result<()> {
    let extra = args.iter().fold(String::new(), |mut extra, a| {
        let _ = write!(extra, " {a}");
        extra
    });
    println!(
        "xtask test: cargo fmt --check, cargo clippy -D warnings (and on the XDP program for its target), then cargo test --workspace --exclude jit-gate-ebpf --no-fail-fast --lib --bins --tests{extra}"
    );
    // Cheapest checks first, so a formatting slip fails in seconds rather than after a build.
    cmd::run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    cmd::run(
        cargo()
            .arg("clippy")
            .args(EXCLUDE)
            .args(["--all-targets", "--", "-D", "warnings"]),
    )?;
    cmd::run(&mut clippy_ebpf())?;
    // The packages, from the binaries the tests use (tests/tests/package.rs
    // installs and unpacks them).
    let dist_dir = cmd::workspace_root().join(crate::dist::TEST_DIR);
    crate::dist::run(crate::dist::Profile::Dev, &dist_dir)?;
    // --no-fail-fast: one failing test binary should not hide the results of the others.
    // --lib --bins --tests: the workspace has no doc tests; their empty runs would end the log.
    let mut test = cargo();
    test.arg("test")
        .args(EXCLUDE)
        .args(["--no-fail-fast", "--lib", "--bins", "--tests"])
        .args(args)
        .env(crate::dist::DIST_DIR_VAR, &dist_dir)
        .stdout(Stdio::piped());
    let what = "cargo test";
    let mut child = test
        .spawn()
        .with_context(|| format!("could not start `{what}`"))?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let mut totals = Totals::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("read cargo test output")?;
        println!("{line}");
        totals.add(&line);
    }
    let status = child.wait().with_context(|| format!("wait for `{what}`"))?;
    // One closing line for the whole workspace, after the per-binary ones.
    println!(
        "total: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    anyhow::ensure!(status.success(), "`{what}` failed ({status})");
    anyhow::ensure!(totals.passed > 0, "`{what}` ran no test");
    Ok(())
}

/// Clippy on the XDP program, for the target it is built for (as aya's
/// xtask does): the nightly toolchain, `core` built from source, a target
/// directory of its own.
fn clippy_ebpf() -> std::process::Command {
    let mut clippy = command("rustup");
    clippy
        .current_dir(cmd::workspace_root())
        .args(["run", "nightly", "cargo", "clippy", "-p", "jit-gate-ebpf"])
        .args(["--target", "bpfel-unknown-none", "-Zbuild-std=core"])
        .args(["--bins", "--release", "--target-dir", "target/bpf-clippy"])
        .args(["--", "-D", "warnings"]);
    clippy
}

/// Sums libtest's per-binary summary lines.
#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    /// Adds a line like `test result: ok. 5 passed; 0 failed; 1 ignored; ...`.
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(['.', ';']) {
            let mut words = part.split_whitespace();
            let (Some(n), Some(kind)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match kind {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_libtest_summary_lines_and_ignores_the_rest() {
        let mut t = Totals::default();
        t.add("test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.1s");
        t.add("test result: FAILED. 2 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out");
        t.add("test foo ... ok");
        assert_eq!((t.passed, t.failed, t.ignored), (7, 3, 1));
    }
}
