//! The transformer, written here rather than taken from candle-transformers so the
//! engine owns its memory layout and hot paths (one model file for every supported
//! architecture, a KV cache that can be truncated for prefix reuse, RoPE tables sized
//! to the context actually used).
//!
//! Supported: `llama` (Llama 2/3, SmolLM), `qwen2`, `qwen3`, `phi3` and `gemma3`. The
//! differences are data, read from GGUF metadata into [`Config`]: RoPE layout
//! (interleaved for llama, NeoX halves for the rest), attention biases, per-head Q/K
//! norms, fused QKV and gate/up projections, Gemma's extra norms, embedding scale,
//! GELU and sliding-window layers.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::attention::{AttentionShape, HostKvCache, attend};
use crate::error::LoadError;
use crate::gguf::GgufFile;
use crate::numerics;
use crate::quant::{KMatrix, Q4_1Matrix, Q5_0Matrix, Q8_0Matrix};
use crate::weights::{ALIGN, Arena, Settled};

/// Architectures this engine can run.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2", "qwen3", "phi3", "gemma3"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Phi3,
    Gemma3,
}

/// Hyper-parameters of a loaded model, from its GGUF metadata.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) arch: Arch,
    pub(crate) n_layer: usize,
    pub(crate) n_embd: usize,
    pub(crate) n_head: usize,
    pub(crate) n_head_kv: usize,
    pub(crate) head_dim: usize,
    pub(crate) n_ff: usize,
    pub(crate) n_vocab: usize,
    pub(crate) rms_eps: f64,
    pub(crate) rope_base: f32,
    pub(crate) rope_scale: f32,
    /// Gemma 3's local layers use their own base.
    pub(crate) rope_base_local: f32,
    /// Context length the model was trained for.
    pub(crate) train_context: usize,
    /// Window of the sliding-window layers (Gemma 3), and which layers use it.
    pub(crate) sliding_window: Option<usize>,
    pub(crate) swa_pattern: usize,
}

impl Config {
    pub(crate) fn from_gguf(gguf: &GgufFile, n_vocab: usize) -> Result<Self, LoadError> {
        let arch_name = gguf.string("general.architecture")?.to_owned();
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "phi3" => Arch::Phi3,
            "gemma3" => Arch::Gemma3,
            _ => {
                return Err(LoadError::UnsupportedArchitecture {
                    path: gguf.path.clone(),
                    architecture: arch_name,
                    supported: SUPPORTED_ARCHITECTURES.join(", "),
                });
            }
        };
        let key = |suffix: &str| format!("{arch_name}.{suffix}");
        let malformed = |reason: String| LoadError::Malformed { path: gguf.path.clone(), reason };
        if gguf.opt_usize(&key("expert_count"))?.unwrap_or(0) > 0 {
            return Err(LoadError::UnsupportedArchitecture {
                path: gguf.path.clone(),
                architecture: format!("{arch_name} (mixture of experts)"),
                supported: SUPPORTED_ARCHITECTURES.join(", "),
            });
        }
        let n_embd = gguf.usize(&key("embedding_length"))?;
        let n_head = gguf.usize(&key("attention.head_count"))?;
        let n_head_kv = gguf.opt_usize(&key("attention.head_count_kv"))?.unwrap_or(n_head);
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(malformed(format!("{n_head} attention heads cannot share {n_head_kv} key/value heads")));
        }
        let head_dim = match gguf.opt_usize(&key("attention.key_length"))? {
            Some(head_dim) => head_dim,
            None if n_embd % n_head == 0 => n_embd / n_head,
            None => return Err(malformed(format!("embedding length {n_embd} is not a multiple of {n_head} heads"))),
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(malformed(format!("head dimension {head_dim} must be even and non-zero")));
        }
        if let Some(rope_dim) = gguf.opt_usize(&key("rope.dimension_count"))?
            && rope_dim != head_dim
        {
            return Err(malformed(format!("partial rotary embeddings ({rope_dim} of {head_dim}) are not supported")));
        }
        let rms_eps = gguf.opt_f32(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5) as f64;
        let default_base = if arch == Arch::Gemma3 { 1_000_000.0 } else { 10_000.0 };
        let rope_base = gguf.opt_f32(&key("rope.freq_base")).unwrap_or(default_base);
        let rope_scale = match gguf.opt_string(&key("rope.scaling.type")) {
            Some("linear") => {
                gguf.opt_f32(&key("rope.scaling.factor")).filter(|f| *f > 0.0).map(|f| 1.0 / f).unwrap_or(1.0)
            }
            _ => 1.0,
        };
        let sliding_window =
            if arch == Arch::Gemma3 { gguf.opt_usize(&key("attention.sliding_window"))? } else { None };
        let config = Self {
            arch,
            n_layer: gguf.usize(&key("block_count"))?,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_ff: gguf.usize(&key("feed_forward_length"))?,
            n_vocab,
            rms_eps,
            rope_base,
            rope_scale,
            rope_base_local: 10_000.0,
            train_context: gguf.opt_usize(&key("context_length"))?.unwrap_or(4096),
            sliding_window,
            swa_pattern: 6,
        };
        for (name, value, max) in [
            ("block_count", config.n_layer, 1024),
            ("embedding_length", n_embd, 1 << 16),
            ("feed_forward_length", config.n_ff, 1 << 18),
            ("attention.head_count", n_head, 1024),
        ] {
            if value == 0 || value > max {
                return Err(malformed(format!("{arch_name}.{name} = {value} is outside 1..={max}")));
            }
        }
        Ok(config)
    }

    fn rope_neox(&self) -> bool {
        self.arch != Arch::Llama
    }

    fn is_sliding(&self, layer_idx: usize) -> bool {
        self.sliding_window.is_some() && !(layer_idx + 1).is_multiple_of(self.swa_pattern)
    }
}

