//! `<data_dir>/credentials.json`: the agent's identity, written once by `--register`.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil;

/// A string never to reach a log line or an error: `Debug` prints a placeholder, no `Display`; see [`Secret::expose`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The secret itself, for the one place that must send or store it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The stored identity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Credentials {
    pub uuid: String,
    pub key: Secret,
    pub name: String,
}

/// Why credentials could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(
        "the agent is not registered ({} does not exist): run `wazuh-agent --register --url URL --user USER` first",
        .path.display()
    )]
    NotRegistered { path: PathBuf },
    #[error("cannot read {}: {source}", .path.display())]
    Read { path: PathBuf, source: io::Error },
    /// The file is not the JSON object `{"uuid", "key", "name"}`.
    #[error("{} is damaged ({message}); register again with `wazuh-agent --register --force`", .path.display())]
    Corrupt { path: PathBuf, message: String },
    #[error("cannot write {}: {source}", .path.display())]
    Write { path: PathBuf, source: io::Error },
}

impl Credentials {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("credentials.json")
    }

    pub fn load(data_dir: &Path) -> Result<Credentials, CredentialsError> {
        let path = Credentials::path(data_dir);
        let text = match fsutil::read_nofollow(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(CredentialsError::NotRegistered { path }),
            Err(source) => return Err(CredentialsError::Read { path, source }),
        };
        let corrupt = |message| CredentialsError::Corrupt { path: path.clone(), message };
        // serde_json's message may quote the offending value: keep only its position.
        let creds: Credentials = serde_json::from_slice(&text)
            .map_err(|e| corrupt(format!("invalid JSON at line {} column {}", e.line(), e.column())))?;
        if creds.uuid.is_empty() || creds.key.expose().is_empty() {
            return Err(corrupt("uuid or key is empty".into()));
        }
        Ok(creds)
    }

    /// Writes the file atomically, mode 0600, in a data_dir set to 0700.
    pub fn store(&self, data_dir: &Path) -> Result<(), CredentialsError> {
        let path = Credentials::path(data_dir);
        let write = |path: PathBuf| move |source| CredentialsError::Write { path, source };
        fsutil::ensure_private_dir(data_dir).map_err(write(data_dir.to_path_buf()))?;
        let mut json = serde_json::to_vec_pretty(self).map_err(io::Error::other).map_err(write(path.clone()))?;
        json.push(b'\n');
        fsutil::write_atomic(&path, &json, 0o600).map_err(write(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints() {
        let c = Credentials { uuid: "u".into(), key: Secret::new("k3y-value".into()), name: "n".into() };
        assert!(!format!("{c:?}").contains("k3y-value"));
        // No `Display`: `format!("{}", c.key)` does not compile.
    }

    #[test]
    fn round_trip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        assert!(matches!(Credentials::load(&data), Err(CredentialsError::NotRegistered { .. })));
        let c = Credentials { uuid: "u1".into(), key: Secret::new("k".repeat(32)), name: "n".into() };
        c.store(&data).unwrap();
        assert_eq!(Credentials::load(&data).unwrap(), c);
        std::fs::write(Credentials::path(&data), "{\"uuid\": \"u\", \"key\": \"SECRETKEY\"").unwrap();
        let e = Credentials::load(&data).unwrap_err().to_string();
        assert!(e.contains("damaged") && !e.contains("SECRETKEY"), "{e}");
    }
}
