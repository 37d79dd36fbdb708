//! Prometheus metrics (off by default): the XDP gate's per-port and
//! per-reason counters, grants, audit events by kind (grants created,
//! expired, revoked, denial summaries, drift repairs, …), enforcement health
//! per interface and layer, the flow table, and RPC latency per method.
//! Served over HTTP on `[metrics] listen` and/or written to a `node_exporter`
//! textfile. Kernel figures are read at each scrape through the engine's
//! status, so they are the kernel's counters, never a copy kept aside.

pub mod rpc;
mod snapshot;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use prometheus_client::{
    encoding::{EncodeLabelSet, text},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use crate::engine::{Command, EngineHandle};

/// Where the metrics are served when `[metrics]` is enabled without an
/// address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9847";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `[metrics]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub enabled: bool,
    /// HTTP addresses serving `/metrics`; empty: none (textfile only).
    pub listen: Vec<SocketAddr>,
    /// A `node_exporter` textfile-collector file, rewritten atomically every
    /// `textfile_interval`.
    pub textfile: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub textfile_interval: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: false,
            listen: vec![DEFAULT_LISTEN.parse().expect("default address")],
            textfile: None,
            textfile_interval: Duration::from_secs(15),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// The metrics that live across scrapes: RPC latencies and audit events
/// counted as they are committed.
pub struct Metrics {
    registry: Registry,
    pub rpc: rpc::RpcMetrics,
    events: Family<KindLabel, Counter>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let rpc = rpc::RpcMetrics::register(&mut registry);
        let events = Family::<KindLabel, Counter>::default();
        registry.register(
            "jit_gate_audit_events",
            "Audit records committed since the agent started, by kind",
            events.clone(),
        );
        Arc::new(Metrics {
            registry,
            rpc,
            events,
        })
    }

    /// Counts the engine's audit records until the engine stops.
    pub async fn count_events(self: Arc<Self>, engine: EngineHandle) {
        let mut records = engine.subscribe();
        loop {
            match records.recv().await {
                Ok(record) => {
                    self.events
                        .get_or_create(&KindLabel {
                            kind: record.kind.name(),
                        })
                        .inc();
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!("metrics: {missed} audit records not counted (slow reader)");
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    /// The text exposition: the kernel's and engine's figures now, then the
    /// counters kept here.
    pub async fn render(&self, engine: &EngineHandle) -> anyhow::Result<String> {
        let status = engine
            .call(Command::Status)
            .await
            .map_err(|e| anyhow::anyhow!("reading the status: {}", e.message))?;
        let mut out = String::new();
        text::encode_registry(&mut out, &snapshot::registry(&status))?;
        text::encode_registry(&mut out, &self.registry)?;
        text::encode_eof(&mut out)?;
        Ok(out)
    }
}

/// Serves `/metrics` on `listeners` and writes the textfile, as configured.
pub async fn run(
    config: MetricsConfig,
    listeners: Vec<tokio::net::TcpListener>,
    metrics: Arc<Metrics>,
    engine: EngineHandle,
) -> anyhow::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get({
            let (metrics, engine) = (metrics.clone(), engine.clone());
            move || async move {
                use axum::{
                    http::{StatusCode, header::CONTENT_TYPE},
                    response::IntoResponse as _,
                };
                match metrics.render(&engine).await {
                    Ok(body) => ([(CONTENT_TYPE, OPENMETRICS)], body).into_response(),
                    Err(e) => {
                        tracing::error!("metrics: {e:#}");
                        (StatusCode::SERVICE_UNAVAILABLE, "metrics unavailable\n").into_response()
                    }
                }
            }
        }),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        let app = app.clone();
        tasks.spawn(async move { axum::serve(listener, app).await.context("serving metrics") });
    }
    if let Some(path) = config.textfile.clone() {
        tasks.spawn(write_textfile(
            path,
            config.textfile_interval,
            metrics,
            engine,
        ));
    }
    while let Some(done) = tasks.join_next().await {
        done.context("metrics task")??;
    }
    Ok(())
}

/// Binds the metrics addresses (before anything is attached, like the API).
pub fn bind(config: &MetricsConfig) -> anyhow::Result<Vec<std::net::TcpListener>> {
    if !config.enabled {
        return Ok(Vec::new());
    }
    config
        .listen
        .iter()
        .map(|address| {
            let listener = std::net::TcpListener::bind(address)
                .with_context(|| format!("metrics.listen: binding {address}"))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
        .collect()
}

async fn write_textfile(
    path: PathBuf,
    every: Duration,
    metrics: Arc<Metrics>,
    engine: EngineHandle,
) -> anyhow::Result<()> {
    loop {
        match metrics.render(&engine).await {
            Ok(text) => {
                if let Err(e) = replace(&path, &text) {
                    tracing::error!("metrics: writing {}: {e:#}", path.display());
                }
            }
            Err(e) => tracing::error!("metrics: {e:#}"),
        }
        tokio::time::sleep(every).await;
    }
}

/// Writes beside and renames, so `node_exporter` never reads half a file.
fn replace(path: &Path, text: &str) -> anyhow::Result<()> {
    let partial = path.with_extension("prom.partial");
    std::fs::write(&partial, text)?;
    // `node_exporter` runs as another user; the figures are not secret.
    std::fs::set_permissions(
        &partial,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )?;
    std::fs::rename(&partial, path)?;
    Ok(())
}
