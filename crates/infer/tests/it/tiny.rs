//! Small GGUF models written by the tests themselves: random weights, real metadata and
//! shapes for each architecture, so loading code runs without downloads.

use std::path::Path;

use candle_core::quantized::gguf_file::{self as gguf_format, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

pub(crate) const N_EMBD: usize = 64;
pub(crate) const N_HEAD: usize = 4;
pub(crate) const N_HEAD_KV: usize = 2;
pub(crate) const HEAD_DIM: usize = 16;
pub(crate) const N_FF: usize = 128;
pub(crate) const N_LAYER: usize = 2;

/// Control tokens appended after the 256 byte-level tokens.
pub(crate) const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Options for a tiny model file.
pub(crate) struct Tiny {
    pub(crate) arch: &'static str,
    /// `llama`-style SentencePiece vocabulary instead of byte-level BPE.
    pub(crate) sentencepiece: bool,
    pub(crate) seed: u64,
}

impl Tiny {
    pub(crate) fn new(arch: &'static str) -> Self {
        Self { arch, sentencepiece: arch == "phi3", seed: 1 }
    }

    /// Writes the model to `path`.
    pub(crate) fn write(&self, path: &Path) {
        let (tokens, types, merges, scores) = if self.sentencepiece { spm_vocab() } else { bpe_vocab() };
        let n_vocab = tokens.len();
        let mut rng = self.seed;
        let mut next = move || {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((rng >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let mut random = |shape: &[usize], scale: f32| -> Tensor {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|_| next() * scale).collect();
            Tensor::from_vec(data, shape, &Device::Cpu).expect("tensor")
        };
        let quant = |t: Tensor| QTensor::quantize(&t, GgmlDType::Q8_0).expect("quantize");
        let plain = |t: Tensor| QTensor::quantize(&t, GgmlDType::F32).expect("f32");
        let ones = |len: usize| plain(Tensor::ones(len, candle_core::DType::F32, &Device::Cpu).expect("ones"));

        let q_dim = N_HEAD * HEAD_DIM;
        let kv_dim = N_HEAD_KV * HEAD_DIM;
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        tensors.push(("token_embd.weight".into(), quant(random(&[n_vocab, N_EMBD], 1.0))));
        tensors.push(("output_norm.weight".into(), ones(N_EMBD)));
        if self.arch == "phi3" || self.arch == "qwen2" {
            tensors.push(("output.weight".into(), quant(random(&[n_vocab, N_EMBD], 0.5))));
        }
        for layer in 0..N_LAYER {
            let name = |suffix: &str| format!("blk.{layer}.{suffix}");
            tensors.push((name("attn_norm.weight"), ones(N_EMBD)));
            tensors.push((name("ffn_norm.weight"), ones(N_EMBD)));
            if self.arch == "phi3" {
                tensors.push((name("attn_qkv.weight"), quant(random(&[q_dim + 2 * kv_dim, N_EMBD], 0.3))));
                tensors.push((name("ffn_up.weight"), quant(random(&[2 * N_FF, N_EMBD], 0.3))));
            } else {
                tensors.push((name("attn_q.weight"), quant(random(&[q_dim, N_EMBD], 0.3))));
                tensors.push((name("attn_k.weight"), quant(random(&[kv_dim, N_EMBD], 0.3))));
                tensors.push((name("attn_v.weight"), quant(random(&[kv_dim, N_EMBD], 0.3))));
                tensors.push((name("ffn_gate.weight"), quant(random(&[N_FF, N_EMBD], 0.3))));
                tensors.push((name("ffn_up.weight"), quant(random(&[N_FF, N_EMBD], 0.3))));
            }
            tensors.push((name("attn_output.weight"), quant(random(&[N_EMBD, q_dim], 0.3))));
            tensors.push((name("ffn_down.weight"), quant(random(&[N_EMBD, N_FF], 0.3))));
            if self.arch == "qwen2" {
                tensors.push((name("attn_q.bias"), plain(random(&[q_dim], 0.1))));
                tensors.push((name("attn_k.bias"), plain(random(&[kv_dim], 0.1))));
                tensors.push((name("attn_v.bias"), plain(random(&[kv_dim], 0.1))));
            }
            if self.arch == "qwen3" || self.arch == "gemma3" {
                tensors.push((name("attn_q_norm.weight"), ones(HEAD_DIM)));
                tensors.push((name("attn_k_norm.weight"), ones(HEAD_DIM)));
            }
            if self.arch == "gemma3" {
                tensors.push((name("post_attention_norm.weight"), ones(N_EMBD)));
                tensors.push((name("post_ffw_norm.weight"), ones(N_EMBD)));
            }
        }

        let arch = self.arch;
        let key = |suffix: &str| format!("{arch}.{suffix}");
        let mut metadata: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            ("general.name".into(), Value::String(format!("tiny-{arch}"))),
            (key("block_count"), Value::U32(N_LAYER as u32)),
            (key("context_length"), Value::U32(256)),
            (key("embedding_length"), Value::U32(N_EMBD as u32)),
            (key("feed_forward_length"), Value::U32(N_FF as u32)),
            (key("attention.head_count"), Value::U32(N_HEAD as u32)),
            (key("attention.head_count_kv"), Value::U32(N_HEAD_KV as u32)),
            (key("attention.key_length"), Value::U32(HEAD_DIM as u32)),
            (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
            (key("rope.freq_base"), Value::F32(10000.0)),
            ("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect())),
            ("tokenizer.ggml.token_type".into(), Value::Array(types.iter().map(|&t| Value::I32(t)).collect())),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(n_vocab as u32 - 2)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(n_vocab as u32 - 1)),
        ];
        if arch == "gemma3" {
            metadata.push((key("attention.sliding_window"), Value::U32(8)));
        }
        if self.sentencepiece {
            metadata.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
            metadata
                .push(("tokenizer.ggml.scores".into(), Value::Array(scores.iter().map(|&s| Value::F32(s)).collect())));
            metadata.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)));
        } else {
            metadata.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
            metadata.push(("tokenizer.ggml.pre".into(), Value::String("default".into())));
            metadata.push((
                "tokenizer.ggml.merges".into(),
                Value::Array(merges.iter().map(|m| Value::String(m.clone())).collect()),
            ));
        }
        let mut file = std::fs::File::create(path).expect("create tiny gguf");
        let metadata_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_format::write(&mut file, &metadata_refs, &tensor_refs).expect("write tiny gguf");
    }
}

