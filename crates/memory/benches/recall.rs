//! Recall over a large history: `cargo bench -p kith-memory --bench recall`.
//!
//! Fills a vault with 100,000 messages (about 60 words each, drawn with a Zipf law from
//! an English vocabulary) and 10,000 memories, every one with a 384-dimension embedding
//! (random unit vectors: the timing does not depend on what they mean). Then, timed:
//! unlock with the passphrase (age's scrypt at its default work factor), open the
//! database, decrypt every row and build the recall index; then 1,000 `recall` top-10
//! queries of 1–4 words with a query vector, reporting p50/p99/max.

use std::time::{Duration, Instant};

use kith_memory::secrecy::SecretString;
use kith_memory::{ConversationMeta, ItemKind, ItemRef, MemoryStore, MessageBody, MessageStats, RecallIndex, Vault};

const MESSAGES: usize = 100_000;
const MEMORIES: usize = 10_000;
const DIM: usize = 384;
const QUERIES: usize = 1_000;

const WORDS: &str = "the of and to a in is you that it he was for on are as with his they I at be this have from \
or one had by word but not what all were we when your can said there use an each which she do how their if will up \
other about out many then them these so some her would make like him into time has look two more write go see number \
no way could people my than first water been call who oil its now find long down day did get come made may part over \
new sound take only little work know place year live me back give most very after thing our just name good sentence \
man think say great where help through much before line right too mean old any same tell boy follow came want show \
also around form three small set put end does another well large must big even such because turn here why ask went \
men read need land different home us move try kind hand picture again change off play spell air away animal house \
point page letter mother answer found study still learn should America world daughter Ada train Lyon metric units \
garden tomato weather spring recipe budget meeting doctor appointment birthday holiday flight hotel password cabin";

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Zipf-like index into `n` words: frequent words first.
    fn zipf(&mut self, n: usize) -> usize {
        ((n as f32).powf(self.unit()) as usize).saturating_sub(1).min(n - 1)
    }
    fn vector(&mut self) -> Vec<f32> {
        let v: Vec<f32> = (0..DIM).map(|_| self.unit() - 0.5).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / norm).collect()
    }
    /// `base` to `base + spread - 1` words.
    fn text(&mut self, words: &[&str], base: usize, spread: usize) -> String {
        let count = base + self.zipf(spread);
        (0..count).map(|_| words[self.zipf(words.len())]).collect::<Vec<_>>().join(" ")
    }
}

fn main() {
    let words: Vec<&str> = WORDS.split_whitespace().collect();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let dir = tempfile::tempdir().expect("tempdir");
    let passphrase = SecretString::from("a long enough bench passphrase".to_owned());
    let vault = Vault::new(dir.path());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");

    runtime.block_on(async {
        let key = vault.init(&passphrase, &[]).expect("vault");
        let store = MemoryStore::open(dir.path(), &key).await.expect("open");
        let started = Instant::now();
        let conversation = store
            .create_conversation(&ConversationMeta::new("bench", "none"))
            .await
            .expect("conversation");
        for _ in 0..MESSAGES / 1_000 {
            let batch: Vec<(MessageBody, MessageStats)> = (0..1_000)
                .map(|i| {
                    let role = if i % 2 == 0 { "user" } else { "assistant" };
                    let content = rng.text(&words, 30, 60);
                    (MessageBody { role: role.into(), content, ran_on: None, interrupted: false }, MessageStats::default())
                })
                .collect();
            let ids = store.add_messages(conversation, &batch).await.expect("insert");
            let vectors: Vec<(ItemRef, Vec<f32>)> =
                ids.iter().map(|&id| (ItemRef { kind: ItemKind::Message, id }, rng.vector())).collect();
            store.set_embeddings(&vectors).await.expect("embeddings");
        }
        let mut memories = Vec::with_capacity(MEMORIES);
        for _ in 0..MEMORIES {
            let text = rng.text(&words, 6, 12);
            let id = store.add_memory(&text, None, false).await.expect("memory");
            memories.push((ItemRef { kind: ItemKind::Memory, id }, rng.vector()));
        }
        store.set_embeddings(&memories).await.expect("embeddings");
        store.close().await;
        drop(key);
        let size = std::fs::metadata(dir.path().join("memory.db")).map(|m| m.len()).unwrap_or(0);
        println!(
            "filled {MESSAGES} messages + {MEMORIES} memories with {DIM}-d embeddings in {:.1} s; database {:.1} MiB",
            started.elapsed().as_secs_f64(),
            size as f64 / (1 << 20) as f64
        );

        let started = Instant::now();
        let key = vault.unlock(&passphrase).expect("unlock");
        let unlocked = started.elapsed();
        let store = MemoryStore::open(dir.path(), &key).await.expect("reopen");
        let opened = started.elapsed();
        let items = store.recall_items().await.expect("decrypt");
        assert!(items.damaged.is_empty());
        let decrypted = started.elapsed();
        let index = RecallIndex::build(items.items);
        let built = started.elapsed();
        assert_eq!(index.len(), MESSAGES + MEMORIES);
        println!(
            "unlock + decrypt + index: {:.2} s (unlock {:.2} s, open {:.2} s, read + decrypt {:.2} s, index {:.2} s)",
            built.as_secs_f64(),
            unlocked.as_secs_f64(),
            (opened - unlocked).as_secs_f64(),
            (decrypted - opened).as_secs_f64(),
            (built - decrypted).as_secs_f64(),
        );

        let mut times: Vec<Duration> = Vec::with_capacity(QUERIES);
        let mut found = 0;
        for _ in 0..QUERIES {
            let query = rng.text(&words, 1, 4);
            let vector = rng.vector();
            let started = Instant::now();
            let hits = index.recall(&query, Some(&vector), 10);
            times.push(started.elapsed());
            found += hits.len();
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "recall top-10 over {} items, {QUERIES} queries: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({:.1} hits/query)",
            index.len(),
            ms(times[QUERIES / 2]),
            ms(times[QUERIES * 99 / 100]),
            ms(times[QUERIES - 1]),
            found as f64 / QUERIES as f64
        );
        store.close().await;
    });
}
