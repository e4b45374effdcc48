//! The vault key and its age-wrapped copies on disk.
//!
//! Layout under the data directory:
//! - `vault/passphrase.age`: the key, age-encrypted to the passphrase (scrypt recipient;
//!   age allows no other recipient in such a file);
//! - `vault/devices.age`: the same key encrypted to the user's X25519 recipients, when any.
//!
//! Files are written to a temporary name, synced and renamed, so a crash leaves either the
//! old file or the new one.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use age::secrecy::{ExposeSecret, SecretString};
use age::x25519;
use chacha20poly1305::aead::OsRng;
use chacha20poly1305::aead::rand_core::RngCore;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Bytes in a vault key.
const KEY_LEN: usize = 32;
/// Largest wrapped-key file read (an age header with a few recipients and 32 bytes).
const MAX_KEY_FILE: u64 = 64 * 1024;

/// The key every content field is sealed with. Zeroized when dropped; never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct VaultKey([u8; KEY_LEN]);

impl VaultKey {
    fn generate() -> Self {
        let mut key = [0u8; KEY_LEN];
        OsRng.fill_bytes(&mut key);
        Self(key)
    }

    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for VaultKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VaultKey(..)")
    }
}

/// Why the vault could not be created or opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    /// `init` on a directory that already has a vault.
    #[error("a vault already exists in {0}")]
    AlreadyExists(PathBuf),
    /// No vault in the directory.
    #[error("no vault in {0}; create one with `kith vault init`")]
    NotInitialized(PathBuf),
    /// The passphrase does not open the vault.
    #[error("wrong passphrase")]
    WrongPassphrase,
    /// None of the given identities is a recipient of the vault.
    #[error("this device's key is not a recipient of the vault")]
    NotARecipient,
    /// The passphrase is empty.
    #[error("the passphrase is empty")]
    EmptyPassphrase,
    /// A wrapped-key file is not a valid age file or does not hold a vault key.
    #[error("{path} is damaged: {reason}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading or writing the vault files failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// The vault of one data directory.
#[derive(Debug, Clone)]
pub struct Vault {
    dir: PathBuf,
    /// scrypt work factor (log2 N) for new passphrase wrappings.
    work_factor: u8,
}

/// scrypt cost of the passphrase wrapping: N = 2^17, r = 8 (128 MiB, about 0.5 s on a
/// 2-core x86 machine), the floor OWASP recommends for scrypt. Fixed rather than age's
/// "about a second where it was created" so that unlocking stays well inside the 2 s a
/// user waits for their history, and a vault made on a fast machine still opens quickly
/// on a slow one.
pub const DEFAULT_WORK_FACTOR: u8 = 17;

impl Vault {
    /// The vault under `data_dir` (which need not exist yet).
    pub fn new(data_dir: &Path) -> Self {
        Self { dir: data_dir.join("vault"), work_factor: DEFAULT_WORK_FACTOR }
    }

    /// Uses scrypt work factor `log_n` for new passphrase wrappings instead of
    /// [`DEFAULT_WORK_FACTOR`] (tests use a small one to run quickly).
    pub fn with_work_factor(mut self, log_n: u8) -> Self {
        self.work_factor = log_n.clamp(1, 30);
        self
    }

    /// The `vault/` directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Marks that the user keeps the vault key in the OS keyring (see `os_keyring.rs`).
    pub(crate) fn keyring_marker(&self) -> PathBuf {
        self.dir.join("keyring")
    }

    /// A key read back from the OS keyring (checked for length only: the store's vault
    /// check tells whether it is this vault's).
    pub(crate) fn key_from_keyring(&self, secret: zeroize::Zeroizing<Vec<u8>>) -> Result<VaultKey, VaultError> {
        key_from(secret.to_vec(), &self.keyring_marker())
    }

    fn passphrase_file(&self) -> PathBuf {
        self.dir.join("passphrase.age")
    }

    fn devices_file(&self) -> PathBuf {
        self.dir.join("devices.age")
    }

    /// Whether a vault exists.
    pub fn exists(&self) -> bool {
        self.passphrase_file().exists()
    }

