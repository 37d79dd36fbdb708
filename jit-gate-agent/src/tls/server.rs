//! The API's TCP listener with mandatory mutual TLS (TLS 1.3 only): binds
//! the configured addresses, closes connections from networks that are not
//! allowed, runs each handshake on its own task with a deadline, and hands
//! the verified connections to the gRPC server with their peer (address,
//! certificate chain, identity). The certificate, key, CAs, revocation lists,
//! pins, principals and allowed networks can be replaced at run time
//! (`reload`): new handshakes use the new set, established connections keep
//! theirs, and their next call is checked against the new one.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, OnceLock, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use ipnet::IpNet;
use rustls::{RootCertStore, ServerConfig, crypto::CryptoProvider, pki_types::CertificateDer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::{
    audit::{Event, Kind},
    auth::Principal,
    refusal::{Refusal, RefusalKind},
    tls::{
        config::{CertPrincipal, TlsConfig},
        identity::CertIdentity,
        material::{self, MaterialError},
        reports::Reports,
        verifier::{ClientVerifier, Refused, Rejection, noting_refusal},
    },
};

/// Longest a client may take to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections are closed at once.
const MAX_HANDSHAKES: usize = 256;
/// Verified connections waiting for the gRPC server to take them.
const ACCEPTED_QUEUE: usize = 64;
/// Pending TCP connections per listening socket.
const BACKLOG: i32 = 1024;
const KEEPALIVE: Duration = Duration::from_mins(1);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Material(#[from] MaterialError),
    #[error("{what}: {problem}")]
    Invalid { what: String, problem: String },
}

pub(crate) fn invalid(what: impl Into<String>, problem: &dyn std::fmt::Display) -> TlsError {
    TlsError::Invalid {
        what: what.into(),
        problem: problem.to_string(),
    }
}

/// Where refusals of identifiable callers go (the audit log).
pub type Auditor = Box<dyn Fn(Event) + Send + Sync>;

/// The set in force: built whole from the configuration and its files.
struct Active {
    generation: u64,
    acceptor: TlsAcceptor,
    verifier: Arc<ClientVerifier>,
    principals: Vec<CertPrincipal>,
    allowed_networks: Vec<IpNet>,
}

/// A set read and checked by `prepare`, for `install`.
pub struct Prepared(Active);

pub struct TlsServer {
    active: RwLock<Arc<Active>>,
    reports: Mutex<Reports>,
    auditor: OnceLock<Auditor>,
}

impl TlsServer {
    /// Reads and checks every file the configuration names.
    pub fn load(config: &TlsConfig) -> Result<Arc<TlsServer>, TlsError> {
        Ok(Arc::new(TlsServer {
            active: RwLock::new(Arc::new(build(config, 1)?)),
            reports: Mutex::default(),
            auditor: OnceLock::new(),
        }))
    }

    /// Reads and checks a replacement set, without putting it in force.
    pub fn prepare(&self, config: &TlsConfig) -> Result<Prepared, TlsError> {
        Ok(Prepared(build(config, self.current().generation + 1)?))
    }

    /// Puts a prepared set in force: new handshakes use it, and the next
    /// call on every established connection is checked against it.
    pub fn install(&self, prepared: Prepared) {
        *self.active.write().expect("TLS set lock") = Arc::new(prepared.0);
    }

    /// Sets where refusals of identifiable callers are audited (once).
    pub fn set_auditor(&self, auditor: Auditor) {
        let _ = self.auditor.set(auditor);
    }

    fn current(&self) -> Arc<Active> {
        self.active.read().expect("TLS set lock").clone()
    }

    /// Logs a refusal (bounded), and audits it under `principal` if the
    /// caller could be identified.
    fn report(
        &self,
        remote: SocketAddr,
        code: &'static str,
        message: &str,
        principal: Option<&str>,
    ) {
        let now = Instant::now();
        let (logged, audited) = {
            let mut reports = self.reports.lock().expect("reports lock");
            (
                reports.log(code, now),
                principal.and_then(|p| reports.audit(p, code, now)),
            )
        };
        let who = principal.map_or_else(String::new, |p| format!(" ({p})"));
        if let Some(unlogged) = logged {
            tracing::warn!(
                "TLS client {remote}{who} refused: {message}; {unlogged} similar refusals since the last report"
            );
        }
        if let (Some(unaudited), Some(principal), Some(auditor)) =
            (audited, principal, self.auditor.get())
        {
            auditor(
                Event::new(
                    Kind::CallRefused,
                    principal,
                    0,
                    format!("TLS client {remote} refused: {message}"),
                )
                .with_details(serde_json::json!({
                    "remote": remote.to_string(),
                    "reason": code,
                    "similar_refusals_not_audited": unaudited,
                })),
            );
        }
    }

    fn refused_handshake(&self, remote: SocketAddr, refused: &Refused) {
        let principal = refused.identified.as_ref().map(CertIdentity::name);
        let message = match &principal {
            // A certificate is public: the handshake stopped before its
            // holder proved possession of the key.
            Some(_) => format!(
                "{}; the certificate chains to a configured CA (possession of its key not proven)",
                refused.rejection
            ),
            None => refused.rejection.to_string(),
        };
        self.report(
            remote,
            refused.rejection.code(),
            &message,
            principal.as_deref(),
        );
    }
}

fn build(config: &TlsConfig, generation: u64) -> Result<Active, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = material::certificates(&config.certificate)?;
    let key = material::private_key(&config.key)?;
    provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| {
            invalid(
                config.key.display().to_string(),
                &format!("not a usable private key: {e}"),
            )
        })?;
    let mut roots = RootCertStore::empty();
    for path in &config.client_ca {
        for (i, ca) in material::certificates(path)?.into_iter().enumerate() {
            roots.add(ca).map_err(|e| {
                invalid(
                    path.display().to_string(),
                    &format!("certificate {} is not a usable CA: {e}", i + 1),
                )
            })?;
        }
    }
    let mut crls = Vec::new();
    for path in &config.crl {
        crls.extend(material::revocation_lists(path)?);
    }
    let pinned = config
        .pinned_client_certificates
        .iter()
        .map(|p| p.0)
        .collect();
    let verifier = Arc::new(
        ClientVerifier::new(provider.clone(), roots, crls, pinned)
            .map_err(|e| invalid("api.tls.client_ca/crl", &e))?,
    );
    let mut server = server_config(provider, verifier.clone(), chain, key).map_err(|e| {
        invalid(
            format!(
                "{} and {}",
                config.certificate.display(),
                config.key.display()
            ),
            &e,
        )
    })?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Active {
        generation,
        acceptor: TlsAcceptor::from(Arc::new(server)),
        verifier,
        principals: config.principals.clone(),
        allowed_networks: config.allowed_networks.clone(),
    })
}

