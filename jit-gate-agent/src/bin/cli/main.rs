//! `jit-gate`: the operator CLI, a client of the agent's gRPC API over its
//! Unix socket or its mutual-TLS listener. One command can run on many
//! agents at once (a fleet, from a file), with bounded concurrency.
//!
//! Exit status: 0 if the command succeeded on every agent, 1 if it failed
//! on any, 2 for a usage error (bad option, unreadable or invalid policy
//! file), found before any agent is contacted, 3 if `audit verify` found a
//! broken audit log.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

mod approvals;
mod args;
mod audit;
mod commands;
mod connect;
mod convert;
mod fleet;
mod output;
mod tls;
mod watch;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    if let Some(code) = jit_gate_agent::docs::write_if_asked::<args::Cli>() {
        return code;
    }
    // Die quietly on a closed pipe (`jit-gate watch | head`), as Unix
    // tools do, instead of panicking in println!.
    // SAFETY: restores the default disposition before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = args::Cli::try_parse().unwrap_or_else(|error| {
        let hint = args::misplaced_option_hint(&error);
        // Prints the error (or the help or version asked for) and its usage.
        let _ = error.print();
        if let Some(hint) = hint {
            eprintln!("hint: {hint}");
        }
        std::process::exit(error.exit_code());
    });
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(commands::Outcome::Success) => ExitCode::SUCCESS,
        Ok(commands::Outcome::Failure) => ExitCode::FAILURE,
        Ok(commands::Outcome::AuditBroken) => ExitCode::from(3),
        Ok(commands::Outcome::NotGranted(end)) => ExitCode::from(end.exit_status()),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
