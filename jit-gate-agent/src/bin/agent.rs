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
    config::{self, Config},
    enforce::{nft::NftGate, xdp::XdpGate},
    engine::{Command, Engine, EngineHandle},
    fleet::{self, EtcdOptions},
    metrics::{self, Metrics},
    proto::{ReloadConfigurationRequest, jit_gate_client::JitGateClient},
    reload::Reloader,
    startup,
    store::AuditReader,
    tls::{self, server::TlsServer},
};
use tokio::signal::unix::{SignalKind, signal};

/// The daemon's own allocations go to mimalloc: its heaps are per thread,
/// and a block freed by another thread (a request decoded on an API worker,
/// dropped on the engine thread) goes back without a lock. glibc's malloc
/// with one arena serialised the three busy threads on its lock and spent
/// about a third of the API workers' time in malloc and free (`perf`, a
/// 300,000-grant fill). The C libraries (`SQLite`, libnftnl) keep glibc's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "jit-gate-agent",
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
    /// Log lines as text, or one JSON object per line (for a collector).
    /// Colours only when writing to a terminal.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Action>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr (the journal under systemd), at `RUST_LOG` or info.
fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}

#[derive(Subcommand)]
enum Action {
    /// Run the agent (the default).
    Run,
    /// Validate the configuration (and read the TLS files it names) and exit.
    CheckConfig,
    /// Ask the running agent to read its configuration again and wait for
    /// the outcome (the unit's ExecReload): exits non-zero with the reason
    /// if the file is invalid or the agent refuses it.
    Reload,
    /// Remove the gate: detach XDP, delete its pins and the nftables table.
    Remove,
    /// Certificates for the mutual-TLS listener (a first install).
    #[command(subcommand)]
    Tls(TlsAction),
}

#[derive(Subcommand)]
enum TlsAction {
    /// Create a CA, a server certificate for this host and client
    /// certificates (files 0600, never overwritten); print the configuration.
    Init {
        /// Directory for the files (created 0700).
        #[arg(long, default_value = "/etc/jit-gate/tls")]
        dir: PathBuf,
        /// A DNS name for the server certificate besides the host name and
        /// localhost; repeatable.
        #[arg(long = "name", value_name = "DNS")]
        names: Vec<String>,
        /// An address for the server certificate; repeatable. Default: the
        /// addresses of this host's interfaces.
        #[arg(long = "address", value_name = "IP")]
        addresses: Vec<std::net::IpAddr>,
        /// A client principal to issue a certificate for; repeatable.
        #[arg(long = "client", value_name = "NAME", default_value = "admin")]
        clients: Vec<String>,
        /// Lifetime of the server and client certificates.
        #[arg(long, default_value = "365days", value_parser = humantime::parse_duration)]
        lifetime: Duration,
    },
    /// Issue more client certificates from the CA `init` made.
    Client {
        #[arg(long, default_value = "/etc/jit-gate/tls")]
        dir: PathBuf,
        /// Client principals; repeatable.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        #[arg(long, default_value = "365days", value_parser = humantime::parse_duration)]
        lifetime: Duration,
    },
}

