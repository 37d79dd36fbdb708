//! The client side of the API over mutual TLS (the CLI, tests, benchmarks):
//! `https://host:port` targets, a TLS 1.3 client configuration from PEM
//! files (CA, certificate, key), and a gRPC channel over it.

use std::{fmt, path::Path, str::FromStr, sync::Arc};

use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::tls::{
    config::DEFAULT_PORT,
    material,
    server::{TlsError, invalid},
};

/// An agent's TLS listener: `https://host[:port]` (port 7443 by default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsTarget {
    /// A DNS name or an IP address (without brackets); the server's
    /// certificate must name it.
    pub host: String,
    pub port: u16,
}

impl FromStr for TlsTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let uri: Uri = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!(
                "{s:?}: the agent's TCP listener speaks mutual TLS only: write https://host:port"
            ));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!("{s:?}: write https://host:port, without a path"));
        }
        let authority = uri.authority().ok_or_else(|| format!("{s:?}: no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{s:?}: no user information in an agent address"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        ServerName::try_from(host.as_str())
            .map_err(|_| format!("{s:?}: {host:?} is neither a DNS name nor an IP address"))?;
        Ok(TlsTarget {
            host,
            port: authority.port_u16().unwrap_or(DEFAULT_PORT),
        })
    }
}

impl fmt::Display for TlsTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "https://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "https://{}:{}", self.host, self.port)
        }
    }
}

/// A TLS 1.3 client that trusts the CAs in `ca` and presents the
/// certificate chain in `certificate` with its `key`.
pub fn client_config(
    ca: &Path,
    certificate: &Path,
    key: &Path,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in material::certificates(ca)?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| {
            invalid(
                ca.display().to_string(),
                &format!("certificate {} is not a usable CA: {e}", i + 1),
            )
        })?;
    }
    let chain = material::certificates(certificate)?;
    let key_der = material::private_key(key)?;
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .and_then(|b| {
                b.with_root_certificates(roots)
                    .with_client_auth_cert(chain, key_der)
            })
            .map_err(|e| {
                invalid(
                    format!("{} and {}", certificate.display(), key.display()),
                    &e,
                )
            })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Connects a gRPC channel to `target`: TCP, then the TLS handshake.
pub async fn channel(
    config: Arc<ClientConfig>,
    target: &TlsTarget,
) -> Result<Channel, tonic::transport::Error> {
    let server_name =
        ServerName::try_from(target.host.clone()).expect("checked when the target was parsed");
    let address = (target.host.clone(), target.port);
    // The connector does the TLS; the URI only sets :authority.
    let authority = target.to_string().replacen("https", "http", 1);
    Endpoint::from_shared(authority)?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = TlsConnector::from(config.clone());
            let server_name = server_name.clone();
            let address = address.clone();
            async move {
                let tcp = TcpStream::connect(address).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        for (text, host, port, shown) in [
            (
                "https://agent.example.org:9443",
                "agent.example.org",
                9443,
                None,
            ),
            (
                "https://192.0.2.1",
                "192.0.2.1",
                DEFAULT_PORT,
                Some("https://192.0.2.1:7443"),
            ),
            (
                "https://[2001:db8::1]:7443/",
                "2001:db8::1",
                7443,
                Some("https://[2001:db8::1]:7443"),
            ),
        ] {
            let target: TlsTarget = text.parse().unwrap();
            assert_eq!((target.host.as_str(), target.port), (host, port));
            assert_eq!(target.to_string(), shown.unwrap_or(text));
        }
        for (text, needle) in [
            ("http://192.0.2.1:7443", "mutual TLS only"),
            ("192.0.2.1:7443", "mutual TLS only"),
            ("https://192.0.2.1:7443/x", "without a path"),
            ("https://u@192.0.2.1", "no user information"),
            ("https://a_b!:1", ""),
        ] {
            let err = text.parse::<TlsTarget>().unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
