//! Signed audit checkpoints: the agent's Ed25519 key (generated at first
//! start, file mode 0600) signs (sequence, head hash, time) every so often,
//! so that whoever keeps a checkpoint can later tell that the log was cut
//! short or re-hashed; and the verification of a log against its chain and
//! such checkpoints. README "Audit log" documents the signed bytes:
//! `"jit-gate audit checkpoint v1" ‖ u64 sequence ‖ head hash (32 bytes) ‖
//! i64 at_ms`, big-endian.

use std::{
    io::Write as _,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier as _, VerifyingKey};

use crate::audit::{AuditRecord, Broken, Verifier};

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

/// The outcome of verifying a log.
#[derive(Clone, Debug, Default)]
pub struct Verification {
    pub records: u64,
    pub pruned: u64,
    /// Head verified: sequence and hash.
    pub head: (u64, String),
    pub checkpoints_checked: u64,
    pub broken: Option<Broken>,
}

/// Verifies the log read page by page through `page(after)`, and that each
/// of `checkpoints` is signed by `key` and matches the log (a checkpoint
/// beyond the end means records were cut off; one whose hash differs means
/// the chain was re-hashed).
pub fn verify_log<E>(
    mut page: impl FnMut(u64) -> Result<Vec<AuditRecord>, E>,
    checkpoints: &[Checkpoint],
    public: &VerifyingKey,
) -> Result<Verification, E> {
    let mut verifier = Verifier::default();
    let mut out = Verification::default();
    for checkpoint in checkpoints {
        if !checkpoint.signed_by(public) {
            out.broken = Some(Broken {
                sequence: checkpoint.sequence,
                problem: "a checkpoint for it is not signed by this agent's key".into(),
            });
            return Ok(finish(out, &verifier));
        }
    }
    let mut after = 0;
    loop {
        let records = page(after)?;
        let Some(last) = records.last().map(|r| r.sequence) else {
            break;
        };
        for record in &records {
            if let Err(broken) = verifier.check(record) {
                out.broken = Some(broken);
                return Ok(finish(out, &verifier));
            }
            for checkpoint in checkpoints.iter().filter(|c| c.sequence == record.sequence) {
                out.checkpoints_checked += 1;
                if checkpoint.hash != record.hash {
                    out.broken = Some(Broken {
                        sequence: record.sequence,
                        problem: format!(
                            "a signed checkpoint says its hash is {}, the log says {}: the chain was re-hashed",
                            checkpoint.hash, record.hash
                        ),
                    });
                    return Ok(finish(out, &verifier));
                }
            }
        }
        after = last;
    }
    let end = verifier.head().0;
    if let Some(beyond) = checkpoints.iter().find(|c| c.sequence > end) {
        out.broken = Some(Broken {
            sequence: beyond.sequence,
            problem: format!(
                "the log ends at record {end}, but a signed checkpoint covers record {}: records were removed from the end",
                beyond.sequence
            ),
        });
    }
    out.checkpoints_checked += checkpoints.iter().filter(|c| c.sequence == 0).count() as u64;
    Ok(finish(out, &verifier))
}

fn finish(mut out: Verification, verifier: &Verifier) -> Verification {
    out.records = verifier.records;
    out.pruned = verifier.pruned;
    let (sequence, hash) = verifier.head();
    out.head = (sequence, hash.to_owned());
    out
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

        // A log checked against kept checkpoints: cut short, re-hashed.
        let mut log = Vec::new();
        let mut previous = crate::audit::GENESIS_HASH.to_owned();
        for sequence in 1..=3 {
            let event =
                crate::audit::Event::new(crate::audit::Kind::PolicyChanged, "uid:0", 0, "x");
            let record =
                crate::audit::seal(sequence, std::time::SystemTime::now(), event, &previous);
            previous.clone_from(&record.hash);
            log.push(record);
        }
        let public = key.verifying_key();
        let kept = key.sign(3, &log[2].hash, 0);
        let pages = |records: Vec<AuditRecord>| {
            move |after: u64| -> Result<Vec<AuditRecord>, ()> {
                Ok(records
                    .iter()
                    .filter(|r| r.sequence > after)
                    .cloned()
                    .collect())
            }
        };
        let whole = verify_log(pages(log.clone()), std::slice::from_ref(&kept), &public).unwrap();
        assert!(
            whole.broken.is_none() && whole.checkpoints_checked == 1,
            "{whole:?}"
        );
        let cut = verify_log(
            pages(log[..2].to_vec()),
            std::slice::from_ref(&kept),
            &public,
        )
        .unwrap();
        assert!(cut.broken.unwrap().problem.contains("removed from the end"));
        let mut rehashed = log.clone();
        rehashed[2] = crate::audit::seal(
            3,
            std::time::SystemTime::now(),
            crate::audit::Event::new(crate::audit::Kind::PolicyChanged, "uid:0", 0, "forged"),
            &log[1].hash,
        );
        let forged = verify_log(pages(rehashed), std::slice::from_ref(&kept), &public).unwrap();
        assert!(forged.broken.unwrap().problem.contains("re-hashed"));

        std::fs::write(&path, "not a key").unwrap();
        assert!(matches!(
            CheckpointKey::load_or_create(&path),
            Err(KeyError::Malformed { .. })
        ));
    }
}
