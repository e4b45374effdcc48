//! llama.cpp's SentencePiece tokenizer (`llm_tokenizer_spm`), for `llama`-style GGUF
//! vocabularies: no merge table, only the vocabulary and its scores.
//!
//! Text is first cut around the spellings of special tokens (longest first, as
//! `tokenizer_st_partition` does). Each remaining piece has its spaces written as `▁`
//! (with one more in front after a special token, when the vocabulary asks for it),
//! starts as one symbol per character, and then merges the adjacent pair whose joined
//! text is the highest-scoring vocabulary piece, again and again. A symbol left that is
//! no piece becomes its bytes' `<0xNN>` tokens.
//!
//! The vocabulary lives in one byte buffer with an open-addressing index over it: a few
//! MB for Gemma's 262,144 pieces, where a merge table derived from the scores held
//! 514,847 merges and hash maps of ~50 MB.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// GGUF token types that `tokenizer_st_partition` splits out of the text.
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;

/// Token texts in one buffer; token `i` is `bytes[ends[i - 1]..ends[i]]`.
#[derive(Debug, Default)]
pub(crate) struct Texts {
    bytes: Vec<u8>,
    ends: Vec<u32>,
}

impl Texts {
    pub(crate) fn push(&mut self, text: &[u8]) {
        self.bytes.extend_from_slice(text);
        self.ends.push(self.bytes.len() as u32);
    }

    pub(crate) fn get(&self, id: u32) -> &[u8] {
        let id = id as usize;
        match self.ends.get(id) {
            Some(&end) => {
                let start = if id == 0 { 0 } else { self.ends[id - 1] };
                &self.bytes[start as usize..end as usize]
            }
            None => &[],
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    fn shrink(&mut self) {
        self.bytes.shrink_to_fit();
        self.ends.shrink_to_fit();
    }
}

/// Text → id over [`Texts`], open addressing with linear probing (load ≤ 1/2).
#[derive(Debug)]
struct Index {
    slots: Vec<u32>,
    mask: usize,
}

const EMPTY: u32 = u32::MAX;

fn hash(bytes: &[u8]) -> usize {
    // FNV-1a, then a multiply to spread the low bits the mask keeps.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 20) as usize
}

impl Index {
    /// Indexes every text; a text that occurs twice maps to its last id, as llama.cpp's
    /// `token_to_id` does.
    fn new(texts: &Texts) -> Self {
        let size = (texts.len() * 2).next_power_of_two().max(16);
        let mut index = Self { slots: vec![EMPTY; size], mask: size - 1 };
        for id in 0..texts.len() as u32 {
            let text = texts.get(id);
            let mut slot = hash(text) & index.mask;
            loop {
                let held = index.slots[slot];
                if held == EMPTY || texts.get(held) == text {
                    index.slots[slot] = id;
                    break;
                }
                slot = (slot + 1) & index.mask;
            }
        }
        index
    }

    fn get(&self, texts: &Texts, text: &[u8]) -> Option<u32> {
        let mut slot = hash(text) & self.mask;
        loop {
            let held = self.slots[slot];
            if held == EMPTY {
                return None;
            }
            if texts.get(held) == text {
                return Some(held);
            }
            slot = (slot + 1) & self.mask;
        }
    }
}

/// A SentencePiece vocabulary and what encoding needs of it.
#[derive(Debug)]
pub(crate) struct Spm {
    texts: Texts,
    index: Index,
    scores: Vec<f32>,
    /// Special tokens by spelling: id and whether it is a control (or unknown) token,
    /// which stays plain text unless special tokens are parsed.
    specials: HashMap<Vec<u8>, (u32, bool)>,
    /// Lengths of the special spellings that start with each byte, longest first.
    special_lengths: Vec<Vec<usize>>,
    byte_tokens: [Option<u32>; 256],
    add_space_prefix: bool,
}

/// A piece of the text between special tokens, or a special token.
enum Fragment {
    Text(std::ops::Range<usize>),
    Token(u32),
}

impl Spm {
    /// `tokens` are the vocabulary's texts in id order, `types` their GGUF token types.
    pub(crate) fn new(texts: Texts, types: &[i32], scores: Vec<f32>, add_space_prefix: bool) -> Self {
        let mut texts = texts;
        texts.shrink();
        let index = Index::new(&texts);
        let mut specials = HashMap::new();
        let mut special_lengths = vec![Vec::new(); 256];
        for (id, &kind) in types.iter().enumerate() {
            if !matches!(kind, TYPE_CONTROL | TYPE_UNKNOWN | TYPE_USER_DEFINED) {
                continue;
            }
            let text = texts.get(id as u32);
            let Some(&first) = text.first() else { continue };
            specials.entry(text.to_vec()).or_insert((id as u32, kind != TYPE_USER_DEFINED));
            let lengths: &mut Vec<usize> = &mut special_lengths[first as usize];
            if !lengths.contains(&text.len()) {
                lengths.push(text.len());
            }
        }
        for lengths in &mut special_lengths {
            lengths.sort_unstable_by(|a, b| b.cmp(a));
        }
        let mut byte_tokens = [None; 256];
        for (byte, slot) in byte_tokens.iter_mut().enumerate() {
            *slot =
                index.get(&texts, format!("<0x{byte:02X}>").as_bytes()).or_else(|| index.get(&texts, &[byte as u8]));
        }
        Self { texts, index, scores, specials, special_lengths, byte_tokens, add_space_prefix }
    }

    /// Appends the ids of `text` to `out`. With `parse_special` off, control tokens'
    /// spellings are plain text (user-defined ones are always split out, as in llama.cpp).
    pub(crate) fn encode(&self, text: &str, parse_special: bool, out: &mut Vec<u32>) -> Result<(), String> {
        let mut prev_special = true;
        let mut piece = String::new();
        for fragment in self.partition(text.as_bytes(), parse_special) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(range) => {
                    piece.clear();
                    if self.add_space_prefix && prev_special {
                        piece.push('▁');
                    }
                    // Special spellings are whole UTF-8 sequences, so the cuts fall on
                    // character boundaries.
                    let raw = text.get(range).ok_or("a special token cut a character in two")?;
                    for ch in raw.chars() {
                        piece.push(if ch == ' ' { '▁' } else { ch });
                    }
                    self.merge(&piece, out)?;
                    prev_special = false;
                }
            }
        }
        Ok(())
    }

