//! Client certificates, checked during the handshake: the chain against the
//! configured CAs and revocation lists (rustls' webpki verifier), then the
//! pinned fingerprints. A refusal is classified so that it can be told
//! precisely, and it names the certificate's principal only when the
//! certificate really chains to a configured CA — webpki reports an expired
//! certificate before it checks any signature, so such a certificate is
//! verified again at a time inside its validity before it is believed.

use std::{
    cell::RefCell,
    fmt,
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    SignatureScheme,
    client::danger::HandshakeSignatureValid,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use crate::tls::{identity::CertIdentity, material::sha256};

/// Why a client was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection {
    NoCertificate,
    UnknownIssuer,
    Expired {
        not_after: SystemTime,
    },
    NotYetValid {
        not_before: SystemTime,
    },
    Revoked,
    /// Valid, but not among `pinned_client_certificates`.
    NotPinned,
    /// The client offers no TLS 1.3 (TLS 1.2 or older).
    NotTls13(String),
    /// Not TLS at all (plaintext HTTP/2, for one).
    NotTls,
    /// The client ended the handshake (it did not trust the server).
    ClientAlert(String),
    /// Anything else that broke the handshake.
    Handshake(String),
}

impl Rejection {
    /// A stable short name for logs and audit details.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::NoCertificate => "no-certificate",
            Rejection::UnknownIssuer => "unknown-issuer",
            Rejection::Expired { .. } => "expired",
            Rejection::NotYetValid { .. } => "not-yet-valid",
            Rejection::Revoked => "revoked",
            Rejection::NotPinned => "not-pinned",
            Rejection::NotTls13(_) => "protocol-version",
            Rejection::NotTls => "not-tls",
            Rejection::ClientAlert(_) => "client-alert",
            Rejection::Handshake(_) => "handshake",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let time = |t: &SystemTime| humantime::format_rfc3339_seconds(*t);
        match self {
            Rejection::NoCertificate => f.write_str("no client certificate"),
            Rejection::UnknownIssuer => {
                f.write_str("client certificate not issued by a configured CA")
            }
            Rejection::Expired { not_after } => {
                write!(f, "client certificate expired at {}", time(not_after))
            }
            Rejection::NotYetValid { not_before } => {
                write!(
                    f,
                    "client certificate not valid before {}",
                    time(not_before)
                )
            }
            Rejection::Revoked => f.write_str("client certificate revoked"),
            Rejection::NotPinned => {
                f.write_str("client certificate not among the pinned fingerprints")
            }
            Rejection::NotTls13(why) => {
                write!(
                    f,
                    "client cannot speak TLS 1.3, the only version served ({why})"
                )
            }
            Rejection::NotTls => f.write_str("not a TLS client (plaintext?)"),
            Rejection::ClientAlert(alert) => {
                write!(
                    f,
                    "client ended the handshake ({alert}): does it trust this server's CA?"
                )
            }
            Rejection::Handshake(why) => f.write_str(why),
        }
    }
}

/// A refused client: why, and who, if the certificate chains to a
/// configured CA (its holder did not prove possession of the key when the
/// handshake stopped at the certificate).
#[derive(Clone, Debug)]
pub struct Refused {
    pub rejection: Rejection,
    pub identified: Option<CertIdentity>,
}

tokio::task_local! {
    /// Where the verifier leaves the refusal of the handshake this task runs.
    static REFUSED: RefCell<Option<Refused>>;
}

/// Runs a handshake, returning its outcome and what the verifier refused
/// during it, if anything.
pub async fn noting_refusal<F: Future>(handshake: F) -> (F::Output, Option<Refused>) {
    REFUSED
        .scope(RefCell::new(None), async {
            let outcome = handshake.await;
            (outcome, REFUSED.with(|slot| slot.borrow_mut().take()))
        })
        .await
}

#[derive(Debug)]
pub struct ClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    pinned: Vec<[u8; 32]>,
}

impl ClientVerifier {
    pub fn new(
        provider: Arc<CryptoProvider>,
        roots: RootCertStore,
        crls: Vec<CertificateRevocationListDer<'static>>,
        pinned: Vec<[u8; 32]>,
    ) -> Result<ClientVerifier, String> {
        let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .with_crls(crls)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(ClientVerifier { webpki, pinned })
    }