/// 256 byte-level tokens, a few merges, then the control tokens.
fn bpe_vocab() -> (Vec<String>, Vec<i32>, Vec<String>, Vec<f32>) {
    let mut tokens: Vec<String> = (0u32..256).map(byte_char).map(String::from).collect();
    let mut merges = Vec::new();
    for (a, b) in [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w")] {
        merges.push(format!("{a} {b}"));
        tokens.push(format!("{a}{b}"));
    }
    let mut types = vec![1; tokens.len()];
    for special in SPECIALS {
        tokens.push(special.into());
        types.push(3);
    }
    let scores = vec![0.0; tokens.len()];
    (tokens, types, merges, scores)
}

/// `<unk>`, byte tokens, `▁` and letters with scores, then control tokens.
fn spm_vocab() -> (Vec<String>, Vec<i32>, Vec<String>, Vec<f32>) {
    let mut tokens = vec!["<unk>".to_string()];
    let mut types = vec![2];
    for byte in 0u32..256 {
        tokens.push(format!("<0x{byte:02X}>"));
        types.push(6);
    }
    for piece in ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "hell", "hello", "▁w", "▁wo"] {
        tokens.push(piece.into());
        types.push(1);
    }
    for special in SPECIALS {
        tokens.push(special.into());
        types.push(3);
    }
    let scores = (0..tokens.len()).map(|i| -(i as f32)).collect();
    (tokens, types, Vec::new(), scores)
}

/// GPT-2's byte-to-character table.
fn byte_char(byte: u32) -> char {
    let printable = |b: u32| (33..=126).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable(byte) {
        return char::from_u32(byte).expect("printable");
    }
    let offset = (0..byte).filter(|&b| !printable(b)).count() as u32;
    char::from_u32(256 + offset).expect("shifted")
}
