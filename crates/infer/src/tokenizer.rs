//! The text ⇄ token-id mapping, built from GGUF metadata (or a `tokenizer.json`) so
//! that ids match llama.cpp's.
//!
//! `llama`-style (SentencePiece) vocabularies are encoded by [`crate::spm`], a port of
//! llama.cpp's own algorithm. `gpt2`-style ones go through the `tokenizers` crate: a
//! byte-level BPE with the pre-tokenizer regexes llama.cpp uses for each
//! `tokenizer.ggml.pre`, its control and user-defined tokens as added tokens so they are
//! split out of the raw text first, as llama.cpp does. A `tokenizer.json` also goes
//! through `tokenizers`.
//!
//! Decoding does not go through `tokenizers`: each id maps to the exact bytes it stands
//! for (byte-level BPE characters mapped back, `▁` as a space, `<0xNN>` byte tokens as
//! that byte), so a streaming decoder can join bytes and cut only at UTF-8 boundaries.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::LoadError;
use crate::gguf::GgufFile;
use crate::spm::{Spm, Texts};

/// GGUF token types (`tokenizer.ggml.token_type`).
const TYPE_NORMAL: i32 = 1;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;

/// Token texts llama.cpp treats as end-of-generation in any vocabulary, besides the ids
/// named in metadata (`llama-vocab.cpp`, the EOG heuristics, FIM pad/repo/sep included).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "</s>",
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];

/// GPT-2's pre-tokenizer regex, llama.cpp's default for BPE vocabularies.
const REGEX_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's (`llama-bpe`), digits in groups of up to three.
const REGEX_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2/3's, single digits.
const REGEX_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A model's tokenizer: encoding, per-token bytes, and its special ids.
pub struct Tokenizer {
    encoder: Encoder,
    /// The bytes each id stands for.
    token_bytes: Texts,
    bos_id: Option<u32>,
    add_bos: bool,
    eog_ids: HashSet<u32>,
}

enum Encoder {
    Spm(Box<Spm>),
    Hf {
        /// Splits control tokens out of the text (`parse_special = true`).
        special: Box<tokenizers::Tokenizer>,
        /// Treats control-token spellings as plain text, made on first use.
        literal: OnceLock<Box<tokenizers::Tokenizer>>,
    },
}

