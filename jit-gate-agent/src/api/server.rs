//! Serving the API on the Unix socket: the `JitGate` service, gRPC health
//! and server reflection. The socket lives in a directory only root (and
//! the configured group) can enter; peer credentials are checked per call.

use std::{
    ffi::CString,
    future::Future,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::Path,
};

use anyhow::{Context, bail};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

use crate::{
    api::Service,
    proto::{FILE_DESCRIPTOR_SET, jit_gate_server::JitGateServer},
};

/// Largest request accepted (a full request is a few KiB).
const MAX_MESSAGE: usize = 1 << 20;

/// Binds the socket: stale sockets are replaced, anything else at the path
/// is refused. Mode 0600 (0660 with a group).
pub fn bind(path: &Path, group: Option<&str>) -> anyhow::Result<UnixListener> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let gid = group.map(group_id).transpose()?;
    let dir_mode = if gid.is_some() { 0o750 } else { 0o700 };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))
        .with_context(|| format!("restricting {}", dir.display()))?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?,
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(_) => {}
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("restricting {}", path.display()))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(dir, None, Some(gid))
            .and_then(|()| std::os::unix::fs::chown(path, None, Some(gid)))
            .with_context(|| format!("giving {} to group {gid}", path.display()))?;
    }
    Ok(listener)
}

fn group_id(name: &str) -> anyhow::Result<u32> {
    let c_name = CString::new(name).context("group name contains NUL")?;
    // SAFETY: getgrnam reads a NUL-terminated string and returns a pointer
    // to static storage or null; the gid is copied out at once.
    let entry = unsafe { libc::getgrnam(c_name.as_ptr()) };
    if entry.is_null() {
        bail!("no group named {name:?}");
    }
    // SAFETY: non-null pointer to a valid struct group, see above.
    Ok(unsafe { (*entry).gr_gid })
}

/// Serves until `shutdown` completes, then ends event streams and lets
/// the other open calls finish.
pub async fn serve(
    listener: UnixListener,
    service: Service,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<JitGateServer<Service>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let stopping = service.stopping.clone();
    let shutdown = async move {
        shutdown.await;
        stopping.send_replace(true);
    };
    Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(JitGateServer::new(service).max_decoding_message_size(MAX_MESSAGE))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("serving the API")
}