/// A weight matrix: Kith's own kernel where it has one (Q4_1 on the CPU, whose
/// activations must be quantized exactly as ggml does), candle's otherwise.
pub(crate) enum Linear {
    Candle(QMatMul),
    Q4_1(Q4_1Matrix),
    Q8_0(Arc<Q8_0Matrix>),
    Q5_0(Q5_0Matrix),
    KQuant(KMatrix),
}

impl Linear {
    /// Reads matrix `name` (checked to have `shape`): on the CPU, the types Kith has its own
    /// kernels for go straight from the file into `arena`; the rest is candle's.
    pub(crate) fn read(
        gguf: &mut GgufFile,
        name: &str,
        shape: &[usize],
        device: &Device,
        arena: &Arc<Arena>,
    ) -> Result<Self, LoadError> {
        let dtype = gguf.tensor_type(name, shape)?;
        if let (&[n, k], true) = (shape, device.is_cpu()) {
            let path = gguf.path.clone();
            let reader = gguf.raw_tensor(name, shape)?;
            let own = match dtype {
                GgmlDType::Q4_1 => Q4_1Matrix::read(arena, reader, n, k).map(|m| m.map(Self::Q4_1)),
                GgmlDType::Q8_0 => Q8_0Matrix::read(arena, reader, n, k).map(|m| m.map(|m| Self::Q8_0(Arc::new(m)))),
                GgmlDType::Q5_0 => Q5_0Matrix::read(arena, reader, n, k).map(|m| m.map(Self::Q5_0)),
                GgmlDType::Q4K => KMatrix::read_q4_k(arena, reader, n, k).map(|m| m.map(Self::KQuant)),
                GgmlDType::Q6K => KMatrix::read_q6_k(arena, reader, n, k).map(|m| m.map(Self::KQuant)),
                _ => Ok(None),
            };
            if let Some(linear) = own.map_err(|source| LoadError::Io { path, source })? {
                return Ok(linear);
            }
        }
        Ok(Self::Candle(QMatMul::from_qtensor(gguf.tensor(name, shape, device)?)?))
    }

    /// `x` (`m × k`, row-major) times the transposed weights with Kith's own kernels, or
    /// `None` for a matrix candle multiplies.
    pub(crate) fn host_matmul(&self, x: &[f32], m: usize) -> Option<Vec<f32>> {
        match self {
            Self::Candle(_) => None,
            Self::Q4_1(matrix) => Some(matrix.matmul(x, m)),
            Self::Q8_0(matrix) => Some(matrix.matmul(x, m)),
            Self::Q5_0(matrix) => Some(matrix.matmul(x, m)),
            Self::KQuant(matrix) => Some(matrix.matmul(x, m)),
        }
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Self::Candle(matmul) = self {
            return matmul.forward(x);
        }
        let mut dims = x.dims().to_vec();
        let k = dims.pop().unwrap_or(0);
        let m = (x.elem_count() / k.max(1)).max(1);
        let out = with_host(x, |data| self.host_matmul(data, m).unwrap_or_default())?;
        dims.push(out.len() / m);
        Tensor::from_vec(out, dims, x.device())
    }

    /// `x` (`m` rows of host values) times the transposed weights, as host values: Kith's
    /// kernels, or candle's for the other types.
    fn forward_host(&self, x: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        match self {
            Self::Candle(matmul) => {
                let x = Tensor::from_slice(x, (m, x.len() / m.max(1)), &Device::Cpu)?;
                matmul.forward(&x)?.flatten_all()?.to_vec1::<f32>()
            }
            own => Ok(own.host_matmul(x, m).unwrap_or_default()),
        }
    }
}

/// `f(values)` for an f32 tensor in host memory, without a copy when it is contiguous.
fn with_host<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets())
            && let Ok(values) = cpu.as_slice::<f32>()
        {
            return Ok(f(&values[start..end]));
        }
    }
    Ok(f(&t.flatten_all()?.to_vec1::<f32>()?))
}

/// The token embedding table: Kith's Q8_0 rows on the CPU (shared with a tied output
/// projection), candle's quantized tensor otherwise.
enum Embedding {
    Candle(Arc<QTensor>),
    Q8_0(Arc<Q8_0Matrix>),
}

