//! An agent's identity: an Ed25519 key pair kept on disk; its node id is the hex public key. Links prove it
//! with TLS (`crate::tls`).
use std::io::Write;
use std::path::Path;

use ed25519_dalek::SigningKey;

pub struct Identity {
    key: SigningKey,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("identity file {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("identity file {path} holds {len} bytes, not a 32-byte Ed25519 secret key")]
    BadKey { path: String, len: usize },
}

impl Identity {
    /// A fresh key (tests, and the first start of an agent).
    pub fn generate() -> Self {
        Self { key: SigningKey::from_bytes(&rand::random()) }
    }

    /// The key whose 32-byte Ed25519 secret (seed) is `secret`.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self { key: SigningKey::from_bytes(&secret) }
    }

    /// The key at `path`, created (mode 0600, written atomically) when the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, IdentityError> {
        let io = |error| IdentityError::Io { path: path.display().to_string(), error };
        match std::fs::read(path) {
            Ok(bytes) => {
                let secret: [u8; 32] = bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| IdentityError::BadKey { path: path.display().to_string(), len: bytes.len() })?;
                Ok(Self { key: SigningKey::from_bytes(&secret) })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Self::generate();
                let tmp = path.with_extension("tmp");
                let mut file = open_private(&tmp).map_err(io)?;
                file.write_all(id.key.as_bytes()).and_then(|_| file.sync_all()).map_err(io)?;
                std::fs::rename(&tmp, path).map_err(io)?;
                Ok(id)
            }
            Err(e) => Err(io(e)),
        }
    }

    pub fn node_id(&self) -> String {
        hex::encode(self.key.verifying_key().as_bytes())
    }

    /// The key itself, for the link's TLS certificate (`crate::tls`).
    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.key
    }
}

fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)
}

/// Whether `id` is a node id as written: 64 lowercase hex digits (one key, one spelling).
pub fn is_node_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id");
        let first = Identity::load_or_create(&path).unwrap();
        let again = Identity::load_or_create(&path).unwrap();
        assert_eq!(first.node_id(), again.node_id());
        assert_eq!(first.node_id().len(), 64);
        assert!(is_node_id(&first.node_id()));
        assert!(!is_node_id("zz"));
        assert!(!is_node_id(&first.node_id().to_uppercase()), "one key, one spelling");
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(Identity::load_or_create(&path), Err(IdentityError::BadKey { len: 5, .. })));
    }
}