    /// Creates a new vault key, wrapped for `passphrase` and for `devices` (possibly none).
    pub fn init(&self, passphrase: &SecretString, devices: &[x25519::Recipient]) -> Result<VaultKey, VaultError> {
        if self.exists() {
            return Err(VaultError::AlreadyExists(self.dir.clone()));
        }
        let key = VaultKey::generate();
        fs::create_dir_all(&self.dir).map_err(|source| VaultError::Io { path: self.dir.clone(), source })?;
        self.wrap_for_devices(&key, devices)?;
        self.wrap_for_passphrase(&key, passphrase)?;
        Ok(key)
    }

    /// Unwraps the vault key with the passphrase.
    pub fn unlock(&self, passphrase: &SecretString) -> Result<VaultKey, VaultError> {
        let path = self.passphrase_file();
        let wrapped = self.read(&path)?;
        let mut identity = age::scrypt::Identity::new(passphrase.clone());
        // Files this vault wrote use at most the calibrated factor; allow a slower machine
        // to open a vault created on a faster one.
        identity.set_max_work_factor(30);
        match age::decrypt(&identity, &wrapped) {
            Ok(plain) => key_from(plain, &path),
            Err(age::DecryptError::DecryptionFailed | age::DecryptError::NoMatchingKeys) => {
                Err(VaultError::WrongPassphrase)
            }
            Err(err) => Err(VaultError::Damaged { path, reason: err.to_string() }),
        }
    }

    /// Unwraps the vault key with one of this device's X25519 identities.
    pub fn unlock_with_identity(&self, identity: &x25519::Identity) -> Result<VaultKey, VaultError> {
        let path = self.devices_file();
        if !self.exists() {
            return Err(VaultError::NotInitialized(self.dir.clone()));
        }
        if !path.exists() {
            return Err(VaultError::NotARecipient);
        }
        let wrapped = self.read(&path)?;
        match age::decrypt(identity, &wrapped) {
            Ok(plain) => key_from(plain, &path),
            Err(age::DecryptError::NoMatchingKeys) => Err(VaultError::NotARecipient),
            Err(err) => Err(VaultError::Damaged { path, reason: err.to_string() }),
        }
    }

    /// Re-wraps the vault key for a new passphrase; no content is re-encrypted.
    pub fn change_passphrase(&self, old: &SecretString, new: &SecretString) -> Result<(), VaultError> {
        let key = self.unlock(old)?;
        self.wrap_for_passphrase(&key, new)
    }

    fn wrap_for_passphrase(&self, key: &VaultKey, passphrase: &SecretString) -> Result<(), VaultError> {
        if passphrase.expose_secret().is_empty() {
            return Err(VaultError::EmptyPassphrase);
        }
        let mut recipient = age::scrypt::Recipient::new(passphrase.clone());
        recipient.set_work_factor(self.work_factor);
        let wrapped = age::encrypt(&recipient, key.bytes())
            .map_err(|err| VaultError::Damaged { path: self.passphrase_file(), reason: err.to_string() })?;
        self.write(&self.passphrase_file(), &wrapped)
    }

    fn wrap_for_devices(&self, key: &VaultKey, devices: &[x25519::Recipient]) -> Result<(), VaultError> {
        let path = self.devices_file();
        if devices.is_empty() {
            return Ok(());
        }
        let recipients = devices.iter().map(|r| r as &dyn age::Recipient);
        let encryptor = age::Encryptor::with_recipients(recipients)
            .map_err(|err| VaultError::Damaged { path: path.clone(), reason: err.to_string() })?;
        let mut wrapped = Vec::new();
        let mut writer =
            encryptor.wrap_output(&mut wrapped).map_err(|source| VaultError::Io { path: path.clone(), source })?;
        writer
            .write_all(key.bytes())
            .and_then(|()| writer.finish().map(drop))
            .map_err(|source| VaultError::Io { path: path.clone(), source })?;
        self.write(&path, &wrapped)
    }

    fn read(&self, path: &Path) -> Result<Vec<u8>, VaultError> {
        let meta = fs::metadata(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => VaultError::NotInitialized(self.dir.clone()),
            _ => VaultError::Io { path: path.to_owned(), source },
        })?;
        if meta.len() > MAX_KEY_FILE {
            return Err(VaultError::Damaged { path: path.to_owned(), reason: format!("{} bytes", meta.len()) });
        }
        fs::read(path).map_err(|source| VaultError::Io { path: path.to_owned(), source })
    }

    /// Writes `bytes` to `path` through a synced temporary file and a rename.
    fn write(&self, path: &Path, bytes: &[u8]) -> Result<(), VaultError> {
        let io = |source| VaultError::Io { path: path.to_owned(), source };
        let partial = path.with_extension("age.partial");
        let mut file = fs::File::create(&partial).map_err(io)?;
        file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io)?;
        fs::rename(&partial, path).map_err(io)?;
        fs::File::open(&self.dir).and_then(|dir| dir.sync_all()).map_err(io)
    }
}