impl Embedding {
    fn lookup(&self, tokens: &[u32], device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Self::Candle(table) => table.embedding(&Tensor::new(tokens, device)?),
            Self::Q8_0(table) => {
                let mut rows = Vec::with_capacity(tokens.len() * table.k());
                for &token in tokens {
                    match table.row(token as usize) {
                        Some(row) => rows.extend(row),
                        None => candle_core::bail!("token id {token} is outside the vocabulary"),
                    }
                }
                Tensor::from_vec(rows, (tokens.len(), table.k()), device)
            }
        }
    }
}

/// RMS norm with a weight: ggml's order of operations on the CPU, candle's on a GPU.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        return candle_nn::ops::rms_norm(x, weight, eps as f32);
    }
    let mut data = x.flatten_all()?.to_vec1::<f32>()?;
    with_host(weight, |weight| numerics::rms_norm(&mut data, weight, eps as f32))?;
    Tensor::from_vec(data, x.dims(), x.device())
}

/// Rotary embeddings: ggml's angles computed per forward on the CPU; precomputed tables
/// for positions `0..len` on a GPU.
enum Rope {
    Host(numerics::Rope),
    Device { cos: Tensor, sin: Tensor },
}

impl Rope {
    #[allow(clippy::too_many_arguments)]
    fn new(
        head_dim: usize,
        base: f32,
        scale: f32,
        freq_factors: Option<&[f32]>,
        len: usize,
        neox: bool,
        device: &Device,
    ) -> candle_core::Result<Self> {
        if device.is_cpu() {
            return Ok(Self::Host(numerics::Rope::new(head_dim, base, scale, freq_factors.map(<[f32]>::to_vec), neox)));
        }
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                let freq = 1.0 / base.powf(2.0 * i as f32 / head_dim as f32);
                let factor = freq_factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0);
                freq * scale / factor
            })
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions = Tensor::arange(0u32, len as u32, device)?.to_dtype(DType::F32)?.reshape((len, 1))?;
        let angles = positions.broadcast_mul(&inv_freq)?;
        Ok(Self::Device { cos: angles.cos()?, sin: angles.sin()? })
    }

    /// The host angles for positions `pos..pos + seq` (empty on a GPU).
    fn host_table(&self, pos: usize, seq: usize) -> Vec<f32> {
        match self {
            Self::Host(rope) => rope.table(pos, seq),
            Self::Device { .. } => Vec::new(),
        }
    }
}

/// A whole KV cache (every layer's), while it is not the model's.
pub(crate) struct KvCaches(Vec<LayerCache>);

/// Keys and values of one layer: in host memory (f16, llama.cpp's numerics) on the CPU,
/// as f32 tensors on a GPU.
enum LayerCache {
    Host(HostKvCache),
    Device(DeviceKvCache),
}

impl LayerCache {
    fn len(&self) -> usize {
        match self {
            Self::Host(cache) => cache.len(),
            Self::Device(cache) => cache.len,
        }
    }

    fn truncate(&mut self, len: usize) {
        match self {
            Self::Host(cache) => cache.truncate(len),
            Self::Device(cache) => cache.len = cache.len.min(len),
        }
    }
}

/// Keys and values of one layer on a GPU for the positions processed so far. The buffer
/// grows in steps and can be cut back, so a conversation can reuse its common prefix.
struct DeviceKvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

/// Positions the cache grows by at a time.
const KV_GROWTH: usize = 256;

/// Rows per micro-batch (llama.cpp's default `n_ubatch`).
const UBATCH: usize = 512;

impl DeviceKvCache {
    fn new() -> Self {
        Self { k: None, v: None, len: 0 }
    }

