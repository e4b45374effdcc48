//! Recall: an in-memory index over the unlocked vault's memories and messages, searched
//! by meaning (sentence embeddings) and by words (BM25), and nothing of it on disk.
//!
//! Vectors are kept as int8 with one f32 scale each (unit vectors lose nothing that
//! changes a ranking: cosine error below 0.01), a quarter of the f32 size: 100,000 items
//! of 384 dimensions take 38 MiB. A query scores every vector (a dot product of int8s,
//! about a millisecond for 100,000 items) and the BM25 postings of its words; the two are
//! blended into one score. The index is dropped with the store's key: texts, words and
//! vectors are zeroized then.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use zeroize::Zeroize;

/// Weight of meaning against words in a blended score (both in 0..=1).
const SEMANTIC_WEIGHT: f32 = 0.7;
/// BM25 parameters (the usual ones).
const BM25_K1: f32 = 1.2;
const BM25_B: f32 = 0.75;

/// What kind of row an indexed item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ItemKind {
    /// A long-term memory.
    Memory,
    /// A message of a conversation.
    Message,
}

impl ItemKind {
    /// `memory` or `message`.
    pub fn as_str(self) -> &'static str {
        match self {
            ItemKind::Memory => "memory",
            ItemKind::Message => "message",
        }
    }
}

/// A memory or message row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItemRef {
    /// Which table.
    pub kind: ItemKind,
    /// Its row id.
    pub id: i64,
}

/// A sentence embedding as stored: int8 components and the scale that maps them back.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedVector {
    scale: f32,
    values: Vec<i8>,
}

impl QuantizedVector {
    /// Symmetric int8 quantization (`scale = max |v| / 127`).
    pub fn quantize(vector: &[f32]) -> Self {
        let max = vector.iter().fold(0.0f32, |m, v| if v.is_finite() { m.max(v.abs()) } else { m });
        if max == 0.0 {
            return Self { scale: 0.0, values: vec![0; vector.len()] };
        }
        let scale = max / 127.0;
        let values = vector
            .iter()
            .map(|v| if v.is_finite() { (v / scale).round().clamp(-127.0, 127.0) as i8 } else { 0 })
            .collect();
        Self { scale, values }
    }

    /// Back to f32.
    pub fn dequantize(&self) -> Vec<f32> {
        self.values.iter().map(|&v| f32::from(v) * self.scale).collect()
    }

    /// Number of components.
    pub fn dim(&self) -> usize {
        self.values.len()
    }

    /// `scale` (f32 little-endian) then the components: the sealed form.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(4 + self.values.len());
        bytes.extend_from_slice(&self.scale.to_le_bytes());
        bytes.extend(self.values.iter().map(|&v| v as u8));
        bytes
    }

    /// Parses [`to_bytes`](Self::to_bytes)' output; `None` when it cannot be one.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let (scale, values) = bytes.split_first_chunk::<4>()?;
        let scale = f32::from_le_bytes(*scale);
        (scale.is_finite() && scale >= 0.0 && !values.is_empty())
            .then(|| Self { scale, values: values.iter().map(|&b| b as i8).collect() })
    }
}

impl Drop for QuantizedVector {
    fn drop(&mut self) {
        self.values.zeroize();
    }
}

/// One decrypted row, ready to index.
#[derive(Debug, Clone)]
pub struct RecallItem {
    /// Which row.
    pub item: ItemRef,
    /// The conversation of a message.
    pub conversation_id: Option<i64>,
    /// Unix milliseconds.
    pub created_at: i64,
    /// A message's role (`user`, `assistant`, `system`).
    pub role: Option<String>,
    /// The text.
    pub text: String,
    /// Its embedding, when computed.
    pub embedding: Option<QuantizedVector>,
}

impl Drop for RecallItem {
    fn drop(&mut self) {
        self.text.zeroize();
    }
}

/// A recalled item and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// Which row.
    pub item: ItemRef,
    /// The conversation of a message.
    pub conversation_id: Option<i64>,
    /// Unix milliseconds.
    pub created_at: i64,
    /// A message's role.
    pub role: Option<String>,
    /// The text.
    pub text: String,
    /// The blended score in 0..=1: `0.7 × semantic + 0.3 × keyword` when the query has
    /// a vector, the keyword score alone otherwise.
    pub score: f32,
    /// Cosine similarity to the query (None without a query vector or item embedding).
    pub semantic: Option<f32>,
    /// BM25 relative to the best keyword match of this query (0..=1).
    pub keyword: f32,
}

