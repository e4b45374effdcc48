//! `kith memory`: long-term memories and export/import.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use kith_memory::age::x25519;
use kith_memory::{ExportTo, ImportWith, MemoryStore, Vault, write_export};
use kith_models::Store;

use crate::cli::{MemoryArgs, MemoryCommand};
use crate::vault::passphrase;

pub(crate) async fn run(args: MemoryArgs) -> Result<ExitCode> {
    let home = Store::from_env()?.home().to_owned();
    let vault = Vault::new(&home);
    if !vault.exists() {
        bail!("no vault in {}; create one with `kith vault init`", home.display());
    }
    let key = vault
        .unlock(&passphrase("KITH_PASSPHRASE", args.passphrase_file.as_deref(), "Vault passphrase", false)?)
        .context("unlocking the vault")?;
    let store = MemoryStore::open(&home, &key).await.context("opening the memory store")?;
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
            eprintln!("Remembered (id {id}).");
        }
        MemoryCommand::Forget { id } => {
            if !store.forget_memory(id).await? {
                bail!("no memory with id {id}");
            }
            eprintln!("Forgotten.");
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
