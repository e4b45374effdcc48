//! `kith memory`: long-term memories and export/import.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use kith_infer::Embedder;
use kith_memory::age::x25519;
use kith_memory::{
    ExportTo, Hit, ImportWith, ItemKind, ItemRef, MemoryStore, QuantizedVector, RecallIndex, write_export,
};
use kith_models::{Catalog, Store};

use crate::cli::{MemoryArgs, MemoryCommand};
use crate::vault::{open_store, passphrase};

/// The catalog entry that embeds memories and messages for recall.
pub(crate) const EMBEDDING_MODEL: &str = "minilm-l6";

pub(crate) async fn run(args: MemoryArgs) -> Result<ExitCode> {
    let home = Store::from_env()?.home().to_owned();
    let store = open_store(&home, args.passphrase_file.as_deref()).await?;
    match args.command {
        MemoryCommand::List => {
            let memories = store.memories().await?;
            for memory in &memories.items {
                println!("{:>6}  {}{}", memory.id, if memory.pinned { "[pinned] " } else { "" }, memory.text);
            }
            for damaged in &memories.damaged {
                eprintln!("warning: {damaged}");
            }
        }
        MemoryCommand::Chats => {
            let conversations = store.conversations().await?;
            for conversation in &conversations.items {
                let messages = store.messages(conversation.id).await?;
                println!(
                    "{:>6}  {:>4} messages  {}  {}",
                    conversation.id,
                    messages.items.len(),
                    conversation.meta.model,
                    conversation.meta.title
                );
            }
            for damaged in &conversations.damaged {
                eprintln!("warning: {damaged}");
            }
        }
        MemoryCommand::Add { text, pin } => {
            let id = store.add_memory(&text, None, pin).await?;
            if let Some(embedder) = load_embedder(true)? {
                let vector = embedder.embed_one(&text)?;
                store.set_embedding(ItemRef { kind: ItemKind::Memory, id }, &vector).await?;
            }
            eprintln!("Remembered (id {id}).");
        }
        MemoryCommand::Search { query, limit, json } => search(&store, &query, limit, json).await?,
        MemoryCommand::Forget { id: Some(id), .. } => {
            if !store.forget_memory(id).await? {
                bail!("no memory with id {id}");
            }
            eprintln!("Forgotten.");
        }
        MemoryCommand::Forget { id: None, conversation, with_memories } => {
            let conversation = conversation.context("give a memory id or --conversation ID")?;
            let memories = if with_memories { store.forget_conversation_memories(conversation).await? } else { 0 };
            if !store.delete_conversation(conversation).await? {
                bail!("no conversation {conversation} (see `kith memory chats`)");
            }
            eprintln!(
                "Deleted conversation {conversation}{}.",
                if with_memories { format!(" and {memories} memories that came from it") } else { String::new() }
            );
        }
        MemoryCommand::Export { file, to } => {
            let (bytes, summary) = match to {
                Some(recipient) => {
                    let recipient: x25519::Recipient =
                        recipient.parse().map_err(|e| anyhow::anyhow!("--to {recipient}: {e}"))?;
                    store.export(ExportTo::Recipient(&recipient)).await?
                }
                None => {
                    let secret = passphrase("KITH_EXPORT_PASSPHRASE", None, "Export passphrase", true)?;
                    store.export(ExportTo::Passphrase(&secret)).await?
                }
            };
            write_export(&file, &bytes).with_context(|| format!("writing {}", file.display()))?;
            eprintln!(
                "Exported {} conversations, {} messages, {} memories, {} settings to {}.",
                summary.conversations,
                summary.messages,
                summary.memories,
                summary.settings,
                file.display()
            );
        }
        MemoryCommand::Import { file, identity } => {
            let reader = std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
            let summary = match identity {
                Some(path) => {
                    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                    let identity = text
                        .lines()
                        .find(|line| line.starts_with("AGE-SECRET-KEY-"))
                        .context("no AGE-SECRET-KEY line in the identity file")?
                        .parse::<x25519::Identity>()
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                    store.import(reader, ImportWith::Identity(&identity)).await?
                }
                None => {
                    let secret = passphrase("KITH_EXPORT_PASSPHRASE", None, "Export passphrase", false)?;
                    store.import(reader, ImportWith::Passphrase(&secret)).await?
                }
            };
            eprintln!(
                "Imported {} conversations, {} messages, {} memories, {} settings.",
                summary.conversations, summary.messages, summary.memories, summary.settings
            );
        }
    }
    store.close().await;
    Ok(ExitCode::SUCCESS)
}