    /// Appends `k`, `v` (1, n_kv, seq, head_dim) and returns all cached keys and values.
    fn append(&mut self, k: &Tensor, v: &Tensor, max_len: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let seq = k.dim(2)?;
        let needed = self.len + seq;
        let capacity = self.k.as_ref().map(|t| t.dim(2)).transpose()?.unwrap_or(0);
        if needed > capacity {
            let new_capacity =
                needed.max(capacity * 2).div_ceil(KV_GROWTH).saturating_mul(KV_GROWTH).min(max_len.max(needed));
            let (_, n_kv, _, head_dim) = k.dims4()?;
            let grow = |old: &Option<Tensor>| -> candle_core::Result<Tensor> {
                let buffer = Tensor::zeros((1, n_kv, new_capacity, head_dim), DType::F32, k.device())?;
                if let Some(old) = old
                    && self.len > 0
                {
                    buffer.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                Ok(buffer)
            };
            self.k = Some(grow(&self.k)?);
            self.v = Some(grow(&self.v)?);
        }
        let (k_buf, v_buf) = match (&self.k, &self.v) {
            (Some(k_buf), Some(v_buf)) => (k_buf, v_buf),
            _ => candle_core::bail!("kv cache buffers missing after growth"),
        };
        k_buf.slice_set(&k.contiguous()?, 2, self.len)?;
        v_buf.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = needed;
        Ok((k_buf.narrow(2, 0, needed)?, v_buf.narrow(2, 0, needed)?))
    }
}

struct Layer {
    attn_norm: Tensor,
    /// Separate projections, or one fused QKV (phi3).
    q: Option<Linear>,
    k: Option<Linear>,
    v: Option<Linear>,
    qkv: Option<Linear>,
    q_bias: Option<Tensor>,
    k_bias: Option<Tensor>,
    v_bias: Option<Tensor>,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    out: Linear,
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    /// `None` when the up projection holds gate and up together (phi3).
    gate: Option<Linear>,
    up: Linear,
    down: Linear,
    post_ffn_norm: Option<Tensor>,
    sliding: bool,
    cache: LayerCache,
}

/// A loaded transformer with its KV cache.
pub(crate) struct Model {
    pub(crate) config: Config,
    embed: Embedding,
    layers: Vec<Layer>,
    output_norm: Tensor,
    lm_head: Linear,
    rope: Rope,
    rope_local: Option<Rope>,
    /// Positions the cache and RoPE tables are sized for.
    pub(crate) context_length: usize,
    device: Device,
    /// Whether the weights have moved to huge pages (see `weights.rs`).
    pub(crate) settled: Arc<Settled>,
}

impl Model {
    /// Reads all weights, checking every shape against the metadata.
    pub(crate) fn load(
        gguf: &mut GgufFile,
        config: Config,
        context_length: usize,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let c = &config;
        let q_dim = c.n_head * c.head_dim;
        let kv_dim = c.n_head_kv * c.head_dim;
        // Kith's own matrices, one after another in one arena (sized from the file).
        let arena = Arena::new(if device.is_cpu() { gguf.own_kernel_bytes(ALIGN) } else { 0 });
        let qmm = |gguf: &mut GgufFile, name: &str, shape: &[usize]| Linear::read(gguf, name, shape, device, &arena);
        let vector = |gguf: &mut GgufFile, name: &str, len: usize| -> Result<Tensor, LoadError> {
            Ok(gguf.tensor(name, &[len], device)?.dequantize(device)?)
        };
        let opt_vector = |gguf: &mut GgufFile, name: &str, len: usize| -> Result<Option<Tensor>, LoadError> {
            if gguf.has_tensor(name) { vector(gguf, name, len).map(Some) } else { Ok(None) }
        };

        // A Q8_0 embedding table is Kith's, shared with a tied output projection.
        let embed_shape = [c.n_vocab, c.n_embd];
        let own_embed = match gguf.tensor_type("token_embd.weight", &embed_shape)? {
            GgmlDType::Q8_0 if device.is_cpu() => match qmm(gguf, "token_embd.weight", &embed_shape)? {
                Linear::Q8_0(matrix) => Some(matrix),
                _ => None,
            },
            _ => None,
        };
        let embed = match own_embed {
            Some(matrix) => Embedding::Q8_0(matrix),
            None => Embedding::Candle(Arc::new(gguf.tensor("token_embd.weight", &embed_shape, device)?)),
        };
        let mut layers = Vec::with_capacity(c.n_layer);
        for idx in 0..c.n_layer {
            let name = |suffix: &str| format!("blk.{idx}.{suffix}");
            let fused_qkv = c.arch == Arch::Phi3;
            let (q, k, v, qkv) = if fused_qkv {
                (None, None, None, Some(qmm(gguf, &name("attn_qkv.weight"), &[q_dim + 2 * kv_dim, c.n_embd])?))
            } else {
                (
                    Some(qmm(gguf, &name("attn_q.weight"), &[q_dim, c.n_embd])?),
                    Some(qmm(gguf, &name("attn_k.weight"), &[kv_dim, c.n_embd])?),
                    Some(qmm(gguf, &name("attn_v.weight"), &[kv_dim, c.n_embd])?),
                    None,
                )
            };
            let fused_gate_up = c.arch == Arch::Phi3;
            let (gate, up) = if fused_gate_up {
                (None, qmm(gguf, &name("ffn_up.weight"), &[2 * c.n_ff, c.n_embd])?)
            } else {
                (
                    Some(qmm(gguf, &name("ffn_gate.weight"), &[c.n_ff, c.n_embd])?),
                    qmm(gguf, &name("ffn_up.weight"), &[c.n_ff, c.n_embd])?,
                )
            };
            layers.push(Layer {
                attn_norm: vector(gguf, &name("attn_norm.weight"), c.n_embd)?,
                q,
                k,
                v,
                qkv,
                q_bias: opt_vector(gguf, &name("attn_q.bias"), q_dim)?,
                k_bias: opt_vector(gguf, &name("attn_k.bias"), kv_dim)?,
                v_bias: opt_vector(gguf, &name("attn_v.bias"), kv_dim)?,
                q_norm: opt_vector(gguf, &name("attn_q_norm.weight"), c.head_dim)?,
                k_norm: opt_vector(gguf, &name("attn_k_norm.weight"), c.head_dim)?,
                out: qmm(gguf, &name("attn_output.weight"), &[c.n_embd, q_dim])?,
                post_attn_norm: opt_vector(gguf, &name("post_attention_norm.weight"), c.n_embd)?,
                ffn_norm: vector(gguf, &name("ffn_norm.weight"), c.n_embd)?,
                gate,
                up,
                down: qmm(gguf, &name("ffn_down.weight"), &[c.n_embd, c.n_ff])?,
                post_ffn_norm: opt_vector(gguf, &name("post_ffw_norm.weight"), c.n_embd)?,
                sliding: c.is_sliding(idx),
                cache: if device.is_cpu() {
                    LayerCache::Host(HostKvCache::new(c.n_head_kv, c.head_dim, context_length))
                } else {
                    LayerCache::Device(DeviceKvCache::new())
                },
            });
        }
        let output_norm = vector(gguf, "output_norm.weight", c.n_embd)?;
        let lm_head = if gguf.has_tensor("output.weight") {
            qmm(gguf, "output.weight", &[c.n_vocab, c.n_embd])?
        } else {
            match &embed {
                Embedding::Q8_0(matrix) => Linear::Q8_0(matrix.clone()),
                Embedding::Candle(tensor) => Linear::Candle(QMatMul::from_arc(tensor.clone())?),
            }
        };
        let freq_factors = if gguf.has_tensor("rope_freqs.weight") {
            Some(vector(gguf, "rope_freqs.weight", c.head_dim / 2)?.to_vec1::<f32>()?)
        } else {
            None
        };
        let neox = c.rope_neox();
        let rope =
            Rope::new(c.head_dim, c.rope_base, c.rope_scale, freq_factors.as_deref(), context_length, neox, device)?;
        let rope_local = match c.sliding_window {
            Some(_) => Some(Rope::new(c.head_dim, c.rope_base_local, 1.0, None, context_length, neox, device)?),
            None => None,
        };
        Ok(Self {
            config,
            embed,
            layers,
            output_norm,
            lm_head,
            rope,
            rope_local,
            context_length,
            device: device.clone(),
            settled: arena.settle(),
        })
    }