impl Drop for Hit {
    fn drop(&mut self) {
        self.text.zeroize();
    }
}

struct Entry {
    item: ItemRef,
    conversation_id: Option<i64>,
    created_at: i64,
    role: Option<String>,
    text: String,
    alive: bool,
    words: u32,
}

/// The in-memory recall index of one unlocked store.
#[derive(Default)]
pub struct RecallIndex {
    entries: Vec<Entry>,
    slots: HashMap<ItemRef, u32, BuildWordHasher>,
    /// Vector length; 0 until the first embedding arrives.
    dim: usize,
    /// `entries.len() × dim` int8 components (zeros where an item has no embedding).
    vectors: Vec<i8>,
    /// Per entry; 0 means "no embedding".
    scales: Vec<f32>,
    /// Word → (entry, count in the entry).
    postings: HashMap<String, Vec<(u32, u32)>, BuildWordHasher>,
    live: usize,
    live_words: u64,
}

impl std::fmt::Debug for RecallIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecallIndex")
            .field("items", &self.live)
            .field("dim", &self.dim)
            .field("words", &self.postings.len())
            .finish_non_exhaustive()
    }
}

impl RecallIndex {
    /// Indexes `items`.
    pub fn build(items: Vec<RecallItem>) -> Self {
        // Splitting texts into words is most of the work: do it on every core, then merge.
        let words = crate::par::map(&items, |item| split_words(&item.text));
        let mut index = Self::default();
        for (item, words) in items.into_iter().zip(words) {
            index.insert_split(item, &words);
        }
        index
    }

    /// Items indexed.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Items without an embedding (searchable by words only), as (row, text).
    pub fn missing_embeddings(&self) -> Vec<(ItemRef, &str)> {
        self.entries
            .iter()
            .zip(&self.scales)
            .filter(|(entry, scale)| entry.alive && **scale == 0.0)
            .map(|(entry, _)| (entry.item, entry.text.as_str()))
            .collect()
    }

    /// Whether a memory with this text (ignoring case) is indexed.
    pub fn has_memory_text(&self, text: &str) -> bool {
        self.entries
            .iter()
            .any(|entry| entry.alive && entry.item.kind == ItemKind::Memory && entry.text.eq_ignore_ascii_case(text))
    }

    /// Adds an item, replacing the one with the same row if indexed.
    pub fn insert(&mut self, item: RecallItem) {
        let words = split_words(&item.text);
        self.insert_split(item, &words);
    }

    fn insert_split(&mut self, mut item: RecallItem, split: &Words) {
        self.remove(item.item);
        let slot = self.entries.len() as u32;
        let mut words = 0u32;
        for word in split.iter() {
            words += 1;
            match self.postings.get_mut(word) {
                // A repeated word of this entry: count it again.
                Some(list) if list.last().is_some_and(|last| last.0 == slot) => {
                    if let Some(last) = list.last_mut() {
                        last.1 += 1;
                    }
                }
                Some(list) => list.push((slot, 1)),
                None => {
                    self.postings.insert(word.to_owned(), vec![(slot, 1)]);
                }
            }
        }
        self.entries.push(Entry {
            item: item.item,
            conversation_id: item.conversation_id,
            created_at: item.created_at,
            role: item.role.take(),
            text: std::mem::take(&mut item.text),
            alive: true,
            words,
        });
        self.slots.insert(item.item, slot);
        self.live += 1;
        self.live_words += u64::from(words);
        self.scales.push(0.0);
        self.vectors.resize(self.entries.len() * self.dim, 0);
        if let Some(vector) = item.embedding.take() {
            self.put_vector(slot, &vector);
        }
    }

    /// Sets or replaces an indexed item's embedding; false if the item is not indexed.
    pub fn set_embedding(&mut self, item: ItemRef, vector: &QuantizedVector) -> bool {
        match self.slots.get(&item) {
            Some(&slot) => {
                self.put_vector(slot, vector);
                true
            }
            None => false,
        }
    }

    fn put_vector(&mut self, slot: u32, vector: &QuantizedVector) {
        if self.dim == 0 && vector.dim() > 0 {
            self.dim = vector.dim();
            self.vectors = vec![0; self.entries.len() * self.dim];
        }
        if vector.dim() != self.dim {
            tracing::warn!(expected = self.dim, found = vector.dim(), "embedding of another size; not indexed");
            return;
        }
        let at = slot as usize * self.dim;
        self.vectors[at..at + self.dim].copy_from_slice(&vector.values);
        self.scales[slot as usize] = vector.scale;
    }