fn server_config(
    provider: Arc<CryptoProvider>,
    verifier: Arc<ClientVerifier>,
    chain: Vec<CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<ServerConfig, rustls::Error> {
    ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
}

/// Binds every address (IPv6 ones IPv6-only), before anything is attached,
/// so that a taken port refuses the start.
pub fn bind(addresses: &[SocketAddr]) -> anyhow::Result<Vec<std::net::TcpListener>> {
    use anyhow::Context as _;
    use socket2::{Domain, Socket, Type};
    addresses
        .iter()
        .map(|address| {
            let socket = Socket::new(Domain::for_address(*address), Type::STREAM, None)
                .context("creating a TCP socket")?;
            if address.is_ipv6() {
                socket.set_only_v6(true)?;
            }
            socket.set_reuse_address(true)?;
            socket.set_nonblocking(true)?;
            socket
                .bind(&(*address).into())
                .and_then(|()| socket.listen(BACKLOG))
                .with_context(|| format!("listening on {address} (api.tls.listen)"))?;
            Ok(socket.into())
        })
        .collect()
}

/// The verified connections of every listener, for `serve_with_incoming`.
pub fn incoming(
    server: &Arc<TlsServer>,
    listeners: Vec<std::net::TcpListener>,
) -> io::Result<ReceiverStream<Result<TlsConnection, io::Error>>> {
    let (accepted, queue) = mpsc::channel(ACCEPTED_QUEUE);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    for listener in listeners {
        let listener = TcpListener::from_std(listener)?;
        tokio::spawn(accept_loop(
            listener,
            server.clone(),
            handshakes.clone(),
            accepted.clone(),
        ));
    }
    Ok(ReceiverStream::new(queue))
}

async fn accept_loop(
    listener: TcpListener,
    server: Arc<TlsServer>,
    handshakes: Arc<Semaphore>,
    accepted: mpsc::Sender<Result<TlsConnection, io::Error>>,
) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(connection) => connection,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!("accepting a TLS client: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let active = server.current();
        let remote_ip = remote.ip().to_canonical();
        if !active.allowed_networks.is_empty()
            && !active
                .allowed_networks
                .iter()
                .any(|n| n.contains(&remote_ip))
        {
            server.report(
                remote,
                "network",
                "address outside api.tls.allowed_networks",
                None,
            );
            continue;
        }
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            server.report(
                remote,
                "busy",
                &format!("{MAX_HANDSHAKES} handshakes already in progress"),
                None,
            );
            continue;
        };
        let server = server.clone();
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(connection) = handshake(&server, &active, tcp, remote).await {
                let _ = accepted.send(Ok(connection)).await;
            }
        });
    }
}