    /// Cuts `text` around special-token spellings as `tokenizer_st_partition` does: the
    /// longest spelling first, each one's occurrences left to right in the text not yet
    /// taken by a longer one.
    fn partition(&self, text: &[u8], parse_special: bool) -> Vec<Fragment> {
        // Every occurrence: (length, id, start).
        let mut found: Vec<(usize, u32, usize)> = Vec::new();
        for start in 0..text.len() {
            for &len in &self.special_lengths[text[start] as usize] {
                let Some(spelling) = text.get(start..start + len) else { continue };
                if let Some(&(id, control)) = self.specials.get(spelling)
                    && (parse_special || !control)
                {
                    found.push((len, id, start));
                }
            }
        }
        found.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        // Accepted occurrences as start → (end, id), none overlapping.
        let mut taken: std::collections::BTreeMap<usize, (usize, u32)> = std::collections::BTreeMap::new();
        for (len, id, start) in found {
            let end = start + len;
            let before = taken.range(..end).next_back().is_some_and(|(_, &(e, _))| e > start);
            if !before {
                taken.insert(start, (end, id));
            }
        }
        let mut fragments = Vec::with_capacity(taken.len() * 2 + 1);
        let mut at = 0;
        for (start, (end, id)) in taken {
            if start > at {
                fragments.push(Fragment::Text(at..start));
            }
            fragments.push(Fragment::Token(id));
            at = end;
        }
        if at < text.len() {
            fragments.push(Fragment::Text(at..text.len()));
        }
        fragments
    }

