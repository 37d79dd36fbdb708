//! jit-gate-agent: the daemon. Loads the configuration, restores grants,
//! programs the kernel and serves the API on its Unix socket. Stopping it
//! leaves enforcement in place; `remove` takes the gate away.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use jit_gate_agent::{
    api::{Service, server},
    auth::UidRole,
    config::{self, Config},
    enforce::{nft::NftGate, xdp::XdpGate},
    engine::{Command, Engine, EngineHandle},
    startup,
    store::AuditReader,
};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    version,
    about = "jit-gate agent: just-in-time access gate for management ports"
)]
struct Args {
    /// Configuration file.
    #[arg(long, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Create a missing database although pinned XDP state or the nftables
    /// table exist (the database was lost): a new audit chain starts, its
    /// first record saying so. Refused if the database exists.
    #[arg(long)]
    reinitialize: bool,
    #[command(subcommand)]
    command: Option<Action>,
}

#[derive(Subcommand)]
enum Action {
    /// Run the agent (the default).
    Run,
    /// Validate the configuration and exit.
    CheckConfig,
    /// Remove the gate: detach XDP, delete its pins and the nftables table.
    Remove,
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    // Every file the agent creates (database, WAL, key, socket) is its own,
    // whatever umask it was started with.
    // SAFETY: umask only sets this process's file-creation mask.
    unsafe {
        libc::umask(0o077);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("jit-gate-agent: invalid configuration, nothing attached: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match args.command.unwrap_or(Action::Run) {
        Action::CheckConfig => {
            println!("{}: valid", args.config.display());
            Ok(())
        }
        Action::Remove => remove(&config),
        Action::Run => run(config, &args.config, args.reinitialize),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jit-gate-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One malloc arena for the whole process: the agent has three busy
/// threads, and glibc's default of one arena per thread multiplies the
/// memory freed but kept around (measured: 25% less resident memory with
/// 100,000 grants).
fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator parameter; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn remove(config: &Config) -> anyhow::Result<()> {
    XdpGate::remove(&config.pin_dir).context("removing the XDP gate")?;
    let existed = NftGate::new(config.nft_table.clone())
        .remove()
        .context("removing the nftables table")?;
    println!(
        "removed {} and {}nftables table {}",
        config.pin_dir.display(),
        if existed { "" } else { "(absent) " },
        config.nft_table
    );
    Ok(())
}

fn run(config: Config, config_path: &Path, reinitialize: bool) -> anyhow::Result<()> {
    // Everything that can fail is checked before anything is attached.
    let (prepared, listener) =
        startup::prepare(&config, reinitialize).context("nothing attached, nothing changed")?;
    let reader = AuditReader::open(&config.database)?;
    let public_key = prepared.key.verifying_key();
    let api = config.api.clone();
    let principals = Arc::new(RwLock::new(config.api.principals.clone()));
    let engine = Engine::start(config, prepared).context("starting")?;
    let (handle, engine_thread) = engine.spawn()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let service = Service::new(handle.clone(), principals.clone(), reader, public_key, &api);
        tokio::spawn(reload_on_sighup(
            config_path.to_owned(),
            handle.clone(),
            principals,
        ));
        tokio::spawn(watchdog(handle.clone()));
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        tracing::info!("serving on {}", api.unix_socket.display());
        server::serve(listener, service, shutdown_signal()).await
    })?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    drop(handle);
    drop(runtime);
    engine_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the engine thread panicked"))?;
    tracing::info!("stopped; enforcement stays in place");
    Ok(())
}

async fn shutdown_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping");
}

/// SIGHUP: read and validate the file again; a bad file changes nothing.
async fn reload_on_sighup(
    path: PathBuf,
    engine: EngineHandle,
    principals: Arc<RwLock<Vec<UidRole>>>,
) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot listen for SIGHUP; reload disabled");
        return;
    };
    while hup.recv().await.is_some() {
        let config = match Config::load(&path) {
            Ok(config) => config,
            Err(e) => {
                tracing::error!("reload refused, running configuration kept: {e}");
                continue;
            }
        };
        let new_principals = config.api.principals.clone();
        match engine
            .call(|reply| Command::Reload {
                config: Box::new(config),
                reply,
            })
            .await
        {
            Ok(()) => {
                *principals.write().expect("principals lock") = new_principals;
                tracing::info!("configuration reloaded from {}", path.display());
            }
            Err(e) => tracing::error!("reload refused, running configuration kept: {}", e.message),
        }
    }
}

/// Tells systemd the agent is alive while the engine answers.
async fn watchdog(engine: EngineHandle) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) {
        return;
    }
    let period = Duration::from_micros(usec / 2);
    loop {
        tokio::time::sleep(period).await;
        if engine.call(Command::Policy).await.is_ok() {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        }
    }
}