async fn handshake(
    server: &Arc<TlsServer>,
    active: &Active,
    tcp: TcpStream,
    remote: SocketAddr,
) -> Option<TlsConnection> {
    // gRPC calls are small: do not let Nagle hold them back.
    let _ = tcp.set_nodelay(true);
    let _ = socket2::SockRef::from(&tcp)
        .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(KEEPALIVE));
    let attempt = noting_refusal(active.acceptor.accept(tcp));
    let Ok((outcome, refused)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await else {
        let message = format!("no complete handshake within {HANDSHAKE_TIMEOUT:?}");
        server.report(remote, "timeout", &message, None);
        return None;
    };
    let stream = match outcome {
        Ok(stream) => stream,
        Err(error) => {
            let refused = refused.unwrap_or_else(|| Refused {
                rejection: rejection_of(&error),
                identified: None,
            });
            server.refused_handshake(remote, &refused);
            return None;
        }
    };
    let chain: Vec<CertificateDer<'static>> = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    // The verifier parsed it already; this cannot fail for a verified chain.
    let identity = CertIdentity::parse(chain.first()?).ok()?;
    Some(TlsConnection {
        stream,
        peer: Arc::new(TlsPeer {
            remote,
            chain,
            identity,
            checked_generation: AtomicU64::new(active.generation),
            server: server.clone(),
        }),
    })
}

/// A failed handshake the verifier did not see: no certificate, no TLS
/// 1.3, not TLS at all.
fn rejection_of(error: &io::Error) -> Rejection {
    let tls = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls {
        Some(rustls::Error::NoCertificatesPresented) => Rejection::NoCertificate,
        Some(rustls::Error::PeerIncompatible(why)) => Rejection::NotTls13(format!("{why:?}")),
        Some(rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. }) => {
            Rejection::NotTls
        }
        Some(rustls::Error::AlertReceived(alert)) => Rejection::ClientAlert(format!("{alert:?}")),
        Some(other) => Rejection::Handshake(format!("TLS handshake failed: {other}")),
        None => Rejection::Handshake(format!("connection lost during the handshake: {error}")),
    }
}

/// Who is at the other end of a verified connection.
pub struct TlsPeer {
    pub remote: SocketAddr,
    chain: Vec<CertificateDer<'static>>,
    pub identity: CertIdentity,
    /// The generation of the trusted set the chain was last checked with.
    checked_generation: AtomicU64,
    server: Arc<TlsServer>,
}

impl TlsPeer {
    /// The caller's principal, if its certificate is still accepted: after
    /// a reload its chain is checked against the new set once, and its
    /// expiry on every call; the role comes from the current principals.
    pub fn principal(&self) -> Result<Principal, Refusal> {
        let active = self.server.current();
        let now = SystemTime::now();
        if self.checked_generation.load(Ordering::Acquire) != active.generation {
            if let Err(refused) = active.verifier.check(&self.chain, now) {
                return Err(Refusal::new(
                    RefusalKind::Unauthenticated,
                    format!(
                        "{}; the agent's TLS configuration changed since this connection opened",
                        refused.rejection
                    ),
                ));
            }
            self.checked_generation
                .store(active.generation, Ordering::Release);
        }
        if now > self.identity.not_after {
            let rejection = Rejection::Expired {
                not_after: self.identity.not_after,
            };
            return Err(Refusal::new(
                RefusalKind::Unauthenticated,
                format!("{rejection} while this connection was open; reconnect with a valid one"),
            ));
        }
        let (identity, role) = self.identity.role_in(&active.principals).ok_or_else(|| {
            Refusal::new(
                RefusalKind::PermissionDenied,
                format!(
                    "certificate principal {} has no role (api.tls.principals)",
                    self.identity.name()
                ),
            )
        })?;
        Ok(Principal {
            name: identity.to_string(),
            role,
        })
    }
}

/// A verified TLS connection, as the gRPC server takes it.
pub struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    peer: Arc<TlsPeer>,
}

impl Connected for TlsConnection {
    type ConnectInfo = Arc<TlsPeer>;
    fn connect_info(&self) -> Arc<TlsPeer> {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