    /// `llm_tokenizer_spm_session::tokenize` on one piece of text.
    fn merge(&self, text: &str, out: &mut Vec<u32>) -> Result<(), String> {
        let bytes = text.as_bytes();
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, ch)) in text.char_indices().enumerate() {
            let end = start + ch.len_utf8();
            let next = if end == bytes.len() { -1 } else { i as i32 + 1 };
            symbols.push(Symbol { start, len: ch.len_utf8(), prev: i as i32 - 1, next });
        }
        let mut queue = BinaryHeap::new();
        for right in 1..symbols.len() {
            self.push_bigram(&mut queue, bytes, &symbols, right - 1, right);
        }
        while let Some(bigram) = queue.pop() {
            let (left, right) = (bigram.left, bigram.right);
            if symbols[left].len == 0 || symbols[right].len == 0 || symbols[left].len + symbols[right].len != bigram.len
            {
                continue;
            }
            symbols[left].len += symbols[right].len;
            symbols[right].len = 0;
            let next = symbols[right].next;
            symbols[left].next = next;
            if next >= 0 {
                symbols[next as usize].prev = left as i32;
            }
            if symbols[left].prev >= 0 {
                self.push_bigram(&mut queue, bytes, &symbols, symbols[left].prev as usize, left);
            }
            if next >= 0 {
                self.push_bigram(&mut queue, bytes, &symbols, left, next as usize);
            }
        }
        let mut at = if symbols.is_empty() { -1 } else { 0 };
        while at >= 0 {
            let symbol = &symbols[at as usize];
            let piece = &bytes[symbol.start..symbol.start + symbol.len];
            match self.index.get(&self.texts, piece) {
                Some(id) => out.push(id),
                None => {
                    for &byte in piece {
                        out.push(
                            self.byte_tokens[byte as usize]
                                .ok_or_else(|| format!("the vocabulary has no token for byte 0x{byte:02X}"))?,
                        );
                    }
                }
            }
            at = symbol.next;
        }
        Ok(())
    }

    fn push_bigram(&self, queue: &mut BinaryHeap<Bigram>, bytes: &[u8], symbols: &[Symbol], left: usize, right: usize) {
        let start = symbols[left].start;
        let len = symbols[left].len + symbols[right].len;
        if let Some(id) = self.index.get(&self.texts, &bytes[start..start + len]) {
            let score = self.scores.get(id as usize).copied().unwrap_or(0.0);
            queue.push(Bigram { score, left, right, len });
        }
    }
}

struct Symbol {
    start: usize,
    len: usize,
    prev: i32,
    next: i32,
}

/// A candidate merge; the heap pops the highest score, then the leftmost.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then(other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(pieces: &[(&str, f32, i32)], add_space_prefix: bool) -> Spm {
        let mut texts = Texts::default();
        for (text, _, _) in pieces {
            texts.push(text.as_bytes());
        }
        let types: Vec<i32> = pieces.iter().map(|p| p.2).collect();
        let scores = pieces.iter().map(|p| p.1).collect();
        Spm::new(texts, &types, scores, add_space_prefix)
    }

    fn byte_pieces() -> Vec<(String, f32, i32)> {
        (0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0, 6)).collect()
    }

    #[test]
    fn merges_highest_score_first_and_falls_back_to_bytes() {
        let bytes = byte_pieces();
        let mut pieces: Vec<(&str, f32, i32)> = bytes.iter().map(|(t, s, k)| (t.as_str(), *s, *k)).collect();
        let base = pieces.len() as u32;
        // "ab" outranks "bc", so "abc" is "ab" + "c", not "a" + "bc".
        pieces.extend([
            ("a", -1.0, 1),
            ("b", -1.0, 1),
            ("c", -1.0, 1),
            ("ab", -2.0, 1),
            ("bc", -3.0, 1),
            ("▁", -1.0, 1),
            ("<ctl>", 0.0, 3),
            ("\n\n", 0.0, 4),
        ]);
        let spm = vocab(&pieces, true);
        let mut out = Vec::new();
        spm.encode("abc", true, &mut out).expect("encodes");
        assert_eq!(out, [base + 5, base + 3, base + 2]);
        // A character with no piece becomes its UTF-8 bytes.
        out.clear();
        spm.encode("é", true, &mut out).expect("encodes");
        assert_eq!(out, [base + 5, 0xC3, 0xA9]);
        // Control spellings split out only when parsing specials; user-defined always.
        out.clear();
        spm.encode("a<ctl>b\n\n", true, &mut out).expect("encodes");
        assert_eq!(out, [base + 5, base, base + 6, base + 5, base + 1, base + 7]);
        out.clear();
        spm.encode("<ctl>", false, &mut out).expect("encodes");
        assert_eq!(out, [base + 5, 0x3C, base + 2, 0x74, 0x6C, 0x3E], "▁, then a token per character");
        // The longer spelling wins where two overlap.
        out.clear();
        spm.encode("\n\n\n", true, &mut out).expect("encodes");
        assert_eq!(out, [base + 7, base + 5, 0x0A]);
    }

    #[test]
    fn missing_byte_token_is_an_error() {
        let spm = vocab(&[("a", 0.0, 1)], false);
        let mut out = Vec::new();
        let err = spm.encode("ab", true, &mut out).expect_err("no token for b");
        assert!(err.contains("0x62"), "{err}");
    }
}
