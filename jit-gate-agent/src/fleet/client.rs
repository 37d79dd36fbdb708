//! Connecting to etcd: TLS material read (and checked) before the agent
//! attaches anything, and a client whose calls and watches notice a dead
//! member or a member without a leader.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use super::FleetConfig;

#[derive(Debug, thiserror::Error)]
pub enum FleetClientError {
    #[error("reading {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM {what}")]
    NotPem {
        path: std::path::PathBuf,
        what: &'static str,
    },
    #[error("no etcd endpoint given")]
    NoEndpoints,
    #[error("connecting to etcd at {endpoints}: {source}")]
    Connect {
        endpoints: String,
        source: etcd_client::Error,
    },
}

/// The TLS settings and timeouts of the etcd connection, read once.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    tls: Option<TlsOptions>,
    timeout: Duration,
    /// The endpoint tried first by the next connection.
    next: Arc<AtomicUsize>,
}

fn read_pem(path: &std::path::Path, what: &'static str) -> Result<Vec<u8>, FleetClientError> {
    let bytes = std::fs::read(path).map_err(|source| FleetClientError::Read {
        path: path.to_owned(),
        source,
    })?;
    let marker = if what == "key" {
        "PRIVATE KEY-----"
    } else {
        "-----BEGIN CERTIFICATE-----"
    };
    if !String::from_utf8_lossy(&bytes).contains(marker) {
        return Err(FleetClientError::NotPem {
            path: path.to_owned(),
            what,
        });
    }
    Ok(bytes)
}

impl EtcdOptions {
    /// Reads the TLS files `[fleet.tls]` names (errors name the file).
    pub fn load(config: &FleetConfig) -> Result<EtcdOptions, FleetClientError> {
        Self::new(
            config.endpoints.clone(),
            config
                .tls
                .as_ref()
                .map(|t| (t.ca.as_path(), t.certificate.as_path(), t.key.as_path())),
            config.timeout,
        )
    }

    /// Endpoints, (CA, certificate, key) files if TLS, and the timeout.
    pub fn new(
        endpoints: Vec<String>,
        tls: Option<(&std::path::Path, &std::path::Path, &std::path::Path)>,
        timeout: Duration,
    ) -> Result<EtcdOptions, FleetClientError> {
        if endpoints.is_empty() {
            return Err(FleetClientError::NoEndpoints);
        }
        let tls = tls
            .map(|(ca, certificate, key)| {
                Ok::<_, FleetClientError>(
                    TlsOptions::new()
                        .ca_certificate(Certificate::from_pem(read_pem(ca, "certificate")?))
                        .identity(Identity::from_pem(
                            read_pem(certificate, "certificate")?,
                            read_pem(key, "key")?,
                        )),
                )
            })
            .transpose()?;
        Ok(EtcdOptions {
            endpoints,
            tls,
            timeout,
            next: Arc::default(),
        })
    }

    /// A client of the first member that answers, trying each endpoint in
    /// turn from the one after the last used (the crate's balanced channel
    /// keeps sending calls to a dead member). Calls time out after
    /// `timeout`; HTTP/2 pings every `timeout` notice a member that died;
    /// `require_leader` makes a member cut off from its cluster fail calls
    /// and end watches instead of going quiet.
    pub async fn connect(&self) -> Result<Client, FleetClientError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            .with_timeout(self.timeout)
            .with_keep_alive(self.timeout, self.timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.clone());
        }
        let count = self.endpoints.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let mut failure = None;
        for offset in 0..count {
            let endpoint = &self.endpoints[(first + offset) % count];
            let answered = match Client::connect([endpoint], Some(options.clone())).await {
                Ok(mut client) => client.status().await.map(|_| client),
                Err(e) => Err(e),
            };
            match answered {
                Ok(client) => {
                    // The next session starts here again.
                    self.next.store((first + offset) % count, Ordering::Relaxed);
                    return Ok(client);
                }
                Err(e) => failure = Some((endpoint.clone(), e)),
            }
        }
        let (endpoint, source) = failure.expect("`new` refuses an empty list of endpoints");
        Err(FleetClientError::Connect {
            endpoints: format!("{} (last tried {endpoint})", self.endpoints.join(",")),
            source,
        })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_files_are_read_up_front_and_named_when_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("ca.pem");
        std::fs::write(
            &pem,
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let junk = dir.path().join("junk.key");
        std::fs::write(&junk, "not a key").unwrap();
        let missing = dir.path().join("missing.pem");
        let endpoints = || vec!["https://192.0.2.1:2379".to_owned()];
        let timeout = Duration::from_secs(1);
        let err =
            EtcdOptions::new(endpoints(), Some((&pem, &missing, &junk)), timeout).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
        let err = EtcdOptions::new(endpoints(), Some((&pem, &pem, &junk)), timeout).unwrap_err();
        assert!(
            err.to_string().contains("junk.key holds no PEM key"),
            "{err}"
        );
        let err = EtcdOptions::new(Vec::new(), None, timeout).unwrap_err();
        assert!(matches!(err, FleetClientError::NoEndpoints));
        assert!(EtcdOptions::new(endpoints(), None, timeout).is_ok());
    }
}
