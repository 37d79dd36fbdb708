//! Reaching agents: socket addresses, the gRPC channel over a Unix socket,
//! and the fan-out that runs one call on every agent at once.

use std::{
    fmt,
    future::Future,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use hyper_util::rt::TokioIo;
use jit_gate_agent::proto::jit_gate_client::JitGateClient;
use tokio::net::UnixStream;
use tonic::{
    Code, Status,
    transport::{Channel, Endpoint, Uri},
};

pub(crate) type Client = JitGateClient<Channel>;

/// An agent's Unix socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Agent(PathBuf);

impl Agent {
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl fmt::Display for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.display().fmt(f)
    }
}

impl FromStr for Agent {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let path = match s.strip_prefix("unix:") {
            // `unix:///path` (URI with empty authority) or `unix:/path`.
            Some(rest) => match rest.strip_prefix("//") {
                Some(path) if path.starts_with('/') => path,
                Some(_) => return Err(format!("{s:?}: write unix:///path or unix:/path")),
                None => rest,
            },
            None if s.contains("://") => {
                return Err(format!(
                    "{s:?}: the agent listens only on a Unix socket (a path, unix:/path or unix:///path)"
                ));
            }
            None => s,
        };
        if path.is_empty() {
            return Err("empty agent socket path".into());
        }
        Ok(Agent(PathBuf::from(path)))
    }
}

/// Why a call on one agent failed: the agent's gRPC status, or the
/// client's own (`Unavailable` for no connection, `DeadlineExceeded`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CallError {
    pub code: Code,
    pub message: String,
}

impl CallError {
    /// The code's name as in tonic and the gRPC docs ("`InvalidArgument`").
    pub(crate) fn code_name(&self) -> String {
        format!("{:?}", self.code)
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code_name(), self.message)
    }
}

impl From<Status> for CallError {
    fn from(status: Status) -> Self {
        // Transport failures come with an empty or generic message; the
        // cause is in the source chain.
        let mut message = status.message().to_owned();
        if let Some(source) = std::error::Error::source(&status) {
            message = [message, chain(source)]
                .into_iter()
                .filter(|m| !m.is_empty())
                .collect::<Vec<_>>()
                .join(": ");
        }
        CallError {
            code: status.code(),
            message,
        }
    }
}

/// One agent's answer to a fanned-out call.
pub(crate) struct Reply<T> {
    pub agent: Agent,
    pub result: Result<T, CallError>,
}

/// The agents a command runs on, and how long each may take.
pub(crate) struct Fleet {
    pub agents: Vec<Agent>,
    pub timeout: Duration,
}

impl Fleet {
    /// Runs `call` with its own copy of `request` on every agent
    /// concurrently; replies come in the order the agents were given.
    /// The timeout covers connecting and the call (for a stream: opening it).
    pub(crate) async fn call<Req, T, F, Fut>(&self, request: Req, call: F) -> Vec<Reply<T>>
    where
        Req: Clone,
        F: Fn(Client, Req) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let calls = self.agents.iter().map(|agent| {
            let attempt = async {
                let client = connect(agent).await?;
                Ok(call(client, request.clone()).await?.into_inner())
            };
            async move {
                let result = tokio::time::timeout(self.timeout, attempt)
                    .await
                    .unwrap_or_else(|_| {
                        Err(CallError {
                            code: Code::DeadlineExceeded,
                            message: format!(
                                "no answer within {}",
                                humantime::format_duration(self.timeout)
                            ),
                        })
                    });
                Reply {
                    agent: agent.clone(),
                    result,
                }
            }
        });
        futures_util::future::join_all(calls).await
    }
}

async fn connect(agent: &Agent) -> Result<Client, CallError> {
    let path = agent.path().to_owned();
    // The URI is required by tonic but unused: the connector ignores it.
    let channel = Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| CallError {
            code: Code::Unavailable,
            // Past tonic's generic "transport error" to the io error.
            message: format!(
                "cannot connect: {}",
                std::error::Error::source(&e).map_or_else(|| chain(&e), chain)
            ),
        })?;
    Ok(JitGateClient::new(channel))
}

/// An error and its causes, outermost first, without repeats (tonic's
/// transport errors wrap the io error whose text is what helps).
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}
