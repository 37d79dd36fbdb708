//! Signed audit checkpoints: the agent's Ed25519 key (generated at first
//! start, file mode 0600) signs (sequence, head hash, time) every so often,
//! so that whoever keeps a checkpoint can later tell that the log was cut
//! short or re-hashed. README "Audit log" documents the signed bytes:
//! `"jit-gate audit checkpoint v1" ‖ u64 sequence ‖ head hash (32 bytes) ‖
//! i64 at_ms`, big-endian.

use std::{
    io::Write as _,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

const DOMAIN: &[u8] = b"jit-gate audit checkpoint v1";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("audit signing key {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("audit signing key {path}: not 64 hex digits (an Ed25519 seed)")]
    Malformed { path: PathBuf },
    #[error("generating the audit signing key: {0}")]
    Random(String),
}

/// A signed statement that the log's record `sequence` has hash `hash`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub sequence: u64,
    /// Hex SHA-256, as in the audit table.
    pub hash: String,
    pub at_ms: i64,
    /// Hex Ed25519 signature over `signed_bytes`.
    pub signature: String,
}

impl Checkpoint {
    pub fn signed_bytes(sequence: u64, hash: &str, at_ms: i64) -> Option<Vec<u8>> {
        let hash = hex::decode(hash).ok().filter(|h| h.len() == 32)?;
        let mut bytes = DOMAIN.to_vec();
        bytes.extend_from_slice(&sequence.to_be_bytes());
        bytes.extend_from_slice(&hash);
        bytes.extend_from_slice(&at_ms.to_be_bytes());
        Some(bytes)
    }

    /// Whether the signature is `key`'s over this checkpoint.
    pub fn signed_by(&self, key: &VerifyingKey) -> bool {
        let Some(bytes) = Checkpoint::signed_bytes(self.sequence, &self.hash, self.at_ms) else {
            return false;
        };
        let Some(signature) = hex::decode(&self.signature)
            .ok()
            .and_then(|s| Signature::from_slice(&s).ok())
        else {
            return false;
        };
        key.verify(&bytes, &signature).is_ok()
    }
}

/// The agent's signing key.
pub struct CheckpointKey {
    key: SigningKey,
}

impl CheckpointKey {
    /// Reads the key at `path`, or generates one there (mode 0600) if the
    /// file does not exist. A file that exists but cannot be read or parsed
    /// is an error: the agent never replaces a key silently.
    pub fn load_or_create(path: &Path) -> Result<CheckpointKey, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let seed: [u8; 32] = hex::decode(text.trim())
                    .ok()
                    .and_then(|bytes| bytes.try_into().ok())
                    .ok_or_else(|| KeyError::Malformed {
                        path: path.to_owned(),
                    })?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(io)?;
                Ok(CheckpointKey {
                    key: SigningKey::from_bytes(&seed),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io)?;
                file.write_all(hex::encode(seed).as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(io)?;
                Ok(CheckpointKey {
                    key: SigningKey::from_bytes(&seed),
                })
            }
            Err(e) => Err(io(e)),
        }
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Hex of the public key, as the API and the log show it.
    pub fn public_hex(&self) -> String {
        hex::encode(self.verifying_key().as_bytes())
    }

    pub fn sign(&self, sequence: u64, hash: &str, at_ms: i64) -> Checkpoint {
        let bytes =
            Checkpoint::signed_bytes(sequence, hash, at_ms).expect("audit hashes are 32-byte hex");
        Checkpoint {
            sequence,
            hash: hash.to_owned(),
            at_ms,
            signature: hex::encode(self.key.sign(&bytes).to_bytes()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn key_is_created_private_then_reused_and_signs_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        let key = CheckpointKey::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = CheckpointKey::load_or_create(&path).unwrap();
        assert_eq!(key.public_hex(), again.public_hex());

        let hash = "ab".repeat(32);
        let checkpoint = key.sign(7, &hash, 1_700_000_000_000);
        assert!(checkpoint.signed_by(&again.verifying_key()));
        let mut forged = checkpoint.clone();
        forged.sequence = 6;
        assert!(!forged.signed_by(&key.verifying_key()));

        std::fs::write(&path, "not a key").unwrap();
        assert!(matches!(
            CheckpointKey::load_or_create(&path),
            Err(KeyError::Malformed { .. })
        ));
    }
}
