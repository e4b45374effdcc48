//! Kith's encrypted memory: what makes the content of conversations and memories unreadable
//! to anyone but the user.
//!
//! - [`Vault`] holds the 256-bit vault key on disk only wrapped with [age]: for the user's
//!   passphrase (scrypt) and, optionally, for X25519 recipients (the user's other devices).
//!   Changing the passphrase re-wraps the key; nothing else is re-encrypted.
//! - [`VaultKey`] is that key in memory, zeroized on drop.
//! - [`FieldCipher`] seals each content field with XChaCha20-Poly1305, a fresh random nonce
//!   per write and the field's identity ([`FieldId`]: table, column, row) as associated
//!   data, so a ciphertext copied onto another row or column fails to open.
//!
//! The design and what it does and does not protect are in `SECURITY.md`.
//!
//! ```no_run
//! use kith_memory::{FieldCipher, FieldId, Vault};
//! use kith_memory::secrecy::SecretString;
//!
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let vault = Vault::new("/home/me/.local/share/kith".as_ref());
//! let passphrase = SecretString::from("correct horse battery staple".to_owned());
//! let key = vault.unlock(&passphrase)?;
//! let cipher = FieldCipher::new(&key);
//! let id = FieldId { table: "messages", column: "content", row: 42 };
//! let sealed = cipher.seal(id, b"my daughter is called Ada")?;
//! assert_eq!(&cipher.open(id, &sealed)?[..], b"my daughter is called Ada");
//! # Ok(()) }
//! ```
//!
//! This crate never logs content, passphrases or keys.

mod export;
mod field;
mod os_keyring;
mod par;
mod recall;
mod store;
mod vault;

pub use age;
pub use age::secrecy;
pub use export::{ExportError, ExportSummary, ExportTo, ImportWith, MAX_EXPORT_BYTES, write_export};
pub use field::{FieldCipher, FieldError, FieldId};
pub use os_keyring::{Keyring, KeyringError};
pub use recall::{Hit, ItemKind, ItemRef, QuantizedVector, RecallIndex, RecallItem};
pub use store::{
    Candidate, Conversation, ConversationMeta, Listing, Memory, MemoryStore, Message, MessageBody, MessageStats, RanOn,
    StoreError,
};
pub use vault::{DEFAULT_WORK_FACTOR, Vault, VaultError, VaultKey};
