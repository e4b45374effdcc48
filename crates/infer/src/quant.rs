//! Kith's own quantized matrix kernels for Q4_1, Q5_0, Q8_0, Q4_K and Q6_K weights: the
//! activations quantized as ggml quantizes them (Q8_1, Q8_0, Q8_K) and each output summed
//! in the order and with the fused multiply-adds of the kernel llama.cpp's x86-64 CPU
//! backend runs for that type and batch size, so the results are llama.cpp's bit for bit.
//! Other types go through candle.

use std::io::Read;
use std::sync::Arc;

use half::f16;
use rayon::prelude::*;

use crate::weights::{Arena, Blocks, RawBlock};

#[cfg(target_arch = "x86_64")]
use crate::numerics::has_avx2_fma_f16c;
use crate::numerics::{hsum_8, multiversion};

const QK: usize = 32;

/// Rows a matrix of `n` rows of type `dtype` takes in the weight arena: the K-quants are
/// repacked eight rows at a time, the last group padded with zero rows.
pub(crate) fn stored_rows(dtype: candle_core::quantized::GgmlDType, n: usize) -> usize {
    use candle_core::quantized::GgmlDType::{Q4K, Q6K};
    if matches!(dtype, Q4K | Q6K) { n.next_multiple_of(8) } else { n }
}

/// Returns `$f(args)` from the AVX2 kernels (with VNNI where the CPU has it) when the CPU
/// has AVX2, FMA and F16C; falls through otherwise.
macro_rules! simd_return {
    ($f:ident $(::<$($g:ty),*>)? ($($arg:expr),*)) => {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma_f16c() {
            #[allow(unsafe_code)]
            // SAFETY: the CPU has AVX2, FMA and F16C (checked above), and AVX-512 VNNI and
            // VL for `avx2_vnni` (checked here).
            return unsafe {
                if crate::numerics::has_vnni_256() {
                    avx2_vnni::$f $(::<$($g),*>)? ($($arg),*)
                } else {
                    avx2::$f $(::<$($g),*>)? ($($arg),*)
                }
            };
        }
    };
}

/// `m × n` outputs of a weight matrix with `n` rows of `per_row` blocks each, times `m`
/// rows of activations, in parallel. Activation rows go `G` at a time through
/// `dotg(weights, group)`, which decodes each weight block once for the rows `G·group..`
/// and keeps an accumulator per row (a single one is bound by the latency of its chain of
/// fused multiply-adds); the last `m % G` rows go one at a time through
/// `dot(weights, row)`, or, with `pad` and at least `G` rows, as a last group that repeats
/// the last row (see [`group_of`]) and keeps its own outputs: the weights are read once
/// more rather than once per row left (for kernels whose groups give each row the one-row
/// kernel's bits). Every output is computed the same way whatever the split into work
/// items, so results do not depend on the thread count.
fn par_matmul<const G: usize, W: Sync>(
    weights: &[W],
    (n, m, per_row): (usize, usize, usize),
    pad: bool,
    dot: impl Fn(&[W], usize) -> f32 + Sync,
    dotg: impl Fn(&[W], usize) -> [f32; G] + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    let chunk = n.div_ceil(rayon::current_num_threads() * 4).max(16);
    let weight_row = |col: usize| &weights[col * per_row..(col + 1) * per_row];
    let grouped = if pad && m >= G { m } else { m / G * G };
    let (head, tail) = out.split_at_mut(grouped * n);
    head.par_chunks_mut(G * n).enumerate().for_each(|(group, rows)| {
        let columns: Vec<[f32; G]> =
            (0..n).into_par_iter().with_min_len(chunk).map(|col| dotg(weight_row(col), group)).collect();
        for (r, row) in rows.chunks_exact_mut(n).enumerate() {
            for (value, column) in row.iter_mut().zip(&columns) {
                *value = column[r];
            }
        }
    });
    tail.par_chunks_mut(n.max(1)).enumerate().for_each(|(index, out_row)| {
        out_row.par_chunks_mut(chunk).enumerate().for_each(|(chunk_idx, dst)| {
            for (offset, value) in dst.iter_mut().enumerate() {
                *value = dot(weight_row(chunk_idx * chunk + offset), grouped + index);
            }
        });
    });
    out
}

/// `m × n` outputs of a matrix stored as groups of eight rows ([`BlockQ4Kx8`],
/// [`BlockQ6Kx8`]: `per_row` blocks a group, the last group padded), in parallel.
/// `tile(group, first, rows)` gives the group's eight outputs for activation rows
/// `first..first + rows`: all but the last `m % 4` rows (ggml's gemm part for Q4_K) go 8
/// at a time (4 for a last tile of 4 to 7 rows), the others one at a time; the tile picks
/// its arithmetic from that and from `m`.
fn par_matmul_x8<W: Sync>(
    groups: &[W],
    (n, m, per_row): (usize, usize, usize),
    tile: impl Fn(&[W], usize, usize) -> [[f32; 8]; ROWS] + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    let gemm = m - m % 4;
    let mut tiles = Vec::new();
    let mut rest = out.as_mut_slice();
    let mut first = 0;
    while first < m {
        let rows = if first + ROWS <= gemm {
            ROWS
        } else if first < gemm {
            4
        } else {
            1
        };
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(rows * n);
        tiles.push((first, rows, head));
        (first, rest) = (first + rows, tail);
    }
    let group_count = n.div_ceil(8);
    let chunk = group_count.div_ceil(rayon::current_num_threads() * 4).max(2);
    tiles.into_par_iter().for_each(|(first, rows, out)| {
        let columns: Vec<[[f32; 8]; ROWS]> = (0..group_count)
            .into_par_iter()
            .with_min_len(chunk)
            .map(|g| tile(&groups[g * per_row..(g + 1) * per_row], first, rows))
            .collect();
        for (r, out_row) in out.chunks_exact_mut(n.max(1)).enumerate() {
            for (values, column) in out_row.chunks_mut(8).zip(&columns) {
                values.copy_from_slice(&column[r][..values.len()]);
            }
        }
    });
    out
}

/// Row `row` of `per_row` blocks each.
#[inline(always)]
fn row_of<A>(activations: &[A], per_row: usize, row: usize) -> &[A] {
    &activations[row * per_row..(row + 1) * per_row]
}

/// Rows `G·group..G·group + G`; past the last row, the last row again.
#[inline(always)]
fn group_of<A, const G: usize>(activations: &[A], per_row: usize, group: usize) -> [&[A]; G] {
    if (G * group + G) * per_row <= activations.len() {
        return std::array::from_fn(|r| row_of(activations, per_row, G * group + r));
    }
    let last = (activations.len() / per_row.max(1)).saturating_sub(1);
    std::array::from_fn(|r| row_of(activations, per_row, (G * group + r).min(last)))
}

/// Activation rows per call of the Q4_1, Q8_0 and Q5_0 kernels in a prompt: each weight
/// block decoded once for eight rows.
const ROWS: usize = 8;
/// The same for batches of 4 to 7 rows (a sliding-window model's prompt ends with a batch
/// of 4, as llama.cpp's server computes it), which would otherwise take one pass over the
/// weights per row.
const FEW_ROWS: usize = 4;

/// An activation block type: `VALUES` values quantized as ggml quantizes them.
trait Activations: Send + Sized {
    const VALUES: usize;
    fn quantize(x: &[f32]) -> Self;
}

multiversion! {
    /// Activations quantized a block at a time, in parallel for long inputs (a direct call
    /// of the block's `#[inline(always)]` quantizer, so each copy inlines its own).
    fn quantize<A: Activations>(x: &[f32]) -> Vec<A> {
        x.par_chunks_exact(A::VALUES).with_min_len(2048 / A::VALUES).map(|x| A::quantize(x)).collect()
    }
}

/// The `n × k` blocks of a matrix stored `per_block` values a block, read from `reader`
/// into `arena`; `Ok(None)` when `k` is not a whole number of blocks.
fn read_blocks<B: RawBlock>(
    arena: &Arc<Arena>,
    reader: impl Read,
    (n, k): (usize, usize),
    per_block: usize,
) -> std::io::Result<Option<Blocks<B>>> {
    if !k.is_multiple_of(per_block) {
        return Ok(None);
    }
    let count = n.checked_mul(k / per_block).ok_or(std::io::ErrorKind::InvalidInput)?;
    arena.read(reader, count).map(Some)
}

/// One Q4_1 block: 32 weights as `d * q + m`, q in 0..16; GGUF's 20 bytes as they are
/// (the kernels widen the f16 scales: decoding is bound by memory bandwidth).
#[derive(Clone, Copy)]
#[repr(C)]
struct BlockQ4_1 {
    d: f16,
    m: f16,
    qs: [u8; QK / 2],
}

/// One Q8_1 block of activations: `d * q`, and `s = d * Σq` rounded to f16 like ggml.
#[derive(Clone, Copy)]
struct BlockQ8_1 {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

// SAFETY: repr(C), 20 bytes without padding (checked below), f16 and bytes only.
#[allow(unsafe_code)]
unsafe impl RawBlock for BlockQ4_1 {}
const _: () = assert!(size_of::<BlockQ4_1>() == 20);

/// A Q4_1 weight matrix of `n` rows by `k` columns.
pub(crate) struct Q4_1Matrix {
    n: usize,
    k: usize,
    blocks: Blocks<BlockQ4_1>,
}

impl Q4_1Matrix {
    /// Reads the matrix's GGUF bytes into `arena`; `Ok(None)` when `k` is not a whole
    /// number of blocks.
    pub(crate) fn read(arena: &Arc<Arena>, reader: impl Read, n: usize, k: usize) -> std::io::Result<Option<Self>> {
        Ok(read_blocks(arena, reader, (n, k), QK)?.map(|blocks| Self { n, k, blocks }))
    }

    #[cfg(test)]
    fn from_bytes(bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        if bytes.len() != n * k / QK * size_of::<BlockQ4_1>() {
            return None;
        }
        Self::read(&Arena::new(bytes.len() + crate::weights::ALIGN), bytes, n, k).ok().flatten()
    }

    /// `x` is `m × k` row-major; returns `m × n`.
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let a: Vec<BlockQ8_1> = quantize(x);
        let per_row = self.k / QK;
        let (w, shape) = (&self.blocks[..], (self.n, m, per_row));
        simd_return!(matmul_q4_1(w, &a, shape));
        par_matmul(
            w,
            shape,
            true,
            |w, r| dot_q4_1(w, row_of(&a, per_row, r)),
            |w, g| dotn_q4_1::<ROWS>(w, group_of(&a, per_row, g)),
        )
    }
}

impl Activations for BlockQ8_1 {
    const VALUES: usize = QK;
    #[inline(always)]
    fn quantize(x: &[f32]) -> Self {
        quantize_q8_1(x)
    }
}

impl Activations for BlockQ8_0 {
    const VALUES: usize = QK;
    #[inline(always)]
    fn quantize(x: &[f32]) -> Self {
        quantize_q8_0(x)
    }
}

impl Activations for BlockQ8K {
    const VALUES: usize = QK_K;
    #[inline(always)]
    fn quantize(x: &[f32]) -> Self {
        quantize_q8_k(x)
    }
}

/// ggml's `quantize_row_q8_1` (x86 SIMD version: f32 scale, round half to even, `s`
/// from the f32 scale times the integer sum, rounded to f16 once).
#[inline(always)]
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
fn dot_q4_1_scalar(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    let mut acc = [0f32; 8];
    let mut mins = 0f32;
    for (wb, ab) in w.iter().zip(a) {
        mins = wb.m.to_f32().mul_add(ab.s, mins);
        let scale = wb.d.to_f32() * ab.d;
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

/// One Q8_0 block of activations: 32 values as `d * q`.
#[derive(Clone, Copy)]
struct BlockQ8_0 {
    d: f32,
    qs: [i8; QK],
}

/// A Q8_0 weight block, GGUF's 34 bytes as they are.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct WeightQ8_0 {
    d: f16,
    qs: [i8; QK],
}

/// A Q5_0 weight block, GGUF's 22 bytes as they are: value `j` is `d * (q - 16)`, q's low
/// four bits in byte `j % 16` of `qs` (the low nibble for `j < 16`), its fifth in bit `j`
/// of `qh`.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ5_0 {
    d: f16,
    qh: [u8; 4],
    qs: [u8; QK / 2],
}

