//! The SQLite store: conversations, messages, memories and settings, every content field
//! sealed with the vault key (see `field.rs`), in one database file under the data dir.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, Sqlite, Transaction};
use zeroize::Zeroizing;

use crate::export::{ConversationRecord, MemoryRecord, MessageRecord, SettingRecord};
use crate::field::{FieldCipher, FieldError, FieldId};
use crate::recall::{ItemKind, ItemRef, QuantizedVector, RecallItem};
use crate::vault::VaultKey;
use kith_types::Privacy;

/// Schema migrations, embedded in the binary, applied in order; `PRAGMA user_version`
/// records how many have run.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_initial.sql"),
    include_str!("../migrations/0002_message_embeddings.sql"),
    include_str!("../migrations/0003_memory_candidates.sql"),
];

/// The setting that proves the database belongs to the unlocked vault.
const VAULT_CHECK: &str = "kith.vault-check";
const VAULT_CHECK_VALUE: &[u8] = b"kith memory v1";

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite failed.
    #[error("database {path}: {source}")]
    Database {
        /// The database file.
        path: PathBuf,
        /// The underlying error.
        source: sqlx::Error,
    },
    /// The database was written with another vault's key.
    #[error("{0} belongs to another vault (its data does not open with this key)")]
    OtherVault(PathBuf),
    /// The database is newer than this Kith.
    #[error("{path} has schema version {found}; this Kith knows up to {known}")]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Its schema version.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
    /// A sealed field did not open.
    #[error(transparent)]
    Field(#[from] FieldError),
    /// No such row.
    #[error("no {table} row {id}")]
    NotFound {
        /// The table.
        table: &'static str,
        /// The id asked for.
        id: i64,
    },
    /// A field opened but its content is not what this version wrote.
    #[error("{field}: unreadable content ({reason})")]
    Corrupt {
        /// The field.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

/// Where a reply was computed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RanOn {
    /// On this machine.
    Local,
    /// On a trusted peer (its name).
    Peer(String),
    /// In parts, in this order (`local` or a peer's name), after a peer failed mid-answer.
    Parts(Vec<String>),
}

impl RanOn {
    /// From where the parts of an answer ran, in order.
    pub fn from_parts(mut parts: Vec<String>) -> Self {
        match parts.len() {
            0 => RanOn::Local,
            1 if parts[0] == "local" => RanOn::Local,
            1 => RanOn::Peer(parts.remove(0)),
            _ => RanOn::Parts(parts),
        }
    }
}

impl std::fmt::Display for RanOn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RanOn::Local => f.write_str("local"),
            RanOn::Peer(name) => f.write_str(name),
            RanOn::Parts(parts) => f.write_str(&parts.join(", then ")),
        }
    }
}

/// A conversation's sealed metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationMeta {
    /// Title shown in lists.
    pub title: String,
    /// Model name.
    pub model: String,
    /// Where its turns may run (conversations saved before this field: the default).
    #[serde(default)]
    pub privacy: Privacy,
}

impl ConversationMeta {
    /// A title and model, with the default privacy mode.
    pub fn new(title: impl Into<String>, model: impl Into<String>) -> Self {
        Self { title: title.into(), model: model.into(), privacy: Privacy::default() }
    }
}

/// A stored conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// Row id.
    pub id: i64,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds of the last message.
    pub updated_at: i64,
    /// Title and model.
    pub meta: ConversationMeta,
}

/// A message to store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageBody {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
    /// Where a reply ran (None for the user's own messages).
    pub ran_on: Option<RanOn>,
    /// The reply was cut short (the node shut down or the client went away).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
}

/// Counts and timing of a message (stored in plaintext: sizes, not content).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessageStats {
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Generated tokens.
    pub output_tokens: i64,
    /// Generation time.
    pub duration_ms: i64,
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Row id.
    pub id: i64,
    /// Its conversation.
    pub conversation_id: i64,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Counts and timing.
    pub stats: MessageStats,
    /// Role, text, where it ran.
    pub body: MessageBody,
}

/// A long-term memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Memory {
    /// Row id.
    pub id: i64,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Kept regardless of age or relevance.
    pub pinned: bool,
    /// The message it came from, if any.
    pub source_message_id: Option<i64>,
    /// The remembered text.
    pub text: String,
    /// Its sentence embedding, once computed.
    pub embedding: Option<Vec<f32>>,
}

/// A memory the node suggested, waiting for the user to keep, edit or discard it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Row id (of the candidates table, not a memory id).
    pub id: i64,
    /// Unix milliseconds.
    pub created_at: i64,
    /// The message it was found in.
    pub source_message_id: Option<i64>,
    /// The suggested text.
    pub text: String,
}

/// Rows read from a table: the ones that opened, and an error naming each one that did not.
#[derive(Debug)]
pub struct Listing<T> {
    /// Rows that opened and verified.
    pub items: Vec<T>,
    /// One error per damaged row, naming it.
    pub damaged: Vec<StoreError>,
}

impl<T> Listing<T> {
    /// Decodes each row: the ones that open go to `items`, the others' errors to `damaged`.
    /// Large reads decode on every core (decryption and JSON dominate a full read).
    fn from_rows<R: Sync>(rows: Vec<R>, decode: impl Fn(&R) -> Result<T, StoreError> + Sync) -> Self
    where
        T: Send,
    {
        Self::from_rows_partial(rows, |row| decode(row).map(|item| (item, None)))
    }

    /// As [`from_rows`](Self::from_rows), for rows that can be partly damaged: the
    /// decoder returns the item with what it could not read (e.g. an embedding, which is
    /// derived data and gets recomputed) as a second error.
    fn from_rows_partial<R: Sync>(
        rows: Vec<R>,
        decode: impl Fn(&R) -> Result<(T, Option<StoreError>), StoreError> + Sync,
    ) -> Self
    where
        T: Send,
    {
        let mut listing = Listing { items: Vec::with_capacity(rows.len()), damaged: Vec::new() };
        for result in crate::par::map(&rows, decode) {
            match result {
                Ok((item, partial)) => {
                    listing.items.push(item);
                    listing.damaged.extend(partial);
                }
                Err(err) => listing.damaged.push(err),
            }
        }
        listing
    }
}