fn main() -> ExitCode {
    if let Some(code) = jit_gate_agent::docs::write_if_asked::<Args>() {
        return code;
    }
    limit_malloc_arenas();
    purge_freed_memory_at_once();
    // Every file the agent creates (database, WAL, key, socket) is its own,
    // whatever umask it was started with.
    // SAFETY: umask only sets this process's file-creation mask.
    unsafe {
        libc::umask(0o077);
    }
    let args = Args::parse();
    init_logging(args.log_format);
    let action = args.command.unwrap_or(Action::Run);
    if let Action::Tls(tls) = action {
        return match tls_action(tls) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("jit-gate-agent: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let loaded = Config::load(&args.config)
        .map_err(|e| e.to_string())
        .and_then(|config| {
            let tls = config
                .api
                .tls
                .as_ref()
                .map(TlsServer::load)
                .transpose()
                .map_err(|e| format!("{}: api.tls: {e}", args.config.display()))?;
            let fleet = config
                .fleet
                .as_ref()
                .map(EtcdOptions::load)
                .transpose()
                .map_err(|e| format!("{}: fleet.tls: {e}", args.config.display()))?;
            Ok((config, tls, fleet))
        });
    let (config, tls, fleet) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            let consequence = if matches!(action, Action::Reload) {
                "reload refused, running configuration kept"
            } else {
                "nothing attached"
            };
            eprintln!("jit-gate-agent: invalid configuration, {consequence}: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match action {
        Action::CheckConfig => {
            println!("{}: valid", args.config.display());
            Ok(())
        }
        Action::Remove => remove(&config),
        Action::Reload => reload(&config.api.unix_socket),
        Action::Run => run(config, tls, fleet, &args.config, args.reinitialize),
        Action::Tls(_) => unreachable!("handled above"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jit-gate-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// glibc's malloc serves only the C libraries now (`SQLite`'s page cache,
/// libnftnl; the Rust side uses mimalloc). One arena: glibc's default of
/// one per thread multiplies the memory freed but kept around. Buffers of
/// 1 MiB and more are mapped on their own, so freeing one returns it to
/// the system at once, with no `malloc_trim` walking the heap on the
/// engine thread (130-200 ms a call at a million grants, measured when
/// every allocation went through glibc).
fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets allocator parameters; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// mimalloc's `purge_delay` option (its index in `mi_option_t`, mimalloc
/// 3's `mimalloc.h`; the Rust bindings name no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc keeps pages freed for a second (its default `purge_delay`)
/// before it returns them to the system, and only when the thread that
/// owns them allocates or frees again: a reconciliation's chunks, freed
/// once compared, stayed resident on an idle reader's heap. At once
/// instead: the agent's resident memory is what it holds.
fn purge_freed_memory_at_once() {
    // SAFETY: sets an option read on each purge decision; any thread may.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

fn tls_action(action: TlsAction) -> anyhow::Result<String> {
    match action {
        TlsAction::Init {
            dir,
            names,
            addresses,
            clients,
            lifetime,
        } => tls::init::init(&tls::init::InitOptions {
            dir,
            names,
            addresses,
            clients,
            lifetime,
        }),
        TlsAction::Client {
            dir,
            names,
            lifetime,
        } => tls::init::add_clients(&dir, &names, lifetime),
    }
}

/// Calls `ReloadConfiguration` on the agent's Unix socket.
fn reload(socket: &Path) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let socket = socket.to_owned();
        let channel = tonic::transport::Endpoint::from_static("http://agent.invalid")
            .connect_with_connector(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    tokio::net::UnixStream::connect(socket)
                        .await
                        .map(hyper_util::rt::TokioIo::new)
                }
            }))
            .await
            .context("connecting to the agent")?;
        JitGateClient::new(channel)
            .reload_configuration(ReloadConfigurationRequest {})
            .await
            .map_err(|status| anyhow::anyhow!("{}", status.message()))
            .context("reload refused")?;
        println!("configuration reloaded");
        Ok(())
    })
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

fn run(
    config: Config,
    tls: Option<Arc<TlsServer>>,
    fleet: Option<EtcdOptions>,
    config_path: &Path,
    reinitialize: bool,
) -> anyhow::Result<()> {
    // Everything that can fail is checked before anything is attached: the
    // TLS material was read with the configuration; its ports are bound here.
    let (prepared, listener) =
        startup::prepare(&config, reinitialize).context("nothing attached, nothing changed")?;
    let tls_listeners = config
        .api
        .tls
        .as_ref()
        .map(|t| tls::server::bind(&t.listen))
        .transpose()
        .context("nothing attached, nothing changed")?;
    let metrics_listeners =
        metrics::bind(&config.metrics).context("nothing attached, nothing changed")?;
    let fleet = config.fleet.clone().zip(fleet);
    let metrics_config = config.metrics.clone();
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
        let tls_incoming = match (&tls, tls_listeners) {
            (Some(tls), Some(listeners)) => {
                tls.set_auditor(audit_through(handle.clone()));
                Some(tls::server::incoming(tls, listeners).context("TLS listener")?)
            }
            _ => None,
        };
        let reloader = Arc::new(Reloader::new(
            config_path.to_owned(),
            handle.clone(),
            principals.clone(),
            tls,
        ));
        let service = Service::new(
            handle.clone(),
            principals,
            reader,
            public_key,
            &api,
            reloader.clone(),
        );
        tokio::spawn(reload_on_sighup(reloader));
        let rpc_metrics = if metrics_config.enabled {
            let metrics = Metrics::new();
            tokio::spawn(metrics.clone().count_events(handle.clone()));
            let listeners = metrics_listeners
                .into_iter()
                .map(tokio::net::TcpListener::from_std)
                .collect::<Result<Vec<_>, _>>()
                .context("metrics listener")?;
            for listener in &listeners {
                tracing::info!("metrics on http://{}/metrics", listener.local_addr()?);
            }
            let rpc = metrics.rpc.clone();
            let engine = handle.clone();
            tokio::spawn(async move {
                if let Err(e) = metrics::run(metrics_config, listeners, metrics, engine).await {
                    tracing::error!("metrics stopped: {e:#}");
                }
            });
            Some(rpc)
        } else {
            None
        };
        if let Some((fleet, options)) = fleet {
            fleet::spawn(fleet, options, handle.clone());
        }
        tokio::spawn(watchdog(handle.clone()));
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        tracing::info!("serving on {}", api.unix_socket.display());
        server::serve(
            listener,
            tls_incoming,
            service,
            rpc_metrics,
            shutdown_signal(),
        )
        .await
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

/// Refusals the TLS listener can pin on a caller go to the audit log.
fn audit_through(engine: EngineHandle) -> tls::server::Auditor {
    Box::new(move |event| {
        let engine = engine.clone();
        tokio::spawn(async move {
            let recorded = engine.call(|reply| Command::Record { event, reply }).await;
            if let Err(e) = recorded {
                tracing::error!("auditing a refused TLS client: {}", e.message);
            }
        });
    })
}

/// SIGHUP: the same reload as the API's `ReloadConfiguration`.
async fn reload_on_sighup(reloader: Arc<Reloader>) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot listen for SIGHUP; reload disabled");
        return;
    };
    while hup.recv().await.is_some() {
        // The outcome is logged by the reloader.
        let _ = reloader.reload().await;
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
