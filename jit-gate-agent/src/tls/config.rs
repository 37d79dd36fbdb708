//! The `[api.tls]` configuration: where the mutual-TLS listener listens,
//! its certificate and key, what client certificates are checked against
//! (CAs, revocation lists, pinned fingerprints), which client networks may
//! connect, and which certificate principals hold which role.

use std::{collections::BTreeSet, fmt, net::SocketAddr, path::PathBuf, str::FromStr};

use ipnet::IpNet;
use serde::Deserialize;

use crate::{
    auth::Role,
    net::Protocol,
    policy::PortRule,
    refusal::{Refusal, RefusalKind},
};

/// The port `tls init` and the documentation use; any port may be configured.
pub const DEFAULT_PORT: u16 = 7443;

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Addresses the listener binds (IPv4 and IPv6; an IPv6 address binds
    /// IPv6 only, so `0.0.0.0:P` and `[::]:P` can both be listed).
    pub listen: Vec<SocketAddr>,
    /// PEM: the server's certificate, followed by any intermediates.
    pub certificate: PathBuf,
    /// PEM: the server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM files of the CAs that sign client certificates.
    pub client_ca: Vec<PathBuf>,
    /// PEM certificate revocation lists; when set, every certificate of a
    /// client's chain must be covered by a list from its issuer.
    #[serde(default)]
    pub crl: Vec<PathBuf>,
    /// If not empty, only client certificates with one of these SHA-256
    /// fingerprints (of the whole certificate) are accepted.
    #[serde(default)]
    pub pinned_client_certificates: Vec<Fingerprint>,
    /// Client networks allowed to connect; empty: any. Others are closed
    /// before the TLS handshake.
    #[serde(default)]
    pub allowed_networks: Vec<IpNet>,
    /// Certificate principals and their roles; the first entry matching
    /// the client certificate applies.
    #[serde(default)]
    pub principals: Vec<CertPrincipal>,
}

/// One certificate principal: exactly one of `uri`, `dns` (subject
/// alternative names) or `spki_sha256` (the key), with its role.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertPrincipal {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub dns: Option<String>,
    #[serde(default)]
    pub spki_sha256: Option<Fingerprint>,
    pub role: Role,
}

impl CertPrincipal {
    /// The identity this entry names (valid after `TlsConfig::validate`).
    pub fn identity(&self) -> Identity {
        match (&self.uri, &self.dns, &self.spki_sha256) {
            (Some(uri), _, _) => Identity::Uri(uri.clone()),
            (_, Some(dns), _) => Identity::Dns(dns.to_ascii_lowercase()),
            (_, _, Some(spki)) => Identity::Spki(spki.0),
            (None, None, None) => unreachable!("validated: one selector per principal"),
        }
    }
}

/// What a client certificate can be known by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Identity {
    /// A URI subject alternative name (e.g. a SPIFFE id).
    Uri(String),
    /// A DNS subject alternative name, lower case.
    Dns(String),
    /// SHA-256 of the certificate's `SubjectPublicKeyInfo`.
    Spki([u8; 32]),
}

impl fmt::Display for Identity {
    /// How audit records name a certificate principal.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Uri(uri) => write!(f, "uri:{uri}"),
            Identity::Dns(name) => write!(f, "dns:{name}"),
            Identity::Spki(hash) => write!(f, "spki-sha256:{}", hex::encode(hash)),
        }
    }
}

/// A SHA-256 digest written as 64 hex digits, colons allowed
/// (`openssl x509 -fingerprint -sha256` prints it that way).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl FromStr for Fingerprint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let digits: String = s.chars().filter(|c| *c != ':').collect();
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(&digits, &mut bytes)
            .map_err(|_| format!("{s:?} is not a SHA-256 digest (64 hex digits)"))?;
        Ok(Fingerprint(bytes))
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Longest URI or DNS name a principal may be configured with.
const MAX_NAME: usize = 512;