/// The encrypted store of one vault.
pub struct MemoryStore {
    pool: SqlitePool,
    cipher: FieldCipher,
    path: PathBuf,
}

impl MemoryStore {
    /// Opens (creating and migrating if needed) `<data_dir>/memory.db` with the unlocked
    /// vault's key. A database sealed with another key is refused before anything is read.
    ///
    /// Pragmas: WAL so readers never block the writer and a crash never leaves a torn
    /// page; `synchronous=FULL` so a commit that returned is on disk even if the machine
    /// loses power (WAL with NORMAL could lose the last commits); foreign keys on, so
    /// deleting a conversation deletes its messages; `secure_delete` so deleted rows'
    /// ciphertext is overwritten rather than left in free pages.
    pub async fn open(data_dir: &Path, key: &VaultKey) -> Result<Self, StoreError> {
        let path = data_dir.join("memory.db");
        let db = |source| StoreError::Database { path: path.clone(), source };
        std::fs::create_dir_all(data_dir).map_err(|e| db(sqlx::Error::Io(e)))?;
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(db)?
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            .pragma("secure_delete", "ON")
            // Full reads (recall at unlock) stream 100,000+ rows from sqlx's worker thread;
            // with its default 50-row buffer the two threads hand over every few rows.
            .row_buffer_size(4_096);
        // One connection: writes are serialised anyway, and row ids are allocated inside
        // write transactions.
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.map_err(db)?;
        let store = Self { pool, cipher: FieldCipher::new(key), path };
        store.migrate().await?;
        store.check_vault().await?;
        Ok(store)
    }

