//! Kith's own quantized matrix-vector kernels, for the types where candle's CPU path
//! differs from llama.cpp's (Q4_1: activations quantized to Q8_1 exactly as ggml does).

use half::f16;
use rayon::prelude::*;

const QK: usize = 32;

/// One Q4_1 block: 32 weights as `d * q + m`, q in 0..16.
#[derive(Clone, Copy)]
struct BlockQ4_1 {
    d: f32,
    m: f32,
    qs: [u8; QK / 2],
}

/// One Q8_1 block of activations: `d * q`, and `s = d * Σq` rounded to f16 like ggml.
#[derive(Clone, Copy)]
struct BlockQ8_1 {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

/// A Q4_1 weight matrix of `n` rows by `k` columns.
pub(crate) struct Q4_1Matrix {
    n: usize,
    k: usize,
    blocks: Vec<BlockQ4_1>,
}

impl Q4_1Matrix {
    /// From raw GGUF bytes (20 bytes a block: f16 d, f16 m, 16 bytes of nibbles).
    pub(crate) fn from_bytes(bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        if k % QK != 0 || bytes.len() != n * k / QK * 20 {
            return None;
        }
        let blocks = bytes
            .chunks_exact(20)
            .map(|raw| {
                let mut qs = [0u8; QK / 2];
                qs.copy_from_slice(&raw[4..20]);
                BlockQ4_1 {
                    d: f16::from_le_bytes([raw[0], raw[1]]).to_f32(),
                    m: f16::from_le_bytes([raw[2], raw[3]]).to_f32(),
                    qs,
                }
            })
            .collect();
        Some(Self { n, k, blocks })
    }

    pub(crate) fn n(&self) -> usize {
        self.n
    }

    /// `x` is `m × k` row-major; returns `m × n`.
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let blocks_per_row = self.k / QK;
        let activations: Vec<BlockQ8_1> = x.chunks_exact(QK).map(quantize_q8_1).collect();
        let mut out = vec![0f32; m * self.n];
        out.par_chunks_mut(self.n).enumerate().for_each(|(row, out_row)| {
            let a = &activations[row * blocks_per_row..(row + 1) * blocks_per_row];
            out_row.par_chunks_mut(64).enumerate().for_each(|(chunk, dst)| {
                for (offset, value) in dst.iter_mut().enumerate() {
                    let col = chunk * 64 + offset;
                    let w = &self.blocks[col * blocks_per_row..(col + 1) * blocks_per_row];
                    *value = dot(w, a);
                }
            });
        });
        out
    }
}

/// ggml's `quantize_row_q8_1` (x86 SIMD version: f32 scale, round half to even, `s`
/// from the f32 scale times the integer sum, rounded to f16 once).
fn quantize_q8_1(x: &[f32]) -> BlockQ8_1 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * id).round_ties_even() as i8;
        sum += i32::from(*q);
    }
    BlockQ8_1 { d: f16::from_f32(d).to_f32(), s: f16::from_f32(d * sum as f32).to_f32(), qs }
}

/// ggml's `ggml_vec_dot_q4_1_q8_1`: the scaled integer dots and the `m * s` terms are
/// summed separately and added at the end.
fn dot(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    let mut acc = 0f32;
    let mut mins = 0f32;
    for (wb, ab) in w.iter().zip(a) {
        mins += wb.m * ab.s;
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            let lo = i32::from(wb.qs[j] & 0x0F);
            let hi = i32::from(wb.qs[j] >> 4);
            sumi += lo * i32::from(ab.qs[j]) + hi * i32::from(ab.qs[j + QK / 2]);
        }
        acc += wb.d * ab.d * sumi as f32;
    }
    acc + mins
}
