//! Per-field authenticated encryption bound to the field's place in the database.
//!
//! A sealed field is `version (1 byte) ‖ nonce (24 bytes) ‖ XChaCha20-Poly1305 ciphertext
//! and tag`. The associated data names the table, the column and the row id, so the
//! ciphertext of one row, copied onto another row or column, fails authentication. A
//! fresh random nonce per write (192 bits: no practical collision risk) means rewriting a
//! field never reuses one.

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

use crate::VaultKey;

/// Format of sealed fields written by this version.
const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Domain separation for the associated data.
const AAD_PREFIX: &[u8] = b"kith-field-v1";

/// Where a field lives: its table, column and row id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldId<'a> {
    /// Table name.
    pub table: &'a str,
    /// Column name.
    pub column: &'a str,
    /// Row id.
    pub row: i64,
}

impl FieldId<'_> {
    fn associated_data(&self) -> Vec<u8> {
        let mut aad = Vec::with_capacity(AAD_PREFIX.len() + self.table.len() + self.column.len() + 10);
        aad.extend_from_slice(AAD_PREFIX);
        aad.push(0);
        aad.extend_from_slice(self.table.as_bytes());
        aad.push(0);
        aad.extend_from_slice(self.column.as_bytes());
        aad.push(0);
        aad.extend_from_slice(&self.row.to_le_bytes());
        aad
    }
}

impl std::fmt::Display for FieldId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{} of row {}", self.table, self.column, self.row)
    }
}

/// A field that could not be opened. Names the field, never its content.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FieldError {
    /// Too short, or written by an unknown format version.
    #[error("{field} is malformed: {reason}")]
    Malformed {
        /// The field, as `table.column of row N`.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// Authentication failed: the ciphertext was altered, belongs to another field or row,
    /// or was sealed with another vault's key.
    #[error("{field} failed authentication (tampered, moved from another row, or another vault's data)")]
    Tampered {
        /// The field, as `table.column of row N`.
        field: String,
    },
}

/// Seals and opens content fields with the vault key.
pub struct FieldCipher {
    aead: XChaCha20Poly1305,
}

impl FieldCipher {
    /// A cipher for the unlocked vault's key.
    pub fn new(key: &VaultKey) -> Self {
        Self { aead: XChaCha20Poly1305::new(key.bytes().into()) }
    }

    /// Encrypts `plaintext` for the field `id`.
    pub fn seal(&self, id: FieldId<'_>, plaintext: &[u8]) -> Result<Vec<u8>, FieldError> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = id.associated_data();
        // The AEAD refuses only inputs beyond its length limit (256 GiB).
        let ciphertext = self
            .aead
            .encrypt(&nonce, Payload { msg: plaintext, aad: &aad })
            .map_err(|_| FieldError::Malformed { field: id.to_string(), reason: "too large to seal".into() })?;
        let mut sealed = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
        sealed.push(VERSION);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        Ok(sealed)
    }

    /// Decrypts the field `id`; the plaintext is zeroized when dropped.
    pub fn open(&self, id: FieldId<'_>, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, FieldError> {
        let malformed = |reason: String| FieldError::Malformed { field: id.to_string(), reason };
        let Some((&version, rest)) = sealed.split_first() else {
            return Err(malformed("empty".into()));
        };
        if version != VERSION {
            return Err(malformed(format!("unknown format version {version}")));
        }
        if rest.len() < NONCE_LEN + TAG_LEN {
            return Err(malformed(format!("{} bytes, shorter than nonce and tag", sealed.len())));
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let aad = id.associated_data();
        self.aead
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ciphertext, aad: &aad })
            .map(Zeroizing::new)
            .map_err(|_| FieldError::Tampered { field: id.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Vault;
    use age::secrecy::SecretString;

    fn cipher() -> (tempfile::TempDir, FieldCipher) {
        let dir = tempfile::tempdir().expect("tempdir");
        let key =
            Vault::new(dir.path()).with_work_factor(4).init(&SecretString::from("pass".to_owned()), &[]).expect("init");
        (dir, FieldCipher::new(&key))
    }

    const MSG: FieldId<'static> = FieldId { table: "messages", column: "content", row: 7 };

    #[test]
    fn sealed_fields_open_and_hide_their_content() {
        let (_dir, cipher) = cipher();
        let canary = b"canary-3f9a: my daughter is called Ada";
        let sealed = cipher.seal(MSG, canary).expect("seals");
        assert!(!sealed.windows(6).any(|w| w == b"canary"), "plaintext visible in the ciphertext");
        assert_eq!(&cipher.open(MSG, &sealed).expect("opens")[..], canary);
        // Same content twice: different ciphertexts (fresh nonces).
        assert_ne!(cipher.seal(MSG, canary).expect("seals"), sealed);
        assert_eq!(&cipher.open(MSG, &cipher.seal(MSG, b"").expect("seals")).expect("empty field")[..], b"");
    }

    #[test]
    fn a_flipped_byte_is_detected_and_names_the_row() {
        let (_dir, cipher) = cipher();
        let sealed = cipher.seal(MSG, b"hello").expect("seals");
        for at in 1..sealed.len() {
            let mut bad = sealed.clone();
            bad[at] ^= 0x01;
            let err = cipher.open(MSG, &bad).expect_err("tampering detected");
            assert!(err.to_string().contains("messages.content of row 7"), "{err}");
        }
    }

    #[test]
    fn a_ciphertext_moved_to_another_row_or_column_fails() {
        let (_dir, cipher) = cipher();
        let sealed = cipher.seal(MSG, b"hello").expect("seals");
        for other in [
            FieldId { row: 8, ..MSG },
            FieldId { column: "title", ..MSG },
            FieldId { table: "memories", column: "content", row: 7 },
        ] {
            assert!(matches!(cipher.open(other, &sealed), Err(FieldError::Tampered { .. })));
        }
    }

    #[test]
    fn another_vaults_key_and_malformed_fields_are_refused() {
        let (_a, one) = cipher();
        let (_b, two) = cipher();
        assert!(matches!(two.open(MSG, &one.seal(MSG, b"hello").expect("seals")), Err(FieldError::Tampered { .. })));
        assert!(matches!(one.open(MSG, &[]), Err(FieldError::Malformed { .. })));
        assert!(matches!(one.open(MSG, &[2, 0, 0]), Err(FieldError::Malformed { .. })));
        assert!(matches!(one.open(MSG, &[VERSION; 20]), Err(FieldError::Malformed { .. })));
    }
}