    fn db(&self, source: sqlx::Error) -> StoreError {
        StoreError::Database { path: self.path.clone(), source }
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let version: i64 =
            sqlx::query_scalar("PRAGMA user_version").fetch_one(&self.pool).await.map_err(|e| self.db(e))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew { path: self.path.clone(), found: version, known });
        }
        for (index, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let mut tx = self.pool.begin().await.map_err(|e| self.db(e))?;
            sqlx::raw_sql(*sql).execute(&mut *tx).await.map_err(|e| self.db(e))?;
            // The version is a number this code computes, not input.
            let set_version = sqlx::AssertSqlSafe(format!("PRAGMA user_version = {}", index + 1));
            sqlx::raw_sql(set_version).execute(&mut *tx).await.map_err(|e| self.db(e))?;
            tx.commit().await.map_err(|e| self.db(e))?;
        }
        Ok(())
    }

    async fn check_vault(&self) -> Result<(), StoreError> {
        match self.setting(VAULT_CHECK).await {
            Ok(Some(value)) if value.as_slice() == VAULT_CHECK_VALUE => Ok(()),
            Ok(Some(_)) | Err(StoreError::Field(_)) => Err(StoreError::OtherVault(self.path.clone())),
            Ok(None) => self.set_setting(VAULT_CHECK, VAULT_CHECK_VALUE).await,
            Err(err) => Err(err),
        }
    }

    fn seal_json<T: Serialize>(&self, id: FieldId<'_>, value: &T) -> Result<Vec<u8>, StoreError> {
        let json = zeroize::Zeroizing::new(
            serde_json::to_vec(value)
                .map_err(|e| StoreError::Corrupt { field: id.to_string(), reason: e.to_string() })?,
        );
        Ok(self.cipher.seal(id, &json)?)
    }

    fn open_json<T: DeserializeOwned>(&self, id: FieldId<'_>, sealed: &[u8]) -> Result<T, StoreError> {
        let plain = self.cipher.open(id, sealed)?;
        serde_json::from_slice(&plain).map_err(|e| StoreError::Corrupt { field: id.to_string(), reason: e.to_string() })
    }

    /// Starts a new conversation.
    pub async fn create_conversation(&self, meta: &ConversationMeta) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.db(e))?;
        let id = next_id(&mut tx, Table::Conversations).await.map_err(|e| self.db(e))?;
        let sealed = self.seal_json(FieldId { table: "conversations", column: "meta_sealed", row: id }, meta)?;
        let now = now_ms();
        sqlx::query("INSERT INTO conversations (id, created_at, updated_at, meta_sealed) VALUES (?, ?, ?, ?)")
            .bind(id)
            .bind(now)
            .bind(now)
            .bind(sealed)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.db(e))?;
        tx.commit().await.map_err(|e| self.db(e))?;
        Ok(id)
    }

    /// Replaces a conversation's title, model or privacy mode.
    pub async fn set_conversation_meta(&self, id: i64, meta: &ConversationMeta) -> Result<(), StoreError> {
        let sealed = self.seal_json(FieldId { table: "conversations", column: "meta_sealed", row: id }, meta)?;
        let done = sqlx::query("UPDATE conversations SET meta_sealed = ? WHERE id = ?")
            .bind(sealed)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.db(e))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound { table: "conversations", id });
        }
        Ok(())
    }

    /// All conversations, newest first.
    pub async fn conversations(&self) -> Result<Listing<Conversation>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, created_at, updated_at, meta_sealed FROM conversations ORDER BY updated_at DESC, id DESC",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.db(e))?;
        Ok(Listing::from_rows(rows, |row| self.decode_conversation(row)))
    }

    /// A `SELECT id, created_at, updated_at, meta_sealed FROM conversations` row.
    fn decode_conversation(&self, row: &sqlx::sqlite::SqliteRow) -> Result<Conversation, StoreError> {
        let id: i64 = row.get(0);
        let meta = self.open_json(FieldId { table: "conversations", column: "meta_sealed", row: id }, row.get(3))?;
        Ok(Conversation { id, created_at: row.get(1), updated_at: row.get(2), meta })
    }

    /// One conversation, if it exists.
    pub async fn conversation(&self, id: i64) -> Result<Option<Conversation>, StoreError> {
        let row = sqlx::query("SELECT id, created_at, updated_at, meta_sealed FROM conversations WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.db(e))?;
        row.map(|row| self.decode_conversation(&row)).transpose()
    }

    /// Appends messages to a conversation in one transaction; returns their ids once the
    /// commit is on disk.
    pub async fn add_messages(
        &self,
        conversation_id: i64,
        messages: &[(MessageBody, MessageStats)],
    ) -> Result<Vec<i64>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.db(e))?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT id FROM conversations WHERE id = ?")
            .bind(conversation_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| self.db(e))?;
        if exists.is_none() {
            return Err(StoreError::NotFound { table: "conversations", id: conversation_id });
        }
        let first = next_id(&mut tx, Table::Messages).await.map_err(|e| self.db(e))?;
        let now = now_ms();
        let ids: Vec<i64> = (first..first + messages.len() as i64).collect();
        let mut sealed = Vec::with_capacity(messages.len());
        for ((body, _), &id) in messages.iter().zip(&ids) {
            sealed.push(self.seal_json(FieldId { table: "messages", column: "body_sealed", row: id }, body)?);
        }
        // Multi-row inserts: one statement per 100 messages instead of one per message.
        for chunk in ids.iter().zip(messages).zip(sealed).collect::<Vec<_>>().chunks(100) {
            let mut insert = sqlx::QueryBuilder::<Sqlite>::new(
                "INSERT INTO messages (id, conversation_id, created_at, prompt_tokens, output_tokens, duration_ms, body_sealed) ",
            );
            insert.push_values(chunk, |mut row, ((id, (_, stats)), sealed)| {
                row.push_bind(**id)
                    .push_bind(conversation_id)
                    .push_bind(now)
                    .push_bind(stats.prompt_tokens)
                    .push_bind(stats.output_tokens)
                    .push_bind(stats.duration_ms)
                    .push_bind(sealed.clone());
            });
            insert.build().execute(&mut *tx).await.map_err(|e| self.db(e))?;
        }
        sqlx::query("UPDATE conversations SET updated_at = ? WHERE id = ?")
            .bind(now)
            .bind(conversation_id)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.db(e))?;
        tx.commit().await.map_err(|e| self.db(e))?;
        Ok(ids)
    }

    /// A conversation's messages in order.
    pub async fn messages(&self, conversation_id: i64) -> Result<Listing<Message>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, created_at, prompt_tokens, output_tokens, duration_ms, body_sealed FROM messages \
             WHERE conversation_id = ? ORDER BY id",
        )
        .bind(conversation_id)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.db(e))?;
        Ok(Listing::from_rows(rows, |row| {
            let id: i64 = row.get(0);
            let body = self.open_json(FieldId { table: "messages", column: "body_sealed", row: id }, row.get(5))?;
            Ok(Message {
                id,
                conversation_id,
                created_at: row.get(1),
                stats: MessageStats { prompt_tokens: row.get(2), output_tokens: row.get(3), duration_ms: row.get(4) },
                body,
            })
        }))
    }

    /// Deletes a conversation and its messages.
    pub async fn delete_conversation(&self, id: i64) -> Result<bool, StoreError> {
        self.delete("DELETE FROM conversations WHERE id = ?", id).await
    }

    /// Forgets the memories that came from a conversation's messages; how many.
    pub async fn forget_conversation_memories(&self, conversation_id: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM memories WHERE source_message_id IN (SELECT id FROM messages WHERE conversation_id = ?)",
        )
        .bind(conversation_id)
        .execute(&self.pool)
        .await
        .map_err(|e| self.db(e))?;
        Ok(done.rows_affected())
    }

    /// The memories that came from a conversation's messages (kept ones, not suggestions).
    pub async fn conversation_memories(&self, conversation_id: i64) -> Result<Vec<i64>, StoreError> {
        sqlx::query_scalar(
            "SELECT id FROM memories WHERE source_message_id IN (SELECT id FROM messages WHERE conversation_id = ?) \
             ORDER BY id",
        )
        .bind(conversation_id)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.db(e))
    }

    /// Runs a one-row `DELETE ... WHERE id = ?`; whether a row went.
    async fn delete(&self, sql: &'static str, id: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(sql).bind(id).execute(&self.pool).await.map_err(|e| self.db(e))?;
        Ok(done.rows_affected() > 0)
    }

    /// Remembers `text` (optionally from a message).
    pub async fn add_memory(
        &self,
        text: &str,
        source_message_id: Option<i64>,
        pinned: bool,
    ) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.db(e))?;
        let id = self.insert_memory(&mut tx, text, source_message_id, pinned).await?;
        tx.commit().await.map_err(|e| self.db(e))?;
        Ok(id)
    }

    /// Inserts a memory row (sealed to its new id) in `tx`; its id.
    async fn insert_memory(
        &self,
        tx: &mut Transaction<'_, Sqlite>,
        text: &str,
        source_message_id: Option<i64>,
        pinned: bool,
    ) -> Result<i64, StoreError> {
        let id = next_id(tx, Table::Memories).await.map_err(|e| self.db(e))?;
        let sealed =
            self.cipher.seal(FieldId { table: "memories", column: "text_sealed", row: id }, text.as_bytes())?;
        sqlx::query(
            "INSERT INTO memories (id, created_at, pinned, source_message_id, text_sealed) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(now_ms())
        .bind(pinned)
        .bind(source_message_id)
        .bind(sealed)
        .execute(&mut **tx)
        .await
        .map_err(|e| self.db(e))?;
        Ok(id)
    }

    /// An embedding sealed to its row (int8 components and scale; see `recall.rs`).
    fn seal_embedding(&self, item: ItemRef, embedding: &[f32]) -> Result<Vec<u8>, StoreError> {
        let bytes = Zeroizing::new(QuantizedVector::quantize(embedding).to_bytes());
        Ok(self.cipher.seal(embedding_field(item), &bytes)?)
    }

    fn open_embedding(&self, item: ItemRef, sealed: Option<&[u8]>) -> Result<Option<QuantizedVector>, StoreError> {
        let Some(sealed) = sealed else { return Ok(None) };
        let field = embedding_field(item);
        let plain = self.cipher.open(field, sealed)?;
        QuantizedVector::from_bytes(&plain)
            .map(Some)
            .ok_or_else(|| StoreError::Corrupt { field: field.to_string(), reason: "not an embedding".into() })
    }

    /// Stores (or replaces) a memory's or message's embedding.
    pub async fn set_embedding(&self, item: ItemRef, embedding: &[f32]) -> Result<(), StoreError> {
        self.set_embeddings(&[(item, embedding.to_vec())]).await
    }

    /// Stores many embeddings in one transaction; a missing row fails them all.
    pub async fn set_embeddings(&self, embeddings: &[(ItemRef, Vec<f32>)]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.db(e))?;
        for (item, embedding) in embeddings {
            let sealed = self.seal_embedding(*item, embedding)?;
            let sql = match item.kind {
                ItemKind::Memory => "UPDATE memories SET embedding_sealed = ? WHERE id = ?",
                ItemKind::Message => "UPDATE messages SET embedding_sealed = ? WHERE id = ?",
            };
            let done = sqlx::query(sql).bind(sealed).bind(item.id).execute(&mut *tx).await.map_err(|e| self.db(e))?;
            if done.rows_affected() == 0 {
                return Err(StoreError::NotFound { table: table_name(item.kind), id: item.id });
            }
        }
        tx.commit().await.map_err(|e| self.db(e))
    }

    /// Every memory and message, decrypted, for the recall index. Rows whose text is
    /// damaged are reported, not indexed; a damaged embedding is reported and its row
    /// indexed without one (so that it gets embedded again).
    pub async fn recall_items(&self) -> Result<Listing<RecallItem>, StoreError> {
        let memories = sqlx::query("SELECT id, created_at, text_sealed, embedding_sealed FROM memories ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.db(e))?;
        let mut listing = Listing::from_rows_partial(memories, |row| {
            let item = ItemRef { kind: ItemKind::Memory, id: row.get(0) };
            let field = FieldId { table: "memories", column: "text_sealed", row: item.id };
            let text = self.open_text(field, row.get(2))?;
            let (embedding, damaged) = split(self.open_embedding(item, row.get(3)));
            Ok((
                RecallItem { item, conversation_id: None, created_at: row.get(1), role: None, text, embedding },
                damaged,
            ))
        });
        let messages = sqlx::query(
            "SELECT id, conversation_id, created_at, body_sealed, embedding_sealed FROM messages ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.db(e))?;
        let messages = Listing::from_rows_partial(messages, |row| {
            let item = ItemRef { kind: ItemKind::Message, id: row.get(0) };
            let mut body: MessageBody =
                self.open_json(FieldId { table: "messages", column: "body_sealed", row: item.id }, row.get(3))?;
            let (embedding, damaged) = split(self.open_embedding(item, row.get(4)));
            let item = RecallItem {
                item,
                conversation_id: Some(row.get(1)),
                created_at: row.get(2),
                role: Some(std::mem::take(&mut body.role)),
                text: std::mem::take(&mut body.content),
                embedding,
            };
            Ok((item, damaged))
        });
        listing.items.extend(messages.items);
        listing.damaged.extend(messages.damaged);
        Ok(listing)
    }

    /// A sealed UTF-8 text field.
    fn open_text(&self, field: FieldId, sealed: &[u8]) -> Result<String, StoreError> {
        let plain = self.cipher.open(field, sealed)?;
        String::from_utf8(plain.to_vec())
            .map_err(|e| StoreError::Corrupt { field: field.to_string(), reason: e.to_string() })
    }

    /// All memories, oldest first (one with a damaged embedding is listed without it, and
    /// the damage reported).
    pub async fn memories(&self) -> Result<Listing<Memory>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, created_at, pinned, source_message_id, text_sealed, embedding_sealed FROM memories ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.db(e))?;
        Ok(Listing::from_rows_partial(rows, |row| {
            let id: i64 = row.get(0);
            let text = self.open_text(FieldId { table: "memories", column: "text_sealed", row: id }, row.get(4))?;
            let (embedding, damaged) = split(self.open_embedding(ItemRef { kind: ItemKind::Memory, id }, row.get(5)));
            let memory = Memory {
                id,
                created_at: row.get(1),
                pinned: row.get(2),
                source_message_id: row.get(3),
                text,
                embedding: embedding.map(|v| v.dequantize()),
            };
            Ok((memory, damaged))
        }))
    }

    /// Records the message a memory came from (so deleting that conversation can take
    /// the memory with it).
    pub async fn set_memory_source(&self, memory_id: i64, message_id: i64) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE memories SET source_message_id = ? WHERE id = ?")
            .bind(message_id)
            .bind(memory_id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.db(e))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound { table: "memories", id: memory_id });
        }
        Ok(())
    }

    /// Forgets one memory.
    pub async fn forget_memory(&self, id: i64) -> Result<bool, StoreError> {
        self.delete("DELETE FROM memories WHERE id = ?", id).await
    }

    /// Puts suggested memories in the review queue, all or none; their ids.
    pub async fn add_candidates(
        &self,
        source_message_id: Option<i64>,
        texts: &[String],
    ) -> Result<Vec<i64>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.db(e))?;
        let first = next_id(&mut tx, Table::Candidates).await.map_err(|e| self.db(e))?;
        let now = now_ms();
        let mut ids = Vec::with_capacity(texts.len());
        for (id, text) in (first..).zip(texts) {
            let sealed = self.cipher.seal(candidate_field(id), text.as_bytes())?;
            sqlx::query(
                "INSERT INTO memory_candidates (id, created_at, source_message_id, text_sealed) VALUES (?, ?, ?, ?)",
            )
            .bind(id)
            .bind(now)
            .bind(source_message_id)
            .bind(sealed)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.db(e))?;
            ids.push(id);
        }
        tx.commit().await.map_err(|e| self.db(e))?;
        Ok(ids)
    }

    /// The review queue, oldest first.
    pub async fn candidates(&self) -> Result<Listing<Candidate>, StoreError> {
        let rows =
            sqlx::query("SELECT id, created_at, source_message_id, text_sealed FROM memory_candidates ORDER BY id")
                .fetch_all(&self.pool)
                .await
                .map_err(|e| self.db(e))?;
        Ok(Listing::from_rows(rows, |row| {
            let id: i64 = row.get(0);
            let text = self.open_text(candidate_field(id), row.get(3))?;
            Ok(Candidate { id, created_at: row.get(1), source_message_id: row.get(2), text })
        }))
    }

    /// Keeps a candidate as a memory (with `text` instead of the suggestion, when the user
    /// edited it), in one transaction; the new memory's id and text.
    pub async fn keep_candidate(&self, id: i64, text: Option<&str>) -> Result<(i64, String), StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.db(e))?;
        let row = sqlx::query("SELECT source_message_id, text_sealed FROM memory_candidates WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| self.db(e))?
            .ok_or(StoreError::NotFound { table: "memory_candidates", id })?;
        let source: Option<i64> = row.get(0);
        let suggested = self.open_text(candidate_field(id), row.get(1))?;
        let text = text.map_or(suggested, str::to_owned);
        let memory_id = self.insert_memory(&mut tx, &text, source, false).await?;
        sqlx::query("DELETE FROM memory_candidates WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.db(e))?;
        tx.commit().await.map_err(|e| self.db(e))?;
        Ok((memory_id, text))
    }

    /// Discards a candidate; whether it was there.
    pub async fn discard_candidate(&self, id: i64) -> Result<bool, StoreError> {
        self.delete("DELETE FROM memory_candidates WHERE id = ?", id).await
    }

    /// A setting's value.
    pub async fn setting(&self, key: &str) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        let row = sqlx::query("SELECT id, value_sealed FROM settings WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.db(e))?;
        match row {
            None => Ok(None),
            Some(row) => {
                let field = FieldId { table: "settings", column: "value_sealed", row: row.get(0) };
                Ok(Some(self.cipher.open(field, row.get::<&[u8], _>(1))?))
            }
        }
    }

    /// Sets a setting.
    pub async fn set_setting(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.db(e))?;
        let existing: Option<i64> = sqlx::query_scalar("SELECT id FROM settings WHERE key = ?")
            .bind(key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| self.db(e))?;
        let id = match existing {
            Some(id) => id,
            None => next_id(&mut tx, Table::Settings).await.map_err(|e| self.db(e))?,
        };
        let sealed = self.cipher.seal(FieldId { table: "settings", column: "value_sealed", row: id }, value)?;
        sqlx::query("INSERT INTO settings (id, key, value_sealed) VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET value_sealed = excluded.value_sealed")
            .bind(id)
            .bind(key)
            .bind(sealed)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.db(e))?;
        tx.commit().await.map_err(|e| self.db(e))
    }

    /// The embeddings of a conversation's messages, by message id.
    async fn message_embeddings(&self, conversation_id: i64) -> Result<HashMap<i64, Vec<f32>>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, embedding_sealed FROM messages WHERE conversation_id = ? AND embedding_sealed IS NOT NULL",
        )
        .bind(conversation_id)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.db(e))?;
        let mut embeddings = HashMap::with_capacity(rows.len());
        for row in rows {
            let item = ItemRef { kind: ItemKind::Message, id: row.get(0) };
            if let Some(vector) = self.open_embedding(item, row.get(1))? {
                embeddings.insert(item.id, vector.dequantize());
            }
        }
        Ok(embeddings)
    }

    /// Every row, decrypted, for an export; any damaged row is an error.
    pub(crate) async fn export_records(
        &self,
    ) -> Result<(Vec<ConversationRecord>, Vec<MemoryRecord>, Vec<SettingRecord>), StoreError> {
        let conversations = self.conversations().await?;
        if let Some(err) = conversations.damaged.into_iter().next() {
            return Err(err);
        }
        let mut records = Vec::with_capacity(conversations.items.len());
        // Oldest first, so an import recreates them in their original order.
        for conversation in conversations.items.into_iter().rev() {
            let messages = self.messages(conversation.id).await?;
            if let Some(err) = messages.damaged.into_iter().next() {
                return Err(err);
            }
            let mut embeddings = self.message_embeddings(conversation.id).await?;
            records.push(ConversationRecord {
                created_at: conversation.created_at,
                updated_at: conversation.updated_at,
                meta: conversation.meta,
                messages: messages
                    .items
                    .into_iter()
                    .map(|m| MessageRecord {
                        created_at: m.created_at,
                        prompt_tokens: m.stats.prompt_tokens,
                        output_tokens: m.stats.output_tokens,
                        duration_ms: m.stats.duration_ms,
                        embedding: embeddings.remove(&m.id),
                        body: m.body,
                    })
                    .collect(),
            });
        }
        let memories = self.memories().await?;
        if let Some(err) = memories.damaged.into_iter().next() {
            return Err(err);
        }
        let memories = memories
            .items
            .into_iter()
            .map(|m| MemoryRecord { created_at: m.created_at, pinned: m.pinned, text: m.text, embedding: m.embedding })
            .collect();
        let keys: Vec<String> = sqlx::query_scalar("SELECT key FROM settings WHERE key != ? ORDER BY id")
            .bind(VAULT_CHECK)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.db(e))?;
        let mut settings = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(value) = self.setting(&key).await? {
                settings.push(SettingRecord { key, value: value.to_vec() });
            }
        }
        Ok((records, memories, settings))
    }

    /// Inserts exported rows in one transaction: all of them or, on error, none.
    pub(crate) async fn import_records(
        &self,
        conversations: &[ConversationRecord],
        memories: &[MemoryRecord],
        settings: &[SettingRecord],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.db(e))?;
        let mut conversation_id = next_id(&mut tx, Table::Conversations).await.map_err(|e| self.db(e))?;
        let mut message_id = next_id(&mut tx, Table::Messages).await.map_err(|e| self.db(e))?;
        for conversation in conversations {
            let sealed = self.seal_json(
                FieldId { table: "conversations", column: "meta_sealed", row: conversation_id },
                &conversation.meta,
            )?;
            sqlx::query("INSERT INTO conversations (id, created_at, updated_at, meta_sealed) VALUES (?, ?, ?, ?)")
                .bind(conversation_id)
                .bind(conversation.created_at)
                .bind(conversation.updated_at)
                .bind(sealed)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.db(e))?;
            for message in &conversation.messages {
                let sealed = self
                    .seal_json(FieldId { table: "messages", column: "body_sealed", row: message_id }, &message.body)?;
                let stats = message.stats();
                let embedding = message
                    .embedding
                    .as_deref()
                    .map(|values| self.seal_embedding(ItemRef { kind: ItemKind::Message, id: message_id }, values))
                    .transpose()?;
                sqlx::query(
                    "INSERT INTO messages (id, conversation_id, created_at, prompt_tokens, output_tokens, duration_ms, body_sealed, embedding_sealed) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(message_id)
                .bind(conversation_id)
                .bind(message.created_at)
                .bind(stats.prompt_tokens)
                .bind(stats.output_tokens)
                .bind(stats.duration_ms)
                .bind(sealed)
                .bind(embedding)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.db(e))?;
                message_id += 1;
            }
            conversation_id += 1;
        }
        let mut memory_id = next_id(&mut tx, Table::Memories).await.map_err(|e| self.db(e))?;
        for memory in memories {
            let text = self
                .cipher
                .seal(FieldId { table: "memories", column: "text_sealed", row: memory_id }, memory.text.as_bytes())?;
            let embedding = memory
                .embedding
                .as_deref()
                .map(|values| self.seal_embedding(ItemRef { kind: ItemKind::Memory, id: memory_id }, values))
                .transpose()?;
            sqlx::query(
                "INSERT INTO memories (id, created_at, pinned, text_sealed, embedding_sealed) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(memory_id)
            .bind(memory.created_at)
            .bind(memory.pinned)
            .bind(text)
            .bind(embedding)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.db(e))?;
            memory_id += 1;
        }
        let mut setting_id = next_id(&mut tx, Table::Settings).await.map_err(|e| self.db(e))?;
        for setting in settings.iter().filter(|s| s.key != VAULT_CHECK) {
            let existing: Option<i64> = sqlx::query_scalar("SELECT id FROM settings WHERE key = ?")
                .bind(&setting.key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| self.db(e))?;
            let id = existing.unwrap_or(setting_id);
            let sealed =
                self.cipher.seal(FieldId { table: "settings", column: "value_sealed", row: id }, &setting.value)?;
            sqlx::query("INSERT INTO settings (id, key, value_sealed) VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET value_sealed = excluded.value_sealed")
                .bind(id)
                .bind(&setting.key)
                .bind(sealed)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.db(e))?;
            if existing.is_none() {
                setting_id += 1;
            }
        }
        tx.commit().await.map_err(|e| self.db(e))
    }

    /// SQLite's `PRAGMA integrity_check`: `"ok"`, or the problems it found.
    pub async fn integrity_check(&self) -> Result<String, StoreError> {
        let rows: Vec<String> =
            sqlx::query_scalar("PRAGMA integrity_check").fetch_all(&self.pool).await.map_err(|e| self.db(e))?;
        Ok(rows.join("\n"))
    }

    /// Closes the database, checkpointing the WAL.
    pub async fn close(self) {
        self.pool.close().await;
    }
}

