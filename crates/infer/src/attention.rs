//! Attention on the CPU with an f16 KV cache, rounded where llama.cpp rounds.
//!
//! Why not plain f32 attention: the engine's outputs are checked token for token against
//! llama.cpp, and small differences in attention are amplified by the 8-bit
//! re-quantization of activations at every layer. llama.cpp keeps K and V in f16; its
//! matrix products convert the other operand to f16 as well, so Q is rounded to f16
//! before Q·K and the softmax probabilities are rounded to f16 before they weight V,
//! with f32 accumulation throughout. Doing the same here gave the closest agreement with
//! llama.cpp's reference outputs of the variants measured (f32 attention, and f16
//! accumulation of V as in llama.cpp's flash attention), and halves the cache's memory.
//!
//! Layout: the cache holds positions in order, each position `n_kv × head_dim` values,
//! so appending is a push and cutting back to a shared prefix is a truncate.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::numerics::dot_f16;

/// Keys and values of one layer, on the host.
pub(crate) struct HostKvCache {
    keys: Vec<f16>,
    values: Vec<f16>,
    n_kv: usize,
    head_dim: usize,
}

impl HostKvCache {
    pub(crate) fn new(n_kv: usize, head_dim: usize) -> Self {
        Self { keys: Vec::new(), values: Vec::new(), n_kv, head_dim }
    }

    fn row(&self) -> usize {
        self.n_kv * self.head_dim
    }

    /// Positions held.
    pub(crate) fn len(&self) -> usize {
        self.keys.len() / self.row()
    }

    pub(crate) fn truncate(&mut self, len: usize) {
        let keep = len.min(self.len()) * self.row();
        self.keys.truncate(keep);
        self.values.truncate(keep);
    }

    /// Appends `seq` positions; `keys` and `values` are laid out `[seq][n_kv][head_dim]`.
    pub(crate) fn append(&mut self, keys: &[f32], values: &[f32]) {
        let start = self.keys.len();
        self.keys.resize(start + keys.len(), f16::ZERO);
        self.keys[start..].convert_from_f32_slice(keys);
        self.values.resize(start + values.len(), f16::ZERO);
        self.values[start..].convert_from_f32_slice(values);
    }
}

/// Shape and scaling of one attention call.
pub(crate) struct AttentionShape {
    pub(crate) n_head: usize,
    pub(crate) n_kv: usize,
    pub(crate) head_dim: usize,
    /// Multiplies Q·K.
    pub(crate) scale: f32,
    /// Apply `scale` to Q before rounding it to f16, as llama.cpp's Gemma graph does,
    /// rather than to the dot products.
    pub(crate) scale_q_first: bool,
    /// Keys more than `window - 1` positions back are hidden (sliding-window layers).
    pub(crate) window: Option<usize>,
}

