//! Reading TLS material from PEM files: certificate chains, private keys,
//! CA bundles and revocation lists, each with an error that names the file
//! and what is wrong with it.

use std::path::{Path, PathBuf};

use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer,
    pem::{self, PemObject},
};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

fn invalid(path: &Path, problem: impl Into<String>) -> MaterialError {
    MaterialError::Invalid {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

/// Reads the file first, so an unreadable file is told apart from one
/// that holds no PEM block of the expected kind.
fn read(path: &Path) -> Result<Vec<u8>, MaterialError> {
    std::fs::read(path).map_err(|source| MaterialError::Read {
        path: path.to_owned(),
        source,
    })
}

fn pem_error(path: &Path, error: &pem::Error) -> MaterialError {
    invalid(path, format!("malformed PEM: {error}"))
}

/// Every certificate in the file, in order (leaf first for a chain).
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, MaterialError> {
    let bytes = read(path)?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, &e))?;
    if certificates.is_empty() {
        return Err(invalid(path, "no PEM CERTIFICATE block"));
    }
    for (i, certificate) in certificates.iter().enumerate() {
        x509_parser::parse_x509_certificate(certificate)
            .map_err(|e| invalid(path, format!("certificate {}: {e}", i + 1)))?;
    }
    Ok(certificates)
}

/// The one private key in the file.
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, MaterialError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => invalid(
            path,
            "no PEM PRIVATE KEY block (PKCS#8, RSA or EC private key expected)",
        ),
        e => pem_error(path, &e),
    })
}

/// Every revocation list in the file.
pub fn revocation_lists(
    path: &Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, MaterialError> {
    let bytes = read(path)?;
    let lists = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, &e))?;
    if lists.is_empty() {
        return Err(invalid(path, "no PEM X509 CRL block"));
    }
    Ok(lists)
}

/// SHA-256 of `bytes`: certificate fingerprints and SPKI pins.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "nothing here\n").unwrap();
        let missing = dir.path().join("missing.pem");
        let garbled = dir.path().join("garbled.pem");
        std::fs::write(
            &garbled,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        for (result, needle) in [
            (
                certificates(&empty).map(drop),
                "empty.pem: no PEM CERTIFICATE block",
            ),
            (
                private_key(&empty).map(drop),
                "empty.pem: no PEM PRIVATE KEY block",
            ),
            (
                revocation_lists(&empty).map(drop),
                "empty.pem: no PEM X509 CRL block",
            ),
            (
                certificates(&missing).map(drop),
                "missing.pem: No such file",
            ),
            (
                certificates(&garbled).map(drop),
                "garbled.pem: certificate 1:",
            ),
        ] {
            let err = result.unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }
}
