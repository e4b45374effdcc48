//! Sentence embeddings: a BERT encoder (all-MiniLM-L6-v2) through candle's BERT module
//! and the `tokenizers` crate, pooled as sentence-transformers pools it.
//!
//! sentence-transformers' all-MiniLM-L6-v2 pipeline is: WordPiece with `[CLS] … [SEP]`,
//! at most 256 tokens (its `max_seq_length`, which overrides the 128 written in
//! `tokenizer.json`), the BERT encoder, the mean of the token vectors under the
//! attention mask, then L2 normalisation. [`Embedder::embed`] does exactly that, in
//! batches padded to their longest member (padding is masked out of both attention
//! and pooling, so a text's vector does not depend on its batch).

use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, TruncationParams, TruncationStrategy};

/// Longest input, in tokens (sentence-transformers' `max_seq_length` for this model).
pub const MAX_EMBED_TOKENS: usize = 256;
/// Texts per forward pass: long enough to amortise per-op overhead, short enough that
/// one long text does not pad many short ones.
const BATCH: usize = 32;
/// Files larger than this are not a MiniLM-class encoder; refuse before reading.
const MAX_WEIGHTS_BYTES: u64 = 2 << 30;

/// Why an embedding model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmbedError {
    /// A file of the model directory is missing or unreadable.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `config.json` is not a BERT configuration.
    #[error("{path} is not a BERT config: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The weights file is larger than any encoder Kith runs.
    #[error("{path} is {size} bytes, larger than an embedding model can be ({MAX_WEIGHTS_BYTES} bytes)")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// `tokenizer.json` could not be read or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The weights are malformed or do not fit the configuration.
    #[error("embedding model weights: {0}")]
    Weights(String),
    /// The tensor library failed while encoding.
    #[error("running the embedding model")]
    Candle(#[from] candle_core::Error),
}

/// A loaded sentence encoder. Cheap to share behind an `Arc`; `embed` takes `&self`.
pub struct Embedder {
    model: BertModel,
    tokenizer: tokenizers::Tokenizer,
    dim: usize,
    device: Device,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder").field("dim", &self.dim).finish_non_exhaustive()
    }
}

impl Embedder {
    /// Loads `model.safetensors`, `config.json` and `tokenizer.json` from `dir` (the
    /// `minilm-l6` catalog entry's directory), on the CPU.
    pub fn load(dir: &Path) -> Result<Self, EmbedError> {
        let device = Device::Cpu;
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map(|bytes| (path.clone(), bytes)).map_err(|source| EmbedError::Io { path, source })
        };

        let (config_path, config) = read("config.json")?;
        let config: Config = serde_json::from_slice(&config)
            .map_err(|e| EmbedError::Config { path: config_path.clone(), reason: e.to_string() })?;
        let dim = config_dim(&config_path, &config)?;

        let weights_path = dir.join("model.safetensors");
        let size = std::fs::metadata(&weights_path)
            .map_err(|source| EmbedError::Io { path: weights_path.clone(), source })?
            .len();
        if size > MAX_WEIGHTS_BYTES {
            return Err(EmbedError::TooLarge { path: weights_path, size });
        }
        let (_, bytes) = read("model.safetensors")?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &device)
            .map_err(|e| EmbedError::Weights(format!("{}: {e}", weights_path.display())))?;
        drop(bytes);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        // Checkpoints exported from `BertModel` have bare names; some carry a `bert.` prefix.
        let model = BertModel::load(vb.clone(), &config)
            .or_else(|_| BertModel::load(vb.pp("bert"), &config))
            .map_err(|e| EmbedError::Weights(format!("{}: {e}", weights_path.display())))?;

        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| EmbedError::Tokenizer(format!("{}: {e}", tokenizer_path.display())))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_EMBED_TOKENS,
                strategy: TruncationStrategy::LongestFirst,
                ..TruncationParams::default()
            }))
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        let pad_id = tokenizer.get_padding().map_or(0, |p| p.pad_id);
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            pad_id,
            ..PaddingParams::default()
        }));
        Ok(Self { model, tokenizer, dim, device })
    }

    /// Vector length (384 for MiniLM-L6).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// One unit-length vector per text, in the order given.
    pub fn embed<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<f32>>, EmbedError> {
        // Similar lengths share a batch so that little is padded.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| texts[i].as_ref().len());
        let mut out = vec![Vec::new(); texts.len()];
        for chunk in order.chunks(BATCH) {
            let batch: Vec<&str> = chunk.iter().map(|&i| texts[i].as_ref()).collect();
            for (&i, vector) in chunk.iter().zip(self.embed_batch(&batch)?) {
                out[i] = vector;
            }
        }
        Ok(out)
    }

    /// The token ids a text is encoded as (with `[CLS]`/`[SEP]`, truncated to
    /// [`MAX_EMBED_TOKENS`]).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
        let encoding = self.tokenizer.encode(text, true).map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// One text's vector.
    pub fn embed_one(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        Ok(self.embed(&[text])?.pop().unwrap_or_default())
    }

    fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let encodings =
            self.tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        let rows = encodings.len();
        let len = encodings.first().map_or(0, |e| e.get_ids().len());
        let flat = |f: fn(&tokenizers::Encoding) -> &[u32]| -> Vec<u32> {
            encodings.iter().flat_map(|e| f(e).iter().copied()).collect()
        };
        let ids = Tensor::from_vec(flat(tokenizers::Encoding::get_ids), (rows, len), &self.device)?;
        let types = Tensor::from_vec(flat(tokenizers::Encoding::get_type_ids), (rows, len), &self.device)?;
        let mask = Tensor::from_vec(flat(tokenizers::Encoding::get_attention_mask), (rows, len), &self.device)?;

        let hidden = self.model.forward(&ids, &types, Some(&mask))?; // (rows, len, dim)
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?.clamp(1e-9f32, f32::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
        Ok(mean.broadcast_div(&norm)?.to_vec2()?)
    }
}

fn config_dim(path: &Path, config: &Config) -> Result<usize, EmbedError> {
    let fail = |reason: &str| EmbedError::Config { path: path.to_path_buf(), reason: reason.into() };
    if config.hidden_size == 0 || config.hidden_size > 4096 || config.num_attention_heads == 0 {
        return Err(fail("hidden_size must be 1..=4096 with at least one attention head"));
    }
    if !config.hidden_size.is_multiple_of(config.num_attention_heads) {
        return Err(fail("hidden_size is not a multiple of num_attention_heads"));
    }
    if config.max_position_embeddings < MAX_EMBED_TOKENS {
        return Err(fail("max_position_embeddings is shorter than the 256-token input"));
    }
    Ok(config.hidden_size)
}