    /// Checks a chain outside a handshake (a connection's certificate after
    /// the trusted set changed).
    pub fn check(&self, chain: &[CertificateDer<'static>], now: SystemTime) -> Result<(), Refused> {
        let Some((end_entity, intermediates)) = chain.split_first() else {
            return Err(Refused {
                rejection: Rejection::NoCertificate,
                identified: None,
            });
        };
        self.verify(end_entity, intermediates, unix_time(now))
            .map(drop)
            .map_err(|e| self.classify(&e, end_entity, intermediates))
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .webpki
            .verify_client_cert(end_entity, intermediates, now)?;
        if !self.pinned.is_empty() && !self.pinned.contains(&sha256(end_entity)) {
            return Err(CertificateError::ApplicationVerificationFailure.into());
        }
        Ok(verified)
    }

    fn classify(
        &self,
        error: &Error,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Refused {
        let identity = CertIdentity::parse(end_entity).ok();
        // Believed only if the chain verifies at `at`; revoked counts too,
        // since webpki checks revocation after the signatures.
        let genuine_at = |at: SystemTime| {
            let verdict = self
                .webpki
                .verify_client_cert(end_entity, intermediates, unix_time(at));
            match verdict {
                Ok(_) | Err(Error::InvalidCertificate(CertificateError::Revoked)) => {
                    identity.clone()
                }
                Err(_) => None,
            }
        };
        let Error::InvalidCertificate(certificate_error) = error else {
            return Refused {
                rejection: Rejection::Handshake(error.to_string()),
                identified: None,
            };
        };
        let (rejection, identified) = match (certificate_error, &identity) {
            (CertificateError::Expired | CertificateError::ExpiredContext { .. }, Some(id)) => (
                Rejection::Expired {
                    not_after: id.not_after,
                },
                genuine_at(id.not_after),
            ),
            (
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
                Some(id),
            ) => (
                Rejection::NotYetValid {
                    not_before: id.not_before,
                },
                genuine_at(id.not_before),
            ),
            (CertificateError::Revoked, _) => (Rejection::Revoked, identity),
            (CertificateError::ApplicationVerificationFailure, _) => {
                (Rejection::NotPinned, identity)
            }
            (CertificateError::UnknownIssuer, _) => (Rejection::UnknownIssuer, None),
            (other, _) => (
                Rejection::Handshake(format!("client certificate refused: {other:?}")),
                None,
            ),
        };
        Refused {
            rejection,
            identified,
        }
    }
}

fn unix_time(at: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(
        at.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO),
    )
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verdict = self.verify(end_entity, intermediates, now);
        if let Err(error) = &verdict {
            let refused = self.classify(error, end_entity, intermediates);
            // Outside `noting_refusal` (never, in the agent) there is no slot.
            let _ = REFUSED.try_with(|slot| *slot.borrow_mut() = Some(refused));
        }
        verdict
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::pem::PemObject as _;

    use super::*;
    use crate::tls::pki::{Ca, Leaf, Usage};

    const HOUR: Duration = Duration::from_hours(1);

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn verifier(ca: &Ca, crl: Option<String>, pinned: Vec<[u8; 32]>) -> ClientVerifier {
        let mut roots = RootCertStore::empty();
        roots.add(der(ca.certificate_pem())).unwrap();
        let crls = crl
            .map(|pem| vec![CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).unwrap()])
            .unwrap_or_default();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        ClientVerifier::new(provider, roots, crls, pinned).unwrap()
    }

    fn client(
        ca: &Ca,
        name: &str,
        shift: Option<time::Duration>,
    ) -> (CertificateDer<'static>, rcgen::SerialNumber) {
        let mut leaf = Leaf::new(name, Usage::Client, HOUR);
        leaf.uris.push(format!("urn:jit-gate:{name}"));
        if let Some(shift) = shift {
            leaf.not_before += shift;
            leaf.not_after += shift;
        }
        let issued = ca.issue(&leaf).unwrap();
        (der(&issued.certificate), issued.serial)
    }

    fn refusal(
        verifier: &ClientVerifier,
        cert: &CertificateDer<'static>,
    ) -> (&'static str, Option<String>) {
        let refused = verifier
            .check(std::slice::from_ref(cert), SystemTime::now())
            .unwrap_err();
        (
            refused.rejection.code(),
            refused.identified.map(|identity| identity.name()),
        )
    }

    #[test]
    fn refusals_are_classified_and_only_genuine_certificates_identified() {
        let ca = Ca::generate("CA", 24 * HOUR).unwrap();
        let other = Ca::generate("other CA", 24 * HOUR).unwrap();
        let (good, _) = client(&ca, "good", None);
        let (revoked, serial) = client(&ca, "revoked", None);
        let crl = ca.revocation_list(&[serial], 1, HOUR).unwrap();
        let plain = verifier(&ca, Some(crl), Vec::new());
        plain
            .check(std::slice::from_ref(&good), SystemTime::now())
            .unwrap();

        let two_hours = time::Duration::hours(2);
        let (expired, _) = client(&ca, "expired", Some(-two_hours));
        let (early, _) = client(&ca, "early", Some(two_hours));
        let (forged_expired, _) = client(&other, "expired", Some(-two_hours));
        let (stranger, _) = client(&other, "good", None);
        for (cert, code, who) in [
            (&expired, "expired", Some("uri:urn:jit-gate:expired")),
            (&early, "not-yet-valid", Some("uri:urn:jit-gate:early")),
            (&revoked, "revoked", Some("uri:urn:jit-gate:revoked")),
            // webpki reports the expiry before the signature: not believed.
            (&forged_expired, "expired", None),
            (&stranger, "unknown-issuer", None),
        ] {
            assert_eq!(refusal(&plain, cert), (code, who.map(str::to_owned)));
        }

        let pinned = verifier(&ca, None, vec![sha256(&good)]);
        pinned
            .check(std::slice::from_ref(&good), SystemTime::now())
            .unwrap();
        assert_eq!(
            refusal(&pinned, &revoked),
            ("not-pinned", Some("uri:urn:jit-gate:revoked".to_owned()))
        );
    }

    #[test]
    fn refusals_during_a_handshake_are_noted() {
        let ca = Ca::generate("CA", HOUR).unwrap();
        let other = Ca::generate("other CA", HOUR).unwrap();
        let (stranger, _) = client(&other, "x", None);
        let verifier = verifier(&ca, None, Vec::new());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (outcome, refused) = runtime.block_on(noting_refusal(async {
            verifier.verify_client_cert(&stranger, &[], UnixTime::now())
        }));
        assert!(outcome.is_err());
        assert_eq!(refused.unwrap().rejection, Rejection::UnknownIssuer);
    }
}
