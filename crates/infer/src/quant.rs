//! Kith's own quantized matrix-vector kernels, for the types where candle's CPU path
//! differs from llama.cpp's (Q4_1: activations quantized to Q8_1 exactly as ggml does).

use half::f16;
use rayon::prelude::*;

use crate::numerics::hsum_8;

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
        if !k.is_multiple_of(QK) || bytes.len() != n * k / QK * 20 {
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
        // Few, large work items: one per thread and a few more for balance. Every output
        // is computed the same way whatever the split, so results do not depend on it.
        let chunk = self.n.div_ceil(rayon::current_num_threads() * 4).max(16);
        out.par_chunks_mut(self.n).enumerate().for_each(|(row, out_row)| {
            let a = &activations[row * blocks_per_row..(row + 1) * blocks_per_row];
            out_row.par_chunks_mut(chunk).enumerate().for_each(|(chunk_idx, dst)| {
                for (offset, value) in dst.iter_mut().enumerate() {
                    let col = chunk_idx * chunk + offset;
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

/// ggml's `ggml_vec_dot_q4_1_q8_1` (x86 AVX2 path): per block, eight lanes of four
/// integer products each (lanes 0-3 the low nibbles, 4-7 the high ones), scaled by
/// `d_w · d_a` into eight f32 accumulators with fused multiply-adds; the `m · s` terms
/// summed apart (fused too: GCC contracts `summs += m * s`); one horizontal sum at the end.
fn dot(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    let mut acc = [0f32; 8];
    let mut mins = 0f32;
    for (wb, ab) in w.iter().zip(a) {
        mins = wb.m.mul_add(ab.s, mins);
        let scale = wb.d * ab.d;
        for lane in 0..4 {
            let mut lo = 0i32;
            let mut hi = 0i32;
            for j in lane * 4..lane * 4 + 4 {
                lo += i32::from(wb.qs[j] & 0x0F) * i32::from(ab.qs[j]);
                hi += i32::from(wb.qs[j] >> 4) * i32::from(ab.qs[j + QK / 2]);
            }
            acc[lane] = scale.mul_add(lo as f32, acc[lane]);
            acc[lane + 4] = scale.mul_add(hi as f32, acc[lane + 4]);
        }
    }
    hsum_8(acc) + mins
}

/// One Q8_0 block: 32 values as `d * q`.
#[derive(Clone, Copy)]
struct BlockQ8_0 {
    d: f32,
    qs: [i8; QK],
}

/// A Q8_0 weight matrix of `n` rows by `k` columns; also serves embedding lookups.
pub(crate) struct Q8_0Matrix {
    n: usize,
    k: usize,
    blocks: Vec<BlockQ8_0>,
}

impl Q8_0Matrix {
    /// From raw GGUF bytes (34 bytes a block: f16 d, 32 signed bytes).
    pub(crate) fn from_bytes(bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        if !k.is_multiple_of(QK) || bytes.len() != n * k / QK * 34 {
            return None;
        }
        let blocks = bytes
            .chunks_exact(34)
            .map(|raw| {
                let mut qs = [0i8; QK];
                for (q, b) in qs.iter_mut().zip(&raw[2..]) {
                    *q = *b as i8;
                }
                BlockQ8_0 { d: f16::from_le_bytes([raw[0], raw[1]]).to_f32(), qs }
            })
            .collect();
        Some(Self { n, k, blocks })
    }

    pub(crate) fn n(&self) -> usize {
        self.n
    }

    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// Row `row` dequantized (`ggml_get_rows`), or `None` past the end.
    pub(crate) fn row(&self, row: usize) -> Option<Vec<f32>> {
        let per_row = self.k / QK;
        let blocks = self.blocks.get(row * per_row..(row + 1) * per_row)?;
        Some(blocks.iter().flat_map(|b| b.qs.iter().map(move |&q| f32::from(q) * b.d)).collect())
    }

    /// `x` is `m × k` row-major; returns `m × n`.
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let per_row = self.k / QK;
        let activations: Vec<BlockQ8_0> = x.chunks_exact(QK).map(quantize_q8_0).collect();
        let mut out = vec![0f32; m * self.n];
        let chunk = self.n.div_ceil(rayon::current_num_threads() * 4).max(16);
        out.par_chunks_mut(self.n).enumerate().for_each(|(row, out_row)| {
            let a = &activations[row * per_row..(row + 1) * per_row];
            out_row.par_chunks_mut(chunk).enumerate().for_each(|(chunk_idx, dst)| {
                for (offset, value) in dst.iter_mut().enumerate() {
                    let col = chunk_idx * chunk + offset;
                    *value = dot_q8_0(&self.blocks[col * per_row..(col + 1) * per_row], a);
                }
            });
        });
        out
    }
}

/// ggml's `quantize_row_q8_0` (x86 SIMD version).
fn quantize_q8_0(x: &[f32]) -> BlockQ8_0 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut qs = [0i8; QK];
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * id).round_ties_even() as i8;
    }
    BlockQ8_0 { d: f16::from_f32(d).to_f32(), qs }
}

/// ggml's `ggml_vec_dot_q8_0_q8_0` (x86 AVX2 path; llamafile's tinyBLAS computes the
/// same): eight lanes of four integer products, fused into eight accumulators.
fn dot_q8_0(w: &[BlockQ8_0], a: &[BlockQ8_0]) -> f32 {
    let mut acc = [0f32; 8];
    for (wb, ab) in w.iter().zip(a) {
        let scale = wb.d * ab.d;
        for (lane, slot) in acc.iter_mut().enumerate() {
            let sum: i32 =
                (lane * 4..lane * 4 + 4).map(|j| i32::from(wb.qs[j]) * i32::from(ab.qs[j])).sum();
            *slot = scale.mul_add(sum as f32, *slot);
        }
    }
    hsum_8(acc)
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    use super::*;

    /// Deterministic values in [-1, 1), with a few large ones as real activations have.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|i| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let v = ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                if i % 97 == 0 { v * 8.0 } else { v }
            })
            .collect()
    }

    /// Kith's Q4_1 matmul against candle's (same blocks) and against f32 arithmetic on the
    /// dequantized weights, for odd block counts and several rows.
    #[test]
    fn q4_1_matches_references() {
        for (n, k, m) in [(4, 32, 1), (8, 96, 3), (12, 160, 2), (64, 576, 5)] {
            let w = values(n * k, n as u64 + 7);
            let x = values(m * k, k as u64);
            let w_tensor = Tensor::from_vec(w, (n, k), &Device::Cpu).expect("tensor");
            let q = QTensor::quantize(&w_tensor, GgmlDType::Q4_1).expect("quantize");
            let ours = Q4_1Matrix::from_bytes(&q.data().expect("bytes"), n, k).expect("layout").matmul(&x, m);

            let x_tensor = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).expect("tensor");
            let dequantized = q.dequantize(&Device::Cpu).expect("dequantize");
            let exact: Vec<f32> = x_tensor
                .matmul(&dequantized.t().expect("t"))
                .expect("matmul")
                .flatten_all()
                .expect("flat")
                .to_vec1()
                .expect("vec");
            let candle: Vec<f32> = QMatMul::from_qtensor(q)
                .expect("qmatmul")
                .forward(&x_tensor)
                .expect("forward")
                .flatten_all()
                .expect("flat")
                .to_vec1()
                .expect("vec");
            let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs())).max(1.0);
            for ((o, c), e) in ours.iter().zip(&candle).zip(&exact) {
                // Same quantized arithmetic as candle up to f16 rounding of one term.
                assert!((o - c).abs() <= 2e-3 * scale, "({n},{k},{m}): ours {o} candle {c}");
                // 8-bit activations: within a percent of exact arithmetic.
                assert!((o - e).abs() <= 1e-2 * scale, "({n},{k},{m}): ours {o} exact {e}");
            }
        }
    }

    #[test]
    fn q8_1_sum_is_scale_times_integer_sum() {
        let x: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
        let block = quantize_q8_1(&x);
        let sum: i32 = block.qs.iter().map(|&q| i32::from(q)).sum();
        assert_eq!(block.s, f16::from_f32(16.0 / 127.0 * sum as f32).to_f32());
        assert_eq!(block.qs[0], -127);
    }

    #[test]
    fn wrong_sizes_are_refused() {
        assert!(Q4_1Matrix::from_bytes(&[0u8; 20], 1, 64).is_none());
        assert!(Q4_1Matrix::from_bytes(&[0u8; 20], 1, 33).is_none());
    }
}
