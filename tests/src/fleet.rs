//! Remote brokers: a broker namespace and gated namespaces joined by a
//! bridge, each gated namespace with a real agent that listens with mutual
//! TLS; the test PKI (a CA, a server certificate per agent, client
//! certificates per principal); and mTLS clients that start in the broker
//! namespace: the Rust API, raw TLS handshakes, the CLI and Python.
//!
//! Addresses come from 198.18.0.0/15 (RFC 2544, benchmarking) and live only
//! inside these namespaces.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::Arc,
    time::Duration,
};

use jit_gate_agent::{
    config::Mode,
    proto::jit_gate_client::JitGateClient,
    tls::pki::{Ca, Leaf, SerialNumber, Usage, client_uri, write_private},
};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tokio::io::AsyncReadExt as _;
use tonic::transport::{Channel, Endpoint};

use crate::{
    agent::{Agent, AgentFiles, one_connection, workspace_binary},
    env::unique_name,
    netns::{Netns, ip, nsenter},
};

pub const BROKER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const TLS_PORT: u16 = 7443;
const DAY: Duration = Duration::from_hours(24);

/// The address of gated host `index`.
pub fn agent_address(index: usize) -> Ipv4Addr {
    let n = u32::try_from(index).expect("host index");
    Ipv4Addr::from(u32::from(BROKER_V4) + 256 + n)
}

/// A client's certificate and key files.
#[derive(Clone, Debug)]
pub struct ClientCert {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

/// A CA and the files it issued, in a directory of the test's own.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("temporary directory");
        let ca = Ca::generate(name, DAY).expect("CA");
        let pki = Pki { dir, ca };
        write_private(&pki.ca_path(), pki.ca.certificate_pem()).expect("write CA");
        pki
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn write(&self, stem: &str, certificate: &str, key: &str) -> ClientCert {
        let files = ClientCert {
            certificate: self.dir.path().join(format!("{stem}.pem")),
            key: self.dir.path().join(format!("{stem}.key")),
        };
        // Replaced, not appended: rotation rewrites a server's files.
        for (path, text) in [(&files.certificate, certificate), (&files.key, key)] {
            let _ = std::fs::remove_file(path);
            write_private(path, text).expect("write certificate");
        }
        files
    }

    /// A client certificate naming `urn:jit-gate:<name>`, adjusted by `edit`
    /// (validity, names); files `<stem>.pem`/`.key`.
    pub fn client_with(
        &self,
        stem: &str,
        name: &str,
        edit: impl FnOnce(&mut Leaf),
    ) -> (ClientCert, SerialNumber) {
        let mut leaf = Leaf::new(name, Usage::Client, DAY);
        leaf.uris.push(client_uri(name));
        edit(&mut leaf);
        let issued = self.ca.issue(&leaf).expect("issue client certificate");
        (
            self.write(stem, &issued.certificate, &issued.key),
            issued.serial,
        )
    }

    pub fn client(&self, name: &str) -> ClientCert {
        self.client_with(&format!("client-{name}"), name, |_| {}).0
    }

    /// The server certificate of an agent at `address`, in `<stem>.pem/.key`.
    pub fn server(&self, stem: &str, address: Ipv4Addr) -> ClientCert {
        let mut leaf = Leaf::new(stem, Usage::Server, DAY);
        leaf.addresses.push(address.into());
        let issued = self.ca.issue(&leaf).expect("issue server certificate");
        self.write(stem, &issued.certificate, &issued.key)
    }

    /// A revocation list of `serials`, written to `ca.crl`.
    pub fn write_crl(&self, serials: &[SerialNumber], number: u64) -> PathBuf {
        let path = self.dir.path().join("ca.crl");
        let pem = self.ca.revocation_list(serials, number, DAY).expect("CRL");
        let _ = std::fs::remove_file(&path);
        write_private(&path, &pem).expect("write CRL");
        path
    }

    /// A TLS 1.3 client configuration trusting this CA, presenting `client`.
    pub fn client_config(&self, client: Option<&ClientCert>) -> Arc<ClientConfig> {
        client_config(&self.ca_path(), client)
    }
}

/// A TLS 1.3 client trusting the CAs in `ca`, presenting `client` if any.
pub fn client_config(ca: &Path, client: Option<&ClientCert>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots);
    let mut config = match client {
        Some(client) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(&client.certificate)
                    .expect("certificate file")
                    .collect::<Result<_, _>>()
                    .expect("certificate PEM"),
                PrivateKeyDer::from_pem_file(&client.key).expect("key file"),
            )
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// The broker's namespace, with a bridge the gated hosts join.
pub struct Broker {
    pub ns: Netns,
    bridge: String,
}