/// The sentence encoder, when its model is pulled; `None` otherwise (with a note on
/// stderr when `note`).
pub(crate) fn load_embedder(note: bool) -> Result<Option<Embedder>> {
    let catalog = Catalog::builtin()?;
    let models = Store::from_env()?;
    let entry = catalog.get(EMBEDDING_MODEL).context("the catalog has no embedding model")?;
    let Some(path) = models.installed_path(entry) else {
        if !note {
            return Ok(None);
        }
        eprintln!(
            "note: {EMBEDDING_MODEL} is not pulled, so recall matches words only; `kith models pull {EMBEDDING_MODEL}` adds search by meaning"
        );
        return Ok(None);
    };
    let dir = path.parent().context("model directory")?;
    Ok(Some(Embedder::load(dir).with_context(|| format!("loading {EMBEDDING_MODEL}"))?))
}

/// Builds the recall index (embedding what has no vector yet) and prints the best hits.
async fn search(store: &MemoryStore, query: &str, limit: usize, json: bool) -> Result<()> {
    let items = store.recall_items().await?;
    for damaged in &items.damaged {
        eprintln!("warning: not searched: {damaged}");
    }
    let mut index = RecallIndex::build(items.items);
    let embedder = load_embedder(true)?;
    let query_vector = match &embedder {
        Some(embedder) => {
            embed_missing(store, &mut index, embedder).await?;
            Some(embedder.embed_one(query)?)
        }
        None => None,
    };
    let hits = index.recall(query, query_vector.as_deref(), limit);
    if json {
        let hits: Vec<serde_json::Value> = hits.iter().map(hit_json).collect();
        println!("{}", serde_json::to_string_pretty(&hits)?);
        return Ok(());
    }
    if hits.is_empty() {
        eprintln!("Nothing found.");
    }
    for hit in &hits {
        let place = match (hit.item.kind, hit.conversation_id) {
            (ItemKind::Message, Some(chat)) => {
                format!("message {} (chat {chat}, {})", hit.item.id, hit.role.as_deref().unwrap_or("?"))
            }
            _ => format!("memory {}", hit.item.id),
        };
        println!("{:.2}  {place:<28}  {}", hit.score, one_line(&hit.text, 100));
    }
    Ok(())
}

/// Embeds (and saves) every indexed item that has no vector yet, e.g. chats saved before
/// the embedding model was pulled; a progress bar when there are many.
async fn embed_missing(store: &MemoryStore, index: &mut RecallIndex, embedder: &Embedder) -> Result<()> {
    let missing: Vec<(ItemRef, String)> =
        index.missing_embeddings().into_iter().map(|(item, text)| (item, text.to_owned())).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let bar = (missing.len() > 64).then(|| {
        eprintln!("Embedding {} memories and messages for search by meaning (once)…", missing.len());
        crate::progress::count_bar(missing.len() as u64, "embedded")
    });
    for chunk in missing.chunks(64) {
        let texts: Vec<&str> = chunk.iter().map(|(_, text)| text.as_str()).collect();
        let vectors = embedder.embed(&texts)?;
        let pairs: Vec<(ItemRef, Vec<f32>)> = chunk.iter().map(|(item, _)| *item).zip(vectors).collect();
        store.set_embeddings(&pairs).await?;
        for (item, vector) in &pairs {
            index.set_embedding(*item, &QuantizedVector::quantize(vector));
        }
        if let Some(bar) = &bar {
            bar.inc(chunk.len() as u64);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(())
}

fn hit_json(hit: &Hit) -> serde_json::Value {
    serde_json::json!({
        "kind": hit.item.kind.as_str(),
        "id": hit.item.id,
        "conversation_id": hit.conversation_id,
        "role": hit.role,
        "created_at": hit.created_at,
        "score": hit.score,
        "semantic": hit.semantic,
        "keyword": hit.keyword,
        "text": hit.text,
    })
}

/// The text on one line, cut to `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &flat[..cut]),
        None => flat,
    }
}
