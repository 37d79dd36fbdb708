//! A small certificate authority for a first install (`jit-gate-agent tls
//! init`) and for tests: a CA, server and client certificates (ECDSA P-256,
//! rcgen), revocation lists, and files written 0600 that are never
//! overwritten. Production users bring their own PKI.

use std::{
    io::Write as _, net::IpAddr, os::unix::fs::OpenOptionsExt as _, path::Path, time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SanType,
};
use time::OffsetDateTime;

pub use rcgen::{Error, SerialNumber};

/// How `tls init` names a client principal in its certificate (a URI
/// subject alternative name), and how the configuration refers to it.
pub fn client_uri(name: &str) -> String {
    format!("urn:jit-gate:{name}")
}

/// A client principal's short name: 1 to 64 letters, digits, '.', '_', '-'.
pub fn valid_client_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "{name:?}: 1 to 64 letters, digits, '.', '_' or '-'"
        ));
    }
    Ok(())
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    certificate: String,
}

/// A certificate and its private key, PEM.
pub struct Issued {
    pub certificate: String,
    pub key: String,
    pub serial: SerialNumber,
}

/// What a leaf certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// A leaf certificate to issue.
pub struct Leaf {
    pub common_name: String,
    pub dns_names: Vec<String>,
    pub addresses: Vec<IpAddr>,
    pub uris: Vec<String>,
    pub usage: Usage,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Leaf {
    /// Valid from a minute ago (clock skew) for `lifetime`.
    pub fn new(common_name: &str, usage: Usage, lifetime: Duration) -> Leaf {
        let now = OffsetDateTime::now_utc();
        Leaf {
            common_name: common_name.to_owned(),
            dns_names: Vec::new(),
            addresses: Vec::new(),
            uris: Vec::new(),
            usage,
            not_before: now - Duration::from_mins(1),
            not_after: now + lifetime,
        }
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive, as DER integers go, and without a leading zero byte, which
    // DER would drop: the serial kept is the one the certificate carries.
    bytes[0] = (bytes[0] & 0x7f).max(1);
    SerialNumber::from_slice(&bytes)
}

impl Ca {
    /// A new CA valid for `lifetime`.
    pub fn generate(common_name: &str, lifetime: Duration) -> Result<Ca, Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.key_identifier_method = KeyIdMethod::Sha256;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_mins(1);
        params.not_after = now + lifetime;
        params.serial_number = Some(random_serial());
        let certificate = params.self_signed(&key)?.pem();
        Ok(Ca {
            issuer: Issuer::new(params, key),
            certificate,
        })
    }

    /// The CA in `certificate`, with its key in `key` (PEM).
    pub fn load(certificate: &Path, key: &Path) -> anyhow::Result<Ca> {
        use anyhow::Context as _;
        let certificate = std::fs::read_to_string(certificate)
            .with_context(|| format!("reading {}", certificate.display()))?;
        let key_pem =
            std::fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?;
        let key_pair = KeyPair::from_pem(&key_pem).with_context(|| format!("{}", key.display()))?;
        let issuer = Issuer::from_ca_cert_pem(&certificate, key_pair).context("reading the CA")?;
        Ok(Ca {
            issuer,
            certificate,
        })
    }

    pub fn certificate_pem(&self) -> &str {
        &self.certificate
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    pub fn issue(&self, leaf: &Leaf) -> Result<Issued, Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, leaf.common_name.as_str());
        params.subject_alt_names = leaf
            .dns_names
            .iter()
            .map(|n| n.clone().try_into().map(SanType::DnsName))
            .chain(
                leaf.uris
                    .iter()
                    .map(|u| u.clone().try_into().map(SanType::URI)),
            )
            .collect::<Result<_, _>>()?;
        params
            .subject_alt_names
            .extend(leaf.addresses.iter().map(|a| SanType::IpAddress(*a)));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match leaf.usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        params.not_before = leaf.not_before;
        params.not_after = leaf.not_after;
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        let certificate = params.signed_by(&key, &self.issuer)?.pem();
        Ok(Issued {
            certificate,
            key: key.serialize_pem(),
            serial,
        })
    }

    /// A revocation list (PEM) revoking `serials`, valid for `lifetime`.
    pub fn revocation_list(
        &self,
        serials: &[SerialNumber],
        number: u64,
        lifetime: Duration,
    ) -> Result<String, Error> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::from_mins(1),
            next_update: now + lifetime,
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: serial.clone(),
                    revocation_time: now - Duration::from_mins(1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer)?.pem()
    }
}

/// Writes a new file readable by its owner only; an existing file is an
/// error, never overwritten.
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use rustls::pki_types::{CertificateDer, pem::PemObject as _};

    use super::*;

    #[test]
    fn issued_certificates_chain_to_the_ca_and_a_loaded_ca_issues_more() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("test CA", Duration::from_hours(1)).unwrap();
        let ca_pem = dir.path().join("ca.pem");
        let ca_key = dir.path().join("ca.key");
        write_private(&ca_pem, ca.certificate_pem()).unwrap();
        write_private(&ca_key, &ca.key_pem()).unwrap();
        let mode = std::fs::metadata(&ca_key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = write_private(&ca_key, "x").unwrap_err();
        assert_eq!(again.kind(), std::io::ErrorKind::AlreadyExists);

        let loaded = Ca::load(&ca_pem, &ca_key).unwrap();
        let mut leaf = Leaf::new("broker-1", Usage::Client, Duration::from_mins(10));
        leaf.uris.push(client_uri("broker-1"));
        let issued = loaded.issue(&leaf).unwrap();
        let der = CertificateDer::from_pem_slice(issued.certificate.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let ca_der = CertificateDer::from_pem_slice(ca.certificate_pem().as_bytes()).unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());
        assert_eq!(cert.raw_serial(), issued.serial.to_bytes().as_slice());
    }

    #[test]
    fn client_names() {
        valid_client_name("broker-1.eu_west").unwrap();
        for bad in ["", "a b", "a/b", &"x".repeat(65)] {
            assert!(valid_client_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(client_uri("ops"), "urn:jit-gate:ops");
    }
}