/// The next row id of `table`, inside a write transaction (ids are allocated before
/// sealing, because each ciphertext is bound to its row id).
async fn next_id(tx: &mut Transaction<'_, Sqlite>, table: Table) -> Result<i64, sqlx::Error> {
    let sql = match table {
        Table::Conversations => "SELECT COALESCE(MAX(id), 0) + 1 FROM conversations",
        Table::Messages => "SELECT COALESCE(MAX(id), 0) + 1 FROM messages",
        Table::Memories => "SELECT COALESCE(MAX(id), 0) + 1 FROM memories",
        Table::Settings => "SELECT COALESCE(MAX(id), 0) + 1 FROM settings",
        Table::Candidates => "SELECT COALESCE(MAX(id), 0) + 1 FROM memory_candidates",
    };
    sqlx::query_scalar(sql).fetch_one(&mut **tx).await
}

/// An optional embedding, or the error that made it unreadable.
fn split(result: Result<Option<QuantizedVector>, StoreError>) -> (Option<QuantizedVector>, Option<StoreError>) {
    match result {
        Ok(vector) => (vector, None),
        Err(err) => (None, Some(err)),
    }
}

/// The sealed text of a memory candidate.
fn candidate_field(id: i64) -> FieldId<'static> {
    FieldId { table: "memory_candidates", column: "text_sealed", row: id }
}

