//! A broker's etcd calls retried when they meet an election or a member
//! that went away: a fresh connection (the next member first), with
//! backoff, until a deadline. Other failures (refused, malformed, denied)
//! are final. The calls retried must be safe to repeat: reads, revocations
//! (the same mark written again) and `broker::write` (idempotent by the
//! grant id, see there).

use std::time::Duration;

use etcd_client::Client;
use tokio::time::Instant;

use super::{EtcdOptions, FleetClientError};

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Runs `call` on a fresh client until it succeeds, fails for good, or
/// `budget` has passed since the first attempt; returns the client that
/// succeeded with the result.
pub async fn retrying<T>(
    options: &EtcdOptions,
    budget: Duration,
    mut call: impl AsyncFnMut(&mut Client) -> anyhow::Result<T>,
) -> anyhow::Result<(Client, T)> {
    let deadline = Instant::now() + budget;
    let mut backoff = BACKOFF_FIRST;
    loop {
        let attempt = async {
            let mut client = options.connect().await?;
            let done = call(&mut client).await?;
            Ok::<_, anyhow::Error>((client, done))
        }
        .await;
        match attempt {
            Ok(done) => return Ok(done),
            Err(e) if transient(&e) && Instant::now() + backoff < deadline => {
                tracing::warn!("etcd call failed, retrying in {backoff:?}: {e:#}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Err(e) => return Err(e),
        }
    }
}

/// An election, a member without a leader, a timeout or a connection
/// lost: another attempt (on another member) may succeed.
fn transient(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        if let Some(etcd) = cause.downcast_ref::<etcd_client::Error>() {
            match etcd {
                etcd_client::Error::GRpcStatus(status) => matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                ),
                etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
                _ => false,
            }
        } else {
            matches!(
                cause.downcast_ref::<FleetClientError>(),
                Some(FleetClientError::Connect { .. })
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elections_and_lost_members_are_retried_refusals_are_not() {
        let status = |code, message: &str| {
            anyhow::Error::from(etcd_client::Error::GRpcStatus(tonic::Status::new(
                code, message,
            )))
        };
        assert!(transient(&status(
            tonic::Code::Unavailable,
            "etcdserver: leader changed"
        )));
        assert!(transient(
            &status(tonic::Code::Unavailable, "etcdserver: no leader").context("writing the grant")
        ));
        assert!(transient(&status(tonic::Code::DeadlineExceeded, "timeout")));
        assert!(!transient(&status(
            tonic::Code::PermissionDenied,
            "etcdserver: permission denied"
        )));
        assert!(!transient(&status(
            tonic::Code::InvalidArgument,
            "etcdserver: too many operations in txn request"
        )));
        assert!(!transient(&anyhow::anyhow!(
            "fleet grant g exists already; choose another id"
        )));
    }
}
