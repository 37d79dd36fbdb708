//! Serving the API on the Unix socket: the JitGate service, gRPC health
//! (for anyone who can reach the socket) and server reflection (for
//! principals with a role), every wire-level failure with its precise code.

use std::future::Future;

use anyhow::Context;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Status, transport::Server};

use crate::{
    api::{Service, WireErrorsLayer},
    auth::Role,
    proto::{FILE_DESCRIPTOR_SET, jit_gate_server::JitGateServer},
};

/// Largest request accepted (a full request is a few KiB; a policy of
/// hundreds of rules some hundred KiB). Larger: RESOURCE_EXHAUSTED.
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
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let gate = service.gate();
    let reflection_gate = gate.clone();
    let reflection = tonic::service::interceptor::InterceptedService::new(
        reflection,
        move |request: Request<()>| -> Result<Request<()>, Status> {
            reflection_gate.authorize(
                request.extensions(),
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                Role::Auditor,
            )?;
            Ok(request)
        },
    );
    let stopping = service.stopping.clone();
    let shutdown = async move {
        shutdown.await;
        stopping.send_replace(true);
    };
    Server::builder()
        .layer(WireErrorsLayer(gate))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(JitGateServer::new(service).max_decoding_message_size(MAX_MESSAGE))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("serving the API")
}