/// The sealed embedding column of a memory or message.
fn embedding_field(item: ItemRef) -> FieldId<'static> {
    FieldId { table: table_name(item.kind), column: "embedding_sealed", row: item.id }
}

fn table_name(kind: ItemKind) -> &'static str {
    match kind {
        ItemKind::Memory => "memories",
        ItemKind::Message => "messages",
    }
}

/// Tables whose ids are allocated by [`next_id`].
#[derive(Clone, Copy)]
enum Table {
    Conversations,
    Messages,
    Memories,
    Settings,
    Candidates,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Vault;
    use age::secrecy::SecretString;

    fn key(dir: &Path) -> VaultKey {
        Vault::new(dir).with_work_factor(4).init(&SecretString::from("pass".to_owned()), &[]).expect("init")
    }

    fn user(text: &str) -> (MessageBody, MessageStats) {
        (
            MessageBody { role: "user".into(), content: text.into(), ran_on: None, interrupted: false },
            MessageStats::default(),
        )
    }

    fn reply(text: &str) -> (MessageBody, MessageStats) {
        let stats = MessageStats { prompt_tokens: 12, output_tokens: 7, duration_ms: 80 };
        (
            MessageBody {
                role: "assistant".into(),
                content: text.into(),
                ran_on: Some(RanOn::Local),
                interrupted: false,
            },
            stats,
        )
    }