    /// Drops an item; whether it was indexed.
    pub fn remove(&mut self, item: ItemRef) -> bool {
        let Some(slot) = self.slots.remove(&item) else { return false };
        let slot = slot as usize;
        let entry = &mut self.entries[slot];
        entry.alive = false;
        entry.text.zeroize();
        self.live -= 1;
        self.live_words -= u64::from(entry.words);
        self.scales[slot] = 0.0;
        self.vectors[slot * self.dim..(slot + 1) * self.dim].zeroize();
        true
    }

    /// Drops every message of a conversation; how many.
    pub fn remove_conversation(&mut self, conversation_id: i64) -> usize {
        let doomed: Vec<ItemRef> = self
            .entries
            .iter()
            .filter(|e| e.alive && e.item.kind == ItemKind::Message && e.conversation_id == Some(conversation_id))
            .map(|e| e.item)
            .collect();
        doomed.into_iter().filter(|&item| self.remove(item)).count()
    }

    /// The `k` items that best match `query`, best first. `query_vector` is the query's
    /// embedding (same model as the items'); without it only words count.
    pub fn recall(&self, query: &str, query_vector: Option<&[f32]>, k: usize) -> Vec<Hit> {
        if k == 0 || self.live == 0 {
            return Vec::new();
        }
        let keyword = self.bm25(query);
        let best_keyword = keyword.iter().copied().fold(0.0f32, f32::max);
        let query_vector = query_vector.filter(|v| self.dim > 0 && v.len() == self.dim).map(QuantizedVector::quantize);

        // Every live entry is scored; each core keeps the best k of its share.
        let shares = crate::par::ranges(self.entries.len(), |range| {
            let mut top: BinaryHeap<Reverse<Scored>> = BinaryHeap::with_capacity(k + 1);
            for slot in range {
                if !self.entries[slot].alive {
                    continue;
                }
                let keyword = if best_keyword > 0.0 { keyword[slot] / best_keyword } else { 0.0 };
                let semantic = query_vector.as_ref().and_then(|q| self.cosine(slot, q));
                let score = match &query_vector {
                    Some(_) => SEMANTIC_WEIGHT * semantic.unwrap_or(0.0).max(0.0) + (1.0 - SEMANTIC_WEIGHT) * keyword,
                    None => keyword,
                };
                if score <= 0.0 {
                    continue;
                }
                let candidate = Scored { score, slot: slot as u32, semantic, keyword };
                if top.len() < k {
                    top.push(Reverse(candidate));
                } else if top.peek().is_some_and(|Reverse(worst)| candidate > *worst) {
                    top.pop();
                    top.push(Reverse(candidate));
                }
            }
            top
        });
        let mut hits: Vec<Scored> = shares.into_iter().flatten().map(|Reverse(s)| s).collect();
        hits.sort_by(|a, b| b.cmp(a));
        hits.truncate(k);
        hits.into_iter()
            .map(|s| {
                let entry = &self.entries[s.slot as usize];
                Hit {
                    item: entry.item,
                    conversation_id: entry.conversation_id,
                    created_at: entry.created_at,
                    role: entry.role.clone(),
                    text: entry.text.clone(),
                    score: s.score,
                    semantic: s.semantic,
                    keyword: s.keyword,
                }
            })
            .collect()
    }

    fn cosine(&self, slot: usize, query: &QuantizedVector) -> Option<f32> {
        let scale = self.scales[slot];
        if scale == 0.0 {
            return None;
        }
        let row = &self.vectors[slot * self.dim..(slot + 1) * self.dim];
        let dot: i32 = row.iter().zip(&query.values).map(|(&a, &b)| i32::from(a) * i32::from(b)).sum();
        Some(dot as f32 * scale * query.scale)
    }

    /// BM25 of every entry for the query's words (0 where none occurs).
    fn bm25(&self, query: &str) -> Vec<f32> {
        let mut scores = vec![0.0f32; self.entries.len()];
        let n = self.live as f32;
        let average = (self.live_words as f32 / n.max(1.0)).max(1.0);
        for (word, _) in split_words(query).counted() {
            let Some(list) = self.postings.get(word) else { continue };
            let live: Vec<&(u32, u32)> = list.iter().filter(|(slot, _)| self.entries[*slot as usize].alive).collect();
            if live.is_empty() {
                continue;
            }
            let df = live.len() as f32;
            let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
            for &&(slot, count) in &live {
                let tf = count as f32;
                let length = self.entries[slot as usize].words as f32;
                scores[slot as usize] +=
                    idf * tf * (BM25_K1 + 1.0) / (tf + BM25_K1 * (1.0 - BM25_B + BM25_B * length / average));
            }
        }
        scores
    }
}

