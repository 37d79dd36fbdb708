//! `cargo xtask`: the project's developer and CI entry point (see `.cargo/config.toml`).
//!
//! Every subcommand that builds or runs anything calls `bootstrap` first, so a fresh
//! machine needs nothing but `cargo xtask test`; on a ready machine bootstrap only
//! checks and costs well under a second.

mod bench;
mod bootstrap;
mod cmd;
mod demo;
mod dist;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "jit-gate developer tasks", version)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Make this machine ready: Debian packages, nightly rust-src, bpf-linker, bpffs (needs root).
    Bootstrap,
    /// Bootstrap, check formatting and clippy, then run the workspace's tests.
    ///
    /// Extra arguments go to `cargo test`, e.g. `cargo xtask test -- -p jit-gate-tests -- --nocapture`.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Bootstrap, then build a .deb and a tarball for this machine's
    /// architecture from a release build, into target/dist.
    Dist {
        /// Package the debug build, uncompressed, into target/dist-test
        /// instead (what `cargo xtask test` does for the package tests).
        #[arg(long)]
        dev: bool,
    },
    /// Bootstrap, then run the end-to-end demo (`jit-gate-demo`).
    Demo,
    /// Bootstrap, then run the benchmarks (`jit-gate-bench`); extra arguments go to the benchmark.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Bootstrap => bootstrap::run().map(|changed| {
            if !changed {
                println!("bootstrap: everything already present");
            }
        }),
        Task::Test { args } => bootstrap::run().and_then(|_| test::run(&args)),
        Task::Demo => bootstrap::run().and_then(|_| demo::run()),
        Task::Dist { dev } => bootstrap::run().and_then(|_| {
            let (profile, dir) = if dev {
                (dist::Profile::Dev, dist::TEST_DIR)
            } else {
                (dist::Profile::Release, "target/dist")
            };
            dist::run(profile, &cmd::workspace_root().join(dir)).map(|_| ())
        }),
        Task::Bench { args } => bootstrap::run().and_then(|_| bench::run(&args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            // Pass a child's exit code through so CI sees what cargo test returned.
            let code = err
                .downcast_ref::<cmd::Failed>()
                .and_then(|f| f.code)
                .and_then(|c| u8::try_from(c).ok())
                .filter(|&c| c != 0)
                .unwrap_or(1);
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(argv: &str) -> Vec<String> {
        match Cli::try_parse_from(argv.split_whitespace()).unwrap().task {
            Task::Test { args } | Task::Bench { args } => args,
            _ => panic!("not test or bench"),
        }
    }

    #[test]
    fn extra_args_are_forwarded_verbatim() {
        assert!(forwarded("xtask test").is_empty());
        assert_eq!(
            forwarded("xtask test -- -p jit-gate-tests -- --nocapture"),
            ["-p", "jit-gate-tests", "--", "--nocapture"]
        );
        assert_eq!(forwarded("xtask test -p x"), ["-p", "x"]);
        assert_eq!(forwarded("xtask bench -- --rate 5"), ["--rate", "5"]);
        assert_eq!(forwarded("xtask bench --rate 5"), ["--rate", "5"]);
    }
}