impl Broker {
    /// Joins `ns` to the bridge by a veth pair, its end up at `address`;
    /// returns the name of that end.
    pub fn join(&self, ns: &Netns, address: Ipv4Addr) -> String {
        let interface = unique_name("vf");
        let peer = unique_name("vp");
        ip(&[
            "link", "add", &interface, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["link", "set", &interface, "netns", &ns.name]);
        ip(&["link", "set", &peer, "netns", &self.ns.name]);
        self.ns
            .exec_ip(&["link", "set", &peer, "master", &self.bridge]);
        self.ns.exec_ip(&["link", "set", &peer, "up"]);
        ns.exec_ip(&["addr", "add", &format!("{address}/15"), "dev", &interface]);
        ns.exec_ip(&["link", "set", &interface, "up"]);
        interface
    }

    pub fn new() -> Broker {
        let ns = Netns::new("jgb");
        let bridge = "br0".to_owned();
        ns.exec_ip(&["link", "add", &bridge, "type", "bridge"]);
        ns.exec_ip(&["addr", "add", &format!("{BROKER_V4}/15"), "dev", &bridge]);
        ns.exec_ip(&["link", "set", &bridge, "up"]);
        Broker { ns, bridge }
    }

    /// A TCP connection from the broker's namespace.
    fn tcp(&self, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let stream = self
            .ns
            .run(|| std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5)))?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(stream)
    }

    /// A TLS connection from the broker's namespace to `to`, whose
    /// certificate must name `to`'s address.
    pub async fn tls(
        &self,
        config: Arc<ClientConfig>,
        to: SocketAddr,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let tcp = self.tcp(to)?;
        let name = ServerName::IpAddress(to.ip().into());
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
    }

    /// What the agent at `to` answers a client presenting `config`: `Ok`
    /// if the connection stays up after the handshake (an HTTP/2 frame
    /// arrives), else the error that ended it (a TLS alert, with TLS 1.3
    /// usually after the client's side of the handshake is done).
    pub async fn handshake(&self, config: Arc<ClientConfig>, to: SocketAddr) -> Result<(), String> {
        let mut stream = self.tls(config, to).await.map_err(|e| e.to_string())?;
        // The client speaks first in HTTP/2; the server answers with SETTINGS.
        tokio::io::AsyncWriteExt::write_all(
            &mut stream,
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut first = [0u8; 9];
        match tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut first)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 5 s".into()),
        }
    }

    /// A gRPC client over one mutual-TLS connection from the broker.
    pub async fn api(
        &self,
        config: Arc<ClientConfig>,
        to: SocketAddr,
    ) -> std::io::Result<JitGateClient<Channel>> {
        let stream = self.tls(config, to).await?;
        let endpoint = Endpoint::from_shared(format!("http://{to}")).expect("endpoint");
        let channel = one_connection(endpoint, stream).await?;
        Ok(JitGateClient::new(channel))
    }

    /// `jit-gate <args>` run in the broker's namespace.
    pub fn cli(&self, args: &[&str]) -> Output {
        nsenter(&self.ns.name, workspace_binary("jit-gate"))
            .args(args)
            .output()
            .expect("run jit-gate")
    }

    /// `program <args>` run in the broker's namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns.name, program]);
        command
    }
}

impl Default for Broker {
    fn default() -> Self {
        Self::new()
    }
}

/// A gated host of the fleet: its namespace, its end of the link to the
/// bridge, its agent's files and certificate.
pub struct Host {
    // Field order is drop order: the agent, its files (pins), the namespace.
    pub agent: Option<Agent>,
    pub files: AgentFiles,
    pub ns: Netns,
    pub interface: String,
    pub address: Ipv4Addr,
    pub server_cert: ClientCert,
}

impl Host {
    pub fn tls_address(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.address), TLS_PORT)
    }

    pub fn url(&self) -> String {
        format!("https://{}:{TLS_PORT}", self.address)
    }

    /// The `[api.tls]` keys (as dotted keys) for this host.
    pub fn tls_config(&self, ca: &[&Path], extra: &str) -> String {
        format!(
            "api.tls.listen = [\"{}\"]\napi.tls.certificate = {:?}\napi.tls.key = {:?}\napi.tls.client_ca = {:?}\n{extra}",
            self.tls_address(),
            self.server_cert.certificate,
            self.server_cert.key,
            ca,
        )
    }

    /// Writes the agent's configuration: mode, interface, TLS, `extra`.
    pub fn configure(&self, mode: Mode, ca: &[&Path], extra: &str) {
        let interfaces: &[&str] = if mode.uses_xdp() {
            &[&self.interface]
        } else {
            &[]
        };
        self.files.write_config(
            interfaces,
            &format!("mode = \"{}\"\n{}", mode.name(), self.tls_config(ca, extra)),
        );
    }
}

/// Gated hosts joined to the broker's bridge.
pub struct Fleet {
    // Field order is drop order: hosts (agents, pins, namespaces), then the
    // broker's namespace and the PKI's files.
    pub hosts: Vec<Host>,
    pub broker: Broker,
    pub pki: Pki,
}

impl Fleet {
    /// `count` hosts, each with an agent configured (not started) in `mode`
    /// with the principals of `principals` (TOML array of tables).
    pub fn new(count: usize, mode: Mode, principals: &str) -> Fleet {
        let broker = Broker::new();
        let pki = Pki::new("fleet CA");
        let hosts = (0..count)
            .map(|index| {
                let host = add_host(&broker, &pki, index);
                host.configure(
                    mode,
                    &[&pki.ca_path()],
                    &format!("api.tls.principals = {principals}\n"),
                );
                host
            })
            .collect();
        Fleet { hosts, broker, pki }
    }

    /// Starts every agent and waits until each serves, a batch at a time
    /// (hundreds starting at once on two cores would outlast the start
    /// timeout).
    pub fn start(&mut self) {
        const BATCH: usize = 25;
        for batch in self.hosts.chunks_mut(BATCH) {
            std::thread::scope(|scope| {
                for host in batch {
                    scope.spawn(|| host.agent = Some(Agent::start(&host.files)));
                }
            });
        }
    }
}

/// Adds gated host `index` to the broker's bridge (agent configured by the caller).
pub fn add_host(broker: &Broker, pki: &Pki, index: usize) -> Host {
    let ns = Netns::new("jgf");
    let address = agent_address(index);
    let interface = broker.join(&ns, address);
    let server_cert = pki.server(&format!("server-{index}"), address);
    Host {
        agent: None,
        files: AgentFiles::new(&ns),
        ns,
        interface,
        address,
        server_cert,
    }
}