    #[tokio::test]
    async fn everything_written_reads_back_after_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = key(dir.path());
        let store = MemoryStore::open(dir.path(), &key).await.expect("open");
        let meta = ConversationMeta::new("Paris", "smollm2-135m");
        let conv = store.create_conversation(&meta).await.expect("conversation");
        let ids = store.add_messages(conv, &[user("Capital of France?"), reply("Paris.")]).await.expect("messages");
        let memory = store.add_memory("prefers metric units", Some(ids[0]), true).await.expect("memory");
        // Exactly representable as int8 × scale (scale 1/128), so it reads back equal.
        let vector = [0.9921875, -0.5, 0.0078125];
        store.set_embedding(ItemRef { kind: ItemKind::Memory, id: memory }, &vector).await.expect("embedding");
        store.set_embedding(ItemRef { kind: ItemKind::Message, id: ids[1] }, &vector).await.expect("embedding");
        store.set_setting("ui.theme", b"dark").await.expect("setting");
        store.close().await;

        let store = MemoryStore::open(dir.path(), &key).await.expect("reopen");
        let conversations = store.conversations().await.expect("list");
        assert!(conversations.damaged.is_empty());
        assert_eq!(conversations.items.len(), 1);
        assert_eq!(conversations.items[0].meta, meta);
        let messages = store.messages(conv).await.expect("messages");
        assert_eq!(
            messages.items.iter().map(|m| m.body.content.as_str()).collect::<Vec<_>>(),
            ["Capital of France?", "Paris."]
        );
        assert_eq!(messages.items[1].stats.output_tokens, 7);
        assert_eq!(messages.items[1].body.ran_on, Some(RanOn::Local));
        let memories = store.memories().await.expect("memories");
        assert_eq!(memories.items.len(), 1);
        assert_eq!(memories.items[0].text, "prefers metric units");
        assert_eq!(memories.items[0].embedding.as_deref(), Some(&vector[..]));
        assert!(memories.items[0].pinned);
        assert_eq!(store.setting("ui.theme").await.expect("setting").as_deref().map(|v| &v[..]), Some(&b"dark"[..]));
        let recall = store.recall_items().await.expect("recall items");
        assert!(recall.damaged.is_empty());
        let found: Vec<(ItemRef, &str, bool)> =
            recall.items.iter().map(|i| (i.item, i.text.as_str(), i.embedding.is_some())).collect();
        assert_eq!(
            found,
            [
                (ItemRef { kind: ItemKind::Memory, id: memory }, "prefers metric units", true),
                (ItemRef { kind: ItemKind::Message, id: ids[0] }, "Capital of France?", false),
                (ItemRef { kind: ItemKind::Message, id: ids[1] }, "Paris.", true),
            ]
        );
        assert_eq!(recall.items[2].embedding.as_ref().map(QuantizedVector::dequantize), Some(vector.to_vec()));
        assert_eq!(recall.items[1].role.as_deref(), Some("user"));
        assert_eq!(recall.items[1].conversation_id, Some(conv));
        let missing = ItemRef { kind: ItemKind::Message, id: 999 };
        assert!(matches!(store.set_embedding(missing, &vector).await, Err(StoreError::NotFound { .. })));