impl Encoder {
    fn hf(tokenizer: tokenizers::Tokenizer) -> Self {
        Self::Hf { special: Box::new(tokenizer), literal: OnceLock::new() }
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

fn tok_err(err: impl std::fmt::Display) -> LoadError {
    LoadError::Tokenizer(err.to_string())
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub(crate) fn from_gguf(gguf: &GgufFile) -> Result<Self, LoadError> {
        let model = gguf.string("tokenizer.ggml.model")?.to_owned();
        let tokens =
            texts(gguf, "tokenizer.ggml.tokens")?.ok_or_else(|| tok_err("the file has no tokenizer.ggml.tokens"))?;
        let n_vocab = tokens.len();
        let types: Vec<i32> = match gguf.array("tokenizer.ggml.token_type")? {
            Some(values) => values.iter().map(|v| v.to_i32().unwrap_or(TYPE_NORMAL)).collect(),
            None => vec![TYPE_NORMAL; n_vocab],
        };
        if types.len() != n_vocab {
            return Err(tok_err(format!("{} token types for {n_vocab} tokens", types.len())));
        }
        let id = |key: &str| -> Result<Option<u32>, LoadError> {
            match gguf.opt_u64(key)? {
                Some(id) if (id as usize) < n_vocab => Ok(Some(id as u32)),
                Some(id) => Err(tok_err(format!("{key} = {id} is outside the {n_vocab}-token vocabulary"))),
                None => Ok(None),
            }
        };
        let bos_id = id("tokenizer.ggml.bos_token_id")?;
        let mut eog_ids: HashSet<u32> = HashSet::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            eog_ids.extend(id(key)?);
        }
        for idx in 0..n_vocab as u32 {
            if EOG_TEXTS.iter().any(|text| text.as_bytes() == tokens.get(idx)) {
                eog_ids.insert(idx);
            }
        }

        let (encoder, token_bytes, add_bos) = match model.as_str() {
            "gpt2" => {
                let merges = string_array(gguf, "tokenizer.ggml.merges")?
                    .ok_or_else(|| tok_err("a gpt2 tokenizer needs tokenizer.ggml.merges"))?;
                let pre = gguf.opt_string("tokenizer.ggml.pre").unwrap_or("default");
                let strings = string_array(gguf, "tokenizer.ggml.tokens")?.unwrap_or_default();
                // Each token's bytes on a second thread while the encoder is built: model
                // load time (SmolLM2's header, tokenizer and template: 5-8 ms less, of 60-85).
                let (token_bytes, encoder) = std::thread::scope(|scope| {
                    let bytes = scope.spawn(|| {
                        let mut token_bytes = Texts::default();
                        for (idx, &kind) in types.iter().enumerate() {
                            let text = tokens.get(idx as u32);
                            match kind {
                                TYPE_CONTROL => token_bytes.push(&[]),
                                TYPE_USER_DEFINED => token_bytes.push(text),
                                _ => token_bytes.push(&byte_level_decode(&String::from_utf8_lossy(text))),
                            }
                        }
                        token_bytes
                    });
                    let encoder = build_byte_level_bpe(&strings, &types, &merges, pre);
                    (bytes.join(), encoder)
                });
                let token_bytes = token_bytes.map_err(|_| tok_err("building the token table panicked"))?;
                let encoder = encoder?;
                (Encoder::hf(encoder), token_bytes, gguf.opt_bool("tokenizer.ggml.add_bos_token").unwrap_or(false))
            }
            "llama" => {
                let scores: Vec<f32> = match gguf.array("tokenizer.ggml.scores")? {
                    Some(values) => values.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
                    None => vec![0.0; n_vocab],
                };
                if scores.len() != n_vocab {
                    return Err(tok_err(format!("{} scores for {n_vocab} tokens", scores.len())));
                }
                let add_space_prefix = gguf.opt_bool("tokenizer.ggml.add_space_prefix").unwrap_or(true);
                let mut token_bytes = Texts::default();
                for (idx, &kind) in types.iter().enumerate() {
                    token_bytes.push(&spm_token_bytes(&String::from_utf8_lossy(tokens.get(idx as u32)), kind));
                }
                let encoder = Encoder::Spm(Box::new(Spm::new(tokens, &types, scores, add_space_prefix)));
                (encoder, token_bytes, gguf.opt_bool("tokenizer.ggml.add_bos_token").unwrap_or(true))
            }
            other => return Err(tok_err(format!("unsupported tokenizer model {other:?} (supported: gpt2, llama)"))),
        };
        Ok(Self { encoder, token_bytes, bos_id, add_bos, eog_ids })
    }

    /// Loads a Hugging Face `tokenizer.json`, keeping the GGUF's special ids.
    pub(crate) fn from_tokenizer_json(path: &Path, from_gguf: &Tokenizer) -> Result<Self, LoadError> {
        let encoder =
            tokenizers::Tokenizer::from_file(path).map_err(|err| tok_err(format!("{}: {err}", path.display())))?;
        // Byte-level BPE shows in the pre-tokenizer or the decoder; only those two small
        // parts are serialized to look, not the whole vocabulary.
        let mentions_byte_level = |json: serde_json::Result<String>| json.is_ok_and(|text| text.contains("ByteLevel"));
        let byte_level = mentions_byte_level(serde_json::to_string(&encoder.get_pre_tokenizer()))
            || mentions_byte_level(serde_json::to_string(&encoder.get_decoder()));
        let vocab = encoder.get_vocab(true);
        let mut token_bytes = vec![Vec::new(); from_gguf.vocab_size().max(vocab.len())];
        let specials: HashSet<String> =
            encoder.get_added_tokens_decoder().values().filter(|t| t.special).map(|t| t.content.clone()).collect();
        for (text, id) in vocab {
            let Some(slot) = token_bytes.get_mut(id as usize) else { continue };
            *slot = if specials.contains(&text) {
                Vec::new()
            } else if byte_level {
                byte_level_decode(&text)
            } else {
                spm_token_bytes(&text, TYPE_NORMAL)
            };
        }
        let mut texts = Texts::default();
        for bytes in &token_bytes {
            texts.push(bytes);
        }
        Ok(Self {
            encoder: Encoder::hf(encoder),
            token_bytes: texts,
            bos_id: from_gguf.bos_id,
            add_bos: from_gguf.add_bos,
            eog_ids: from_gguf.eog_ids.clone(),
        })
    }

    /// Token ids for `text`.
    ///
    /// With `add_special`, BOS is prepended when the model asks for it; with
    /// `parse_special`, spellings of control tokens (`<|im_start|>`) become those tokens,
    /// otherwise they are tokenized as ordinary text. This mirrors llama.cpp's
    /// `/tokenize` options of the same names.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>, String> {
        let mut ids = Vec::new();
        if add_special && self.add_bos {
            ids.extend(self.bos_id);
        }
        match &self.encoder {
            Encoder::Spm(spm) => spm.encode(text, parse_special, &mut ids)?,
            Encoder::Hf { special, literal } => {
                let encoder = if parse_special {
                    special
                } else {
                    literal.get_or_init(|| {
                        let mut literal = (**special).clone();
                        literal.set_encode_special_tokens(true);
                        Box::new(literal)
                    })
                };
                let encoding = encoder.encode_fast(text, false).map_err(|err| err.to_string())?;
                ids.extend_from_slice(encoding.get_ids());
            }
        }
        Ok(ids)
    }