impl Drop for RecallIndex {
    fn drop(&mut self) {
        for entry in &mut self.entries {
            entry.text.zeroize();
        }
        self.vectors.zeroize();
        for (mut word, _) in self.postings.drain() {
            word.zeroize();
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Scored {
    score: f32,
    slot: u32,
    semantic: Option<f32>,
    keyword: f32,
}

impl PartialEq for Scored {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scored {
    /// By score; on a tie the newer row (higher slot) ranks higher.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score.total_cmp(&other.score).then(self.slot.cmp(&other.slot))
    }
}

/// A fast non-cryptographic hash (FxHash's multiply-rotate) for the index's own maps:
/// their keys are the user's words and row ids, not attacker-chosen, and SipHash would
/// be a third of the build time.
#[derive(Default, Clone, Copy)]
struct BuildWordHasher;

impl std::hash::BuildHasher for BuildWordHasher {
    type Hasher = WordHasher;
    fn build_hasher(&self) -> WordHasher {
        WordHasher(0)
    }
}

struct WordHasher(u64);

impl WordHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl std::hash::Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let mut tail = [0u8; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.add(u64::from_le_bytes(tail));
    }
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    fn write_i64(&mut self, n: i64) {
        self.add(n as u64);
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A text's lower-cased words: runs of letters and digits; each CJK character is a word
/// of its own (those scripts do not separate words by spaces). The words are ranges of
/// one lower-cased copy: one allocation per text.
struct Words {
    lower: String,
    spans: Vec<(u32, u32)>,
}

impl Words {
    /// Every word, in order, repeats included.
    fn iter(&self) -> impl Iterator<Item = &str> {
        self.spans.iter().map(|&(start, end)| &self.lower[start as usize..end as usize])
    }

    /// Each distinct word and how often it occurs, sorted.
    fn counted(&self) -> Vec<(&str, u32)> {
        let mut words: Vec<&str> = self.iter().collect();
        words.sort_unstable();
        let mut counts: Vec<(&str, u32)> = Vec::with_capacity(words.len());
        for word in words {
            match counts.last_mut() {
                Some((last, count)) if *last == word => *count += 1,
                _ => counts.push((word, 1)),
            }
        }
        counts
    }
}

impl Drop for Words {
    fn drop(&mut self) {
        self.lower.zeroize();
    }
}

fn split_words(text: &str) -> Words {
    let lower = if text.is_ascii() { text.to_ascii_lowercase() } else { text.to_lowercase() };
    let mut spans: Vec<(u32, u32)> = Vec::new();
    let mut start = None;
    for (at, c) in lower.char_indices() {
        let at = at as u32;
        if c.is_ascii() {
            if c.is_ascii_alphanumeric() {
                start.get_or_insert(at);
            } else if let Some(s) = start.take() {
                spans.push((s, at));
            }
        } else if is_cjk(c) {
            if let Some(s) = start.take() {
                spans.push((s, at));
            }
            spans.push((at, at + c.len_utf8() as u32));
        } else if c.is_alphanumeric() {
            start.get_or_insert(at);
        } else if let Some(s) = start.take() {
            spans.push((s, at));
        }
    }
    if let Some(s) = start {
        spans.push((s, lower.len() as u32));
    }
    Words { lower, spans }
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32, 0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xAC00..=0xD7AF | 0xF900..=0xFAFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(kind: ItemKind, id: i64, text: &str, vector: Option<&[f32]>) -> RecallItem {
        RecallItem {
            item: ItemRef { kind, id },
            conversation_id: (kind == ItemKind::Message).then_some(7),
            created_at: id,
            role: None,
            text: text.into(),
            embedding: vector.map(QuantizedVector::quantize),
        }
    }

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn quantization_round_trips_and_keeps_cosines() {
        let a = unit(&[0.3, -0.2, 0.9, 0.01, -0.5]);
        let q = QuantizedVector::quantize(&a);
        assert_eq!(QuantizedVector::from_bytes(&q.to_bytes()), Some(q.clone()));
        assert_eq!(QuantizedVector::quantize(&q.dequantize()), q, "re-quantizing is idempotent");
        let back = q.dequantize();
        let cos: f32 = a.iter().zip(&back).map(|(x, y)| x * y).sum();
        assert!(cos > 0.9999, "{cos}");
        assert_eq!(QuantizedVector::from_bytes(&[1, 2, 3]), None);
        assert_eq!(QuantizedVector::from_bytes(&f32::NAN.to_le_bytes()), None);
    }

    #[test]
    fn words_are_lowercased_counted_and_split_cjk() {
        let split = split_words("Ada, ada! The café—東京 x2");
        let words = split.counted();
        assert_eq!(words, vec![("ada", 2), ("café", 1), ("the", 1), ("x2", 1), ("京", 1), ("東", 1)]);
    }

    #[test]
    fn keyword_only_ranks_by_bm25() {
        let index = RecallIndex::build(vec![
            item(ItemKind::Memory, 1, "my daughter is called Ada", None),
            item(ItemKind::Message, 2, "the weather is nice", None),
            item(ItemKind::Message, 3, "Ada Ada Ada loves trains", None),
        ]);
        let hits = index.recall("ada", None, 10);
        let ids: Vec<i64> = hits.iter().map(|h| h.item.id).collect();
        assert_eq!(ids, vec![3, 1], "weather does not match; more occurrences rank higher");
        assert_eq!(hits[0].score, 1.0);
        assert!(hits[1].score < 1.0 && hits[1].score > 0.0);
        assert_eq!(hits[0].semantic, None);
        assert!(index.recall("nothing matches", None, 10).is_empty());
    }

    #[test]
    fn meaning_outranks_words_and_scores_blend() {
        let q = unit(&[1.0, 0.0, 0.2]);
        let index = RecallIndex::build(vec![
            item(ItemKind::Memory, 1, "completely different words", Some(&unit(&[1.0, 0.05, 0.2]))),
            item(ItemKind::Message, 2, "query word", Some(&unit(&[0.0, 1.0, 0.0]))),
            item(ItemKind::Message, 3, "no vector but query word", None),
        ]);
        let hits = index.recall("query word", Some(&q), 3);
        assert_eq!(hits[0].item.id, 1, "{hits:?}");
        assert!(hits[0].semantic.is_some_and(|s| s > 0.99));
        assert_eq!(hits[0].keyword, 0.0);
        let by_id = |id| hits.iter().find(|h| h.item.id == id).expect("hit");
        assert_eq!(by_id(3).semantic, None);
        assert!((by_id(3).score - 0.3 * by_id(3).keyword).abs() < 1e-6);
        for hit in &hits {
            assert!((0.0..=1.0).contains(&hit.score), "{hit:?}");
        }
        // A vector of another length is ignored, not an error.
        assert!(index.recall("query", Some(&[1.0, 0.0]), 3).iter().all(|h| h.semantic.is_none()));
    }

    #[test]
    fn top_k_is_sorted_and_bounded() {
        let items = (0..100).map(|i| item(ItemKind::Message, i, &"ada ".repeat(1 + i as usize % 7), None));
        let index = RecallIndex::build(items.collect());
        let hits = index.recall("ada", None, 5);
        assert_eq!(hits.len(), 5);
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    }

    #[test]
    fn insert_remove_and_replace() {
        let mut index = RecallIndex::build(vec![
            item(ItemKind::Memory, 1, "ada", None),
            item(ItemKind::Message, 1, "ada too", None),
            item(ItemKind::Message, 2, "ada three", None),
        ]);
        assert_eq!(index.len(), 3, "a memory and a message may share a row id");
        assert!(index.remove(ItemRef { kind: ItemKind::Memory, id: 1 }));
        assert!(!index.remove(ItemRef { kind: ItemKind::Memory, id: 1 }));
        assert_eq!(index.recall("ada", None, 10).len(), 2);
        assert_eq!(index.remove_conversation(7), 2);
        assert!(index.is_empty());
        assert!(index.recall("ada", None, 10).is_empty());

        index.insert(item(ItemKind::Memory, 5, "old text", None));
        index.insert(item(ItemKind::Memory, 5, "new text", None));
        assert_eq!(index.len(), 1);
        assert!(index.recall("old", None, 10).is_empty());
        assert_eq!(index.missing_embeddings().len(), 1);
        let v = QuantizedVector::quantize(&unit(&[1.0, 2.0]));
        assert!(index.set_embedding(ItemRef { kind: ItemKind::Memory, id: 5 }, &v));
        assert!(index.missing_embeddings().is_empty());
        assert!(index.recall("zzz", Some(&unit(&[1.0, 2.0])), 1)[0].semantic.is_some_and(|s| s > 0.99));
    }
}
