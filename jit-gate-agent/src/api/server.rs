//! Serving the API on the Unix socket: the `JitGate` service, gRPC health
//! (for anyone who can reach the socket) and server reflection (for
//! principals with a role), every wire-level failure with its precise code.

use std::future::Future;

use anyhow::Context;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Status, service::interceptor::InterceptedService, transport::Server};

use crate::{
    api::{Service, WireErrorsLayer},
    auth::Role,
    proto::{FILE_DESCRIPTOR_SET, jit_gate_server::JitGateServer},
};

/// Largest request accepted (a full request is a few KiB; a policy of
/// hundreds of rules some hundred KiB). Larger: `RESOURCE_EXHAUSTED`.
pub const MAX_MESSAGE: usize = 1 << 20;

/// Serves until `shutdown` completes, then ends event streams and lets
/// the other open calls finish.
pub async fn serve(
    listener: std::os::unix::net::UnixListener,
    service: Service,
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
            gate.authorize(request.extensions(), method, Role::Auditor)?;
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
    let shutdown = async move {
        shutdown.await;
        stopping.send_replace(true);
    };
    Server::builder()
        .layer(WireErrorsLayer(gate))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(JitGateServer::new(service).max_decoding_message_size(MAX_MESSAGE))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("serving the API")
}