    /// The encoder in Hugging Face's `tokenizer.json` format, for inspection or other
    /// tools. SentencePiece vocabularies are encoded by Kith's own port of llama.cpp's
    /// algorithm, which has no such form.
    pub fn to_tokenizer_json(&self) -> Result<String, String> {
        match &self.encoder {
            Encoder::Hf { special, .. } => serde_json::to_string(special).map_err(|err| err.to_string()),
            Encoder::Spm(_) => Err("a SentencePiece vocabulary has no tokenizer.json form here".to_owned()),
        }
    }

    /// The bytes token `id` stands for in generated text (empty for control tokens).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes.get(id)
    }

    /// The text of `ids`, with invalid UTF-8 replaced.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| self.token_bytes(id).iter().copied()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Whether generation ends at this token (EOS, EOT and the like).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog_ids.contains(&id)
    }

    /// All end-of-generation ids, sorted.
    pub fn eog_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.eog_ids.iter().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The beginning-of-sequence id, if the vocabulary has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Whether `encode(.., add_special = true, ..)` prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Number of ids in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }
}

/// A string array's entries, in one buffer.
fn texts(gguf: &GgufFile, key: &str) -> Result<Option<Texts>, LoadError> {
    let Some(values) = gguf.array(key)? else { return Ok(None) };
    let mut texts = Texts::default();
    for value in values {
        match value {
            Value::String(s) => texts.push(s.as_bytes()),
            _ => return Err(tok_err(format!("{key} should hold strings"))),
        }
    }
    Ok(Some(texts))
}