    /// Empty KV caches for every layer, to swap in with [`swap_caches`](Self::swap_caches).
    pub(crate) fn empty_caches(&self) -> KvCaches {
        let c = &self.config;
        KvCaches(
            self.layers
                .iter()
                .map(|_| {
                    if self.device.is_cpu() {
                        LayerCache::Host(HostKvCache::new(c.n_head_kv, c.head_dim, self.context_length))
                    } else {
                        LayerCache::Device(DeviceKvCache::new())
                    }
                })
                .collect(),
        )
    }

    /// Exchanges the model's KV caches with `caches` (a generation set aside keeps its
    /// cache while another one runs).
    pub(crate) fn swap_caches(&mut self, caches: &mut KvCaches) {
        for (layer, cache) in self.layers.iter_mut().zip(&mut caches.0) {
            std::mem::swap(&mut layer.cache, cache);
        }
    }

    /// Tokens held in the KV cache.
    pub(crate) fn cache_len(&self) -> usize {
        self.layers.first().map(|l| l.cache.len()).unwrap_or(0)
    }

    /// Forgets cached positions from `len` on.
    pub(crate) fn truncate_cache(&mut self, len: usize) {
        for layer in &mut self.layers {
            layer.cache.truncate(len);
        }
    }

    /// How a prompt continuation of `len` tokens is cut into forward calls; see
    /// [`prompt_batches`].
    pub(crate) fn prompt_batches(&self, len: usize) -> Vec<std::ops::Range<usize>> {
        prompt_batches(len, self.config.sliding_window.is_some())
    }

    /// Runs `tokens` (one micro-batch) at positions `cache_len()..` and returns the logits
    /// of the last one, or nothing without `logits` (a prompt's micro-batch before its last).
    pub(crate) fn forward(&mut self, tokens: &[u32], logits: bool) -> candle_core::Result<Vec<f32>> {
        let mut pass = self.begin(tokens, logits)?;
        loop {
            match self.resume(pass, || false)? {
                Step::Done(logits) => return Ok(logits),
                Step::Paused(paused) => pass = paused,
            }
        }
    }

    /// Starts a forward pass of `tokens` at positions `cache_len()..`; [`resume`]
    /// (Self::resume) runs its layers. Without `logits`, the pass only fills the KV caches:
    /// as llama.cpp with no output rows, it stops after the last layer's attention.
    pub(crate) fn begin(&self, tokens: &[u32], logits: bool) -> candle_core::Result<Pass> {
        let pos = self.cache_len();
        let seq = tokens.len();
        if seq == 0 || pos + seq > self.context_length {
            candle_core::bail!(
                "forward of {seq} tokens at position {pos} exceeds the context of {}",
                self.context_length
            );
        }
        let c = &self.config;
        let mut x = self.embed.lookup(tokens, &self.device)?.unsqueeze(0)?;
        if c.arch == Arch::Gemma3 {
            // ggml_scale by sqrtf(n_embd), an f32 product.
            x = (x * f64::from((c.n_embd as f32).sqrt()))?;
        }
        // Masks are for the tensor attention on GPUs; the host path masks by index.
        let (full_mask, window_mask) = if self.device.is_cpu() {
            (None, None)
        } else {
            let window_mask = match c.sliding_window {
                Some(window) => causal_mask(seq, pos, Some(window), &self.device)?,
                None => None,
            };
            (causal_mask(seq, pos, None, &self.device)?, window_mask)
        };
        // Host RoPE angles, once per forward for each base.
        let table = self.rope.host_table(pos, seq);
        let local_table = self.rope_local.as_ref().map(|rope| rope.host_table(pos, seq));
        Ok(Pass { x, pos, seq, next_layer: 0, table, local_table, full_mask, window_mask, logits })
    }