/// Weight blocks that ggml multiplies by Q8_0 activations with Q8_0's arithmetic: Q8_0
/// itself, and Q5_0 (llamafile's tinyBLAS widens it to signed bytes first). Implementors
/// are `repr(C)` with the f16 scale first, at least 8 bytes: the SIMD kernels read it there.
#[allow(unsafe_code)]
pub(crate) trait Q8Weights: RawBlock {
    /// What [`unsigned_bytes`](Self::unsigned_bytes) adds to each value.
    const OFFSET: i32;
    /// Whether every value lies in -16..16, so that a pair of them times two activations
    /// plus 128 (at most 255 · 16 · 2) cannot saturate `maddubs`'s 16 bits.
    const NARROW: bool;
    fn scale(&self) -> f16;
    fn values(&self) -> [i8; QK];
    /// The values as 32 signed bytes in a vector register.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn bytes(&self) -> std::arch::x86_64::__m256i;
    /// The values plus [`OFFSET`](Self::OFFSET), as 32 unsigned bytes.
    ///
    /// # Safety
    /// The CPU must have AVX2, AVX-512 BW and VL.
    #[cfg(target_arch = "x86_64")]
    unsafe fn unsigned_bytes(&self) -> std::arch::x86_64::__m256i;
}

// SAFETY: repr(C), 34 bytes without padding (checked below), f16 and bytes only.
#[allow(unsafe_code)]
unsafe impl RawBlock for WeightQ8_0 {}
const _: () = assert!(size_of::<WeightQ8_0>() == 34);

#[allow(unsafe_code)]
impl Q8Weights for WeightQ8_0 {
    const OFFSET: i32 = 128;
    const NARROW: bool = false;

    #[inline(always)]
    fn scale(&self) -> f16 {
        self.d
    }

    fn values(&self) -> [i8; QK] {
        self.qs
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    #[allow(unsafe_code)]
    unsafe fn bytes(&self) -> std::arch::x86_64::__m256i {
        // SAFETY: 32 readable bytes; the caller guarantees AVX.
        unsafe { std::arch::x86_64::_mm256_loadu_si256(self.qs.as_ptr().cast()) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    #[allow(unsafe_code)]
    unsafe fn unsigned_bytes(&self) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees AVX2: q + 128 is q with its top bit flipped.
        unsafe { _mm256_xor_si256(self.bytes(), _mm256_set1_epi8(0x80u8 as i8)) }
    }
}

// SAFETY: repr(C), 22 bytes without padding (checked below), f16 and bytes only.
#[allow(unsafe_code)]
unsafe impl RawBlock for BlockQ5_0 {}
const _: () = assert!(size_of::<BlockQ5_0>() == 22);

#[allow(unsafe_code)]
impl Q8Weights for BlockQ5_0 {
    const OFFSET: i32 = 16;
    const NARROW: bool = true;

    #[inline(always)]
    fn scale(&self) -> f16 {
        self.d
    }

    fn values(&self) -> [i8; QK] {
        let high = u32::from_le_bytes(self.qh);
        let bit = |i: usize| (((high >> i) & 1) << 4) as u8;
        let mut values = [0i8; QK];
        for j in 0..QK / 2 {
            values[j] = ((self.qs[j] & 0x0F) | bit(j)) as i8 - 16;
            values[j + QK / 2] = ((self.qs[j] >> 4) | bit(j + QK / 2)) as i8 - 16;
        }
        values
    }

    /// ggml's `bytes_from_nibbles_32` and `bytes_from_bits_32` (tinyBLAS's Q5_0 load).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    #[allow(unsafe_code)]
    unsafe fn bytes(&self) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees AVX2; 16 readable bytes.
        unsafe {
            let packed = _mm_loadu_si128(self.qs.as_ptr().cast());
            let nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F));
            // With AVX-512 (chosen at build time, as VNNI): less 16 where the fifth bit is clear.
            #[cfg(all(target_feature = "avx512bw", target_feature = "avx512vl"))]
            return _mm256_mask_sub_epi8(nibbles, !u32::from_le_bytes(self.qh), nibbles, _mm256_set1_epi8(16));
            #[cfg(not(all(target_feature = "avx512bw", target_feature = "avx512vl")))]
            {
                // Byte j all ones when bit j of qh is set.
                let spread = _mm256_shuffle_epi8(
                    _mm256_set1_epi32(i32::from_le_bytes(self.qh)),
                    _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0),
                );
                let set = _mm256_cmpeq_epi8(
                    _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe)),
                    _mm256_set1_epi64x(-1),
                );
                // q - 16 as a signed byte: the nibble, with 0xF0 where the fifth bit is clear.
                _mm256_or_si256(nibbles, _mm256_andnot_si256(set, _mm256_set1_epi8(0xF0u8 as i8)))
            }
        }
    }

    /// The five-bit values as they are stored (q, not q - 16).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    #[allow(unsafe_code)]
    unsafe fn unsigned_bytes(&self) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees AVX2, AVX-512 BW and VL; 16 readable bytes.
        unsafe {
            let packed = _mm_loadu_si128(self.qs.as_ptr().cast());
            let nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F));
            _mm256_or_si256(nibbles, _mm256_maskz_mov_epi8(u32::from_le_bytes(self.qh), _mm256_set1_epi8(0x10)))
        }
    }
}

/// A weight matrix of `n` rows by `k` columns in Q8_0 or Q5_0 blocks; a Q8_0 one also
/// serves embedding lookups.
pub(crate) struct Q8Matrix<B> {
    n: usize,
    k: usize,
    blocks: Blocks<B>,
}

pub(crate) type Q8_0Matrix = Q8Matrix<WeightQ8_0>;
pub(crate) type Q5_0Matrix = Q8Matrix<BlockQ5_0>;

impl<B: Q8Weights> Q8Matrix<B> {
    /// Reads the matrix's GGUF bytes into `arena`; `Ok(None)` when `k` is not a whole
    /// number of blocks.
    pub(crate) fn read(arena: &Arc<Arena>, reader: impl Read, n: usize, k: usize) -> std::io::Result<Option<Self>> {
        Ok(read_blocks(arena, reader, (n, k), QK)?.map(|blocks| Self { n, k, blocks }))
    }

    #[cfg(test)]
    fn from_bytes(bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        if bytes.len() != n * k / QK * size_of::<B>() {
            return None;
        }
        Self::read(&Arena::new(bytes.len() + crate::weights::ALIGN), bytes, n, k).ok().flatten()
    }

    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// Row `row` dequantized (`ggml_get_rows`), or `None` past the end.
    pub(crate) fn row(&self, row: usize) -> Option<Vec<f32>> {
        let per_row = self.k / QK;
        let blocks = self.blocks.get(row * per_row..(row + 1) * per_row)?;
        Some(
            blocks
                .iter()
                .flat_map(|b| {
                    let d = b.scale().to_f32();
                    b.values().map(move |q| f32::from(q) * d)
                })
                .collect(),
        )
    }

    /// `x` is `m × k` row-major; returns `m × n`.
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let a: Vec<BlockQ8_0> = quantize(x);
        let per_row = self.k / QK;
        let (w, shape) = (&self.blocks[..], (self.n, m, per_row));
        #[cfg(target_arch = "x86_64")]
        if m >= ROWS && crate::numerics::has_avx512_vnni() {
            // Sixteen rows at a time, then eight, then one.
            let big = m / 16 * 16;
            let (first, rest) = a.split_at(big * per_row);
            #[allow(unsafe_code)]
            // SAFETY: the CPU has AVX-512 F, BW, VL and VNNI, AVX2, FMA and F16C (checked above).
            return unsafe {
                let mut out = avx512::pair_matmul::<16, 8, B>(w, first, (self.n, big, per_row));
                out.extend(avx512::pair_matmul::<8, 4, B>(w, rest, (self.n, m - big, per_row)));
                out
            };
        }
        simd_return!(matmul_q8(w, &a, shape));
        par_matmul(
            w,
            shape,
            true,
            |w, r| dot_q8(w, row_of(&a, per_row, r)),
            |w, g| group_of::<_, ROWS>(&a, per_row, g).map(|a| dot_q8_scalar(w, a)),
        )
    }
}

/// Two activation rows' Q8_0 blocks at the same place, laid out for one 512-bit register
/// each (the AVX-512 prompt kernel): the values of both rows, minus `OFFSET` × each group
/// of four values' sum (the unsigned weights' offset taken back, per lane), and each row's
/// scale in its eight lanes.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct PairQ8_0 {
    qs: [i8; 2 * QK],
    offset: [i32; 16],
    d: [f32; 16],
}

/// The first `groups · 2P` rows of `a` (`per_row` blocks each; past its last row, the last
/// row again) as [`PairQ8_0`]s, laid out `[group][block][pair]` so that the kernel reads a
/// group's pairs in order.
#[cfg(target_arch = "x86_64")]
fn pairs_q8_0<const P: usize>(a: &[BlockQ8_0], groups: usize, per_row: usize, offset: i32) -> Vec<PairQ8_0> {
    let last = (a.len() / per_row.max(1)).saturating_sub(1);
    (0..groups * per_row * P)
        .into_par_iter()
        .with_min_len(64)
        .map(|i| {
            let (pair, block, group) = (i % P, i / P % per_row, i / (P * per_row));
            let first = group * 2 * P + 2 * pair;
            let mut out = PairQ8_0 { qs: [0; 2 * QK], offset: [0; 16], d: [0.0; 16] };
            for (half, row) in [first.min(last), (first + 1).min(last)].into_iter().enumerate() {
                let b = &a[row * per_row + block];
                out.qs[half * QK..(half + 1) * QK].copy_from_slice(&b.qs);
                for lane in 0..8 {
                    let sum: i32 = b.qs[lane * 4..lane * 4 + 4].iter().map(|&q| i32::from(q)).sum();
                    out.offset[half * 8 + lane] = -offset * sum;
                }
                out.d[half * 8..(half + 1) * 8].fill(b.d);
            }
            out
        })
        .collect()
}

/// ggml's `quantize_row_q8_0` (x86 SIMD version).
#[inline(always)]
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
fn dot_q8_scalar<B: Q8Weights>(w: &[B], a: &[BlockQ8_0]) -> f32 {
    let mut acc = [0f32; 8];
    for (wb, ab) in w.iter().zip(a) {
        let scale = wb.scale().to_f32() * ab.d;
        let values = wb.values();
        for (lane, slot) in acc.iter_mut().enumerate() {
            let sum: i32 = (lane * 4..lane * 4 + 4).map(|j| i32::from(values[j]) * i32::from(ab.qs[j])).sum();
            *slot = scale.mul_add(sum as f32, *slot);
        }
    }
    hsum_8(acc)
}

/// Super-block size of the K-quants.
const QK_K: usize = 256;

/// One Q8_K block of activations: `d * q`, with the sums of each 16 values.
struct BlockQ8K {
    d: f32,
    qs: [i8; QK_K],
    bsums: [i32; QK_K / 16],
    /// The sums of each 32 values (Q4_K's sub-blocks; at most 32 × 127 in magnitude), 16
    /// bits each so that a pair is one 32-bit lane of the Q4_K kernel.
    sums32: [i16; QK_K / 32],
}

/// ggml's `quantize_row_q8_K_ref` (what x86 builds use): the scale from the signed value
/// of largest magnitude, `-127 / max`, and `d` its reciprocal.
#[inline(always)]
fn quantize_q8_k(x: &[f32]) -> BlockQ8K {
    let mut block = BlockQ8K { d: 0.0, qs: [0; QK_K], bsums: [0; QK_K / 16], sums32: [0; QK_K / 32] };
    // The first value of the largest magnitude (ggml's loop keeps the first), found in two
    // passes that vectorise.
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        return block;
    }
    let max = x.iter().copied().find(|v| v.abs() == amax).unwrap_or(amax);
    let iscale = -127.0 / max;
    for (q, &v) in block.qs.iter_mut().zip(x) {
        *q = (iscale * v).round_ties_even().min(127.0) as i8;
    }
    for (sum, chunk) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
        *sum = chunk.iter().map(|&q| i32::from(q)).sum();
    }
    for (sum, pair) in block.sums32.iter_mut().zip(block.bsums.chunks_exact(2)) {
        // |Σ| ≤ 32 × 127: fits.
        *sum = (pair[0] + pair[1]) as i16;
    }
    block.d = 1.0 / iscale;
    block
}

