//! `[fleet]`: where etcd is, how the agent proves who it is to it, and how
//! this host is named and labelled; validated before anything starts.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::layout;

/// `[fleet]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// etcd client URLs: `https://` (with `[fleet.tls]`), or `http://`
    /// only with `allow_plaintext`.
    pub endpoints: Vec<String>,
    /// This host's name: the grants under `/jit-gate/v1/hosts/<host>/` are
    /// its own.
    pub host: String,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub tls: Option<FleetTls>,
    /// Plain-text etcd (a lab): no TLS, no client certificate.
    #[serde(default)]
    pub allow_plaintext: bool,
    /// Fleet grants this host holds at most (addressed to it, live); more
    /// are refused with their status saying so.
    #[serde(default = "default_max_grants")]
    pub max_grants: usize,
    /// How long a connection attempt or call to etcd may take.
    #[serde(with = "humantime_serde", default = "default_timeout")]
    pub timeout: Duration,
}

/// `[fleet.tls]`: PEM files of the CA that signs etcd's certificates and
/// this agent's client certificate and key (etcd maps its common name to
/// an etcd user: README "Fleet mode", "etcd access control").
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FleetTls {
    pub ca: PathBuf,
    pub certificate: PathBuf,
    pub key: PathBuf,
}

fn default_max_grants() -> usize {
    1024
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

/// Endpoints one host may list.
const MAX_ENDPOINTS: usize = 16;

impl FleetConfig {
    /// The first problem, as (field, message).
    pub(crate) fn validate(&self) -> Result<(), (String, String)> {
        let field = |name: &str, problem: String| Err((format!("fleet.{name}"), problem));
        layout::name("host name", &self.host).or_else(|p| field("host", p))?;
        layout::labels("label", &self.labels).or_else(|p| field("labels", p))?;
        if self.endpoints.is_empty() || self.endpoints.len() > MAX_ENDPOINTS {
            return field(
                "endpoints",
                format!("list 1 to {MAX_ENDPOINTS} etcd client URLs"),
            );
        }
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            let here = format!("endpoints[{i}]");
            match endpoint.split_once("://") {
                Some(("https", rest)) if !rest.is_empty() => {
                    if self.tls.is_none() {
                        return field(&here, "an https endpoint needs [fleet.tls]".into());
                    }
                }
                Some(("http", rest)) if !rest.is_empty() => {
                    if !self.allow_plaintext || self.tls.is_some() {
                        return field(
                            &here,
                            "plain http needs allow_plaintext = true and no [fleet.tls]; use https"
                                .into(),
                        );
                    }
                }
                _ => return field(&here, format!("{endpoint:?} is not an http(s):// URL")),
            }
        }
        if let Some(tls) = &self.tls {
            for (name, path) in [
                ("tls.ca", &tls.ca),
                ("tls.certificate", &tls.certificate),
                ("tls.key", &tls.key),
            ] {
                if !path.is_absolute() {
                    return field(name, format!("{} is not an absolute path", path.display()));
                }
            }
        }
        if !(1..=100_000).contains(&self.max_grants) {
            return field("max_grants", "must be 1 to 100000".into());
        }
        if !(Duration::from_millis(100)..=Duration::from_mins(1)).contains(&self.timeout) {
            return field("timeout", "must be between 100ms and 1m".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FleetConfig, String> {
        let config: FleetConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate().map_err(|(f, p)| format!("{f}: {p}"))?;
        Ok(config)
    }

    #[test]
    fn plaintext_only_when_asked_and_tls_for_https() {
        let ok = parse(
            "endpoints = [\"https://10.0.0.1:2379\"]\nhost = \"db-1\"\nlabels = [\"db\"]\n\
             tls = { ca = \"/ca.pem\", certificate = \"/c.pem\", key = \"/c.key\" }",
        )
        .unwrap();
        assert_eq!(ok.max_grants, 1024);
        for (text, expected) in [
            (
                "endpoints = [\"http://e:2379\"]\nhost = \"h\"",
                "allow_plaintext",
            ),
            (
                "endpoints = [\"https://e:2379\"]\nhost = \"h\"",
                "needs [fleet.tls]",
            ),
            ("endpoints = []\nhost = \"h\"", "fleet.endpoints"),
            ("endpoints = [\"e:2379\"]\nhost = \"h\"", "not an http(s)"),
            (
                "endpoints = [\"http://e:2379\"]\nhost = \"a/b\"\nallow_plaintext = true",
                "fleet.host",
            ),
            (
                "endpoints = [\"http://e:2379\"]\nhost = \"h\"\nallow_plaintext = true\nlabels = [\"a b\"]",
                "fleet.labels",
            ),
            (
                "endpoints = [\"http://e:2379\"]\nhost = \"h\"\nallow_plaintext = true\nmax_grants = 0",
                "fleet.max_grants",
            ),
            (
                "endpoints = [\"http://e:2379\"]\nhost = \"h\"\nallow_plaintext = true\nx = 1",
                "unknown field",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
        assert!(
            parse("endpoints = [\"http://e:2379\"]\nhost = \"h\"\nallow_plaintext = true").is_ok()
        );
    }
}