fn key_from(mut plain: Vec<u8>, path: &Path) -> Result<VaultKey, VaultError> {
    let result = <[u8; KEY_LEN]>::try_from(plain.as_slice()).map(VaultKey).map_err(|_| VaultError::Damaged {
        path: path.to_owned(),
        reason: format!("holds {} bytes, not a key", plain.len()),
    });
    plain.zeroize();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> SecretString {
        SecretString::from(s.to_owned())
    }

    fn vault(dir: &tempfile::TempDir) -> Vault {
        Vault::new(dir.path()).with_work_factor(4)
    }

    #[test]
    fn init_then_unlock_gives_the_same_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = vault(&dir);
        assert!(!v.exists());
        let key = v.init(&secret("hunter2 but longer"), &[]).expect("init");
        assert!(v.exists());
        assert_eq!(v.unlock(&secret("hunter2 but longer")).expect("unlock").bytes(), key.bytes());
        assert!(matches!(v.init(&secret("again"), &[]), Err(VaultError::AlreadyExists(_))));
        assert_eq!(format!("{key:?}"), "VaultKey(..)");
    }

    #[test]
    fn wrong_passphrase_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = vault(&dir);
        v.init(&secret("right"), &[]).expect("init");
        let before = fs::read(v.passphrase_file()).expect("read");
        assert!(matches!(v.unlock(&secret("wrong")), Err(VaultError::WrongPassphrase)));
        assert!(matches!(v.change_passphrase(&secret("wrong"), &secret("new")), Err(VaultError::WrongPassphrase)));
        assert_eq!(fs::read(v.passphrase_file()).expect("read"), before);
    }

    #[test]
    fn changing_the_passphrase_keeps_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = vault(&dir);
        let key = v.init(&secret("old"), &[]).expect("init");
        v.change_passphrase(&secret("old"), &secret("new")).expect("passwd");
        assert!(matches!(v.unlock(&secret("old")), Err(VaultError::WrongPassphrase)));
        assert_eq!(v.unlock(&secret("new")).expect("unlock").bytes(), key.bytes());
        assert!(matches!(v.change_passphrase(&secret("new"), &secret("")), Err(VaultError::EmptyPassphrase)));
    }

    #[test]
    fn devices_unlock_with_their_identity_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = vault(&dir);
        let laptop = x25519::Identity::generate();
        let stranger = x25519::Identity::generate();
        let key = v.init(&secret("pass"), &[laptop.to_public()]).expect("init");
        assert_eq!(v.unlock_with_identity(&laptop).expect("unlock").bytes(), key.bytes());
        assert!(matches!(v.unlock_with_identity(&stranger), Err(VaultError::NotARecipient)));
    }

    #[test]
    fn damaged_or_missing_key_files_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = vault(&dir);
        assert!(matches!(v.unlock(&secret("pass")), Err(VaultError::NotInitialized(_))));
        v.init(&secret("pass"), &[]).expect("init");
        let path = v.passphrase_file();
        let bytes = fs::read(&path).expect("read");
        fs::write(&path, &bytes[..bytes.len() / 2]).expect("truncate");
        assert!(matches!(v.unlock(&secret("pass")), Err(VaultError::Damaged { .. } | VaultError::WrongPassphrase)));
        fs::write(&path, b"not an age file").expect("garbage");
        assert!(matches!(v.unlock(&secret("pass")), Err(VaultError::Damaged { .. })));
        // An age file that holds something other than a key.
        let mut recipient = age::scrypt::Recipient::new(secret("pass"));
        recipient.set_work_factor(4);
        fs::write(&path, age::encrypt(&recipient, b"short").expect("encrypt")).expect("write");
        assert!(matches!(v.unlock(&secret("pass")), Err(VaultError::Damaged { .. })));
    }
}
