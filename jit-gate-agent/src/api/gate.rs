//! The door every call passes: who is calling (the identity the transport
//! vouches for: a Unix socket's peer, or a TLS connection's verified client
//! certificate), whether their role allows the call, precise codes for
//! messages that cannot be decoded or are too large, and a record of
//! refused calls bounded per caller so that no caller can flood the log.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, RwLock},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tonic::{Code, Status, codegen::http, transport::server::UdsConnectInfo};

use crate::{
    audit::{Event, Kind},
    auth::{Identity, Principal, Role, UidRole},
    engine::{Command, EngineHandle},
    tls::server::TlsPeer,
    validate,
    wire::status,
};

/// Refused calls recorded per caller and window; the rest are counted and
/// the count goes into the next record.
const RECORDED_PER_WINDOW: u32 = 5;
const WINDOW: Duration = Duration::from_mins(1);
/// Callers tracked at once (uids reaching the socket are few; this bounds
/// the table whatever happens).
const MAX_CALLERS: usize = 4096;

struct Window {
    started: Instant,
    recorded: u32,
    suppressed: u64,
}

pub struct Gate {
    /// Non-root principals, replaced on configuration reload.
    principals: Arc<RwLock<Vec<UidRole>>>,
    engine: EngineHandle,
    windows: Mutex<HashMap<String, Window>>,
}

/// The caller as the transport identifies it.
pub(super) fn identity(extensions: &http::Extensions) -> Option<Identity> {
    extensions
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .map(|cred| Identity::UnixUid(cred.uid()))
}

/// The caller as records name it, kept cheaply until a name is needed.
enum Caller {
    Tls(Arc<TlsPeer>),
    Transport(Option<Identity>),
}

impl Caller {
    fn of(extensions: &http::Extensions) -> Self {
        match extensions.get::<Arc<TlsPeer>>() {
            Some(peer) => Caller::Tls(peer.clone()),
            None => Caller::Transport(identity(extensions)),
        }
    }

    /// Its certificate principal over TLS, else the transport's identity.
    fn name(&self) -> String {
        match self {
            Caller::Tls(peer) => peer.identity.name(),
            Caller::Transport(identity) => identity
                .as_ref()
                .map_or_else(|| "unauthenticated".to_owned(), Identity::name),
        }
    }
}

impl Gate {
    pub fn new(principals: Arc<RwLock<Vec<UidRole>>>, engine: EngineHandle) -> Self {
        Gate {
            principals,
            engine,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// The caller's principal if its role is at least `needed`; otherwise
    /// the refusal, recorded.
    /// `method` (its gRPC path) is only spelled out for a refusal: every
    /// call passes here, most are allowed.
    pub fn authorize(
        &self,
        extensions: &http::Extensions,
        method: &dyn std::fmt::Display,
        needed: Role,
    ) -> Result<Principal, Status> {
        let principal = if let Some(peer) = extensions.get::<Arc<TlsPeer>>() {
            peer.principal()
        } else {
            let principals = self.principals.read().expect("principals lock");
            Principal::resolve(identity(extensions).as_ref(), &principals)
        };
        principal
            .and_then(|p| p.require(needed).map(|()| p))
            .map_err(|refusal| {
                let status = status(refusal);
                self.record_refusal(&Caller::of(extensions).name(), &method.to_string(), &status);
                status
            })
    }

    /// Records a refused call unless this caller already had its share of
    /// records in the current window (then it is only counted).
    pub fn record_refusal(&self, caller: &str, method: &str, status: &Status) {
        let suppressed = {
            let mut windows = self.windows.lock().expect("refusal windows lock");
            if windows.len() >= MAX_CALLERS && !windows.contains_key(caller) {
                windows.retain(|_, w| w.started.elapsed() < WINDOW);
            }
            if windows.len() >= MAX_CALLERS && !windows.contains_key(caller) {
                tracing::warn!("refused call by {caller} not recorded: too many callers at once");
                return;
            }
            let window = windows.entry(caller.to_owned()).or_insert(Window {
                started: Instant::now(),
                recorded: 0,
                suppressed: 0,
            });
            if window.started.elapsed() >= WINDOW {
                window.started = Instant::now();
                window.recorded = 0;
            }
            if window.recorded >= RECORDED_PER_WINDOW {
                window.suppressed += 1;
                return;
            }
            window.recorded += 1;
            std::mem::take(&mut window.suppressed)
        };
        let event = Event::new(
            Kind::CallRefused,
            caller,
            0,
            format!(
                "{method} refused ({:?}): {}",
                status.code(),
                validate::excerpt(status.message())
            ),
        )
        .with_details(serde_json::json!({
            "method": validate::excerpt(method),
            "code": format!("{:?}", status.code()),
            "suppressed_before": suppressed,
        }));
        let engine = self.engine.clone();
        tokio::spawn(async move {
            if let Err(e) = engine.call(|reply| Command::Record { event, reply }).await {
                tracing::error!("recording a refused call: {}", e.message);
            }
        });
    }
}

/// The status a wire-level failure deserves, if `status` is one: tonic
/// calls an undecodable message INTERNAL and an oversize one `OUT_OF_RANGE`.
fn precise(status: &Status) -> Option<Status> {
    let message = status.message();
    match status.code() {
        Code::Internal if message.starts_with("failed to decode Protobuf message") => Some(
            Status::invalid_argument(format!("the request could not be decoded: {message}")),
        ),
        Code::OutOfRange if message.contains("message length too large") => Some(
            Status::resource_exhausted(format!("the request is too large: {message}")),
        ),
        _ => None,
    }
}

/// A tower layer giving wire-level failures their precise code, and
/// recording them.
#[derive(Clone)]
pub struct WireErrorsLayer(pub Arc<Gate>);

impl<S> tower::Layer<S> for WireErrorsLayer {
    type Service = WireErrors<S>;
    fn layer(&self, inner: S) -> WireErrors<S> {
        WireErrors {
            inner,
            gate: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct WireErrors<S> {
    inner: S,
    gate: Arc<Gate>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for WireErrors<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // Named only if the call fails on the wire: most calls do not.
        let caller = Caller::of(request.extensions());
        let uri = request.uri().clone();
        let gate = self.gate.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            if let Some(mapped) = Status::from_header_map(response.headers())
                .as_ref()
                .and_then(precise)
            {
                let headers = response.headers_mut();
                headers.remove("grpc-message");
                if let Err(e) = mapped.add_header(headers) {
                    tracing::error!("rewriting a wire error's status: {e}");
                }
                gate.record_refusal(&caller.name(), uri.path(), &mapped);
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_failures_get_precise_codes() {
        let undecodable = Status::internal("failed to decode Protobuf message: invalid varint");
        assert_eq!(precise(&undecodable).unwrap().code(), Code::InvalidArgument);
        let oversize = Status::out_of_range(
            "Error, decoded message length too large: found 5000000 bytes, the limit is: 1048576 bytes",
        );
        assert_eq!(precise(&oversize).unwrap().code(), Code::ResourceExhausted);
        assert!(precise(&Status::internal("the engine failed")).is_none());
    }
}
