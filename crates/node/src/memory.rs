//! What the node does with the vault besides chat turns: memories saved, forgotten,
//! suggested and reviewed, conversations deleted and given a privacy mode. Every change
//! reaches the store and the recall index together.

use std::sync::Arc;

use kith_memory::{Candidate, ItemKind, ItemRef, Listing, QuantizedVector, RecallIndex, RecallItem};
use kith_types::Privacy;

use crate::node::{Node, NodeError};
use crate::turn::NodeMemory;

/// What the user decided about a suggested memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Review {
    /// Keep it as suggested.
    Keep,
    /// Keep it with this text instead.
    Edit(String),
    /// Drop it.
    Discard,
}

/// A memory as saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedMemory {
    /// Its id.
    pub id: i64,
    /// Unix milliseconds.
    pub created_at: i64,
}

impl Node {
    fn vault(&self) -> Result<Arc<NodeMemory>, NodeError> {
        self.memory().ok_or(NodeError::NoMemory)
    }

    /// Saves a memory, embeds it (when the embedding model is loaded) and makes it
    /// recallable at once.
    pub async fn add_memory(&self, text: &str, pinned: bool) -> Result<SavedMemory, NodeError> {
        let memory = self.vault()?;
        let text = text.trim();
        if text.is_empty() {
            return Err(NodeError::EmptyMemory);
        }
        let id = memory.store.add_memory(text, None, pinned).await?;
        self.index_memory(&memory, id, text).await
    }

    /// Embeds and indexes a memory already in the store.
    pub(crate) async fn index_memory(
        &self,
        memory: &NodeMemory,
        id: i64,
        text: &str,
    ) -> Result<SavedMemory, NodeError> {
        let item = ItemRef { kind: ItemKind::Memory, id };
        let vector =
            if self.embedding_model().is_some() { self.embed(vec![text.to_owned()]).await?.pop() } else { None };
        if let Some(vector) = &vector {
            memory.store.set_embedding(item, vector).await?;
        }
        let created_at = now_ms();
        memory.index.lock().await.insert(RecallItem {
            item,
            conversation_id: None,
            created_at,
            role: None,
            text: text.to_owned(),
            embedding: vector.as_deref().map(QuantizedVector::quantize),
        });
        Ok(SavedMemory { id, created_at })
    }

    /// Forgets a memory (store and index).
    pub async fn forget_memory(&self, id: i64) -> Result<(), NodeError> {
        let memory = self.vault()?;
        if !memory.store.forget_memory(id).await? {
            return Err(NodeError::NoMemoryItem(id));
        }
        memory.index.lock().await.remove(ItemRef { kind: ItemKind::Memory, id });
        Ok(())
    }

    /// Suggested memories waiting for review, oldest first.
    pub async fn review_queue(&self) -> Result<Listing<Candidate>, NodeError> {
        Ok(self.vault()?.store.candidates().await?)
    }

    /// Applies the user's decision on a suggestion; the memory's id when it was kept.
    pub async fn review(&self, id: i64, decision: Review) -> Result<Option<SavedMemory>, NodeError> {
        let memory = self.vault()?;
        let missing = |err: kith_memory::StoreError| match err {
            kith_memory::StoreError::NotFound { .. } => NodeError::NoCandidate(id),
            other => other.into(),
        };
        let text = match decision {
            Review::Discard => {
                return if memory.store.discard_candidate(id).await? {
                    Ok(None)
                } else {
                    Err(NodeError::NoCandidate(id))
                };
            }
            Review::Keep => None,
            Review::Edit(text) if text.trim().is_empty() => return Err(NodeError::EmptyMemory),
            Review::Edit(text) => Some(text.trim().to_owned()),
        };
        let (memory_id, kept) = memory.store.keep_candidate(id, text.as_deref()).await.map_err(missing)?;
        Ok(Some(self.index_memory(&memory, memory_id, &kept).await?))
    }

    /// Deletes a conversation, and with `with_memories` the memories (kept or waiting)
    /// that came from it; how many memories went.
    pub async fn delete_conversation(&self, id: i64, with_memories: bool) -> Result<u64, NodeError> {
        let memory = self.vault()?;
        let forgotten = if with_memories { memory.store.forget_conversation_memories(id).await? } else { 0 };
        if !memory.store.delete_conversation(id).await? {
            return Err(NodeError::NoConversation(id));
        }
        let mut index = memory.index.lock().await;
        index.remove_conversation(id);
        if forgotten > 0 {
            // Rebuild the memory side of the index from what remains.
            *index = RecallIndex::build(memory.store.recall_items().await?.items);
        }
        Ok(forgotten)
    }

    /// A saved conversation and how many messages it holds, if it exists.
    pub async fn conversation(&self, id: i64) -> Result<Option<(kith_memory::Conversation, usize)>, NodeError> {
        let memory = self.vault()?;
        let Some(conversation) = memory.store.conversation(id).await? else { return Ok(None) };
        let messages = memory.store.messages(id).await?;
        Ok(Some((conversation, messages.items.len() + messages.damaged.len())))
    }

    /// Sets where a conversation's turns may run.
    pub async fn set_privacy(&self, conversation: i64, privacy: Privacy) -> Result<(), NodeError> {
        let memory = self.vault()?;
        let mut meta =
            memory.store.conversation(conversation).await?.ok_or(NodeError::NoConversation(conversation))?.meta;
        if meta.privacy != privacy {
            meta.privacy = privacy;
            memory.store.set_conversation_meta(conversation, &meta).await?;
        }
        Ok(())
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