/// Causal attention of `seq` queries at positions `pos..pos + seq` over the whole cache
/// (which already holds their own keys). `queries` and the result are laid out
/// `[seq][n_head][head_dim]`.
///
/// Each query row is computed as ggml's CPU flash attention computes it for short
/// batches and single-token decoding (`ggml_compute_forward_flash_attn_ext_f16_one_chunk`):
/// Q rounded to f16, scores by `ggml_vec_dot_f16`, an online softmax over the visible keys
/// in order, and the weighted sum of V accumulated in f16, rounded at every step.
pub(crate) fn attend(cache: &HostKvCache, queries: &[f32], pos: usize, shape: &AttentionShape) -> Vec<f32> {
    let head_dim = shape.head_dim;
    let n_rep = shape.n_head / shape.n_kv;
    // Widen the cache once per call rather than once per query (f16 → f32 is exact).
    let mut keys = vec![0f32; cache.keys.len()];
    cache.keys.convert_to_f32_slice(&mut keys);
    let mut values = vec![0f32; cache.values.len()];
    cache.values.convert_to_f32_slice(&mut values);
    let row = |key_pos: usize, kv_head: usize| -> std::ops::Range<usize> {
        let at = (key_pos * shape.n_kv + kv_head) * head_dim;
        at..at + head_dim
    };
    let round = |v: f32| f16::from_f32(v).to_f32();
    let mut out = vec![0f32; queries.len()];
    out.par_chunks_mut(head_dim).zip(queries.par_chunks(head_dim)).enumerate().for_each(|(idx, (out_row, query))| {
        let query_pos = pos + idx / shape.n_head;
        let kv_head = (idx % shape.n_head) / n_rep;
        let first = shape.window.map_or(0, |window| (query_pos + 1).saturating_sub(window));

        let (q, scale): (Vec<f32>, f32) = if shape.scale_q_first {
            (query.iter().map(|x| round(x * shape.scale)).collect(), 1.0)
        } else {
            (query.iter().map(|&x| round(x)).collect(), shape.scale)
        };
        // The running sum of V, its normaliser and the running maximum score.
        let acc = out_row;
        acc.fill(0.0);
        let (mut total, mut max) = (0f32, f32::NEG_INFINITY);
        for key_pos in first..query_pos + 1 {
            let s = dot_f16(&keys[row(key_pos, kv_head)], &q) * scale;
            let (mut ms, mut vs) = (1f32, 1f32);
            if s > max {
                ms = (max - s).exp();
                max = s;
                acc.iter_mut().for_each(|a| *a = round(*a * ms));
            } else {
                vs = (s - max).exp();
            }
            for (a, v) in acc.iter_mut().zip(&values[row(key_pos, kv_head)]) {
                *a = round(v.mul_add(vs, *a));
            }
            total = total.mul_add(ms, vs);
        }
        let inverse = if total == 0.0 { 0.0 } else { 1.0 / total };
        acc.iter_mut().for_each(|a| *a *= inverse);
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference: softmax(q·k * scale) · v in f64.
    fn naive(keys: &[Vec<f32>], values: &[Vec<f32>], q: &[f32], scale: f32) -> Vec<f64> {
        let scores: Vec<f64> = keys
            .iter()
            .map(|k| k.iter().zip(q).map(|(a, b)| f64::from(a * b)).sum::<f64>() * f64::from(scale))
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        (0..q.len())
            .map(|d| values.iter().zip(&weights).map(|(v, w)| f64::from(v[d]) * w).sum::<f64>() / total)
            .collect()
    }

    #[test]
    fn matches_naive_attention_within_f16_precision() {
        let head_dim = 8;
        let mut cache = HostKvCache::new(1, head_dim);
        let keys: Vec<Vec<f32>> =
            (0..20).map(|j| (0..head_dim).map(|d| ((j * 7 + d * 3) % 11) as f32 / 11.0 - 0.5).collect()).collect();
        let values: Vec<Vec<f32>> =
            (0..20).map(|j| (0..head_dim).map(|d| ((j * 5 + d) % 13) as f32 / 13.0).collect()).collect();
        for (k, v) in keys.iter().zip(&values) {
            cache.append(k, v);
        }
        let q: Vec<f32> = (0..head_dim).map(|d| d as f32 / 4.0 - 1.0).collect();
        let shape = AttentionShape { n_head: 1, n_kv: 1, head_dim, scale: 0.5, scale_q_first: false, window: None };
        let got = attend(&cache, &q, 19, &shape);
        let want = naive(&keys, &values, &q, 0.5);
        for (g, w) in got.iter().zip(&want) {
            assert!((f64::from(*g) - w).abs() < 2e-3, "{got:?} vs {want:?}");
        }
        // A window of 4 sees only the last four positions.
        let windowed = AttentionShape { window: Some(4), ..shape };
        let got = attend(&cache, &q, 19, &windowed);
        let want = naive(&keys[16..], &values[16..], &q, 0.5);
        for (g, w) in got.iter().zip(&want) {
            assert!((f64::from(*g) - w).abs() < 2e-3);
        }
        // Truncating forgets positions.
        cache.truncate(5);
        assert_eq!(cache.len(), 5);
    }
}
