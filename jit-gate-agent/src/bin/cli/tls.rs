//! The client certificate for `https://` agents: CA, certificate and key,
//! each from its flag, else its environment variable, else a small client
//! configuration file (`--client-config`, `JIT_GATE_CLIENT_CONFIG`, else
//! `~/.config/jit-gate/client.toml` if it exists).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, bail};
use clap::Args;
use jit_gate_agent::tls::client::client_config;
use rustls::ClientConfig;
use serde::Deserialize;

#[derive(Debug, Default, Args)]
pub(crate) struct TlsArgs {
    /// PEM file of the CA that signed the agents' server certificates.
    #[arg(long, value_name = "PEM", env = "JIT_GATE_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// PEM file of this client's certificate (then any intermediates).
    #[arg(long, value_name = "PEM", env = "JIT_GATE_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// PEM file of this client's private key.
    #[arg(long, value_name = "PEM", env = "JIT_GATE_KEY", global = true)]
    pub key: Option<PathBuf>,
    /// TOML file with `ca`, `certificate` and `key` (paths relative to the
    /// file), used for whatever the options above leave unset.
    #[arg(
        long,
        value_name = "FILE",
        env = "JIT_GATE_CLIENT_CONFIG",
        global = true
    )]
    pub client_config: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    ca: Option<PathBuf>,
    certificate: Option<PathBuf>,
    key: Option<PathBuf>,
}

impl ClientFile {
    fn read(path: &Path) -> anyhow::Result<ClientFile> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file: ClientFile = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: {}",
                path.display(),
                e.to_string().trim_end().replace('\n', " | ")
            )
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: Option<PathBuf>| p.map(|p| base.join(p));
        Ok(ClientFile {
            ca: resolve(file.ca),
            certificate: resolve(file.certificate),
            key: resolve(file.key),
        })
    }
}

fn default_client_file() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let path = PathBuf::from(home).join(".config/jit-gate/client.toml");
    path.is_file().then_some(path)
}

impl TlsArgs {
    /// The TLS client configuration, read before any agent is contacted.
    pub(crate) fn client_config(&self) -> anyhow::Result<Arc<ClientConfig>> {
        let file = match self.client_config.clone().or_else(default_client_file) {
            Some(path) => ClientFile::read(&path)?,
            None => ClientFile::default(),
        };
        let pick = |flag: &Option<PathBuf>, from_file: Option<PathBuf>, what: &str| {
            flag.clone().or(from_file).with_context(|| {
                format!(
                    "https agents need {what}: --{what} (or JIT_GATE_{}, or the client configuration file)",
                    what.to_ascii_uppercase()
                )
            })
        };
        let ca = pick(&self.ca, file.ca, "ca")?;
        let cert = pick(&self.cert, file.certificate, "cert")?;
        let key = pick(&self.key, file.key, "key")?;
        if !key.is_file() {
            bail!("{}: no such file (the client's private key)", key.display());
        }
        Ok(client_config(&ca, &cert, &key)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_whose_paths_are_relative_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("client.toml");
        std::fs::write(
            &file,
            "ca = \"ca.pem\"\ncertificate = \"/abs/c.pem\"\nkey = \"k.key\"\n",
        )
        .unwrap();
        let read = ClientFile::read(&file).unwrap();
        assert_eq!(read.ca, Some(dir.path().join("ca.pem")));
        assert_eq!(read.certificate, Some(PathBuf::from("/abs/c.pem")));
        let args = TlsArgs {
            key: Some(dir.path().join("missing.key")),
            client_config: Some(file.clone()),
            ..TlsArgs::default()
        };
        let err = args.client_config().unwrap_err().to_string();
        assert!(err.contains("missing.key: no such file"), "{err}");
        std::fs::write(&file, "ca = \"ca.pem\"\ncolour = 1\n").unwrap();
        let err = ClientFile::read(&file).unwrap_err().to_string();
        assert!(err.contains("unknown field `colour`"), "{err}");
        let args = TlsArgs {
            client_config: Some(dir.path().join("empty.toml")),
            ..TlsArgs::default()
        };
        std::fs::write(dir.path().join("empty.toml"), "").unwrap();
        let err = args.client_config().unwrap_err().to_string();
        assert!(err.contains("https agents need ca: --ca"), "{err}");
    }
}
