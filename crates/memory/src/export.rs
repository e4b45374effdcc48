//! Export and import: the whole memory as one age file (the standard format, so the `age`
//! command-line tool can decrypt it), encrypted to a passphrase or to an X25519 recipient.
//!
//! Inside is a JSON document (`"format": "kith-memory-export", "version": 1`). An import
//! decrypts and parses the whole file before writing anything, then inserts every row in
//! one transaction: a bad file leaves the store as it was.

use std::io::{Read, Write};

use age::secrecy::SecretString;
use age::x25519;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::store::{ConversationMeta, MemoryStore, MessageBody, MessageStats, StoreError};

/// The format tag and version written into exports.
const FORMAT: &str = "kith-memory-export";
const VERSION: u32 = 1;
/// Largest export read back (bounds memory before decrypting).
pub const MAX_EXPORT_BYTES: u64 = 1 << 32;

/// Who can open an export.
pub enum ExportTo<'a> {
    /// Anyone with this passphrase (age scrypt recipient).
    Passphrase(&'a SecretString),
    /// The holder of this X25519 identity.
    Recipient(&'a x25519::Recipient),
}

/// What opens an export.
pub enum ImportWith<'a> {
    /// The passphrase it was exported to.
    Passphrase(&'a SecretString),
    /// The X25519 identity it was exported to.
    Identity(&'a x25519::Identity),
}

/// Why an export could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The file is not an age file, is truncated or damaged, or does not open with what was given.
    #[error("the export does not decrypt: {0}")]
    Decrypt(String),
    /// It decrypts but is not a Kith memory export this version can read.
    #[error("not a Kith memory export: {0}")]
    Format(String),
    /// Larger than [`MAX_EXPORT_BYTES`].
    #[error("the export is {0} bytes, more than Kith reads")]
    TooLarge(u64),
    /// Encrypting failed.
    #[error("encrypting the export: {0}")]
    Encrypt(String),
    /// Reading from or writing to the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Rows in an export.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportSummary {
    /// Conversations.
    pub conversations: usize,
    /// Messages.
    pub messages: usize,
    /// Memories.
    pub memories: usize,
    /// Settings.
    pub settings: usize,
}

#[derive(Serialize, Deserialize)]
struct Document {
    format: String,
    version: u32,
    conversations: Vec<ConversationRecord>,
    memories: Vec<MemoryRecord>,
    settings: Vec<SettingRecord>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct ConversationRecord {
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
    pub(crate) meta: ConversationMeta,
    pub(crate) messages: Vec<MessageRecord>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct MessageRecord {
    pub(crate) created_at: i64,
    pub(crate) prompt_tokens: i64,
    pub(crate) output_tokens: i64,
    pub(crate) duration_ms: i64,
    pub(crate) body: MessageBody,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) embedding: Option<Vec<f32>>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct MemoryRecord {
    pub(crate) created_at: i64,
    pub(crate) pinned: bool,
    pub(crate) text: String,
    pub(crate) embedding: Option<Vec<f32>>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct SettingRecord {
    pub(crate) key: String,
    pub(crate) value: Vec<u8>,
}

impl MessageRecord {
    pub(crate) fn stats(&self) -> MessageStats {
        MessageStats {
            prompt_tokens: self.prompt_tokens,
            output_tokens: self.output_tokens,
            duration_ms: self.duration_ms,
        }
    }
}

impl MemoryStore {
    /// The whole memory as an age-encrypted export. Damaged rows make it fail (an export
    /// must not silently drop data).
    pub async fn export(&self, to: ExportTo<'_>) -> Result<(Vec<u8>, ExportSummary), ExportError> {
        let (conversations, memories, settings) = self.export_records().await?;
        let summary = ExportSummary {
            conversations: conversations.len(),
            messages: conversations.iter().map(|c| c.messages.len()).sum(),
            memories: memories.len(),
            settings: settings.len(),
        };
        let document = Document { format: FORMAT.into(), version: VERSION, conversations, memories, settings };
        let json = Zeroizing::new(serde_json::to_vec(&document).map_err(|e| ExportError::Encrypt(e.to_string()))?);
        let encrypted = match to {
            ExportTo::Passphrase(passphrase) => age::encrypt(&age::scrypt::Recipient::new(passphrase.clone()), &json),
            ExportTo::Recipient(recipient) => age::encrypt(recipient, &json),
        }
        .map_err(|e| ExportError::Encrypt(e.to_string()))?;
        Ok((encrypted, summary))
    }

    /// Restores an export: everything or, on any error, nothing.
    pub async fn import(&self, export: impl Read, with: ImportWith<'_>) -> Result<ExportSummary, ExportError> {
        let mut bytes = Vec::new();
        export.take(MAX_EXPORT_BYTES + 1).read_to_end(&mut bytes).map_err(|e| ExportError::Decrypt(e.to_string()))?;
        if bytes.len() as u64 > MAX_EXPORT_BYTES {
            return Err(ExportError::TooLarge(bytes.len() as u64));
        }
        let json = Zeroizing::new(
            match with {
                ImportWith::Passphrase(passphrase) => {
                    let mut identity = age::scrypt::Identity::new(passphrase.clone());
                    identity.set_max_work_factor(30);
                    age::decrypt(&identity, &bytes)
                }
                ImportWith::Identity(identity) => age::decrypt(identity, &bytes),
            }
            .map_err(|e| ExportError::Decrypt(e.to_string()))?,
        );
        let document: Document = serde_json::from_slice(&json).map_err(|e| ExportError::Format(e.to_string()))?;
        if document.format != FORMAT {
            return Err(ExportError::Format(format!("format {:?}", document.format)));
        }
        if document.version != VERSION {
            return Err(ExportError::Format(format!("version {} (this Kith reads {VERSION})", document.version)));
        }
        let summary = ExportSummary {
            conversations: document.conversations.len(),
            messages: document.conversations.iter().map(|c| c.messages.len()).sum(),
            memories: document.memories.len(),
            settings: document.settings.len(),
        };
        self.import_records(&document.conversations, &document.memories, &document.settings).await?;
        Ok(summary)
    }
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
pub fn write_export(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let partial = path.with_extension("partial");
    let mut file = std::fs::File::create(&partial)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&partial, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Vault;
    use crate::store::RanOn;
    use crate::{ItemKind, ItemRef};

    fn secret(s: &str) -> SecretString {
        SecretString::from(s.to_owned())
    }

    async fn filled(dir: &std::path::Path) -> MemoryStore {
        let key = Vault::new(dir).with_work_factor(4).init(&secret("pass"), &[]).expect("vault");
        let store = MemoryStore::open(dir, &key).await.expect("open");
        let conv =
            store.create_conversation(&ConversationMeta::new("Trip", "smollm2-135m")).await.expect("conversation");
        let user = MessageBody {
            role: "user".into(),
            content: "Plan a trip to Lyon".into(),
            ran_on: None,
            interrupted: false,
        };
        let reply = MessageBody {
            role: "assistant".into(),
            content: "Day 1: ...".into(),
            ran_on: Some(RanOn::Peer("12D3Koo".into())),
            interrupted: false,
        };
        let stats = MessageStats { prompt_tokens: 20, output_tokens: 30, duration_ms: 400 };
        let ids = store.add_messages(conv, &[(user, MessageStats::default()), (reply, stats)]).await.expect("messages");
        store.set_embedding(ItemRef { kind: ItemKind::Message, id: ids[0] }, &[0.1, -0.7]).await.expect("embedding");
        let memory = store.add_memory("my daughter is called Ada", None, true).await.expect("memory");
        store.set_embedding(ItemRef { kind: ItemKind::Memory, id: memory }, &[0.5, 0.25]).await.expect("embedding");
        store.set_setting("units", b"metric").await.expect("setting");
        store
    }

    #[tokio::test]
    async fn an_export_restores_into_a_fresh_vault_with_nothing_lost() {
        let a = tempfile::tempdir().expect("tempdir");
        let source = filled(a.path()).await;
        let (bytes, summary) = source.export(ExportTo::Passphrase(&secret("export pass"))).await.expect("export");
        assert_eq!(summary, ExportSummary { conversations: 1, messages: 2, memories: 1, settings: 1 });
        assert!(!bytes.windows(4).any(|w| w == b"Lyon"), "exports are encrypted");

        let b = tempfile::tempdir().expect("tempdir");
        let key = Vault::new(b.path()).with_work_factor(4).init(&secret("other"), &[]).expect("vault");
        let target = MemoryStore::open(b.path(), &key).await.expect("open");
        let imported = target.import(&bytes[..], ImportWith::Passphrase(&secret("export pass"))).await.expect("import");
        assert_eq!(imported, summary);
        let (again, _) = target.export(ExportTo::Passphrase(&secret("x"))).await.expect("re-export");
        let original = source.export_records().await.expect("records");
        let restored = target.export_records().await.expect("records");
        assert_eq!(serde_json::to_string(&original).expect("json"), serde_json::to_string(&restored).expect("json"));
        assert!(!again.is_empty());
    }

    #[tokio::test]
    async fn hostile_exports_are_refused_and_nothing_is_half_imported() {
        let a = tempfile::tempdir().expect("tempdir");
        let source = filled(a.path()).await;
        let (good, _) = source.export(ExportTo::Passphrase(&secret("p"))).await.expect("export");
        let b = tempfile::tempdir().expect("tempdir");
        let key = Vault::new(b.path()).with_work_factor(4).init(&secret("other"), &[]).expect("vault");
        let target = MemoryStore::open(b.path(), &key).await.expect("open");
        let recipient = x25519::Identity::generate();
        let not_json = age::encrypt(&recipient.to_public(), b"{\"format\": \"something else\"").expect("encrypt");
        let wrong_format = age::encrypt(
            &recipient.to_public(),
            br#"{"format":"other","version":1,"conversations":[],"memories":[],"settings":[]}"#,
        )
        .expect("encrypt");
        let (p, q) = (secret("p"), secret("q"));
        let cases: Vec<(&str, Vec<u8>, ImportWith<'_>)> = vec![
            ("truncated", good[..good.len() / 2].to_vec(), ImportWith::Passphrase(&p)),
            ("wrong passphrase", good.clone(), ImportWith::Passphrase(&q)),
            ("wrong recipient", good.clone(), ImportWith::Identity(&recipient)),
            ("garbage", b"definitely not age".to_vec(), ImportWith::Passphrase(&p)),
            ("empty", Vec::new(), ImportWith::Passphrase(&p)),
            ("not json", not_json, ImportWith::Identity(&recipient)),
            ("other format", wrong_format, ImportWith::Identity(&recipient)),
        ];
        for (name, bytes, with) in cases {
            let err = target.import(&bytes[..], with).await.expect_err(name);
            assert!(matches!(err, ExportError::Decrypt(_) | ExportError::Format(_)), "{name}: {err}");
            assert!(target.conversations().await.expect("list").items.is_empty(), "{name}: half-imported");
            assert!(target.memories().await.expect("list").items.is_empty(), "{name}: half-imported");
        }
    }
}