/// A K-quant block unpacked for the scalar kernels: values as bytes, scales as ints.
struct BlockK {
    d: f32,
    /// Q4_K only: the scale of the per-sub-block minimums.
    dmin: f32,
    /// Q4_K: a scale and a minimum per 32 values; Q6_K: a scale per 16 values.
    scales: [i32; 16],
    mins: [i32; 8],
    qs: [i8; QK_K],
}

/// A Q4_K super-block, GGUF's 144 bytes as they are: f16 d and dmin, eight 6-bit scales
/// and minimums packed in 12 bytes, and nibbles (bytes `32c..32c+32` hold values
/// `64c..64c+32` in their low halves and the next 32 in their high halves).
#[derive(Clone, Copy)]
#[repr(C)]
struct BlockQ4K {
    d: f16,
    dmin: f16,
    scales: [u8; 12],
    qs: [u8; QK_K / 2],
}

impl BlockQ4K {
    /// The eight scales and the eight minimums (ggml's `get_scale_min_k4`).
    #[inline(always)]
    fn scales_mins(&self) -> ([u8; 8], [u8; 8]) {
        let packed = &self.scales;
        let (mut scales, mut mins) = ([0u8; 8], [0u8; 8]);
        for j in 0..8 {
            (scales[j], mins[j]) = if j < 4 {
                (packed[j] & 63, packed[j + 4] & 63)
            } else {
                ((packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4), (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4))
            };
        }
        (scales, mins)
    }

    fn unpack(&self) -> BlockK {
        let (scales, mins) = self.scales_mins();
        let mut block =
            BlockK { d: self.d.to_f32(), dmin: self.dmin.to_f32(), scales: [0; 16], mins: [0; 8], qs: [0; QK_K] };
        for j in 0..8 {
            (block.scales[j], block.mins[j]) = (i32::from(scales[j]), i32::from(mins[j]));
        }
        for chunk in 0..4 {
            for l in 0..32 {
                let byte = self.qs[chunk * 32 + l];
                block.qs[chunk * 64 + l] = (byte & 0x0F) as i8;
                block.qs[chunk * 64 + 32 + l] = (byte >> 4) as i8;
            }
        }
        block
    }
}

/// A Q6_K super-block, GGUF's 210 bytes as they are: low nibbles, high bit pairs, sixteen
/// signed scales, f16 d.
#[derive(Clone, Copy)]
#[repr(C)]
struct BlockQ6K {
    ql: [u8; QK_K / 2],
    qh: [u8; QK_K / 4],
    scales: [i8; QK_K / 16],
    d: f16,
}

impl BlockQ6K {
    fn scales(&self) -> [i32; 16] {
        self.scales.map(i32::from)
    }

    fn unpack(&self) -> BlockK {
        let mut block = BlockK { d: self.d.to_f32(), dmin: 0.0, scales: self.scales(), mins: [0; 8], qs: [0; QK_K] };
        for half in 0..2 {
            let (ql, qh, out) = (&self.ql[half * 64..], &self.qh[half * 32..], half * 128);
            for l in 0..32 {
                // Unsigned 6-bit values; the -32 offset is applied in the dot product.
                let value = |low: u8, shift: u32| (low | (((qh[l] >> shift) & 3) << 4)) as i8;
                block.qs[out + l] = value(ql[l] & 0x0F, 0);
                block.qs[out + l + 32] = value(ql[l + 32] & 0x0F, 2);
                block.qs[out + l + 64] = value(ql[l] >> 4, 4);
                block.qs[out + l + 96] = value(ql[l + 32] >> 4, 6);
            }
        }
        block
    }
}

/// The super-blocks of eight Q4_K rows at one position, repacked at load (as ggml repacks
/// Q4_K into `block_q4_Kx8`, in a layout of Kith's own) so that one 32-byte load holds four
/// values of each of the eight rows: `qs[8p + step][row]` is the row's bytes
/// `32p + 4·step..+4`, whose low nibbles are values `4·step..+4` of sub-block `2p` and high
/// nibbles the same of sub-block `2p + 1`. The scale bytes are the rows' twelve, byte `i` of
/// row `r` at `scales[i][r]`, so eight rows decode together. 1152 bytes, as the eight
/// blocks take in the file.
#[derive(Clone, Copy)]
#[repr(C)]
struct BlockQ4Kx8 {
    d: [f16; 8],
    dmin: [f16; 8],
    scales: [[u8; 8]; 12],
    qs: [[[u8; 4]; 8]; 32],
}

impl BlockQ4Kx8 {
    fn pack(rows: [&BlockQ4K; 8]) -> Self {
        let mut block = Self { d: [f16::ZERO; 8], dmin: [f16::ZERO; 8], scales: [[0; 8]; 12], qs: [[[0; 4]; 8]; 32] };
        for (r, row) in rows.iter().enumerate() {
            (block.d[r], block.dmin[r]) = (row.d, row.dmin);
            for (i, &byte) in row.scales.iter().enumerate() {
                block.scales[i][r] = byte;
            }
            for (chunk, bytes) in row.qs.chunks_exact(4).enumerate() {
                block.qs[chunk][r].copy_from_slice(bytes);
            }
        }
        block
    }

    /// Row `r`'s super-block as the file holds it.
    fn row(&self, r: usize) -> BlockQ4K {
        let mut row = BlockQ4K { d: self.d[r], dmin: self.dmin[r], scales: [0; 12], qs: [0; QK_K / 2] };
        for (i, byte) in row.scales.iter_mut().enumerate() {
            *byte = self.scales[i][r];
        }
        for (chunk, bytes) in row.qs.chunks_exact_mut(4).enumerate() {
            bytes.copy_from_slice(&self.qs[chunk][r]);
        }
        row
    }

    /// The eight rows' scales and minimums of each sub-block (byte `r` of `[s]` for row `r`):
    /// [`BlockQ4K::scales_mins`] on the eight rows at once, a byte per row.
    #[inline(always)]
    fn scales_mins(&self) -> ([u64; 8], [u64; 8]) {
        const LOW6: u64 = 0x3f3f_3f3f_3f3f_3f3f;
        const LOW4: u64 = 0x0f0f_0f0f_0f0f_0f0f;
        const LOW2: u64 = 0x0303_0303_0303_0303;
        let packed = self.scales.map(u64::from_le_bytes);
        let (mut scales, mut mins) = ([0u64; 8], [0u64; 8]);
        for j in 0..4 {
            scales[j] = packed[j] & LOW6;
            mins[j] = packed[j + 4] & LOW6;
            scales[j + 4] = (packed[j + 8] & LOW4) | (((packed[j] >> 6) & LOW2) << 4);
            mins[j + 4] = ((packed[j + 8] >> 4) & LOW4) | (((packed[j + 4] >> 6) & LOW2) << 4);
        }
        (scales, mins)
    }
}

// SAFETY: repr(C), 144 bytes without padding (checked below), f16 and bytes only.
#[allow(unsafe_code)]
unsafe impl RawBlock for BlockQ4K {}
const _: () = assert!(size_of::<BlockQ4K>() == 144);
// SAFETY: repr(C), 1152 bytes without padding (checked below), f16 and bytes only.
#[allow(unsafe_code)]
unsafe impl RawBlock for BlockQ4Kx8 {}
const _: () = assert!(size_of::<BlockQ4Kx8>() == 8 * 144);
// SAFETY: repr(C), 210 bytes without padding (checked below), bytes and f16 only.
#[allow(unsafe_code)]
unsafe impl RawBlock for BlockQ6K {}
const _: () = assert!(size_of::<BlockQ6K>() == 210);

/// The super-blocks of eight Q6_K rows at one position, repacked at load as [`BlockQ4Kx8`]
/// is: `ql[c][row]` is the row's low-nibble bytes `4c..4c+4`, `qh[c][row]` its high-bit
/// bytes `4c..4c+4`, `scales[g][row]` its scale of values `16g..16g+16`. 1680 bytes, as the
/// eight blocks take in the file.
#[derive(Clone, Copy)]
#[repr(C)]
struct BlockQ6Kx8 {
    ql: [[[u8; 4]; 8]; 32],
    qh: [[[u8; 4]; 8]; 16],
    scales: [[i8; 8]; 16],
    d: [f16; 8],
}

impl BlockQ6Kx8 {
    fn pack(rows: [&BlockQ6K; 8]) -> Self {
        let mut block = Self { ql: [[[0; 4]; 8]; 32], qh: [[[0; 4]; 8]; 16], scales: [[0; 8]; 16], d: [f16::ZERO; 8] };
        for (r, row) in rows.iter().enumerate() {
            block.d[r] = row.d;
            for (chunk, bytes) in row.ql.chunks_exact(4).enumerate() {
                block.ql[chunk][r].copy_from_slice(bytes);
            }
            for (chunk, bytes) in row.qh.chunks_exact(4).enumerate() {
                block.qh[chunk][r].copy_from_slice(bytes);
            }
            for (g, &scale) in row.scales.iter().enumerate() {
                block.scales[g][r] = scale;
            }
        }
        block
    }

    /// Row `r`'s super-block as the file holds it.
    fn row(&self, r: usize) -> BlockQ6K {
        let mut row = BlockQ6K { ql: [0; QK_K / 2], qh: [0; QK_K / 4], scales: [0; QK_K / 16], d: self.d[r] };
        for (chunk, bytes) in row.ql.chunks_exact_mut(4).enumerate() {
            bytes.copy_from_slice(&self.ql[chunk][r]);
        }
        for (chunk, bytes) in row.qh.chunks_exact_mut(4).enumerate() {
            bytes.copy_from_slice(&self.qh[chunk][r]);
        }
        for (g, scale) in row.scales.iter_mut().enumerate() {
            *scale = self.scales[g][r];
        }
        row
    }
}

// SAFETY: repr(C), 1680 bytes without padding (checked below), bytes and f16 only.
#[allow(unsafe_code)]
unsafe impl RawBlock for BlockQ6Kx8 {}
const _: () = assert!(size_of::<BlockQ6Kx8>() == 8 * 210);

enum KBlocks {
    /// Rows in groups of eight, the last group padded with zero rows (both types).
    Q4K(Blocks<BlockQ4Kx8>),
    Q6K(Blocks<BlockQ6Kx8>),
}

/// A Q4_K or Q6_K weight matrix of `n` rows by `k` columns, multiplied by Q8_K activations
/// in the order of the kernel llama.cpp's x86 build runs for it.
pub(crate) struct KMatrix {
    n: usize,
    k: usize,
    blocks: KBlocks,
}

impl KMatrix {
    /// Reads a Q4_K matrix's GGUF bytes into `arena`, repacked eight rows at a time
    /// ([`BlockQ4Kx8`]; `n` rounded up to a multiple of 8 rows); `Ok(None)` when `k` is not
    /// a whole number of blocks.
    pub(crate) fn read_q4_k(
        arena: &Arc<Arena>,
        reader: impl Read,
        n: usize,
        k: usize,
    ) -> std::io::Result<Option<Self>> {
        let zero = BlockQ4K { d: f16::ZERO, dmin: f16::ZERO, scales: [0; 12], qs: [0; QK_K / 2] };
        let blocks = read_repacked(arena, reader, (n, k), zero, BlockQ4Kx8::pack)?;
        Ok(blocks.map(|blocks| Self { n, k, blocks: KBlocks::Q4K(blocks) }))
    }

    /// The same for Q6_K ([`BlockQ6Kx8`]).
    pub(crate) fn read_q6_k(
        arena: &Arc<Arena>,
        reader: impl Read,
        n: usize,
        k: usize,
    ) -> std::io::Result<Option<Self>> {
        let zero = BlockQ6K { ql: [0; QK_K / 2], qh: [0; QK_K / 4], scales: [0; QK_K / 16], d: f16::ZERO };
        let blocks = read_repacked(arena, reader, (n, k), zero, BlockQ6Kx8::pack)?;
        Ok(blocks.map(|blocks| Self { n, k, blocks: KBlocks::Q6K(blocks) }))
    }

