//! Serving the API on the Unix socket and, if configured, the mutual-TLS
//! listener: the `JitGate` service, gRPC health (for anyone who can reach the
//! socket or complete the handshake) and server reflection (for principals
//! with a role), every wire-level failure with its precise code.

use std::future::Future;

use anyhow::Context;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Status, service::interceptor::InterceptedService, transport::Server};

use crate::{
    api::{Service, WireErrorsLayer},
    auth::Role,
    metrics::rpc::{RpcLatency, RpcMetrics},
    proto::{FILE_DESCRIPTOR_SET, jit_gate_server::JitGateServer},
    tls::server::TlsConnection,
};

/// Verified TLS connections (`tls::server::incoming`).
pub type TlsIncoming =
    tokio_stream::wrappers::ReceiverStream<Result<TlsConnection, std::io::Error>>;

/// Largest request accepted (a full request is a few KiB; a policy of
/// hundreds of rules some hundred KiB). Larger: `RESOURCE_EXHAUSTED`.
pub const MAX_MESSAGE: usize = 1 << 20;

/// Calls in flight at once on one connection (HTTP/2
/// `SETTINGS_MAX_CONCURRENT_STREAMS`): a client holding more waits before
/// sending them, so one caller cannot queue without bound. A broker
/// loading in bulk keeps hundreds in flight; more need more connections.
pub const MAX_CALLS_PER_CONNECTION: u32 = 1024;

/// Serves on the Unix socket and, if given, the TLS listener until
/// `shutdown` completes, then ends event streams and lets the other open
/// calls finish.
pub async fn serve(
    listener: std::os::unix::net::UnixListener,
    tls: Option<TlsIncoming>,
    service: Service,
    rpc_metrics: Option<RpcMetrics>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let listener = UnixListener::from_std(listener).context("adopting the API socket")?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<JitGateServer<Service>>().await;
    // Both reflection versions: v1, and v1alpha that many stock clients
    // (Python's grpcio-reflection, grpcurl) still ask.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .context("building the reflection service")?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .context("building the reflection service")?;
    let gate = service.gate();
    let needs_role = |method: &'static str| {
        let gate = gate.clone();
        move |request: Request<()>| -> Result<Request<()>, Status> {
            gate.authorize(request.extensions(), &method, Role::Auditor)?;
            Ok(request)
        }
    };
    let reflection_v1 = InterceptedService::new(
        reflection_v1,
        needs_role("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
    );
    let reflection_v1alpha = InterceptedService::new(
        reflection_v1alpha,
        needs_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
    );
    let stopping = service.stopping.clone();
    let router = Server::builder()
        .max_concurrent_streams(MAX_CALLS_PER_CONNECTION)
        .layer(
            tower::ServiceBuilder::new()
                .layer_fn(move |inner| RpcLatency::new(inner, rpc_metrics.clone()))
                .layer(WireErrorsLayer(gate)),
        )
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(JitGateServer::new(service).max_decoding_message_size(MAX_MESSAGE));
    let stopped = || {
        let mut stopping = stopping.subscribe();
        async move {
            let _ = stopping.wait_for(|stopping| *stopping).await;
        }
    };
    let unix = router
        .clone()
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stopped());
    let tcp = async {
        match tls {
            Some(incoming) => router
                .serve_with_incoming_shutdown(incoming, stopped())
                .await
                .context("serving the API over TLS"),
            None => Ok(()),
        }
    };
    let signal = async {
        shutdown.await;
        stopping.send_replace(true);
        Ok(())
    };
    tokio::try_join!(
        async { unix.await.context("serving the API on the Unix socket") },
        tcp,
        signal
    )?;
    Ok(())
}
