//! The API's bearer token: random, created on first run, kept in the data directory with
//! owner-only permissions.

use std::io::Write;
use std::path::{Path, PathBuf};

/// File name of the token under the data directory.
const FILE: &str = "api-token";
const PREFIX: &str = "kith_";

/// The bearer token every API request must carry.
#[derive(Clone)]
pub struct ApiToken(String);

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(..)")
    }
}

impl ApiToken {
    /// Reads `<data_dir>/api-token`, creating it (0600) with a fresh random token if absent.
    pub fn load_or_create(data_dir: &Path) -> std::io::Result<Self> {
        let path = Self::path(data_dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let token = text.trim();
                if token.starts_with(PREFIX) && token.len() == PREFIX.len() + 64 {
                    return Ok(Self(token.to_owned()));
                }
                tracing::warn!(path = %path.display(), "the API token file is malformed; writing a new token");
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
        let token = format!("{PREFIX}{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>());
        std::fs::create_dir_all(data_dir)?;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&path)?;
        file.write_all(token.as_bytes())?;
        file.sync_all()?;
        Ok(Self(token))
    }

    /// Where the token of a data directory lives.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(FILE)
    }

    /// The token text (for `kith token` and for clients).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `candidate` is this token, in time independent of where they differ.
    pub fn matches(&self, candidate: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), candidate.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_private_and_compared_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = ApiToken::load_or_create(dir.path()).expect("create");
        assert!(token.as_str().starts_with("kith_") && token.as_str().len() == 69);
        let again = ApiToken::load_or_create(dir.path()).expect("load");
        assert_eq!(token.as_str(), again.as_str());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(ApiToken::path(dir.path())).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(token.matches(token.as_str()));
        assert!(!token.matches(&token.as_str()[..68]));
        let last = if token.as_str().ends_with('0') { '1' } else { '0' };
        assert!(!token.matches(&format!("{}{last}", &token.as_str()[..68])));
        assert!(!format!("{token:?}").contains(token.as_str()));
        std::fs::write(ApiToken::path(dir.path()), "garbage").expect("write");
        let fresh = ApiToken::load_or_create(dir.path()).expect("replace");
        assert_ne!(fresh.as_str(), token.as_str());
    }
}
