//! Reaching agents: Unix socket paths and `https://` listeners, the gRPC
//! channel to each, and the fan-out that runs one call on every agent with
//! bounded concurrency, timing each.

use std::{
    fmt,
    future::Future,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use hyper_util::rt::TokioIo;
use jit_gate_agent::{
    proto::jit_gate_client::JitGateClient,
    tls::client::{self as tls_client, TlsTarget},
};
use rustls::ClientConfig;
use tokio::net::UnixStream;
use tonic::{
    Code, Status,
    transport::{Channel, Endpoint, Uri},
};

pub(crate) type Client = JitGateClient<Channel>;

/// An agent: its Unix socket, or its mutual-TLS listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Agent {
    Unix(PathBuf),
    Tls(TlsTarget),
}

impl Agent {
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Agent::Tls(_))
    }
}

impl fmt::Display for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Agent::Unix(path) => path.display().fmt(f),
            Agent::Tls(target) => target.fmt(f),
        }
    }
}

impl FromStr for Agent {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.starts_with("https://") {
            return s.parse().map(Agent::Tls);
        }
        let path = match s.strip_prefix("unix:") {
            // `unix:///path` (URI with empty authority) or `unix:/path`.
            Some(rest) => match rest.strip_prefix("//") {
                Some(path) if path.starts_with('/') => path,
                Some(_) => return Err(format!("{s:?}: write unix:///path or unix:/path")),
                None => rest,
            },
            None if s.contains("://") => {
                return Err(format!(
                    "{s:?}: an agent is a Unix socket (a path, unix:/path or unix:///path) or \
                     a mutual-TLS listener (https://host:port); plaintext TCP is never used"
                ));
            }
            None => s,
        };
        if path.is_empty() {
            return Err("empty agent socket path".into());
        }
        Ok(Agent::Unix(PathBuf::from(path)))
    }
}

/// The agents listed in `path`: one per line, as `--agent` takes them;
/// blank lines and `#` comments are skipped.
pub(crate) fn read_agents_file(path: &Path) -> anyhow::Result<Vec<Agent>> {
    use anyhow::Context as _;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let line = line.split('#').next().unwrap_or_default().trim();
            (!line.is_empty()).then(|| {
                line.parse()
                    .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))
            })
        })
        .collect()
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
    /// From the start of the connection to the answer.
    pub latency: Duration,
}

impl<T> Reply<T> {
    /// No answer within the timeout.
    pub(crate) fn timed_out(&self) -> bool {
        matches!(&self.result, Err(e) if e.code == Code::DeadlineExceeded)
    }
}

/// The agents a command runs on, and how.
pub(crate) struct Fleet {
    pub agents: Vec<Agent>,
    /// Longest wait for each agent.
    pub timeout: Duration,
    /// Agents contacted at once at most.
    pub concurrency: usize,
    /// The client certificate for `https://` agents.
    pub tls: Option<Arc<ClientConfig>>,
}

impl Fleet {
    /// Runs `call` with its own copy of `request` on every agent, at most
    /// `concurrency` at a time; replies come in the order the agents were
    /// given. The timeout covers connecting and the call (for a stream:
    /// opening it), from the moment that agent's turn comes.
    pub(crate) async fn call<Req, T, F, Fut>(&self, request: Req, call: F) -> Vec<Reply<T>>
    where
        Req: Clone,
        F: Fn(Client, Req) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let calls = self.agents.iter().map(|agent| {
            let attempt = async {
                let client = self.connect(agent).await?;
                Ok(call(client, request.clone()).await?.into_inner())
            };
            async move {
                let started = Instant::now();
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
                    latency: started.elapsed(),
                }
            }
        });
        futures_util::stream::iter(calls)
            .buffered(self.concurrency.max(1))
            .collect()
            .await
    }

    pub(crate) async fn connect(&self, agent: &Agent) -> Result<Client, CallError> {
        let channel = match agent {
            Agent::Unix(path) => unix_channel(path).await,
            Agent::Tls(target) => {
                let config = self.tls.clone().ok_or_else(|| CallError {
                    code: Code::Unauthenticated,
                    message: "no client certificate for https agents".into(),
                })?;
                tls_client::channel(config, target).await
            }
        };
        let channel = channel.map_err(|e| CallError {
            code: Code::Unavailable,
            // Past tonic's generic "transport error" to the io error.
            message: format!(
                "cannot connect: {}",
                std::error::Error::source(&e).map_or_else(|| chain(&e), chain)
            ),
        })?;
        Ok(JitGateClient::new(channel))
    }
}

async fn unix_channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    // The URI is required by tonic but unused: the connector ignores it.
    Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                UnixStream::connect(&path)
                    .await
                    .map(TokioIo::new)
                    .map_err(|e| with_socket_hint(&path, e))
            }
        }))
        .await
}

/// A socket the caller may not open: the agent's socket is root's alone
/// unless its configuration names a group for it; say so.
fn with_socket_hint(path: &Path, error: std::io::Error) -> std::io::Error {
    if error.kind() != std::io::ErrorKind::PermissionDenied {
        return error;
    }
    std::io::Error::new(
        error.kind(),
        format!(
            "{error} on {} (hint: only root may open the agent's socket unless `api.socket_group` in the agent's configuration names a group you are in, and `api.principals` gives your uid a role; or run as root)",
            path.display()
        ),
    )
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
