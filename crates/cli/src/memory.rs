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
    if let Some(remote) = crate::remote::connect(&home).await? {
        match args.command {
            MemoryCommand::Import { .. } => bail!(
                "a node is running at {} with this vault open; stop it before importing (or use --no-node to import anyway, then restart it)",
                remote.url()
            ),
            MemoryCommand::Export { .. } => {} // a read: in-process is fine
            command => {
                if !remote.has_memory() {
                    bail!(
                        "the node running at {} has no unlocked vault (started with --no-memory?); use --no-node to open the vault here",
                        remote.url()
                    );
                }
                return through(&remote, command).await;
            }
        }
    }
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
                    "{:>6}  {:>4} messages  {:<15}  {}  {}",
                    conversation.id,
                    messages.items.len(),
                    conversation.meta.privacy,
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
        MemoryCommand::Review { list } => {
            let mut reviewer = Reviewer::Local { store: &store, embedder: None };
            review(&mut reviewer, list).await?;
        }
        MemoryCommand::Forget { id: None, conversation, with_memories } => {
            let conversation = conversation.context("give a memory id or --conversation ID")?;
            let from_it = store.conversation_memories(conversation).await?.len();
            let with_memories = with_memories || offer_to_forget(from_it)?;
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

/// Whether to forget the `count` memories that came from a conversation being deleted:
/// asked on a terminal, otherwise no (with a note).
fn offer_to_forget(count: usize) -> Result<bool> {
    use std::io::IsTerminal;
    if count == 0 {
        return Ok(false);
    }
    if !std::io::stdin().is_terminal() {
        eprintln!("note: {count} memories came from this conversation and are kept (--with-memories forgets them too)");
        return Ok(false);
    }
    eprint!("{count} memories came from this conversation. Forget them too? [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).context("reading the answer")?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

/// Where review decisions go: the vault opened here, or a running node.
enum Reviewer<'a> {
    Local { store: &'a MemoryStore, embedder: Option<Option<Box<Embedder>>> },
    Remote(&'a crate::remote::Remote),
}

impl Reviewer<'_> {
    async fn queue(&self) -> Result<Vec<(i64, String)>> {
        match self {
            Reviewer::Local { store, .. } => {
                let listing = store.candidates().await?;
                for damaged in &listing.damaged {
                    eprintln!("warning: {damaged}");
                }
                Ok(listing.items.into_iter().map(|c| (c.id, c.text)).collect())
            }
            Reviewer::Remote(remote) => Ok(remote
                .all_pages("/api/memories/review")
                .await?
                .iter()
                .map(|c| (c["id"].as_i64().unwrap_or(0), c["text"].as_str().unwrap_or_default().to_owned()))
                .collect()),
        }
    }

    /// Keeps (with `text` when edited) or, with `discard`, drops a suggestion; the kept
    /// memory's id.
    async fn decide(&mut self, id: i64, text: Option<String>, discard: bool) -> Result<Option<i64>> {
        match self {
            Reviewer::Local { store, embedder } => {
                if discard {
                    store.discard_candidate(id).await?;
                    return Ok(None);
                }
                let (memory, text) = store.keep_candidate(id, text.as_deref()).await?;
                if embedder.is_none() {
                    *embedder = Some(load_embedder(false)?.map(Box::new));
                }
                if let Some(Some(embedder)) = embedder {
                    let vector = embedder.embed_one(&text)?;
                    store.set_embedding(ItemRef { kind: ItemKind::Memory, id: memory }, &vector).await?;
                }
                Ok(Some(memory))
            }
            Reviewer::Remote(remote) => {
                let body = match (discard, text) {
                    (true, _) => serde_json::json!({ "action": "discard" }),
                    (false, None) => serde_json::json!({ "action": "keep" }),
                    (false, Some(text)) => serde_json::json!({ "action": "edit", "text": text }),
                };
                let reviewed =
                    remote.send(reqwest::Method::POST, &format!("/api/memories/review/{id}"), Some(&body)).await?;
                Ok(reviewed["memory_id"].as_i64())
            }
        }
    }
}

/// `kith memory review`: one suggestion at a time, answered k(eep), e(dit), d(iscard),
/// s(kip) or q(uit) on stdin.
async fn review(reviewer: &mut Reviewer<'_>, list: bool) -> Result<()> {
    let queue = reviewer.queue().await?;
    if queue.is_empty() {
        eprintln!("No suggested memories to review.");
        return Ok(());
    }
    if list {
        for (id, text) in &queue {
            println!("{id:>6}  {text}");
        }
        return Ok(());
    }
    let mut lines = std::io::stdin().lines();
    let (mut kept, mut discarded) = (0, 0);
    eprintln!("{} suggested memories. For each: [k]eep, [e]dit, [d]iscard, [s]kip, [q]uit.", queue.len());
    for (id, text) in queue {
        println!("{text}");
        let decision = loop {
            eprint!("  keep/edit/discard/skip/quit? ");
            let Some(line) = lines.next().transpose().context("reading stdin")? else { break "q".to_owned() };
            let answer = line.trim().to_lowercase();
            if ["k", "keep", "e", "edit", "d", "discard", "s", "skip", "q", "quit"].contains(&answer.as_str()) {
                break answer;
            }
        };
        match decision.chars().next() {
            Some('k') => {
                let memory = reviewer.decide(id, None, false).await?;
                kept += 1;
                eprintln!("  kept (memory {})", memory.unwrap_or_default());
            }
            Some('e') => {
                eprint!("  new text: ");
                let edited = lines.next().transpose().context("reading stdin")?.unwrap_or_default();
                if edited.trim().is_empty() {
                    eprintln!("  empty: skipped");
                    continue;
                }
                let memory = reviewer.decide(id, Some(edited.trim().to_owned()), false).await?;
                kept += 1;
                eprintln!("  kept as edited (memory {})", memory.unwrap_or_default());
            }
            Some('d') => {
                reviewer.decide(id, None, true).await?;
                discarded += 1;
                eprintln!("  discarded");
            }
            Some('s') => {}
            _ => break,
        }
    }
    eprintln!("Kept {kept}, discarded {discarded}.");
    Ok(())
}

/// `kith memory …` (but export and import) through a running node.
async fn through(remote: &crate::remote::Remote, command: MemoryCommand) -> Result<ExitCode> {
    use reqwest::Method;
    match command {
        MemoryCommand::List => {
            for memory in remote.all_pages("/api/memories").await? {
                let pinned = if memory["pinned"].as_bool() == Some(true) { "[pinned] " } else { "" };
                println!("{:>6}  {pinned}{}", memory["id"], memory["text"].as_str().unwrap_or_default());
            }
        }
        MemoryCommand::Chats => {
            for chat in remote.all_pages("/api/conversations").await? {
                let text = |key: &str| chat[key].as_str().unwrap_or_default().to_owned();
                println!("{:>6}  {:<15}  {}  {}", chat["id"], text("privacy"), text("model"), text("title"));
            }
        }
        MemoryCommand::Add { text, pin } => {
            let body = serde_json::json!({ "text": text, "pinned": pin });
            let saved = remote.send(Method::POST, "/api/memories", Some(&body)).await?;
            eprintln!("Remembered (id {}).", saved["id"]);
        }
        MemoryCommand::Review { list } => review(&mut Reviewer::Remote(remote), list).await?,
        MemoryCommand::Search { query, limit, json } => {
            let mut url = reqwest::Url::parse("http://node/api/memories/search").context("search URL")?;
            url.query_pairs_mut().append_pair("q", &query).append_pair("k", &limit.to_string());
            let path = format!("{}?{}", url.path(), url.query().unwrap_or_default());
            let hits = remote.get(&path).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&hits)?);
                return Ok(ExitCode::SUCCESS);
            }
            let hits = hits.as_array().cloned().unwrap_or_default();
            if hits.is_empty() {
                eprintln!("Nothing found.");
            }
            for hit in hits {
                let place = match (hit["kind"].as_str(), hit["conversation_id"].as_i64()) {
                    (Some("message"), Some(chat)) => {
                        format!("message {} (chat {chat}, {})", hit["id"], hit["role"].as_str().unwrap_or("?"))
                    }
                    _ => format!("memory {}", hit["id"]),
                };
                let text = hit["text"].as_str().unwrap_or_default();
                println!("{:.2}  {place:<28}  {}", hit["score"].as_f64().unwrap_or(0.0), one_line(text, 100));
            }
        }
        MemoryCommand::Forget { id: Some(id), .. } => {
            remote.send(Method::DELETE, &format!("/api/memories/{id}"), None).await?;
            eprintln!("Forgotten.");
        }
        MemoryCommand::Forget { id: None, conversation, with_memories } => {
            let conversation = conversation.context("give a memory id or --conversation ID")?;
            let detail = remote.get(&format!("/api/conversations/{conversation}")).await?;
            let from_it = detail["memory_ids"].as_array().map_or(0, Vec::len);
            let with_memories = with_memories || offer_to_forget(from_it)?;
            let deleted = remote
                .send(Method::DELETE, &format!("/api/conversations/{conversation}?with_memories={with_memories}"), None)
                .await?;
            eprintln!(
                "Deleted conversation {conversation}{}.",
                if with_memories {
                    format!(" and {} memories that came from it", deleted["memories_deleted"])
                } else {
                    String::new()
                }
            );
        }
        MemoryCommand::Export { .. } | MemoryCommand::Import { .. } => bail!("export and import run in-process"),
    }
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
