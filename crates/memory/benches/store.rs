//! Store throughput: `cargo bench -p kith-memory --bench store`.
//!
//! Inserts 100,000 messages of realistic length (about 400 bytes) in transactions of 1,000,
//! then reopens the store and decrypts them all. Prints messages/s and seconds.

use std::time::Instant;

use kith_memory::secrecy::SecretString;
use kith_memory::{ConversationMeta, MemoryStore, MessageBody, MessageStats, Vault};

const MESSAGES: usize = 100_000;
const BATCH: usize = 1_000;

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let passphrase = SecretString::from("bench".to_owned());
    let key = Vault::new(dir.path()).with_work_factor(4).init(&passphrase, &[]).expect("vault");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let store = MemoryStore::open(dir.path(), &key).await.expect("open");
        let conversation =
            store.create_conversation(&ConversationMeta::new("bench", "none")).await.expect("conversation");
        let text =
            "The quick brown fox jumps over the lazy dog while the assistant explains, at some length, why. ".repeat(4);
        let batch: Vec<(MessageBody, MessageStats)> = (0..BATCH)
            .map(|i| {
                let role = if i % 2 == 0 { "user" } else { "assistant" };
                (
                    MessageBody { role: role.into(), content: text.clone(), ran_on: None, interrupted: false },
                    MessageStats::default(),
                )
            })
            .collect();
        let started = Instant::now();
        for _ in 0..MESSAGES / BATCH {
            store.add_messages(conversation, &batch).await.expect("insert");
        }
        let insert = started.elapsed().as_secs_f64();
        println!(
            "insert: {MESSAGES} messages in {insert:.2} s = {:.0} messages/s (batches of {BATCH})",
            MESSAGES as f64 / insert
        );
        store.close().await;

        let started = Instant::now();
        let store = MemoryStore::open(dir.path(), &key).await.expect("reopen");
        let listing = store.messages(conversation).await.expect("read");
        let read = started.elapsed().as_secs_f64();
        assert_eq!(listing.items.len(), MESSAGES);
        println!("open + decrypt all: {MESSAGES} messages in {read:.2} s");
        let size = std::fs::metadata(dir.path().join("memory.db")).map(|m| m.len()).unwrap_or(0);
        println!("database: {:.1} MiB", size as f64 / (1 << 20) as f64);
    });
}