    /// Runs the layers of `pass` still to run, and returns the logits of its last token;
    /// or, when `pause()` says so between two layers (after at least one), the pass to
    /// resume later. Meanwhile the layers run hold one more position in their caches
    /// than the rest: the model's caches must be swapped aside (or truncated) before any
    /// other pass runs.
    pub(crate) fn resume(&mut self, pass: Pass, pause: impl Fn() -> bool) -> candle_core::Result<Step> {
        let Pass { mut x, pos, seq, next_layer, table, local_table, full_mask, window_mask, logits } = pass;
        let c = self.config.clone();
        let n_layer = self.layers.len();
        for il in next_layer..n_layer {
            if il > next_layer && pause() {
                let pass = Pass { x, pos, seq, next_layer: il, table, local_table, full_mask, window_mask, logits };
                return Ok(Step::Paused(pass));
            }
            let layer = &mut self.layers[il];
            let (rope, table, mask) = match (&self.rope_local, &local_table, layer.sliding) {
                (Some(local), Some(local_table), true) => (local, local_table, window_mask.as_ref()),
                _ => (&self.rope, &table, full_mask.as_ref()),
            };
            let h = rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let attn = layer.attention(&h, &c, (rope, table), mask, pos, self.context_length)?;
            if il + 1 == n_layer && !logits {
                return Ok(Step::Done(Vec::new()));
            }
            // llama.cpp carries only the rows it outputs (the last) past the last layer's
            // attention; kernels that treat row groups differently must see the same rows.
            let (attn, x_rows) = if il + 1 == n_layer {
                (attn.narrow(1, seq - 1, 1)?, x.narrow(1, seq - 1, 1)?)
            } else {
                (attn, x.clone())
            };
            x = x_rows;
            let attn = match &layer.post_attn_norm {
                Some(norm) => rms_norm(&attn, norm, c.rms_eps)?,
                None => attn,
            };
            x = (x + attn)?;
            let h = rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let ffn = layer.feed_forward(&h, &c)?;
            let ffn = match &layer.post_ffn_norm {
                Some(norm) => rms_norm(&ffn, norm, c.rms_eps)?,
                None => ffn,
            };
            x = (x + ffn)?;
        }
        let last = x.narrow(1, x.dim(1)? - 1, 1)?;
        let last = rms_norm(&last, &self.output_norm, c.rms_eps)?;
        let logits = self.lm_head.forward(&last)?;
        Ok(Step::Done(logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?))
    }
}

/// A forward pass between two layers (see [`Model::resume`]).
pub(crate) struct Pass {
    /// The hidden state entering layer `next_layer`.
    x: Tensor,
    pos: usize,
    seq: usize,
    next_layer: usize,
    table: Vec<f32>,
    local_table: Option<Vec<f32>>,
    full_mask: Option<Tensor>,
    window_mask: Option<Tensor>,
    /// Whether the pass ends with the last token's logits.
    logits: bool,
}

/// What [`Model::resume`] got to.
pub(crate) enum Step {
    /// The logits of the pass's last token (empty for a pass without them).
    Done(Vec<f32>),
    /// Paused between two layers.
    Paused(Pass),
}

impl Layer {
    fn attention(
        &mut self,
        h: &Tensor,
        c: &Config,
        (rope, table): (&Rope, &[f32]),
        mask: Option<&Tensor>,
        pos: usize,
        max_len: usize,
    ) -> candle_core::Result<Tensor> {
        let (_, seq, _) = h.dims3()?;
        let window = if self.sliding { c.sliding_window } else { None };
        let q_dim = c.n_head * c.head_dim;
        let kv_dim = c.n_head_kv * c.head_dim;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        if let (LayerCache::Host(cache), Rope::Host(rope)) = (&mut self.cache, rope) {
            // On the host, on plain values from the input to the output projection.
            let out = with_host(h, |h| -> candle_core::Result<Vec<f32>> {
                let (mut q, mut k, v) = match (&self.qkv, &self.q, &self.k, &self.v) {
                    (Some(qkv), _, _, _) => {
                        let fused = qkv.forward_host(h, seq)?;
                        let part = |from: usize, width: usize| -> Vec<f32> {
                            fused
                                .chunks_exact(q_dim + 2 * kv_dim)
                                .flat_map(|row| &row[from..from + width])
                                .copied()
                                .collect()
                        };
                        (part(0, q_dim), part(q_dim, kv_dim), part(q_dim + kv_dim, kv_dim))
                    }
                    (None, Some(q), Some(k), Some(v)) => {
                        (q.forward_host(h, seq)?, k.forward_host(h, seq)?, v.forward_host(h, seq)?)
                    }
                    _ => candle_core::bail!("layer has neither fused nor separate attention projections"),
                };
                let mut v = v;
                for (x, bias) in [(&mut q, &self.q_bias), (&mut k, &self.k_bias), (&mut v, &self.v_bias)] {
                    if let Some(bias) = bias {
                        with_host(bias, |bias| {
                            for row in x.chunks_exact_mut(bias.len().max(1)) {
                                row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
                            }
                        })?;
                    }
                }
                for (x, norm) in [(&mut q, &self.q_norm), (&mut k, &self.k_norm)] {
                    if let Some(norm) = norm {
                        with_host(norm, |norm| numerics::rms_norm(x, norm, c.rms_eps as f32))?;
                    }
                }
                // [seq][heads][head_dim] rows, the layout the output projection reads.
                rope.apply(&mut q, table);
                rope.apply(&mut k, table);
                cache.append(&k, &v);
                let shape = AttentionShape {
                    n_head: c.n_head,
                    n_kv: c.n_head_kv,
                    head_dim: c.head_dim,
                    scale: scale as f32,
                    scale_q_first: c.arch == Arch::Gemma3,
                    window,
                };
                self.out.forward_host(&attend(cache, &q, pos, &shape), seq)
            })??;
            let width = out.len() / seq.max(1);
            return Tensor::from_vec(out, (1, seq, width), h.device());
        }
        let (q, k, v) = match (&self.qkv, &self.q, &self.k, &self.v) {
            (Some(qkv), _, _, _) => {
                let fused = qkv.forward(h)?;
                (fused.narrow(2, 0, q_dim)?, fused.narrow(2, q_dim, kv_dim)?, fused.narrow(2, q_dim + kv_dim, kv_dim)?)
            }
            (None, Some(q), Some(k), Some(v)) => (q.forward(h)?, k.forward(h)?, v.forward(h)?),
            _ => candle_core::bail!("layer has neither fused nor separate attention projections"),
        };
        let add_bias = |t: Tensor, bias: &Option<Tensor>| match bias {
            Some(b) => t.broadcast_add(b),
            None => Ok(t),
        };
        let q = add_bias(q, &self.q_bias)?.reshape((1, seq, c.n_head, c.head_dim))?;
        let k = add_bias(k, &self.k_bias)?.reshape((1, seq, c.n_head_kv, c.head_dim))?;
        let v = add_bias(v, &self.v_bias)?.reshape((1, seq, c.n_head_kv, c.head_dim))?;
        let q = match &self.q_norm {
            Some(norm) => rms_norm(&q.contiguous()?, norm, c.rms_eps)?,
            None => q,
        };
        let k = match &self.k_norm {
            Some(norm) => rms_norm(&k.contiguous()?, norm, c.rms_eps)?,
            None => k,
        };
        let out = match (&mut self.cache, rope) {
            (LayerCache::Device(cache), Rope::Device { cos, sin }) => {
                let cos = cos.narrow(0, pos, seq)?;
                let sin = sin.narrow(0, pos, seq)?;
                let rotate = |x: &Tensor| -> candle_core::Result<Tensor> {
                    let x = x.transpose(1, 2)?.contiguous()?;
                    if c.rope_neox() {
                        candle_nn::rotary_emb::rope(&x, &cos, &sin)
                    } else {
                        candle_nn::rotary_emb::rope_i(&x, &cos, &sin)
                    }
                };
                let (q, k) = (rotate(&q)?, rotate(&k)?);
                let v = v.transpose(1, 2)?.contiguous()?;
                let (k_all, v_all) = cache.append(&k, &v, max_len)?;
                let kv_len = k_all.dim(2)?;
                // Grouped-query attention without copying K/V per head: the query heads
                // that share a K/V head are stacked along the sequence axis.
                let n_rep = c.n_head / c.n_head_kv;
                let q = q.reshape((1, c.n_head_kv, n_rep * seq, c.head_dim))?;
                let scores = (q.matmul(&k_all.t()?)? * scale)?;
                let scores = match mask {
                    Some(mask) => scores.reshape((1, c.n_head_kv, n_rep, seq, kv_len))?.broadcast_add(mask)?,
                    None => scores,
                };
                let probs = candle_nn::ops::softmax_last_dim(&scores.contiguous()?)?.reshape((
                    1,
                    c.n_head_kv,
                    n_rep * seq,
                    kv_len,
                ))?;
                let out = probs.matmul(&v_all)?.reshape((1, c.n_head, seq, c.head_dim))?;
                out.transpose(1, 2)?.reshape((1, seq, q_dim))?
            }
            _ => candle_core::bail!("KV cache and RoPE tables live on different devices"),
        };
        self.out.forward(&out)
    }