/// A URI or DNS name a principal can be named by: 1 to `MAX_NAME` bytes,
/// no spaces or control characters.
pub fn valid_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_NAME
        || name.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(format!(
            "{:?}: 1 to {MAX_NAME} bytes, no spaces or control characters",
            name.chars().take(64).collect::<String>()
        ));
    }
    Ok(())
}

impl TlsConfig {
    /// Checks what can be checked without reading the files; `Err` names
    /// the field (under `api.tls`) and the problem.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let field = |name: &str, problem: String| Err((format!("api.tls.{name}"), problem));
        if self.listen.is_empty() {
            return field("listen", "at least one address:port is needed".into());
        }
        let mut seen = BTreeSet::new();
        for (i, address) in self.listen.iter().enumerate() {
            if address.port() == 0 {
                return field(&format!("listen[{i}]"), format!("{address}: port 0"));
            }
            if !seen.insert(address) {
                return field(
                    &format!("listen[{i}]"),
                    format!("{address} is listed twice"),
                );
            }
        }
        if self.client_ca.is_empty() {
            return field(
                "client_ca",
                "at least one CA is needed: client certificates are mandatory".into(),
            );
        }
        let files = [("certificate", &self.certificate), ("key", &self.key)]
            .into_iter()
            .map(|(name, path)| (name.to_owned(), path))
            .chain(
                self.client_ca
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (format!("client_ca[{i}]"), p)),
            )
            .chain(
                self.crl
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (format!("crl[{i}]"), p)),
            );
        for (name, path) in files {
            if !path.is_absolute() {
                return field(&name, format!("{} is not an absolute path", path.display()));
            }
        }
        for (i, network) in self.allowed_networks.iter().enumerate() {
            if network.trunc() != *network {
                return field(
                    &format!("allowed_networks[{i}]"),
                    format!(
                        "{network} has host bits set (did you mean {}?)",
                        network.trunc()
                    ),
                );
            }
        }
        let mut identities = BTreeSet::new();
        for (i, principal) in self.principals.iter().enumerate() {
            let here = format!("principals[{i}]");
            let selectors = [
                principal.uri.is_some(),
                principal.dns.is_some(),
                principal.spki_sha256.is_some(),
            ];
            if selectors.iter().filter(|s| **s).count() != 1 {
                return field(
                    &here,
                    "give exactly one of `uri`, `dns` or `spki_sha256`".into(),
                );
            }
            if let Some(name) = principal.uri.as_ref().or(principal.dns.as_ref()) {
                valid_name(name).or_else(|problem| field(&here, problem))?;
            }
            if !identities.insert(principal.identity()) {
                return field(&here, format!("{} is listed twice", principal.identity()));
            }
        }
        Ok(())
    }

    /// The TCP ports the listener uses, which no policy rule may protect.
    pub fn ports(&self) -> BTreeSet<u16> {
        self.listen.iter().map(SocketAddr::port).collect()
    }

    /// Refuses rules that would protect the listener's own port: a broker
    /// could lock itself out of every agent it drives.
    pub fn check_policy(&self, rules: &[PortRule]) -> Result<(), Refusal> {
        let ports = self.ports();
        match rules
            .iter()
            .find(|r| r.protocol.covers(Protocol::Tcp) && ports.contains(&r.port))
        {
            Some(rule) => Err(Refusal::new(
                RefusalKind::FailedPrecondition,
                format!(
                    "port {}/tcp is the agent's own TLS listener (api.tls.listen) and cannot \
                     be protected: brokers would lock themselves out; restrict who may \
                     connect with api.tls.allowed_networks instead",
                    rule.port
                ),
            )),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::RuleProtocol;

    fn parse(text: &str) -> TlsConfig {
        toml::from_str(text).unwrap()
    }

    const BASE: &str = r#"
        listen = ["0.0.0.0:7443", "[::]:7443"]
        certificate = "/etc/jit-gate/tls/server.pem"
        key = "/etc/jit-gate/tls/server.key"
        client_ca = ["/etc/jit-gate/tls/ca.pem"]
    "#;

    #[test]
    fn full_configuration() {
        let config = parse(&format!(
            "{BASE}
            crl = [\"/etc/jit-gate/tls/ca.crl\"]
            pinned_client_certificates = [\"{}\"]
            allowed_networks = [\"198.51.100.0/24\", \"2001:db8::/32\"]
            principals = [
              {{ uri = \"spiffe://corp/broker\", role = \"broker\" }},
              {{ dns = \"Ops.Example.org\", role = \"auditor\" }},
              {{ spki_sha256 = \"{}\", role = \"admin\" }},
            ]",
            "AB:".repeat(31) + "AB",
            "0f".repeat(32)
        ));
        config.validate().unwrap();
        assert_eq!(config.ports(), BTreeSet::from([7443]));
        assert_eq!(config.pinned_client_certificates[0].0, [0xab; 32]);
        let identities: Vec<String> = config
            .principals
            .iter()
            .map(|p| p.identity().to_string())
            .collect();
        assert_eq!(
            identities,
            [
                "uri:spiffe://corp/broker".to_owned(),
                "dns:ops.example.org".to_owned(),
                format!("spki-sha256:{}", "0f".repeat(32)),
            ]
        );
    }

    #[test]
    fn the_listener_port_cannot_be_protected() {
        let config = parse(BASE);
        let rule = |port, protocol| PortRule::open(port, protocol);
        config
            .check_policy(&[rule(22, RuleProtocol::Tcp), rule(7443, RuleProtocol::Udp)])
            .unwrap();
        for protocol in [RuleProtocol::Tcp, RuleProtocol::Both] {
            let refusal = config
                .check_policy(&[rule(22, RuleProtocol::Tcp), rule(7443, protocol)])
                .unwrap_err();
            assert_eq!(refusal.kind, RefusalKind::FailedPrecondition);
            assert!(
                refusal
                    .message
                    .contains("port 7443/tcp is the agent's own TLS listener")
            );
        }
    }

    #[test]
    fn errors_name_the_field() {
        for (extra, field, needle) in [
            (
                "principals = [{ role = \"broker\" }]",
                "principals[0]",
                "exactly one",
            ),
            (
                "principals = [{ uri = \"a\", dns = \"b\", role = \"broker\" }]",
                "principals[0]",
                "exactly one",
            ),
            (
                "principals = [{ uri = \"a b\", role = \"broker\" }]",
                "principals[0]",
                "no spaces",
            ),
            (
                "principals = [{ dns = \"x\", role = \"broker\" }, { dns = \"X\", role = \"admin\" }]",
                "principals[1]",
                "dns:x is listed twice",
            ),
            (
                "allowed_networks = [\"10.0.0.1/8\"]",
                "allowed_networks[0]",
                "did you mean 10.0.0.0/8",
            ),
            ("crl = [\"ca.crl\"]", "crl[0]", "not an absolute path"),
        ] {
            let config = parse(&format!("{BASE}\n{extra}"));
            let (name, problem) = config.validate().unwrap_err();
            assert_eq!(name, format!("api.tls.{field}"), "{extra}");
            assert!(problem.contains(needle), "{extra}: {problem}");
        }
        let mut config = parse(BASE);
        config.listen.push("0.0.0.0:7443".parse().unwrap());
        assert!(config.validate().unwrap_err().1.contains("listed twice"));
        config.listen = vec!["[::1]:0".parse().unwrap()];
        assert!(config.validate().unwrap_err().1.contains("port 0"));
        config.listen.clear();
        assert_eq!(config.validate().unwrap_err().0, "api.tls.listen");
        let mut config = parse(BASE);
        config.client_ca.clear();
        assert!(config.validate().unwrap_err().1.contains("mandatory"));
        let err =
            toml::from_str::<TlsConfig>(&format!("{BASE}\npinned_client_certificates = [\"abc\"]"))
                .unwrap_err();
        assert!(err.to_string().contains("not a SHA-256 digest"), "{err}");
    }
}