        assert_eq!(store.forget_conversation_memories(conv).await.expect("forget"), 1, "the memory came from it");
        assert!(store.memories().await.expect("memories").items.is_empty());
        assert_eq!(store.conversation(conv).await.expect("one").map(|c| c.meta), Some(meta.clone()));
        assert!(store.delete_conversation(conv).await.expect("delete"));
        assert!(store.conversation(conv).await.expect("one").is_none());
        assert!(store.messages(conv).await.expect("messages").items.is_empty(), "messages go with their conversation");
        assert!(matches!(store.add_messages(conv, &[user("late")]).await, Err(StoreError::NotFound { .. })));
    }

    #[tokio::test]
    async fn review_queue_keeps_edits_discards_and_follows_its_message() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = key(dir.path());
        let store = MemoryStore::open(dir.path(), &key).await.expect("open");
        let conv = store.create_conversation(&ConversationMeta::new("t", "m")).await.expect("conv");
        let ids = store.add_messages(conv, &[user("My name is Ada and I prefer tea")]).await.expect("messages");
        let texts = ["The user's name is Ada".to_owned(), "The user prefers tea".to_owned(), "x".to_owned()];
        let queued = store.add_candidates(Some(ids[0]), &texts).await.expect("queue");
        assert_eq!(queued.len(), 3);
        let listed = store.candidates().await.expect("list");
        assert_eq!(listed.items.iter().map(|c| c.text.as_str()).collect::<Vec<_>>(), texts.map(|t| t.clone()));
        assert!(listed.items.iter().all(|c| c.source_message_id == Some(ids[0])));
        assert!(store.memories().await.expect("memories").items.is_empty(), "candidates are not memories");

        let (kept, kept_text) = store.keep_candidate(queued[0], None).await.expect("keep");
        assert_eq!(kept_text, "The user's name is Ada");
        let (edited, _) = store.keep_candidate(queued[1], Some("The user prefers green tea")).await.expect("edit");
        assert!(store.discard_candidate(queued[2]).await.expect("discard"));
        assert!(!store.discard_candidate(queued[2]).await.expect("again"), "already gone");
        assert!(matches!(store.keep_candidate(queued[2], None).await, Err(StoreError::NotFound { .. })));
        let memories = store.memories().await.expect("memories").items;
        let found: Vec<(i64, &str, Option<i64>)> =
            memories.iter().map(|m| (m.id, m.text.as_str(), m.source_message_id)).collect();
        assert_eq!(
            found,
            [(kept, "The user's name is Ada", Some(ids[0])), (edited, "The user prefers green tea", Some(ids[0]))]
        );
        assert!(store.candidates().await.expect("list").items.is_empty());

        // A waiting candidate goes with its conversation; a kept one can be forgotten with it.
        assert_eq!(store.conversation_memories(conv).await.expect("from it"), [kept, edited]);
        store.add_candidates(Some(ids[0]), &["The user likes rain".to_owned()]).await.expect("queue");
        assert_eq!(store.forget_conversation_memories(conv).await.expect("forget"), 2);
        assert!(store.delete_conversation(conv).await.expect("delete"));
        assert!(store.candidates().await.expect("list").items.is_empty());
    }

    #[tokio::test]
    async fn privacy_mode_is_sealed_and_old_meta_reads_as_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = key(dir.path());
        let store = MemoryStore::open(dir.path(), &key).await.expect("open");
        let conv = store.create_conversation(&ConversationMeta::new("t", "m")).await.expect("conv");
        let mut meta = store.conversation(conv).await.expect("get").expect("there").meta;
        assert_eq!(meta.privacy, Privacy::FriendsAllowed);
        meta.privacy = Privacy::LocalOnly;
        store.set_conversation_meta(conv, &meta).await.expect("set");
        assert_eq!(store.conversation(conv).await.expect("get").expect("there").meta.privacy, Privacy::LocalOnly);
        assert!(matches!(store.set_conversation_meta(999, &meta).await, Err(StoreError::NotFound { .. })));
        // Meta written before the field existed.
        let old: ConversationMeta = serde_json::from_str(r#"{"title":"a","model":"b"}"#).expect("old meta");
        assert_eq!(old.privacy, Privacy::FriendsAllowed);
    }

    /// Unique canaries in every kind of content, then every file in the data directory
    /// (database, WAL, shared memory, vault files) is scanned for them.
    #[tokio::test]
    async fn no_plaintext_reaches_the_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = key(dir.path());
        let store = MemoryStore::open(dir.path(), &key).await.expect("open");
        let canaries = [
            "canary-title-81f2",
            "canary-model-7c1d",
            "canary-user-3a9e",
            "canary-reply-55b0",
            "canary-memory-e4d7",
            "canary-setting-0b6c",
            "canary-candidate-9d31",
        ];
        let conv =
            store.create_conversation(&ConversationMeta::new(canaries[0], canaries[1])).await.expect("conversation");
        store.add_messages(conv, &[user(canaries[2]), reply(canaries[3])]).await.expect("messages");
        store.add_memory(canaries[4], None, false).await.expect("memory");
        store.set_setting("name", canaries[5].as_bytes()).await.expect("setting");
        store.add_candidates(None, &[canaries[6].to_owned()]).await.expect("candidate");
        // Scan while open (WAL and shm present) and after closing.
        let scan = |when: &str| {
            for entry in std::fs::read_dir(dir.path())
                .expect("dir")
                .chain(std::fs::read_dir(dir.path().join("vault")).expect("vault"))
            {
                let path = entry.expect("entry").path();
                if path.is_file() {
                    let bytes = std::fs::read(&path).expect("read");
                    for canary in canaries {
                        assert!(
                            !bytes.windows(canary.len()).any(|w| w == canary.as_bytes()),
                            "{when}: {canary} in {}",
                            path.display()
                        );
                    }
                }
            }
        };
        scan("open");
        store.close().await;
        scan("closed");
    }

    /// A flipped byte, or one row's ciphertext copied onto another, is reported naming the
    /// row, and every other row still reads.
    #[tokio::test]
    async fn tampering_is_detected_per_row() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = key(dir.path());
        let store = MemoryStore::open(dir.path(), &key).await.expect("open");
        let conv = store.create_conversation(&ConversationMeta::new("t", "m")).await.expect("conv");
        let ids = store.add_messages(conv, &[user("one"), user("two"), user("three")]).await.expect("messages");
        // Flip a byte of message 1; copy message 2's ciphertext onto message 3.
        let read = |id: i64| sqlx::query_scalar::<_, Vec<u8>>("SELECT body_sealed FROM messages WHERE id = ?").bind(id);
        let mut first = read(ids[0]).fetch_one(&store.pool).await.expect("read");
        first[10] ^= 0x01;
        sqlx::query("UPDATE messages SET body_sealed = ? WHERE id = ?")
            .bind(first)
            .bind(ids[0])
            .execute(&store.pool)
            .await
            .expect("flip");
        let second: Vec<u8> = sqlx::query_scalar("SELECT body_sealed FROM messages WHERE id = ?")
            .bind(ids[1])
            .fetch_one(&store.pool)
            .await
            .expect("read");
        sqlx::query("UPDATE messages SET body_sealed = ? WHERE id = ?")
            .bind(second)
            .bind(ids[2])
            .execute(&store.pool)
            .await
            .expect("copy");
        let listing = store.messages(conv).await.expect("messages");
        assert_eq!(listing.items.iter().map(|m| m.body.content.as_str()).collect::<Vec<_>>(), ["two"]);
        let errors: Vec<String> = listing.damaged.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains(&format!("messages.body_sealed of row {}", ids[0])), "{errors:?}");
        assert!(errors[1].contains(&format!("messages.body_sealed of row {}", ids[2])), "{errors:?}");

        // Embeddings: one swapped onto another row, one that opens but is not a vector.
        let vector = [0.6, -0.8];
        store.set_embedding(ItemRef { kind: ItemKind::Message, id: ids[1] }, &vector).await.expect("embedding");
        let memory = store.add_memory("m", None, false).await.expect("memory");
        let moved: Vec<u8> = sqlx::query_scalar("SELECT embedding_sealed FROM messages WHERE id = ?")
            .bind(ids[1])
            .fetch_one(&store.pool)
            .await
            .expect("read");
        sqlx::query("UPDATE memories SET embedding_sealed = ? WHERE id = ?")
            .bind(moved)
            .bind(memory)
            .execute(&store.pool)
            .await
            .expect("move");
        // The memory's text still reads: it is recalled by words (and re-embedded by search).
        let recall = store.recall_items().await.expect("recall items");
        assert_eq!(recall.items.iter().map(|i| i.text.as_str()).collect::<Vec<_>>(), ["m", "two"]);
        assert!(recall.items[0].embedding.is_none() && recall.items[1].embedding.is_some());
        let errors: Vec<String> = recall.damaged.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].contains(&format!("memories.embedding_sealed of row {memory}")), "{errors:?}");
        store.set_embedding(ItemRef { kind: ItemKind::Memory, id: memory }, &vector).await.expect("re-embed");
        assert_eq!(store.recall_items().await.expect("recall items").damaged.len(), 2, "healed");

        let not_a_vector =
            store.cipher.seal(embedding_field(ItemRef { kind: ItemKind::Memory, id: memory }), b"ab").expect("seal");
        sqlx::query("UPDATE memories SET embedding_sealed = ? WHERE id = ?")
            .bind(not_a_vector)
            .bind(memory)
            .execute(&store.pool)
            .await
            .expect("write");
        let memories = store.memories().await.expect("memories");
        assert_eq!(memories.items.len(), 1);
        assert_eq!(memories.items[0].embedding, None);
        assert!(matches!(&memories.damaged[..], [StoreError::Corrupt { .. }]), "{:?}", memories.damaged);
    }

    #[tokio::test]
    async fn another_vaults_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MemoryStore::open(dir.path(), &key(dir.path())).await.expect("open");
        store.close().await;
        let other = tempfile::tempdir().expect("tempdir");
        assert!(matches!(MemoryStore::open(dir.path(), &key(other.path())).await, Err(StoreError::OtherVault(_))));
    }
}