    fn feed_forward(&self, h: &Tensor, c: &Config) -> candle_core::Result<Tensor> {
        if h.device().is_cpu() {
            // On the host, on plain values from the input to the output.
            let (_, seq, _) = h.dims3()?;
            let out = with_host(h, |h| -> candle_core::Result<Vec<f32>> {
                let (mut gate, up) = match &self.gate {
                    Some(gate) => (gate.forward_host(h, seq)?, self.up.forward_host(h, seq)?),
                    None => {
                        let fused = self.up.forward_host(h, seq)?;
                        let rows = fused.chunks_exact(2 * c.n_ff);
                        (
                            rows.clone().flat_map(|row| &row[..c.n_ff]).copied().collect(),
                            rows.flat_map(|row| &row[c.n_ff..]).copied().collect(),
                        )
                    }
                };
                let glu = if c.arch == Arch::Gemma3 { numerics::geglu } else { numerics::swiglu };
                glu(&mut gate, &up, c.n_ff);
                drop(up);
                self.down.forward_host(&gate, seq)
            })??;
            let width = out.len() / seq.max(1);
            return Tensor::from_vec(out, (1, seq, width), h.device());
        }
        let (gate, up) = match &self.gate {
            Some(gate) => (gate.forward(h)?, self.up.forward(h)?),
            None => {
                let fused = self.up.forward(h)?;
                (fused.narrow(2, 0, c.n_ff)?, fused.narrow(2, c.n_ff, c.n_ff)?)
            }
        };
        let activated =
            if c.arch == Arch::Gemma3 { (gate.gelu()? * up)? } else { (candle_nn::ops::silu(&gate)? * up)? };
        self.down.forward(&activated)
    }
}

/// The micro-batches llama.cpp's server computes a prompt continuation of `len` tokens in:
/// at most [`UBATCH`] rows at a time and, for sliding-window models (where the server stops
/// to checkpoint), the last 4 and the last `4 + UBATCH` tokens apart. Several of ggml's CPU
/// kernels pick their arithmetic by batch size (flash attention, repacked and tiled K-quant
/// products), so equal batches give llama.cpp's bits; bounded batches also bound the memory
/// a long prompt needs.
fn prompt_batches(len: usize, sliding_window: bool) -> Vec<std::ops::Range<usize>> {
    let mut cuts = Vec::new();
    if sliding_window {
        cuts.extend([4 + UBATCH, 4].into_iter().filter(|&offset| len > offset).map(|offset| len - offset));
    }
    cuts.push(len);
    let mut batches = Vec::new();
    let mut start = 0;
    for end in cuts {
        while start < end {
            let stop = (start + UBATCH).min(end);
            batches.push(start..stop);
            start = stop;
        }
    }
    batches
}

/// Additive mask (seq, pos + seq) for queries at `pos..pos + seq`: key `j` is hidden from
/// query `i` when it lies in the future or, with a window, `window` or more positions back.
/// `None` when nothing is hidden (one query, all keys visible).
fn causal_mask(seq: usize, pos: usize, window: Option<usize>, device: &Device) -> candle_core::Result<Option<Tensor>> {
    let kv_len = pos + seq;
    let visible = |i: usize, j: usize| {
        let query = pos + i;
        j <= query && window.is_none_or(|w| query - j < w)
    };
    if seq == 1 && (0..kv_len).all(|j| visible(0, j)) {
        return Ok(None);
    }
    let mask: Vec<f32> =
        (0..seq).flat_map(|i| (0..kv_len).map(move |j| if visible(i, j) { 0.0 } else { f32::NEG_INFINITY })).collect();
    Tensor::from_vec(mask, (seq, kv_len), device).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_rows(seq: usize, pos: usize, window: Option<usize>) -> Vec<Vec<bool>> {
        match causal_mask(seq, pos, window, &Device::Cpu).expect("mask") {
            None => vec![vec![true; pos + seq]; seq],
            Some(mask) => mask
                .to_vec2::<f32>()
                .expect("2d")
                .into_iter()
                .map(|row| row.into_iter().map(|v| v == 0.0).collect())
                .collect(),
        }
    }

    #[test]
    fn prompts_go_in_llama_cpp_micro_batches() {
        assert_eq!(prompt_batches(30, false), vec![0..30]);
        assert_eq!(prompt_batches(30, true), vec![0..26, 26..30]);
        assert_eq!(prompt_batches(4, true), vec![0..4]);
        assert_eq!(prompt_batches(1, true), vec![0..1]);
        assert_eq!(prompt_batches(1100, false), vec![0..512, 512..1024, 1024..1100]);
        assert_eq!(prompt_batches(1100, true), vec![0..512, 512..584, 584..1096, 1096..1100]);
    }

    #[test]
    fn causal_mask_hides_the_future() {
        assert_eq!(mask_rows(2, 1, None), vec![vec![true, true, false], vec![true, true, true]]);
    }

    #[test]
    fn sliding_window_hides_the_distant_past() {
        assert_eq!(mask_rows(1, 3, Some(2)), vec![vec![false, false, true, true]]);
        assert_eq!(mask_rows(1, 3, None), vec![vec![true; 4]]);
    }
}