    #[cfg(test)]
    fn from_q4_k_bytes(bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        if bytes.len() != n * k / QK_K * 144 {
            return None;
        }
        let padded = n.next_multiple_of(8) * k / QK_K * 144;
        Self::read_q4_k(&Arena::new(padded + crate::weights::ALIGN), bytes, n, k).ok().flatten()
    }

    #[cfg(test)]
    fn from_q6_k_bytes(bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        if bytes.len() != n * k / QK_K * 210 {
            return None;
        }
        let padded = n.next_multiple_of(8) * k / QK_K * 210;
        Self::read_q6_k(&Arena::new(padded + crate::weights::ALIGN), bytes, n, k).ok().flatten()
    }

    /// `x` is `m × k` row-major; returns `m × n`. ggml picks its kernel by batch size,
    /// and so does this: repacked Q4_K takes rows four at a time through its gemm kernel and
    /// the rest through its gemv kernel; Q6_K batches of 8 rows or more go through the tiled
    /// K-quant kernel, smaller ones through `ggml_vec_dot_q6_K_q8_K`. (ggml repacks Q4_K only
    /// when the row count is a multiple of 8, as in every catalog model; other Q4_K
    /// matrices still get the repacked arithmetic here, close to but not bit-equal with
    /// ggml's tiled and `vec_dot` paths for them.)
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let a: Vec<BlockQ8K> = quantize(x);
        let per_row = self.k / QK_K;
        let shape = (self.n, m, per_row);
        let row = |row| row_of(&a, per_row, row);
        match &self.blocks {
            KBlocks::Q4K(blocks) => {
                simd_return!(matmul_q4_k(blocks, &a, shape));
                par_matmul_x8(blocks, shape, |w, first, rows| {
                    let mut out = [[0f32; 8]; ROWS];
                    for (r, out) in out.iter_mut().enumerate().take(rows) {
                        // Rows outside the groups of four: the gemv kernel's arithmetic.
                        *out = dot8_q4_k_scalar(w, row(first + r), rows > 1);
                    }
                    out
                })
            }
            KBlocks::Q6K(blocks) => {
                simd_return!(matmul_q6_k(blocks, &a, shape));
                par_matmul_x8(blocks, shape, |w, first, rows| {
                    let mut out = [[0f32; 8]; ROWS];
                    for (r, out) in out.iter_mut().enumerate().take(rows) {
                        *out = dot8_q6_k_scalar(w, row(first + r), m >= 8);
                    }
                    out
                })
            }
        }
    }
}

/// A K-quant matrix of `n` rows by `k` columns read from `reader` (GGUF's row-major
/// blocks) into `arena` in groups of eight rows, `pack`ed together; rows past `n` in the
/// last group are `zero`. `Ok(None)` when `k` is not a whole number of blocks.
fn read_repacked<B: RawBlock, P: RawBlock>(
    arena: &Arc<Arena>,
    mut reader: impl Read,
    (n, k): (usize, usize),
    zero: B,
    pack: impl Fn([&B; 8]) -> P,
) -> std::io::Result<Option<Blocks<P>>> {
    if !k.is_multiple_of(QK_K) {
        return Ok(None);
    }
    let per_row = k / QK_K;
    let count = n.div_ceil(8).checked_mul(per_row).ok_or(std::io::ErrorKind::InvalidInput)?;
    let mut rows = vec![zero; 8 * per_row];
    let blocks = arena.fill(count, |groups: &mut [P]| {
        for (g, group) in groups.chunks_exact_mut(per_row.max(1)).enumerate() {
            let present = (n - 8 * g).min(8);
            reader.read_exact(crate::weights::as_bytes_mut(&mut rows[..present * per_row]))?;
            rows[present * per_row..].fill(zero);
            for (b, block) in group.iter_mut().enumerate() {
                *block = pack(std::array::from_fn(|r| &rows[r * per_row + b]));
            }
        }
        Ok(())
    })?;
    Ok(Some(blocks))
}

/// Q4_K × Q8_K as ggml's repacked x86 kernels compute one output: integer dots scaled per
/// sub-block, fused into an f32 accumulator (and the minimums' integer sums into another),
/// one subtraction at the end. The gemv kernel fuses once per super-block, the gemm kernel
/// (`gemm`: rows taken four at a time) once per pair of sub-blocks.
fn dot_q4_k_scalar(w: impl IntoIterator<Item = BlockQ4K>, a: &[BlockQ8K], gemm: bool) -> f32 {
    let (mut acc, mut acc_min) = (0f32, 0f32);
    for (wb, ab) in w.into_iter().zip(a) {
        let wb = wb.unpack();
        let (scale, scale_min) = (wb.d * ab.d, wb.dmin * ab.d);
        let (mut sum, mut mins) = (0i32, 0i32);
        for sub in 0..8 {
            let range = sub * 32..sub * 32 + 32;
            let dot: i32 =
                wb.qs[range.clone()].iter().zip(&ab.qs[range]).map(|(&q, &y)| i32::from(q) * i32::from(y)).sum();
            sum += wb.scales[sub] * dot;
            mins += wb.mins[sub] * i32::from(ab.sums32[sub]);
            if gemm && sub % 2 == 1 {
                acc = (sum as f32).mul_add(scale, acc);
                acc_min = (mins as f32).mul_add(scale_min, acc_min);
                (sum, mins) = (0, 0);
            }
        }
        if !gemm {
            acc = (sum as f32).mul_add(scale, acc);
            acc_min = (mins as f32).mul_add(scale_min, acc_min);
        }
    }
    acc - acc_min
}

/// The eight rows of a group of repacked Q4_K rows against one activation row.
fn dot8_q4_k_scalar(w: &[BlockQ4Kx8], a: &[BlockQ8K], gemm: bool) -> [f32; 8] {
    std::array::from_fn(|r| dot_q4_k_scalar(w.iter().map(|block| block.row(r)), a, gemm))
}

/// Q6_K × Q8_K as ggml's `ggml_vec_dot_q6_K_q8_K` (x86 AVX2 path): eight integer lanes,
/// lane `l` holding the unsigned 6-bit products of values `4l..4l+4` of every group of 32
/// (each scaled per 16 values), minus the -32 offset taken from the activation sums of the
/// `l`-th group of 32; fused into eight f32 accumulators per super-block, one horizontal
/// sum at the end.
fn dot_q6_k_scalar(w: impl IntoIterator<Item = BlockQ6K>, a: &[BlockQ8K]) -> f32 {
    let mut acc = [0f32; 8];
    for (wb, ab) in w.into_iter().zip(a) {
        let wb = wb.unpack();
        let d = ab.d * wb.d;
        let mut lanes = [0i32; 8];
        for (e, (&q, &y)) in wb.qs.iter().zip(&ab.qs).enumerate() {
            lanes[(e % 32) / 4] += wb.scales[e / 16] * i32::from(q) * i32::from(y);
        }
        for (lane, sum) in lanes.iter_mut().enumerate() {
            *sum -= 32 * (ab.bsums[2 * lane] * wb.scales[2 * lane] + ab.bsums[2 * lane + 1] * wb.scales[2 * lane + 1]);
        }
        for (slot, lane) in acc.iter_mut().zip(lanes) {
            *slot = d.mul_add(lane as f32, *slot);
        }
    }
    hsum_8(acc)
}

/// Q6_K × Q8_K as ggml's tiled K-quant matmul (`ggml-cpu/tiled`, AVX-512 VNNI kernel)
/// computes one output of a batch: per super-block one exact integer sum (the -32 offset
/// from the activation sums), converted to f32 and scaled by the weight's `d`, then fused
/// with the activation's `d` into one accumulator.
fn dot_q6_k_tiled_scalar(w: impl IntoIterator<Item = BlockQ6K>, a: &[BlockQ8K]) -> f32 {
    let mut acc = 0f32;
    for (wb, ab) in w.into_iter().zip(a) {
        let wb = wb.unpack();
        let mut sum = 0i32;
        for (group, (q, y)) in wb.qs.chunks_exact(16).zip(ab.qs.chunks_exact(16)).enumerate() {
            let raw: i32 = q.iter().zip(y).map(|(&q, &y)| i32::from(q) * i32::from(y)).sum();
            sum += wb.scales[group] * (raw - 32 * ab.bsums[group]);
        }
        acc = ((sum as f32) * wb.d).mul_add(ab.d, acc);
    }
    acc
}

/// The eight rows of a group of repacked Q6_K rows against one activation row: the tiled
/// kernel's arithmetic (`tiled`) or `ggml_vec_dot_q6_K_q8_K`'s.
fn dot8_q6_k_scalar(w: &[BlockQ6Kx8], a: &[BlockQ8K], tiled: bool) -> [f32; 8] {
    let rows = |r| w.iter().map(move |block| block.row(r));
    std::array::from_fn(|r| if tiled { dot_q6_k_tiled_scalar(rows(r), a) } else { dot_q6_k_scalar(rows(r), a) })
}

macro_rules! dispatch {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty => $avx2:ident, $scalar:expr) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) -> $ret {
            simd_return!($avx2($($arg),*));
            $scalar
        }
    };
}

dispatch!(
    /// Q4_1 × Q8_1: AVX2 when the CPU has it, the same arithmetic in scalar code otherwise.
    fn dot_q4_1(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 => dot_q4_1, dot_q4_1_scalar(w, a)
);
/// Q4_1 × Q8_1 for `R` activation rows.
fn dotn_q4_1<const R: usize>(w: &[BlockQ4_1], a: [&[BlockQ8_1]; R]) -> [f32; R] {
    simd_return!(dotn_q4_1(w, a));
    a.map(|a| dot_q4_1_scalar(w, a))
}
/// Q8_0 or Q5_0 × Q8_0.
fn dot_q8<B: Q8Weights>(w: &[B], a: &[BlockQ8_0]) -> f32 {
    simd_return!(dot_q8(w, a));
    dot_q8_scalar(w, a)
}

/// Q8_0 or Q5_0 × Q8_0 for `R` activation rows.
#[cfg(test)]
fn dotn_q8<const R: usize, B: Q8Weights>(w: &[B], a: [&[BlockQ8_0]; R]) -> [f32; R] {
    let len = a.iter().fold(w.len(), |len, a| len.min(a.len()));
    let tiles: Vec<TileQ8_0<R>> = (0..len).map(|i| TileQ8_0::new::<B>(a.map(|a| &a[i]))).collect();
    simd_return!(dotn_q8(w, &tiles));
    a.map(|a| dot_q8_scalar(w, a))
}

/// `R` activation rows' Q8_0 blocks at the same place, side by side: what the AVX2 prompt
/// kernel reads for one weight block. For weights whose values are `NARROW`, the values are
/// stored plus 128, as unsigned bytes.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct TileQ8_0<const R: usize> {
    qs: [[i8; QK]; R],
    d: [f32; R],
}

impl<const R: usize> TileQ8_0<R> {
    fn new<B: Q8Weights>(blocks: [&BlockQ8_0; R]) -> Self {
        let flip = if B::NARROW { 0x80u8 as i8 } else { 0 };
        Self { qs: blocks.map(|b| b.qs.map(|q| q ^ flip)), d: blocks.map(|b| b.d) }
    }
}

/// The tiles for weights `B` of every group of `R` rows that [`par_matmul`] forms (with
/// padding) from `m` rows of `per_row` blocks: `[group][block]`.
fn tiles_q8_0<const R: usize, B: Q8Weights>(a: &[BlockQ8_0], m: usize, per_row: usize) -> Vec<TileQ8_0<R>> {
    let groups = if m >= R { m.div_ceil(R) } else { 0 };
    (0..groups * per_row)
        .into_par_iter()
        .with_min_len(64)
        .map(|t| TileQ8_0::new::<B>(group_of::<_, R>(a, per_row, t / per_row.max(1)).map(|row| &row[t % per_row])))
        .collect()
}

