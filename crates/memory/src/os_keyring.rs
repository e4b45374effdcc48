//! Opt-in unlock from the operating system's keyring (Secret Service on Linux desktops,
//! Keychain on macOS, Credential Manager on Windows) through the `keyring` crates.
//!
//! When the user opts in, the 32-byte vault key itself is stored as a keyring secret
//! (service `kith-vault`, account = the vault directory), so the vault opens without the
//! passphrase for as long as the OS session is unlocked. A marker file `vault/keyring`
//! (no secret in it) records the choice, so Kith never contacts a keyring service the
//! user did not opt in to. Turning it off deletes the secret and the marker.
//!
//! Where no keyring service exists (a server, a container, no desktop session) the
//! platform store cannot be built: [`Keyring::platform`] says so and the passphrase
//! remains the way in.

use std::path::PathBuf;
use std::sync::Arc;

use keyring_core::{CredentialStore, Entry};
use zeroize::Zeroizing;

use crate::vault::{Vault, VaultError, VaultKey};

const SERVICE: &str = "kith-vault";

/// Why the keyring could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyringError {
    /// No keyring service on this machine or in this session.
    #[error(
        "no OS keyring is available here ({0}); on Linux this needs a Secret Service (GNOME Keyring, KWallet) in a desktop session. Keep using the passphrase"
    )]
    Unavailable(String),
    /// The keyring service refused or failed.
    #[error("the OS keyring failed: {0}")]
    Failed(String),
    /// What the keyring holds is not this vault's key.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// Writing or removing the opt-in marker failed.
    #[error("{path}: {source}")]
    Io {
        /// The marker file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// A credential store holding vault keys.
pub struct Keyring {
    store: Arc<CredentialStore>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").field("store", &self.store.vendor()).finish()
    }
}

impl Keyring {
    /// The platform's keyring, or why there is none.
    pub fn platform() -> Result<Self, KeyringError> {
        if let Err(err) = keyring::Entry::store_status() {
            return Err(KeyringError::Unavailable(err.to_string()));
        }
        keyring_core::get_default_store()
            .map(|store| Self { store })
            .ok_or_else(|| KeyringError::Unavailable("no credential store".into()))
    }

    /// A given credential store (tests use keyring-core's in-memory mock).
    pub fn with_store(store: Arc<CredentialStore>) -> Self {
        Self { store }
    }

    /// Whether the user opted in for this vault (the marker exists). Touches no keyring.
    pub fn enabled(vault: &Vault) -> bool {
        vault.keyring_marker().exists()
    }

    fn entry(&self, vault: &Vault) -> Result<Entry, KeyringError> {
        let account = vault.dir().to_string_lossy();
        Entry::new_in_store(&self.store, SERVICE, &account).map_err(|e| KeyringError::Failed(e.to_string()))
    }

    /// Stores the vault key and records the opt-in.
    pub fn remember(&self, vault: &Vault, key: &VaultKey) -> Result<(), KeyringError> {
        self.entry(vault)?.set_secret(key.bytes()).map_err(failure)?;
        let marker = vault.keyring_marker();
        std::fs::write(&marker, b"The vault key is also in the OS keyring; `kith vault keyring off` removes it.\n")
            .map_err(|source| KeyringError::Io { path: marker, source })
    }

    /// The stored vault key, or `None` when the keyring has none for this vault.
    pub fn recall(&self, vault: &Vault) -> Result<Option<VaultKey>, KeyringError> {
        match self.entry(vault)?.get_secret() {
            Ok(secret) => Ok(Some(vault.key_from_keyring(Zeroizing::new(secret))?)),
            Err(keyring_core::Error::NoEntry) => Ok(None),
            Err(err) => Err(failure(err)),
        }
    }

    /// Removes the opt-in marker only (when the keyring itself cannot be reached).
    pub fn disable(vault: &Vault) -> Result<(), KeyringError> {
        let marker = vault.keyring_marker();
        match std::fs::remove_file(&marker) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(KeyringError::Io { path: marker, source }),
        }
    }

    /// Deletes the stored key and the opt-in marker; whether a key was stored.
    pub fn forget(&self, vault: &Vault) -> Result<bool, KeyringError> {
        let had = match self.entry(vault)?.delete_credential() {
            Ok(()) => true,
            Err(keyring_core::Error::NoEntry) => false,
            Err(err) => return Err(failure(err)),
        };
        Self::disable(vault)?;
        Ok(had)
    }
}

fn failure(err: keyring_core::Error) -> KeyringError {
    match err {
        keyring_core::Error::NoStorageAccess(_) | keyring_core::Error::NoDefaultStore => {
            KeyringError::Unavailable(err.to_string())
        }
        other => KeyringError::Failed(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use age::secrecy::SecretString;

    #[test]
    fn a_remembered_key_unlocks_and_forgetting_removes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vault = Vault::new(dir.path()).with_work_factor(4);
        let key = vault.init(&SecretString::from("pass".to_owned()), &[]).expect("init");
        let keyring = Keyring::with_store(keyring_core::mock::Store::new().expect("mock store"));

        assert!(!Keyring::enabled(&vault));
        assert!(keyring.recall(&vault).expect("recall").is_none());
        keyring.remember(&vault, &key).expect("remember");
        assert!(Keyring::enabled(&vault));
        let marker = std::fs::read(vault.keyring_marker()).expect("marker");
        assert!(!marker.windows(4).any(|w| key.bytes().windows(4).any(|k| k == w)), "no key bytes in the marker");
        let recalled = keyring.recall(&vault).expect("recall").expect("a key");
        assert_eq!(recalled.bytes(), key.bytes());

        assert!(keyring.forget(&vault).expect("forget"));
        assert!(!Keyring::enabled(&vault));
        assert!(keyring.recall(&vault).expect("recall").is_none());
        assert!(!keyring.forget(&vault).expect("forget again"));
    }

    #[test]
    fn keyring_failures_and_bad_secrets_are_clear_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vault = Vault::new(dir.path()).with_work_factor(4);
        vault.init(&SecretString::from("pass".to_owned()), &[]).expect("init");
        let store = keyring_core::mock::Store::new().expect("mock store");
        let keyring = Keyring::with_store(store.clone());

        // Something that is not a key under our account.
        let account = vault.dir().to_string_lossy().into_owned();
        let entry = Entry::new_in_store(&(store.clone() as Arc<CredentialStore>), SERVICE, &account).expect("entry");
        entry.set_secret(b"short").expect("set");
        let err = keyring.recall(&vault).expect_err("not a key");
        assert!(matches!(err, KeyringError::Vault(VaultError::Damaged { .. })), "{err}");

        // The service refuses access (a locked keyring, a denied prompt).
        let mock: &keyring_core::mock::Cred = entry.as_any().downcast_ref().expect("mock credential");
        mock.set_error(keyring_core::Error::NoStorageAccess("locked".into()));
        let err = keyring.recall(&vault).expect_err("no access");
        assert!(matches!(err, KeyringError::Unavailable(_)), "{err}");
        assert!(err.to_string().contains("passphrase"), "{err}");
    }
}