fn string_array(gguf: &GgufFile, key: &str) -> Result<Option<Vec<String>>, LoadError> {
    let Some(values) = gguf.array(key)? else { return Ok(None) };
    values
        .iter()
        .map(|value| match value {
            Value::String(s) => Ok(s.clone()),
            _ => Err(tok_err(format!("{key} should hold strings"))),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Control, unknown and user-defined tokens, as `tokenizers` added tokens. Control
/// tokens are "special" (left as text when `parse_special` is off); user-defined ones are
/// always split out, as in llama.cpp.
fn added_tokens(tokens: &[String], types: &[i32]) -> Vec<AddedToken> {
    tokens
        .iter()
        .zip(types)
        .filter_map(|(text, &kind)| match kind {
            TYPE_CONTROL | TYPE_UNKNOWN => Some(AddedToken::from(text.clone(), true).normalized(false)),
            TYPE_USER_DEFINED => Some(AddedToken::from(text.clone(), false).normalized(false)),
            _ => None,
        })
        .filter(|token| !token.content.is_empty())
        .collect()
}

fn build_byte_level_bpe(
    tokens: &[String],
    types: &[i32],
    merges: &[String],
    pre: &str,
) -> Result<tokenizers::Tokenizer, LoadError> {
    let vocab: Vocab = tokens.iter().enumerate().map(|(idx, text)| (text.clone(), idx as u32)).collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|merge| {
            merge
                .split_once(' ')
                .map(|(left, right)| (left.to_owned(), right.to_owned()))
                .ok_or_else(|| tok_err(format!("merge {merge:?} is not two space-separated tokens")))
        })
        .collect::<Result<_, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre == "llama-bpe" || pre == "llama3")
        .build()
        .map_err(tok_err)?;
    // Which regexes split the text before BPE, per llama.cpp's `tokenizer.ggml.pre` table.
    let regexes: Vec<&str> = match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            vec![r"\p{N}", REGEX_GPT2]
        }
        "llama-bpe" | "llama3" | "dbrx" | "smaug-bpe" => vec![REGEX_LLAMA3],
        "qwen2" | "qwen3" | "deepseek-r1-qwen" => vec![REGEX_QWEN2],
        "gpt-2" | "gpt2" | "default" | "phi-2" | "jina-es" | "jina-de" => vec![REGEX_GPT2],
        other => {
            tracing::warn!(
                pre = other,
                "unknown BPE pre-tokenizer, using GPT-2's; token ids may differ from llama.cpp"
            );
            vec![REGEX_GPT2]
        }
    };
    let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
    for regex in regexes {
        let split = Split::new(SplitPattern::Regex(regex.to_owned()), SplitDelimiterBehavior::Isolated, false)
            .map_err(tok_err)?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(PreSequence::new(steps)));
    tokenizer.add_tokens(added_tokens(tokens, types)).map_err(tok_err)?;
    Ok(tokenizer)
}

/// Bytes of a SentencePiece token: `▁` is a space, `<0xNN>` is one byte.
fn spm_token_bytes(text: &str, kind: i32) -> Vec<u8> {
    match kind {
        TYPE_CONTROL | TYPE_UNKNOWN => Vec::new(),
        TYPE_BYTE => text
            .strip_prefix("<0x")
            .and_then(|rest| rest.strip_suffix('>'))
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            .map(|byte| vec![byte])
            .unwrap_or_default(),
        TYPE_USER_DEFINED => text.as_bytes().to_vec(),
        _ => text.replace('▁', " ").into_bytes(),
    }
}

/// GPT-2 maps every byte to a printable character; this maps them back.
fn byte_level_decode(text: &str) -> Vec<u8> {
    static TABLE: OnceLock<HashMap<char, u8>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
        printable.extend(0xA1..=0xAC);
        printable.extend(0xAE..=0xFF);
        let mut map = HashMap::new();
        let mut next_extra = 0u32;
        for byte in 0u32..256 {
            let ch = if printable.contains(&byte) {
                byte
            } else {
                next_extra += 1;
                255 + next_extra
            };
            if let Some(ch) = char::from_u32(ch) {
                map.insert(ch, byte as u8);
            }
        }
        map
    });
    let mut bytes = Vec::with_capacity(text.len());
    for ch in text.chars() {
        match table.get(&ch) {
            Some(&byte) => bytes.push(byte),
            // Not byte-level text (an added token stored verbatim): keep it as is.
            None => bytes.extend_from_slice(ch.encode_utf8(&mut [0u8; 4]).as_bytes()),
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_round_trip() {
        assert_eq!(byte_level_decode("Ġhello"), b" hello");
        assert_eq!(byte_level_decode("Ċ"), b"\n");
        assert_eq!(byte_level_decode("Ã©"), "é".as_bytes());
    }

    #[test]
    fn spm_bytes() {
        assert_eq!(spm_token_bytes("▁the", TYPE_NORMAL), b" the");
        assert_eq!(spm_token_bytes("<0x0A>", TYPE_BYTE), b"\n");
        assert_eq!(spm_token_bytes("<bos>", TYPE_CONTROL), b"");
    }
}
