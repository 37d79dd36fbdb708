//! Who a client certificate names: its URI and DNS subject alternative
//! names and the SHA-256 of its public key (SPKI), matched against the
//! configured principals to find the caller's role. Only ever applied to a
//! certificate whose chain was verified (or, for an audit record of a
//! refused handshake, re-verified apart from its validity period).

use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use x509_parser::{extensions::GeneralName, prelude::X509Certificate};

use crate::{
    auth::Role,
    tls::{
        config::{CertPrincipal, Identity, valid_name},
        material::sha256,
    },
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertIdentity {
    /// URI, then DNS subject alternative names, then the SPKI digest.
    pub identities: Vec<Identity>,
    /// SHA-256 of the whole certificate (what pins name).
    pub fingerprint: [u8; 32],
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CertIdentity {
    pub fn parse(der: &CertificateDer<'_>) -> Result<CertIdentity, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("unreadable certificate: {e}"))?;
        let mut uris = Vec::new();
        let mut dns = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(uri) if nameable(uri) => {
                        uris.push(Identity::Uri((*uri).to_owned()));
                    }
                    GeneralName::DNSName(name) if nameable(name) => {
                        dns.push(Identity::Dns(name.to_ascii_lowercase()));
                    }
                    _ => {}
                }
            }
        }
        let spki = sha256(cert.tbs_certificate.subject_pki.raw);
        let mut identities = uris;
        identities.append(&mut dns);
        identities.push(Identity::Spki(spki));
        let (not_before, not_after) = validity(&cert);
        Ok(CertIdentity {
            identities,
            fingerprint: sha256(der),
            not_before,
            not_after,
        })
    }

    /// The first configured principal that names this certificate.
    pub fn role_in(&self, principals: &[CertPrincipal]) -> Option<(Identity, Role)> {
        principals.iter().find_map(|principal| {
            let wanted = principal.identity();
            self.identities
                .contains(&wanted)
                .then_some((wanted, principal.role))
        })
    }

    /// How a certificate that matches no principal is named: its first
    /// URI, else its first DNS name, else its key.
    pub fn name(&self) -> String {
        self.identities
            .first()
            .expect("the SPKI digest is always there")
            .to_string()
    }
}

fn validity(cert: &X509Certificate<'_>) -> (SystemTime, SystemTime) {
    let at = |t: i64| match u64::try_from(t) {
        Ok(seconds) => SystemTime::UNIX_EPOCH + Duration::from_secs(seconds),
        Err(_) => SystemTime::UNIX_EPOCH,
    };
    (
        at(cert.validity().not_before.timestamp()),
        at(cert.validity().not_after.timestamp()),
    )
}

/// Whether a principal could be configured with this name; other names
/// (too long, spaces, control characters) are left out, so that nothing a
/// certificate carries reaches a log or an audit record unchecked.
fn nameable(name: &str) -> bool {
    valid_name(name).is_ok()
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, PublicKeyData as _, SanType};

    use super::*;

    fn certificate(sans: Vec<SanType>) -> (CertificateDer<'static>, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        (params.self_signed(&key).unwrap().der().clone(), key)
    }

    #[test]
    fn names_come_from_the_sans_and_the_key() {
        let (der, key) = certificate(vec![
            SanType::DnsName("Broker.Example.org".try_into().unwrap()),
            SanType::URI("spiffe://corp/broker".try_into().unwrap()),
        ]);
        let identity = CertIdentity::parse(&der).unwrap();
        let spki = sha256(&key.subject_public_key_info());
        assert_eq!(
            identity.identities,
            [
                Identity::Uri("spiffe://corp/broker".into()),
                Identity::Dns("broker.example.org".into()),
                Identity::Spki(spki),
            ]
        );
        assert_eq!(identity.name(), "uri:spiffe://corp/broker");
        assert_eq!(identity.fingerprint, sha256(&der));
        assert!(identity.not_before < identity.not_after);

        let principal = |uri: Option<&str>, dns: Option<&str>, role| CertPrincipal {
            uri: uri.map(Into::into),
            dns: dns.map(Into::into),
            spki_sha256: None,
            role,
        };
        // The first matching entry wins, in the configuration's order.
        let principals = [
            principal(Some("spiffe://corp/other"), None, Role::Admin),
            principal(None, Some("BROKER.example.org"), Role::Auditor),
            principal(Some("spiffe://corp/broker"), None, Role::Broker),
        ];
        assert_eq!(
            identity.role_in(&principals),
            Some((Identity::Dns("broker.example.org".into()), Role::Auditor))
        );
        assert_eq!(identity.role_in(&principals[..1]), None);
        let by_key = CertPrincipal {
            uri: None,
            dns: None,
            spki_sha256: Some(crate::tls::config::Fingerprint(spki)),
            role: Role::Admin,
        };
        assert_eq!(
            identity.role_in(&[by_key]),
            Some((Identity::Spki(spki), Role::Admin))
        );
    }

    #[test]
    fn a_certificate_without_usable_names_is_known_by_its_key() {
        let (der, key) = certificate(vec![
            SanType::URI("urn:a\u{1b}[2J".try_into().unwrap()),
            SanType::DnsName("x".repeat(600).try_into().unwrap()),
        ]);
        let identity = CertIdentity::parse(&der).unwrap();
        assert_eq!(
            identity.name(),
            format!(
                "spki-sha256:{}",
                hex::encode(sha256(&key.subject_public_key_info()))
            )
        );
    }
}