/// The kernels above with AVX2 integer arithmetic (exact, so any partition of the integer
/// sums gives the same result) and the same floating-point steps as the scalar versions,
/// compiled twice: `avx2`, and `avx2_vnni` where each block's integer products take one
/// VNNI instruction (`vpdpbusd`) instead of two (the same sums). The four-row kernels
/// decode each weight block once and keep each row's accumulator apart, so every row gets
/// the one-row kernel's bits.
macro_rules! avx2_kernels {
    ($module:ident, $features:literal, $vnni:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        mod $module {
            use std::arch::x86_64::*;

            use super::{
                BlockQ4_1, BlockQ4Kx8, BlockQ6Kx8, BlockQ8_0, BlockQ8_1, BlockQ8K, FEW_ROWS, Q8Weights, QK, QK_K, ROWS,
                TileQ8_0, group_of, hsum_8, par_matmul, par_matmul_x8, row_of, tiles_q8_0,
            };

            // Whole products: the closures below inherit this module's target features, so the
            // kernels inline into them and the CPU check happens once per product.

            #[target_feature(enable = $features)]
            pub(super) fn matmul_q4_1(w: &[BlockQ4_1], a: &[BlockQ8_1], shape: (usize, usize, usize)) -> Vec<f32> {
                let per_row = shape.2;
                let dot = |w: &[BlockQ4_1], r| dot_q4_1(w, row_of(a, per_row, r));
                if (FEW_ROWS..ROWS).contains(&shape.1) {
                    return par_matmul(w, shape, true, dot, |w, g| dotn_q4_1::<FEW_ROWS>(w, group_of(a, per_row, g)));
                }
                par_matmul(w, shape, true, dot, |w, g| dotn_q4_1::<ROWS>(w, group_of(a, per_row, g)))
            }

            #[target_feature(enable = $features)]
            pub(super) fn matmul_q8<B: Q8Weights>(w: &[B], a: &[BlockQ8_0], shape: (usize, usize, usize)) -> Vec<f32> {
                let per_row = shape.2;
                let dot = |w: &[B], r| dot_q8(w, row_of(a, per_row, r));
                let m = shape.1;
                if (FEW_ROWS..ROWS).contains(&m) {
                    let tiles = tiles_q8_0::<FEW_ROWS, B>(a, m, per_row);
                    let group = |g: usize| &tiles[g * per_row..(g + 1) * per_row];
                    return par_matmul(w, shape, true, dot, |w, g| dotn_q8::<FEW_ROWS, B>(w, group(g)));
                }
                let tiles = tiles_q8_0::<ROWS, B>(a, m, per_row);
                let group = |g: usize| &tiles[g * per_row..(g + 1) * per_row];
                par_matmul(w, shape, true, dot, |w, g| dotn_q8::<ROWS, B>(w, group(g)))
            }

            #[target_feature(enable = $features)]
            pub(super) fn matmul_q4_k(w: &[BlockQ4Kx8], a: &[BlockQ8K], shape: (usize, usize, usize)) -> Vec<f32> {
                let per_row = shape.2;
                par_matmul_x8(w, shape, |w, first, rows| {
                    let mut out = [[0f32; 8]; ROWS];
                    match rows {
                        ROWS => out = dot8_q4_k::<ROWS, true>(w, group_of(a, per_row, first / ROWS)),
                        4 => out[..4].copy_from_slice(&dot8_q4_k::<4, true>(w, group_of(a, per_row, first / 4))),
                        _ => out[0] = dot8_q4_k::<1, false>(w, [row_of(a, per_row, first)])[0],
                    }
                    out
                })
            }

            #[target_feature(enable = $features)]
            pub(super) fn matmul_q6_k(w: &[BlockQ6Kx8], a: &[BlockQ8K], shape: (usize, usize, usize)) -> Vec<f32> {
                let per_row = shape.2;
                let tiled = shape.1 >= 8;
                par_matmul_x8(w, shape, |w, first, rows| {
                    let mut out = [[0f32; 8]; ROWS];
                    match rows {
                        ROWS if tiled => out = dot8_q6_k_tiled::<ROWS>(w, group_of(a, per_row, first / ROWS)),
                        4 if tiled => {
                            out[..4].copy_from_slice(&dot8_q6_k_tiled::<4>(w, group_of(a, per_row, first / 4)))
                        }
                        _ if tiled => out[0] = dot8_q6_k_tiled::<1>(w, [row_of(a, per_row, first)])[0],
                        _ => {
                            for (r, out) in out.iter_mut().enumerate().take(rows) {
                                *out = dot8_q6_k(w, row_of(a, per_row, first + r));
                            }
                        }
                    }
                    out
                })
            }

            /// A Q8_0 or Q5_0 block's scale in every lane. (All lanes are used, so the compiler
            /// keeps the broadcast load: converting one lane, it inserts the 16 bits into a register
            /// still in use, which chains each block to the previous block's last accumulation.)
            #[inline]
            #[target_feature(enable = $features)]
            fn scale8<B: Q8Weights>(block: &B) -> __m256 {
                _mm256_cvtph_ps(_mm_set1_epi16(block.scale().to_bits() as i16))
            }

            /// A Q4_1 block's `d` and `m`.
            #[inline]
            #[target_feature(enable = $features)]
            fn widen_q4_1(wb: &BlockQ4_1) -> (f32, f32) {
                let bits = i32::from(wb.d.to_bits()) | (i32::from(wb.m.to_bits()) << 16);
                let both = _mm_cvtph_ps(_mm_set1_epi32(bits));
                (_mm_cvtss_f32(both), _mm_cvtss_f32(_mm_movehdup_ps(both)))
            }

            /// Lane `l`: Σ x[j]·y[j] over j in 4l..4l+4, for |x| ≤ 127 (ggml's `mul_sum_i8_pairs`).
            #[inline]
            #[target_feature(enable = $features)]
            fn lanes_i8(x: __m256i, y: __m256i) -> __m256i {
                lanes_u8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
            }

            /// The same for unsigned x ≤ 127.
            #[inline]
            #[target_feature(enable = $features)]
            fn lanes_u8(x: __m256i, y: __m256i) -> __m256i {
                // The pair sums cannot saturate 16 bits (x ≤ 127, |y| ≤ 128), so VNNI's one
                // instruction gives the same sums as the two of AVX2.
                if $vnni {
                    #[allow(unused_unsafe)]
                    // SAFETY: this copy of the kernels is compiled with AVX-512 VNNI and VL.
                    return unsafe { _mm256_dpbusd_epi32(_mm256_setzero_si256(), x, y) };
                }
                _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
            }

            #[inline]
            #[target_feature(enable = $features)]
            fn load(bytes: &[i8]) -> __m256i {
                debug_assert!(bytes.len() >= 32);
                // SAFETY: 32 bytes are readable (unaligned load).
                unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
            }

            #[inline]
            #[target_feature(enable = $features)]
            fn hsum_f32(v: __m256) -> f32 {
                let mut lanes = [0f32; 8];
                // SAFETY: 32 writable bytes.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
                hsum_8(lanes)
            }

            /// The blocks the kernels may read: each activation row cut to the weight row's length
            /// (index loops over them, rather than iterator adapters: closures and `array::map`
            /// are compiled without this module's target features and were not always inlined).
            #[inline]
            fn cut<'a, const R: usize, W, A>(w: &'a [W], a: [&'a [A]; R]) -> (&'a [W], [&'a [A]; R]) {
                let len = a.iter().fold(w.len(), |len, a| len.min(a.len()));
                let mut rows = a;
                for row in &mut rows {
                    *row = &row[..len];
                }
                (&w[..len], rows)
            }

            #[inline]
            #[target_feature(enable = $features)]
            fn q4_1_nibbles(wb: &BlockQ4_1) -> __m256i {
                // SAFETY: 16 readable bytes.
                let packed = unsafe { _mm_loadu_si128(wb.qs.as_ptr().cast()) };
                _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F))
            }

            #[target_feature(enable = $features)]
            pub(super) fn dot_q4_1(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
                let mut acc = _mm256_setzero_ps();
                let mut mins = 0f32;
                for (wb, ab) in w.iter().zip(a) {
                    prefetch(wb);
                    let (d, m) = widen_q4_1(wb);
                    mins = m.mul_add(ab.s, mins);
                    let sums = lanes_u8(q4_1_nibbles(wb), load(&ab.qs));
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * ab.d), _mm256_cvtepi32_ps(sums), acc);
                }
                debug_assert_eq!(QK, 32);
                hsum_f32(acc) + mins
            }

            #[target_feature(enable = $features)]
            pub(super) fn dotn_q4_1<const R: usize>(w: &[BlockQ4_1], a: [&[BlockQ8_1]; R]) -> [f32; R] {
                let mut acc = [_mm256_setzero_ps(); R];
                let mut mins = [0f32; R];
                let (w, a) = cut(w, a);
                for (i, wb) in w.iter().enumerate() {
                    let nibbles = q4_1_nibbles(wb);
                    let (d, m) = widen_q4_1(wb);
                    for r in 0..R {
                        let ab = &a[r][i];
                        mins[r] = m.mul_add(ab.s, mins[r]);
                        let sums = lanes_u8(nibbles, load(&ab.qs));
                        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * ab.d), _mm256_cvtepi32_ps(sums), acc[r]);
                    }
                }
                let mut out = [0f32; R];
                for r in 0..R {
                    out[r] = hsum_f32(acc[r]) + mins[r];
                }
                out
            }

            /// Asks for the cache line `AHEAD` bytes past `block`: one activation row reads each
            /// weight once, from memory, and the hardware prefetchers alone fall behind.
            #[inline]
            #[target_feature(enable = $features)]
            fn prefetch<T>(block: &T) {
                const AHEAD: usize = 2048;
                // A prefetch never faults, whatever the address.
                _mm_prefetch::<_MM_HINT_T0>((block as *const T).cast::<i8>().wrapping_add(AHEAD));
            }

            #[target_feature(enable = $features)]
            pub(super) fn dot_q8<B: Q8Weights>(w: &[B], a: &[BlockQ8_0]) -> f32 {
                let mut acc = _mm256_setzero_ps();
                for (wb, ab) in w.iter().zip(a) {
                    prefetch(wb);
                    // SAFETY: AVX2 is enabled here.
                    let sums = lanes_i8(unsafe { wb.bytes() }, load(&ab.qs));
                    acc =
                        _mm256_fmadd_ps(_mm256_mul_ps(scale8(wb), _mm256_set1_ps(ab.d)), _mm256_cvtepi32_ps(sums), acc);
                }
                hsum_f32(acc)
            }

            /// Blocks whose scale products [`dotn_q8`] computes ahead of their integer sums.
            const SCALED: usize = 8;

            /// [`dot_q8`] for `R` activation rows, given as one [`TileQ8_0`] per block. Each
            /// weight block is decoded once for the rows, and the products of the weight's and
            /// the rows' scales are computed `R` at a time, a run of blocks ahead, so that each
            /// row's step reads its own from memory. Q5_0's values (`NARROW`) go in signed and
            /// the tiles' activations unsigned (plus 128): the pair sums less 128 times the pair's
            /// weights (once per block) are the signed pair sums, exactly, with no sign fix-up
            /// per row.
            #[target_feature(enable = $features)]
            pub(super) fn dotn_q8<const R: usize, B: Q8Weights>(w: &[B], tiles: &[TileQ8_0<R>]) -> [f32; R] {
                let mut acc = [_mm256_setzero_ps(); R];
                let len = w.len().min(tiles.len());
                let mut products = [[0f32; R]; SCALED];
                for (w, tiles) in w[..len].chunks(SCALED).zip(tiles[..len].chunks(SCALED)) {
                    for ((product, wb), tile) in products.iter_mut().zip(w).zip(tiles) {
                        // d_w · d_a: the scalar product's bits.
                        let (d, out) = (scale8(wb), product.as_mut_ptr());
                        // SAFETY: `R` readable and writable floats.
                        unsafe {
                            match R {
                                8 => _mm256_storeu_ps(out, _mm256_mul_ps(d, _mm256_loadu_ps(tile.d.as_ptr()))),
                                4 => _mm_storeu_ps(
                                    out,
                                    _mm_mul_ps(_mm256_castps256_ps128(d), _mm_loadu_ps(tile.d.as_ptr())),
                                ),
                                _ => {
                                    let d = _mm256_cvtss_f32(d);
                                    for r in 0..R {
                                        product[r] = d * tile.d[r];
                                    }
                                }
                            }
                        }
                    }
                    for ((wb, tile), products) in w.iter().zip(tiles).zip(&products) {
                        // SAFETY: AVX2 is enabled here.
                        let values = unsafe { wb.bytes() };
                        if B::NARROW {
                            let offset = narrow_offset(values);
                            for r in 0..R {
                                let sums = narrow_lanes(load(&tile.qs[r]), values, offset);
                                let scale = _mm256_broadcast_ss(&products[r]);
                                acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), acc[r]);
                            }
                        } else {
                            // `lanes_i8` with the weight's half done once.
                            let magnitudes = _mm256_sign_epi8(values, values);
                            for r in 0..R {
                                let sums = lanes_u8(magnitudes, _mm256_sign_epi8(load(&tile.qs[r]), values));
                                let scale = _mm256_broadcast_ss(&products[r]);
                                acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), acc[r]);
                            }
                        }
                    }
                }
                let mut out = [0f32; R];
                if R == 8 {
                    let sums = hsum_8x8(std::array::from_fn(|r| acc[r]));
                    out.copy_from_slice(&sums[..R]);
                } else {
                    for r in 0..R {
                        out[r] = hsum_f32(acc[r]);
                    }
                }
                out
            }

            /// [`hsum_8`] of eight vectors at once, in registers: each sum the scalar one
            /// (addition is commutative, and the grouping is kept).
            #[inline]
            #[target_feature(enable = $features)]
            fn hsum_8x8(v: [__m256; 8]) -> [f32; 8] {
                // [v4 + v0, v5 + v1, v6 + v2, v7 + v3] of vectors 2p (low half) and 2p + 1.
                let r: [__m256; 4] = std::array::from_fn(|p| {
                    let (a, b) = (v[2 * p], v[2 * p + 1]);
                    _mm256_add_ps(_mm256_permute2f128_ps::<0x31>(a, b), _mm256_permute2f128_ps::<0x20>(a, b))
                });
                // [r0 + r2, r1 + r3] of vectors 4q, 4q + 2 (low half), 4q + 1, 4q + 3.
                let t: [__m256; 2] = std::array::from_fn(|q| {
                    let (a, b) = (r[2 * q], r[2 * q + 1]);
                    _mm256_add_ps(_mm256_shuffle_ps::<0b01_00_01_00>(a, b), _mm256_shuffle_ps::<0b11_10_11_10>(a, b))
                });
                // (r0 + r2) + (r1 + r3): vectors 0, 2, 4, 6 (low half), 1, 3, 5, 7.
                let sums = _mm256_add_ps(
                    _mm256_shuffle_ps::<0b10_00_10_00>(t[0], t[1]),
                    _mm256_shuffle_ps::<0b11_01_11_01>(t[0], t[1]),
                );
                let ordered = _mm256_permutevar8x32_ps(sums, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                let mut out = [0f32; 8];
                // SAFETY: 32 writable bytes.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), ordered) };
                out
            }

            /// What [`narrow_lanes`] takes back for signed weight `values` (|v| ≤ 16): 128 ×
            /// each pair's sum in 16 bits (each group of four's, negated, with VNNI).
            #[inline]
            #[target_feature(enable = $features)]
            fn narrow_offset(values: __m256i) -> __m256i {
                let flip = _mm256_set1_epi8(0x80u8 as i8);
                if $vnni {
                    #[allow(unused_unsafe)]
                    // SAFETY: this copy of the kernels is compiled with AVX-512 VNNI and VL.
                    let sums = unsafe { _mm256_dpbusd_epi32(_mm256_setzero_si256(), flip, values) };
                    return _mm256_sub_epi32(_mm256_setzero_si256(), sums);
                }
                _mm256_maddubs_epi16(flip, values)
            }

            /// Lane `l`: Σ y[j]·v[j] over j in 4l..4l+4, from `unsigned` = y + 128 and signed
            /// `values` with |v| ≤ 16 (no pair sum saturates), `offset` their
            /// [`narrow_offset`].
            #[inline]
            #[target_feature(enable = $features)]
            fn narrow_lanes(unsigned: __m256i, values: __m256i, offset: __m256i) -> __m256i {
                if $vnni {
                    #[allow(unused_unsafe)]
                    // SAFETY: this copy of the kernels is compiled with AVX-512 VNNI and VL.
                    return unsafe { _mm256_dpbusd_epi32(offset, unsigned, values) };
                }
                let pairs = _mm256_sub_epi16(_mm256_maddubs_epi16(unsigned, values), offset);
                _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
            }

            /// The eight rows of a group of repacked Q4_K rows ([`BlockQ4Kx8`]) against `R`
            /// activation rows, with the arithmetic of ggml's repacked gemm kernel (`GEMM`:
            /// fused once per pair of sub-blocks) or gemv kernel (once per super-block).
            /// Lane `j` of every vector is weight row `j`. Per sub-block and activation row,
            /// eight `maddubs` take four values of every weight row against the activation's
            /// four values broadcast; their 16-bit sums (each of 16 products of a nibble and
            /// an activation of magnitude ≤ 127: at most 30,480) are widened by `madd` with
            /// the rows' scales. Every integer sum is exact, so it is ggml's.
            #[target_feature(enable = $features)]
            pub(super) fn dot8_q4_k<const R: usize, const GEMM: bool>(
                w: &[BlockQ4Kx8],
                a: [&[BlockQ8K]; R],
            ) -> [[f32; 8]; R] {
                let (w, a) = cut(w, a);
                let (mut acc, mut acc_min) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
                let low = _mm256_set1_epi8(0x0F);
                // Byte r of a sub-block's scales to both 16-bit halves of lane r.
                let spread = _mm256_setr_epi8(
                    0, -1, 0, -1, 1, -1, 1, -1, 2, -1, 2, -1, 3, -1, 3, -1, //
                    4, -1, 4, -1, 5, -1, 5, -1, 6, -1, 6, -1, 7, -1, 7, -1,
                );
                for (i, wb) in w.iter().enumerate() {
                    // SAFETY: 16 readable bytes each.
                    let (d, dmin) = unsafe {
                        (
                            _mm256_cvtph_ps(_mm_loadu_si128(wb.d.as_ptr().cast())),
                            _mm256_cvtph_ps(_mm_loadu_si128(wb.dmin.as_ptr().cast())),
                        )
                    };
                    let (scales, mins) = wb.scales_mins();
                    let mut sums = [_mm256_setzero_si256(); R];
                    let mut min_sums = [_mm256_setzero_si256(); R];
                    for pair in 0..QK_K / 64 {
                        for half in 0..2 {
                            let sub = 2 * pair + half;
                            let mut values = [_mm256_setzero_si256(); 8];
                            for (step, value) in values.iter_mut().enumerate() {
                                // SAFETY: 32 readable bytes.
                                let raw = unsafe { _mm256_loadu_si256(wb.qs[8 * pair + step].as_ptr().cast()) };
                                let raw = if half == 0 { raw } else { _mm256_srli_epi16(raw, 4) };
                                *value = _mm256_and_si256(raw, low);
                            }
                            let scale = _mm256_shuffle_epi8(_mm256_set1_epi64x(scales[sub] as i64), spread);
                            for r in 0..R {
                                let qs = &a[r][i].qs[sub * 32..sub * 32 + 32];
                                let mut dot = _mm256_setzero_si256();
                                for (step, &value) in values.iter().enumerate() {
                                    // SAFETY: 4 readable bytes of the 32.
                                    let y = unsafe { qs.as_ptr().add(4 * step).cast::<i32>().read_unaligned() };
                                    dot = _mm256_add_epi16(dot, _mm256_maddubs_epi16(value, _mm256_set1_epi32(y)));
                                }
                                sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(dot, scale));
                            }
                        }
                        // Lane r: the pair's minimums, 16 bits each, against the activation's
                        // sums of the two sub-blocks.
                        let pair_mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(
                            _mm_cvtsi64_si128(mins[2 * pair] as i64),
                            _mm_cvtsi64_si128(mins[2 * pair + 1] as i64),
                        ));
                        for r in 0..R {
                            let ab = &a[r][i];
                            let (s0, s1) = (ab.sums32[2 * pair] as u16, ab.sums32[2 * pair + 1] as u16);
                            let both = (u32::from(s0) | (u32::from(s1) << 16)) as i32;
                            min_sums[r] =
                                _mm256_add_epi32(min_sums[r], _mm256_madd_epi16(pair_mins, _mm256_set1_epi32(both)));
                            if GEMM {
                                let ad = _mm256_set1_ps(ab.d);
                                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), _mm256_mul_ps(d, ad), acc[r]);
                                acc_min[r] = _mm256_fmadd_ps(
                                    _mm256_cvtepi32_ps(min_sums[r]),
                                    _mm256_mul_ps(dmin, ad),
                                    acc_min[r],
                                );
                                (sums[r], min_sums[r]) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                            }
                        }
                    }
                    if !GEMM {
                        for r in 0..R {
                            let ad = _mm256_set1_ps(a[r][i].d);
                            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), _mm256_mul_ps(d, ad), acc[r]);
                            acc_min[r] =
                                _mm256_fmadd_ps(_mm256_cvtepi32_ps(min_sums[r]), _mm256_mul_ps(dmin, ad), acc_min[r]);
                        }
                    }
                }
                let mut out = [[0f32; 8]; R];
                for r in 0..R {
                    // SAFETY: 32 writable bytes.
                    unsafe { _mm256_storeu_ps(out[r].as_mut_ptr(), _mm256_sub_ps(acc[r], acc_min[r])) };
                }
                out
            }

            /// Group of 32 values `group` of eight repacked Q6_K rows: in vector `step`, values
            /// `4·step..+4` of the group of every row (unsigned 6-bit).
            #[inline]
            #[target_feature(enable = $features)]
            fn q6_values(wb: &BlockQ6Kx8, group: usize) -> [__m256i; 8] {
                let (half, quarter) = (group / 4, group % 4);
                let (low, pair) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x03));
                let shift = _mm_cvtsi64_si128(2 * quarter as i64);
                let mut values = [_mm256_setzero_si256(); 8];
                for (step, value) in values.iter_mut().enumerate() {
                    // SAFETY: 32 readable bytes each.
                    let (ql, qh) = unsafe {
                        (
                            _mm256_loadu_si256(wb.ql[half * 16 + (quarter & 1) * 8 + step].as_ptr().cast()),
                            _mm256_loadu_si256(wb.qh[half * 8 + step].as_ptr().cast()),
                        )
                    };
                    // Quarters 2 and 3 take the high nibbles; quarter q the bit pair q of qh,
                    // moved to bits 4-5 (masked first: the 16-bit shifts cannot carry across).
                    let ql = if quarter < 2 { ql } else { _mm256_srli_epi16(ql, 4) };
                    let high = _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(qh, shift), pair), 4);
                    *value = _mm256_or_si256(_mm256_and_si256(ql, low), high);
                }
                values
            }

            /// Scale group `g` (values `16g..16g+16`) of the eight rows, in both 16-bit halves of
            /// each row's lane, as `madd` takes it.
            #[inline]
            #[target_feature(enable = $features)]
            fn q6_scale(wb: &BlockQ6Kx8, g: usize) -> __m256i {
                // SAFETY: 8 readable bytes.
                let s = _mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(wb.scales[g].as_ptr().cast()) });
                _mm256_or_si256(_mm256_and_si256(s, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(s, 16))
            }

            /// Scale groups `2t` and `2t + 1` of the eight rows as a pair of 16-bit halves.
            #[inline]
            #[target_feature(enable = $features)]
            fn q6_scale_pair(wb: &BlockQ6Kx8, t: usize) -> __m256i {
                // SAFETY: 8 readable bytes each.
                let (first, second) = unsafe {
                    (
                        _mm_loadl_epi64(wb.scales[2 * t].as_ptr().cast()),
                        _mm_loadl_epi64(wb.scales[2 * t + 1].as_ptr().cast()),
                    )
                };
                _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(first, second))
            }

            /// The activation sums of 16 values `2t` and `2t + 1` (at most 16 · 127 in
            /// magnitude) as a pair of 16-bit halves, in every lane.
            #[inline]
            #[target_feature(enable = $features)]
            fn bsum_pair(ab: &BlockQ8K, t: usize) -> __m256i {
                let (first, second) = (ab.bsums[2 * t] as u16, ab.bsums[2 * t + 1] as u16);
                _mm256_set1_epi32((u32::from(first) | (u32::from(second) << 16)) as i32)
            }

            /// Four activation values, `4·step..+4` of `qs`, in every lane.
            #[inline]
            #[target_feature(enable = $features)]
            fn four(qs: &[i8], step: usize) -> __m256i {
                debug_assert!(4 * step + 4 <= qs.len());
                // SAFETY: 4 readable bytes (qs holds a group of 32).
                _mm256_set1_epi32(unsafe { qs.as_ptr().add(4 * step).cast::<i32>().read_unaligned() })
            }

            /// Eight repacked Q6_K rows against `R` activation rows with the tiled kernel's
            /// arithmetic: per super-block one exact integer sum per output (the `maddubs`
            /// pairs, each at most 2 · 63 · 127, summed two at a time in 16 bits and widened
            /// by the scales; the -32 offset from the activation sums), then the floats.
            #[target_feature(enable = $features)]
            pub(super) fn dot8_q6_k_tiled<const R: usize>(w: &[BlockQ6Kx8], a: [&[BlockQ8K]; R]) -> [[f32; 8]; R] {
                let (w, a) = cut(w, a);
                let mut acc = [_mm256_setzero_ps(); R];
                for (i, wb) in w.iter().enumerate() {
                    let mut sums = [_mm256_setzero_si256(); R];
                    for group in 0..QK_K / 32 {
                        let values = q6_values(wb, group);
                        let (first, second) = (q6_scale(wb, 2 * group), q6_scale(wb, 2 * group + 1));
                        for r in 0..R {
                            let qs = &a[r][i].qs[group * 32..group * 32 + 32];
                            let p = |step: usize| _mm256_maddubs_epi16(values[step], four(qs, step));
                            let lo = _mm256_add_epi32(
                                _mm256_madd_epi16(_mm256_add_epi16(p(0), p(1)), first),
                                _mm256_madd_epi16(_mm256_add_epi16(p(2), p(3)), first),
                            );
                            let hi = _mm256_add_epi32(
                                _mm256_madd_epi16(_mm256_add_epi16(p(4), p(5)), second),
                                _mm256_madd_epi16(_mm256_add_epi16(p(6), p(7)), second),
                            );
                            sums[r] = _mm256_add_epi32(sums[r], _mm256_add_epi32(lo, hi));
                        }
                    }
                    let mut pairs = [_mm256_setzero_si256(); 8];
                    for (t, pair) in pairs.iter_mut().enumerate() {
                        *pair = q6_scale_pair(wb, t);
                    }
                    // SAFETY: 16 readable bytes.
                    let d = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(wb.d.as_ptr().cast()) });
                    for r in 0..R {
                        let ab = &a[r][i];
                        let mut offsets = _mm256_setzero_si256();
                        for (t, &pair) in pairs.iter().enumerate() {
                            offsets = _mm256_add_epi32(offsets, _mm256_madd_epi16(pair, bsum_pair(ab, t)));
                        }
                        let sum = _mm256_sub_epi32(sums[r], _mm256_slli_epi32(offsets, 5));
                        acc[r] =
                            _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sum), d), _mm256_set1_ps(ab.d), acc[r]);
                    }
                }
                let mut out = [[0f32; 8]; R];
                for r in 0..R {
                    // SAFETY: 32 writable bytes.
                    unsafe { _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
                }
                out
            }

            /// Eight repacked Q6_K rows against one activation row as `ggml_vec_dot_q6_K_q8_K`
            /// computes each: its eight lanes (lane `l`: values `4l..4l+4` of every group of
            /// 32) are vectors here, one per lane, each holding the eight rows; fused per
            /// super-block, then summed across as `hsum_8`.
            #[target_feature(enable = $features)]
            pub(super) fn dot8_q6_k(w: &[BlockQ6Kx8], a: &[BlockQ8K]) -> [f32; 8] {
                let mut acc = [_mm256_setzero_ps(); 8];
                for (wb, ab) in w.iter().zip(a) {
                    prefetch(wb);
                    prefetch(&wb.ql[16]);
                    prefetch(&wb.qh[0]);
                    prefetch(&wb.qh[15]);
                    let mut lanes = [_mm256_setzero_si256(); 8];
                    for group in 0..QK_K / 32 {
                        let values = q6_values(wb, group);
                        let (first, second) = (q6_scale(wb, 2 * group), q6_scale(wb, 2 * group + 1));
                        let qs = &ab.qs[group * 32..group * 32 + 32];
                        for (l, lane) in lanes.iter_mut().enumerate() {
                            let scale = if l < 4 { first } else { second };
                            let pairs = _mm256_maddubs_epi16(values[l], four(qs, l));
                            *lane = _mm256_add_epi32(*lane, _mm256_madd_epi16(pairs, scale));
                        }
                    }
                    // SAFETY: 16 readable bytes.
                    let d = _mm256_mul_ps(
                        _mm256_set1_ps(ab.d),
                        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(wb.d.as_ptr().cast()) }),
                    );
                    for (l, (lane, acc)) in lanes.iter().zip(&mut acc).enumerate() {
                        // Lane l's offset: 32 × the terms of groups of 16 `2l` and `2l + 1`.
                        let offset = _mm256_madd_epi16(q6_scale_pair(wb, l), bsum_pair(ab, l));
                        let lane = _mm256_sub_epi32(*lane, _mm256_slli_epi32(offset, 5));
                        *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lane), *acc);
                    }
                }
                // hsum_8 across the lanes, for every row at once.
                let (r0, r1) = (_mm256_add_ps(acc[4], acc[0]), _mm256_add_ps(acc[5], acc[1]));
                let (r2, r3) = (_mm256_add_ps(acc[6], acc[2]), _mm256_add_ps(acc[7], acc[3]));
                let mut out = [0f32; 8];
                // SAFETY: 32 writable bytes.
                unsafe {
                    _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(_mm256_add_ps(r0, r2), _mm256_add_ps(r1, r3)))
                };
                out
            }
        }
    };
}
avx2_kernels!(avx2, "avx2,fma,f16c", false);
avx2_kernels!(avx2_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", true);

/// Prompt kernels with AVX-512 (chosen at run time): two activation rows per 512-bit
/// register, the rows' lanes side by side. Each output keeps the AVX2 kernel's eight lanes
/// and their order of fused multiply-adds, so its bits; the weights are made unsigned
/// (`Q8Weights::unsigned_bytes`) and the offset taken back in the integer sums, which are
/// exact, so `vpdpbusd` needs no sign fix-up per row.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{BlockQ8_0, PairQ8_0, Q8Weights, dot_q8, pairs_q8_0, par_matmul, row_of};

    /// The rows of `a` (`shape`: outputs, rows, blocks per row) times `w`: `R` rows (`P`
    /// pairs) at a time, the rest one at a time.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) fn pair_matmul<const R: usize, const P: usize, B: Q8Weights>(
        w: &[B],
        a: &[BlockQ8_0],
        shape: (usize, usize, usize),
    ) -> Vec<f32> {
        debug_assert_eq!(R, 2 * P);
        let (_, m, per_row) = shape;
        // A last partial group repeats the last row (as `group_of` does).
        let groups = if m >= R { m.div_ceil(R) } else { 0 };
        let pairs = pairs_q8_0::<P>(a, groups, per_row, B::OFFSET);
        let group = |group: usize| &pairs[group * per_row * P..(group + 1) * per_row * P];
        par_matmul::<R, B>(
            w,
            shape,
            true,
            |w, row| dot_q8(w, row_of(a, per_row, row)),
            |w, g| {
                let outs = dot_pairs::<P, B>(w, group(g));
                let mut flat = [0f32; R];
                for (r, out) in flat.iter_mut().enumerate() {
                    *out = outs[r / 2][r % 2];
                }
                flat
            },
        )
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load<T>(value: &T) -> __m512i {
        debug_assert!(size_of::<T>() >= 64);
        // SAFETY: 64 readable bytes (the caller's types are 64 bytes).
        unsafe { _mm512_loadu_si512(std::ptr::from_ref(value).cast()) }
    }

    /// Q8_0 or Q5_0 × Q8_0 for the `2P` rows whose pairs are `pairs` (`P` per block);
    /// each pair's two outputs.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) fn dot_pairs<const P: usize, B: Q8Weights>(w: &[B], pairs: &[PairQ8_0]) -> [[f32; 2]; P] {
        let mut acc = [_mm512_setzero_ps(); P];
        for (wb, block) in w.iter().zip(pairs.chunks_exact(P)) {
            // SAFETY: AVX2, AVX-512 BW and VL are enabled here.
            let values = _mm512_broadcast_i64x4(unsafe { wb.unsigned_bytes() });
            let d = _mm512_cvtph_ps(_mm256_set1_epi16(wb.scale().to_bits() as i16));
            for (acc, pair) in acc.iter_mut().zip(block) {
                let sums = _mm512_dpbusd_epi32(load(&pair.offset), values, load(&pair.qs));
                // d_w · d_a in every lane: the scalar product's bits.
                let scale = _mm512_mul_ps(d, _mm512_castsi512_ps(load(&pair.d)));
                *acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sums), *acc);
            }
        }
        acc.map(|acc| hsum_8_pair(acc))
    }

    /// `hsum_8` of each 256-bit half, in registers: `(v4 + v0) ...`, then `(r0 + r2) + (r1 +
    /// r3)`, each sum the scalar one (addition is commutative, and the grouping is kept).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn hsum_8_pair(v: __m512) -> [f32; 2] {
        let r = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0b10_11_00_01>(v, v));
        let pairs = _mm512_add_ps(r, _mm512_permute_ps::<0b01_00_11_10>(r));
        let sums = _mm512_add_ps(pairs, _mm512_permute_ps::<0b10_11_00_01>(pairs));
        [_mm512_cvtss_f32(sums), _mm512_cvtss_f32(_mm512_shuffle_f32x4::<0b10>(sums, sums))]
    }
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

    /// A Q8_0 table read into an arena holds the file's values (its rows dequantize as
    /// candle dequantizes them); a short reader is an error.
    #[test]
    fn q8_0_rows_read_in_place_match_candle() {
        let (n, k) = (300, 640);
        let w = Tensor::from_vec(values(n * k, 11), (n, k), &Device::Cpu).expect("tensor");
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).expect("quantize");
        let bytes = q.data().expect("bytes").to_vec();
        let arena = Arena::new(2 * bytes.len() + 2 * crate::weights::ALIGN);
        let read = Q8_0Matrix::read(&arena, bytes.as_slice(), n, k).expect("read").expect("layout");
        let candle = q.dequantize(&Device::Cpu).expect("dequantize").to_vec2::<f32>().expect("rows");
        assert_eq!((0..n).map(|r| read.row(r).expect("row")).collect::<Vec<_>>(), candle);
        assert!(read.row(n).is_none());
        let short = Q8_0Matrix::read(&arena, &bytes[..bytes.len() - 1], n, k);
        assert!(short.is_err_and(|e| e.kind() == std::io::ErrorKind::UnexpectedEof));
    }

    /// Every own kernel against f32 arithmetic on candle's dequantized weights.
    #[test]
    fn own_kernels_match_dequantized_weights() {
        let (n, k, m) = (16, 512, 5);
        let w = values(n * k, 3);
        // No outliers in the activations: Q8_K shares one scale across 256 of them.
        let x: Vec<f32> = values(m * k, 5).into_iter().map(|v| v.clamp(-1.0, 1.0)).collect();
        let w_tensor = Tensor::from_vec(w, (n, k), &Device::Cpu).expect("tensor");
        let x_tensor = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).expect("tensor");
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let q = QTensor::quantize(&w_tensor, dtype).expect("quantize");
            let bytes = q.data().expect("bytes");
            let ours = match dtype {
                GgmlDType::Q8_0 => Q8_0Matrix::from_bytes(&bytes, n, k).expect("layout").matmul(&x, m),
                GgmlDType::Q5_0 => Q5_0Matrix::from_bytes(&bytes, n, k).expect("layout").matmul(&x, m),
                GgmlDType::Q4K => KMatrix::from_q4_k_bytes(&bytes, n, k).expect("layout").matmul(&x, m),
                _ => KMatrix::from_q6_k_bytes(&bytes, n, k).expect("layout").matmul(&x, m),
            };
            let dequantized = q.dequantize(&Device::Cpu).expect("dequantize");
            let exact: Vec<f32> = x_tensor
                .matmul(&dequantized.t().expect("t"))
                .expect("matmul")
                .flatten_all()
                .expect("flat")
                .to_vec1()
                .expect("vec");
            let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs())).max(1.0);
            for (o, e) in ours.iter().zip(&exact) {
                assert!((o - e).abs() <= 1e-2 * scale, "{dtype:?}: ours {o} exact {e}");
            }
        }
    }

    /// The SIMD kernels give the scalar kernels' bits, and each row of a four-row kernel
    /// the one-row scalar kernel's.
    #[test]
    fn simd_and_scalar_kernels_agree_bit_for_bit() {
        let (n, k) = (8, 512);
        let w_tensor = Tensor::from_vec(values(n * k, 11), (n, k), &Device::Cpu).expect("tensor");
        let x: Vec<Vec<f32>> = (0..4).map(|r| values(k, 13 + r)).collect();
        let row = |blocks_per_row: usize, col: usize| col * blocks_per_row..(col + 1) * blocks_per_row;
        let q41 = QTensor::quantize(&w_tensor, GgmlDType::Q4_1).expect("quantize");
        let q41 = Q4_1Matrix::from_bytes(&q41.data().expect("bytes"), n, k).expect("layout");
        let a41: Vec<Vec<BlockQ8_1>> = x.iter().map(|x| x.chunks_exact(QK).map(quantize_q8_1).collect()).collect();
        let q80 = QTensor::quantize(&w_tensor, GgmlDType::Q8_0).expect("quantize");
        let q80 = Q8_0Matrix::from_bytes(&q80.data().expect("bytes"), n, k).expect("layout");
        let q50 = QTensor::quantize(&w_tensor, GgmlDType::Q5_0).expect("quantize");
        let q50 = Q5_0Matrix::from_bytes(&q50.data().expect("bytes"), n, k).expect("layout");
        let a80: Vec<Vec<BlockQ8_0>> = x.iter().map(|x| x.chunks_exact(QK).map(quantize_q8_0).collect()).collect();
        let q4k = QTensor::quantize(&w_tensor, GgmlDType::Q4K).expect("quantize");
        let q4k = KMatrix::from_q4_k_bytes(&q4k.data().expect("bytes"), n, k).expect("layout");
        let q6k = QTensor::quantize(&w_tensor, GgmlDType::Q6K).expect("quantize");
        let q6k = KMatrix::from_q6_k_bytes(&q6k.data().expect("bytes"), n, k).expect("layout");
        let a8k: Vec<Vec<BlockQ8K>> = x.iter().map(|x| x.chunks_exact(QK_K).map(quantize_q8_k).collect()).collect();
        fn four<T>(a: &[Vec<T>]) -> [&[T]; 4] {
            std::array::from_fn(|r| a[r].as_slice())
        }
        let bits = |v: [f32; 4]| v.map(f32::to_bits);
        for col in 0..n {
            let (w41, w80, w50) =
                (&q41.blocks[row(k / QK, col)], &q80.blocks[row(k / QK, col)], &q50.blocks[row(k / QK, col)]);
            let (KBlocks::Q4K(b4k), KBlocks::Q6K(b6k)) = (&q4k.blocks, &q6k.blocks) else { panic!("kinds") };
            for r in 0..4 {
                let (a41, a80) = (&a41[r], &a80[r]);
                assert_eq!(dot_q4_1(w41, a41).to_bits(), dot_q4_1_scalar(w41, a41).to_bits());
                assert_eq!(dot_q8(w80, a80).to_bits(), dot_q8_scalar(w80, a80).to_bits());
                assert_eq!(dot_q8(w50, a80).to_bits(), dot_q8_scalar(w50, a80).to_bits());
            }
            let expected = |dot: &dyn Fn(usize) -> f32| bits(std::array::from_fn(dot));
            assert_eq!(bits(dotn_q4_1(w41, four(&a41))), expected(&|r| dot_q4_1_scalar(w41, &a41[r])));
            assert_eq!(bits(dotn_q8(w80, four(&a80))), expected(&|r| dot_q8_scalar(w80, &a80[r])));
            assert_eq!(bits(dotn_q8(w50, four(&a80))), expected(&|r| dot_q8_scalar(w50, &a80[r])));
            let eight: [&[BlockQ8_0]; 8] = std::array::from_fn(|r| a80[r % 4].as_slice());
            let want: [u32; 8] = std::array::from_fn(|r| dot_q8_scalar(w50, &a80[r % 4]).to_bits());
            assert_eq!(dotn_q8(w50, eight).map(f32::to_bits), want);
            let eight: [&[BlockQ8_1]; 8] = std::array::from_fn(|r| a41[r % 4].as_slice());
            let want: [u32; 8] = std::array::from_fn(|r| dot_q4_1_scalar(w41, &a41[r % 4]).to_bits());
            assert_eq!(dotn_q4_1(w41, eight).map(f32::to_bits), want);
            // The dispatchers above take one copy of the SIMD kernels; both are checked
            // here (the VNNI one where the CPU has VNNI).
            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code)]
            if has_avx2_fma_f16c() {
                // SAFETY: AVX2, FMA and F16C are there, and AVX-512 VNNI and VL where used.
                unsafe {
                    let vnni = crate::numerics::has_vnni_256();
                    macro_rules! both {
                        ($f:ident($($arg:expr),*) == $want:expr) => {
                            assert_eq!(avx2::$f($($arg),*).to_bits(), $want.to_bits(), stringify!($f));
                            if vnni {
                                assert_eq!(avx2_vnni::$f($($arg),*).to_bits(), $want.to_bits(), stringify!($f));
                            }
                        };
                    }
                    let (a41, a80, a8k) = (&a41[0], &a80[0], &a8k[0]);
                    both!(dot_q4_1(w41, a41) == dot_q4_1_scalar(w41, a41));
                    both!(dot_q8(w80, a80) == dot_q8_scalar(w80, a80));
                    both!(dot_q8(w50, a80) == dot_q8_scalar(w50, a80));
                    // Repacked Q4_K, the first group of eight rows (`k_quant_rows_follow_the_batch_size`
                    // covers the tiles of the dispatched copy).
                    let w4k = &b4k[..k / QK_K];
                    let want = dot8_q4_k_scalar(w4k, a8k, false).map(f32::to_bits);
                    assert_eq!(avx2::dot8_q4_k::<1, false>(w4k, [a8k])[0].map(f32::to_bits), want);
                    if vnni {
                        assert_eq!(avx2_vnni::dot8_q4_k::<1, false>(w4k, [a8k])[0].map(f32::to_bits), want);
                    }
                    // Repacked Q6_K, the same way (`k_quant_rows_follow_the_batch_size`).
                    let w6k = &b6k[..k / QK_K];
                    let (want, tiled) = (dot8_q6_k_scalar(w6k, a8k, false), dot8_q6_k_scalar(w6k, a8k, true));
                    assert_eq!(avx2::dot8_q6_k(w6k, a8k).map(f32::to_bits), want.map(f32::to_bits));
                    assert_eq!(avx2::dot8_q6_k_tiled::<1>(w6k, [a8k])[0].map(f32::to_bits), tiled.map(f32::to_bits));
                    if vnni {
                        assert_eq!(avx2_vnni::dot8_q6_k(w6k, a8k).map(f32::to_bits), want.map(f32::to_bits));
                        let got = avx2_vnni::dot8_q6_k_tiled::<1>(w6k, [a8k])[0];
                        assert_eq!(got.map(f32::to_bits), tiled.map(f32::to_bits));
                    }
                }
            }
        }
    }

    /// In a prompt, each row of a Q4_1, Q8_0 or Q5_0 product has the bits that row gets
    /// alone (the one-row kernel, as in decoding), whichever kernel takes the row groups
    /// (AVX-512 pairs, AVX2 or scalar) and whatever the rows left over.
    #[test]
    fn prompt_rows_equal_rows_alone() {
        let (n, k) = (24, 640);
        let w_tensor = Tensor::from_vec(values(n * k, 21), (n, k), &Device::Cpu).expect("tensor");
        let bytes = |dtype| QTensor::quantize(&w_tensor, dtype).expect("quantize").data().expect("bytes").to_vec();
        let q41 = Q4_1Matrix::from_bytes(&bytes(GgmlDType::Q4_1), n, k).expect("layout");
        let q80 = Q8_0Matrix::from_bytes(&bytes(GgmlDType::Q8_0), n, k).expect("layout");
        let q50 = Q5_0Matrix::from_bytes(&bytes(GgmlDType::Q5_0), n, k).expect("layout");
        type Matmul<'a> = &'a dyn Fn(&[f32], usize) -> Vec<f32>;
        let kernels: [(&str, Matmul); 3] = [
            ("Q4_1", &|x, m| q41.matmul(x, m)),
            ("Q8_0", &|x, m| q80.matmul(x, m)),
            ("Q5_0", &|x, m| q50.matmul(x, m)),
        ];
        for m in [4, 5, 7, 8, 11, 16, 19] {
            let x = values(m * k, 23 + m as u64);
            for (name, matmul) in kernels {
                let together = matmul(&x, m);
                for (r, row) in x.chunks_exact(k).enumerate() {
                    let alone = matmul(row, 1);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&together[r * n..(r + 1) * n]), bits(&alone), "{name}: row {r} of {m}");
                }
            }
        }
    }

    /// A K-quant product's rows have the scalar kernel's bits on the file's rows, whatever
    /// the tiles: Q4_K with ggml's gemm arithmetic for all but the last `m % 4` rows and its
    /// gemv arithmetic for those; Q6_K with the tiled kernel's for batches of 8 rows or more,
    /// `vec_dot`'s for smaller ones. A row count that is not a multiple of 8 pads the last
    /// group.
    #[test]
    fn k_quant_rows_follow_the_batch_size() {
        let (n, k) = (20, 768);
        let w = Tensor::from_vec(values(n * k, 31), (n, k), &Device::Cpu).expect("tensor");
        let bytes = |dtype| QTensor::quantize(&w, dtype).expect("quantize").data().expect("bytes").to_vec();
        let (q4k, q6k) = (bytes(GgmlDType::Q4K), bytes(GgmlDType::Q6K));
        let q4k_matrix = KMatrix::from_q4_k_bytes(&q4k, n, k).expect("layout");
        let q6k_matrix = KMatrix::from_q6_k_bytes(&q6k, n, k).expect("layout");
        // The file's blocks, as GGUF lays them out.
        let arena = Arena::new(q4k.len() + q6k.len() + 2 * crate::weights::ALIGN);
        let q4k_blocks: Vec<BlockQ4K> = arena.read(q4k.as_slice(), n * k / QK_K).expect("read").to_vec();
        let q6k_blocks: Vec<BlockQ6K> = arena.read(q6k.as_slice(), n * k / QK_K).expect("read").to_vec();
        let per_row = k / QK_K;
        for m in [1, 3, 4, 5, 7, 8, 11, 12, 13, 16, 19] {
            let x = values(m * k, 41 + m as u64);
            let (out4, out6) = (q4k_matrix.matmul(&x, m), q6k_matrix.matmul(&x, m));
            let a: Vec<BlockQ8K> = x.chunks_exact(QK_K).map(quantize_q8_k).collect();
            for r in 0..m {
                let a = row_of(&a, per_row, r);
                for col in 0..n {
                    let (w4, w6) = (row_of(&q4k_blocks, per_row, col), row_of(&q6k_blocks, per_row, col));
                    let want4 = dot_q4_k_scalar(w4.iter().copied(), a, r < m - m % 4);
                    let want6 = if m >= 8 {
                        dot_q6_k_tiled_scalar(w6.iter().copied(), a)
                    } else {
                        dot_q6_k_scalar(w6.iter().copied(), a)
                    };
                    assert_eq!(out4[r * n + col].to_bits(), want4.to_bits(), "Q4_K: m {m}, row {r}, column {col}");
                    assert_eq!(out6[r * n + col].to_bits(), want6.to_bits(), "Q6_K: m {m}, row {r}, column {col}");
                }
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
