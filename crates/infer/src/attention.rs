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

use crate::numerics::{dot_f16, multiversion, reduce_add_16, v_expf};

/// Keys and values of one layer, on the host.
pub(crate) struct HostKvCache {
    keys: Vec<f16>,
    values: Vec<f16>,
    n_kv: usize,
    head_dim: usize,
}

impl HostKvCache {
    /// A cache with room for `capacity` positions, reserved but not touched: its pages
    /// become resident as positions fill them, and it never moves. Growing it by
    /// reallocation instead would leave the old buffers as holes among the forward pass's
    /// own buffers (SmolLM2's peak memory through pp512: 6 MiB more).
    pub(crate) fn new(n_kv: usize, head_dim: usize, capacity: usize) -> Self {
        let room = capacity.saturating_mul(n_kv * head_dim);
        Self { keys: Vec::with_capacity(room), values: Vec::with_capacity(room), n_kv, head_dim }
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

    /// The positions from `from` (a multiple of [`TILE_CELLS`]) on, widened to f32 (exact)
    /// in the blocks the tiled kernel walks, each contiguous: per K/V head and tile, the keys
    /// transposed (per dimension, the tile's cells side by side at [`KEY_STRIDE`], so that
    /// one score per lane is computed, as ggml's tile GEMM does; the last tile padded with
    /// zeros); per K/V head, the values of each position. Positions before `from` are
    /// hidden from every query of the call (a sliding window's).
    fn widened(&self, from: usize) -> (Vec<f32>, Vec<f32>) {
        let (head_dim, width) = (self.head_dim, self.row());
        let len = self.len().saturating_sub(from);
        let tiles = len.div_ceil(TILE_CELLS);
        let mut keys_t = vec![0f32; self.n_kv * tiles * head_dim * KEY_STRIDE];
        keys_t.par_chunks_mut(head_dim * KEY_STRIDE).enumerate().for_each(|(block, out)| {
            let (kv_head, tile) = (block / tiles, block % tiles);
            let first = (from + tile * TILE_CELLS) * width + kv_head * head_dim;
            transpose_keys(&self.keys[first..], width, TILE_CELLS.min(len - tile * TILE_CELLS), head_dim, out);
        });
        let mut values = vec![0f32; self.n_kv * len * head_dim];
        values.par_chunks_mut(len.max(1) * head_dim).enumerate().for_each(|(kv_head, out)| {
            for (position, out) in out.chunks_exact_mut(head_dim).enumerate() {
                let at = (from + position) * width + kv_head * head_dim;
                widen(&self.values[at..at + head_dim], out);
            }
        });
        (keys_t, values)
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

/// `out[dim · KEY_STRIDE + cell] = keys[cell · width + dim]` widened, for `cells` keys of
/// `head_dim` values, each `width` values after the previous one.
fn transpose_keys(keys: &[f16], width: usize, cells: usize, head_dim: usize, out: &mut [f32]) {
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::numerics::has_avx2_fma_f16c() && head_dim.is_multiple_of(8) {
        done = cells / 8 * 8;
        #[allow(unsafe_code)]
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
        unsafe {
            simd::transpose_keys(keys, width, done, head_dim, out)
        };
    }
    for cell in done..cells {
        for (dim, k) in keys[cell * width..cell * width + head_dim].iter().enumerate() {
            out[dim * KEY_STRIDE + cell] = k.to_f32();
        }
    }
}

/// `values` widened into `out`.
fn widen(values: &[f16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::numerics::has_avx2_fma_f16c() {
        #[allow(unsafe_code)]
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
        unsafe {
            simd::widen(values, out)
        };
        return;
    }
    values.convert_to_f32_slice(out);
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

/// Query rows from which ggml switches to its tiled flash-attention kernel.
const TILE_ROWS: usize = 64;
/// Key/value cells per tile of that kernel.
const TILE_CELLS: usize = 64;
/// Values between two dimensions of a tile's transposed keys: the tile's cells and a gap,
/// so that the rows a product walks down do not all fall into the same few cache sets
/// (a power-of-two stride made Gemma's 256-dimension tiles 20% slower).
const KEY_STRIDE: usize = TILE_CELLS + 8;

multiversion! {
    /// Causal attention of `seq` queries at positions `pos..pos + seq` over the whole cache
    /// (which already holds their own keys). `queries` and the result are laid out
    /// `[seq][n_head][head_dim]`.
    ///
    /// Each query row is computed as ggml's CPU flash attention computes it: batches of fewer
    /// than 64 rows (and single-token decoding) as `flash_attn_ext_f16_one_chunk` (Q rounded
    /// to f16, scores by `ggml_vec_dot_f16`, an online softmax over the visible keys in order,
    /// the weighted sum of V accumulated in f16, rounded at every step); larger batches as
    /// `flash_attn_ext_tiled` (f32 Q, 64-cell tiles, fused multiply-add chains, a vectorised
    /// softmax summed in f64, an f32 accumulator).
    pub(crate) fn attend(cache: &HostKvCache, queries: &[f32], pos: usize, shape: &AttentionShape) -> Vec<f32> {
        let head_dim = shape.head_dim;
        let n_rep = shape.n_head / shape.n_kv;
        let tiled = queries.len() / (shape.n_head * head_dim) >= TILE_ROWS;
        // The tiled kernel's rows are many: it reads the cache widened once per call. The
        // one-chunk kernel reads the f16 cache as it is.
        let len = cache.len();
        let visible =
            |query_pos: usize| shape.window.map_or(0, |window| (query_pos + 1).saturating_sub(window))..query_pos + 1;
        // The first query sees the earliest keys.
        let from = visible(pos).start / TILE_CELLS * TILE_CELLS;
        let (keys_t, values) = if tiled { cache.widened(from) } else { (Vec::new(), Vec::new()) };
        let rows = Rows {
            keys16: &cache.keys,
            values16: &cache.values,
            keys_t: &keys_t,
            values: &values,
            from,
            n_kv: shape.n_kv,
            head_dim,
            len,
        };
        let mut out = vec![0f32; queries.len()];
        let prepare = |query: &[f32]| -> (Vec<f32>, f32) {
            if shape.scale_q_first {
                (query.iter().map(|x| x * shape.scale).collect(), 1.0)
            } else {
                (query.to_vec(), shape.scale)
            }
        };
        if tiled {
            // Blocks of positions walk the tiles together: each tile of K and V is read from
            // memory once for the block, and stays in the core's caches while every row of it
            // takes its step (a position alone would stream the whole cache from the shared
            // cache, per K/V head). Per position, the query heads that share a K/V head go
            // through the kernel up to four at a time, each with its own accumulators, sharing
            // the reads of K and V and giving the processor several independent chains of
            // fused multiply-adds. Each row takes the same steps as alone, in the same order.
            let width = shape.n_head * head_dim;
            let block = POSITIONS_PER_WALK * width;
            out.par_chunks_mut(block).zip(queries.par_chunks(block)).enumerate().for_each(|(b, (outs, qs))| {
                let (first, outs_len) = (pos + b * POSITIONS_PER_WALK, outs.len());
                let prepared: Vec<(Vec<f32>, f32)> = qs.chunks(head_dim).map(prepare).collect();
                let mut heads: Vec<(&mut [f32], &[f32], f32)> =
                    outs.chunks_mut(head_dim).zip(&prepared).map(|(out, (q, scale))| (out, q.as_slice(), *scale)).collect();
                // Per K/V head (in parallel: a block's heads share no output), its rows of every
                // position in the block, in groups.
                let mut per_kv: Vec<Vec<Group>> = (0..shape.n_kv).map(|_| Vec::new()).collect();
                for (i, position) in heads.chunks_mut(shape.n_head).enumerate() {
                    let visible = visible(first + i);
                    for (kv_head, mine) in position.chunks_mut(n_rep).enumerate() {
                        let mut mine = mine.iter_mut();
                        loop {
                            let group: Vec<_> = mine.by_ref().take(4).collect();
                            if group.is_empty() {
                                break;
                            }
                            per_kv[kv_head].push(Group::new(group, visible.clone()));
                        }
                    }
                }
                // From the first position's first tile to the last position's last key.
                let positions = outs_len / width;
                let start = visible(first).start / TILE_CELLS * TILE_CELLS;
                let end = visible(first + positions - 1).end;
                per_kv.into_par_iter().enumerate().for_each(|(kv_head, mut groups)| {
                    for tile_start in (start..end).step_by(TILE_CELLS) {
                        groups.iter_mut().for_each(|group| group.step(&rows, kv_head, tile_start));
                    }
                    groups.into_iter().for_each(Group::finish);
                });
            });
        } else {
            out.par_chunks_mut(head_dim).zip(queries.par_chunks(head_dim)).enumerate().for_each(
                |(idx, (out_row, query))| {
                    let kv_head = (idx % shape.n_head) / n_rep;
                    let (q, scale) = prepare(query);
                    attend_one_chunk(&rows, kv_head, &q, scale, visible(pos + idx / shape.n_head), out_row);
                },
            );
        }
        out
    }
}

/// Query positions that walk the tiles of the cache together (see [`attend`]).
const POSITIONS_PER_WALK: usize = 8;

/// One to four query rows of a position that share a K/V head, part way through their
/// walk over the tiles.
enum Group<'a> {
    One(TiledRows<'a, 1>),
    Two(TiledRows<'a, 2>),
    Three(TiledRows<'a, 3>),
    Four(TiledRows<'a, 4>),
}

impl<'a> Group<'a> {
    /// The rows `heads` (output, query, scale; one scale for all), seeing the keys `visible`.
    fn new<'q: 'a>(heads: Vec<&'a mut (&mut [f32], &'q [f32], f32)>, visible: std::ops::Range<usize>) -> Self {
        let scale = heads.first().map_or(1.0, |head| head.2);
        let (outs, qs): (Vec<&'a mut [f32]>, Vec<&'a [f32]>) =
            heads.into_iter().map(|head| (&mut *head.0, head.1)).unzip();
        fn rows<'a, const R: usize>(
            outs: Vec<&'a mut [f32]>,
            qs: Vec<&'a [f32]>,
            scale: f32,
            visible: std::ops::Range<usize>,
        ) -> Option<TiledRows<'a, R>> {
            Some(TiledRows::new(<[_; R]>::try_from(qs).ok()?, <[_; R]>::try_from(outs).ok()?, scale, visible))
        }
        match outs.len() {
            4 => rows(outs, qs, scale, visible).map(Self::Four),
            3 => rows(outs, qs, scale, visible).map(Self::Three),
            2 => rows(outs, qs, scale, visible).map(Self::Two),
            _ => rows(outs, qs, scale, visible).map(Self::One),
        }
        .unwrap_or_else(|| unreachable!("a group holds one to four rows"))
    }

    #[inline(always)]
    fn step(&mut self, cache: &Rows, kv_head: usize, tile_start: usize) {
        match self {
            Self::One(rows) => rows.step(cache, kv_head, tile_start),
            Self::Two(rows) => rows.step(cache, kv_head, tile_start),
            Self::Three(rows) => rows.step(cache, kv_head, tile_start),
            Self::Four(rows) => rows.step(cache, kv_head, tile_start),
        }
    }

    fn finish(self) {
        match self {
            Self::One(rows) => rows.finish(),
            Self::Two(rows) => rows.finish(),
            Self::Three(rows) => rows.finish(),
            Self::Four(rows) => rows.finish(),
        }
    }
}

/// The cache of one layer, and for the tiled kernel its widened form.
struct Rows<'a> {
    keys16: &'a [f16],
    values16: &'a [f16],
    /// Keys laid out `[kv_head][tile][dim][cell]` (tiled kernel only), tiles from `from`.
    keys_t: &'a [f32],
    /// Values laid out `[kv_head][position][dim]` (tiled kernel only), positions from `from`.
    values: &'a [f32],
    /// The first position widened (a multiple of [`TILE_CELLS`]).
    from: usize,
    n_kv: usize,
    head_dim: usize,
    len: usize,
}

impl Rows<'_> {
    fn at(&self, key_pos: usize, kv_head: usize) -> std::ops::Range<usize> {
        let at = (key_pos * self.n_kv + kv_head) * self.head_dim;
        at..at + self.head_dim
    }

    /// Where the transposed keys of the tile from `tile_start` begin in `keys_t`.
    fn key_tile(&self, kv_head: usize, tile_start: usize) -> usize {
        let tiles = (self.len - self.from).div_ceil(TILE_CELLS);
        (kv_head * tiles + (tile_start - self.from) / TILE_CELLS) * self.head_dim * KEY_STRIDE
    }

    /// Where the widened value of `position` begins in `values`.
    fn value_row(&self, kv_head: usize, position: usize) -> usize {
        (kv_head * (self.len - self.from) + position - self.from) * self.head_dim
    }
}

/// `ggml_compute_forward_flash_attn_ext_f16_one_chunk` for one query row.
#[allow(unsafe_code)]
fn attend_one_chunk(
    rows: &Rows,
    kv_head: usize,
    q: &[f32],
    scale: f32,
    visible: std::ops::Range<usize>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::numerics::has_avx2_fma_f16c() && rows.head_dim.is_multiple_of(64) {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
        unsafe { simd::attend_one_chunk(rows, kv_head, q, scale, visible, out) };
        return;
    }
    attend_one_chunk_scalar(rows, kv_head, q, scale, visible, out);
}

/// `q` rounded to f16 and widened back (what ggml's one-chunk kernel multiplies keys by).
fn rounded_to_f16(q: &[f32]) -> Vec<f32> {
    let mut q16 = vec![f16::ZERO; q.len()];
    q16.convert_from_f32_slice(q);
    let mut widened = vec![0f32; q.len()];
    q16.convert_to_f32_slice(&mut widened);
    widened
}

fn attend_one_chunk_scalar(
    rows: &Rows,
    kv_head: usize,
    q: &[f32],
    scale: f32,
    visible: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let head_dim = rows.head_dim;
    let q = rounded_to_f16(q);
    // The running sum of V (kept in f16 as ggml keeps it, widened here for the arithmetic),
    // its normaliser and the running maximum score.
    let mut acc = vec![0f32; head_dim];
    let mut acc16 = vec![f16::ZERO; head_dim];
    let mut round = |acc: &mut [f32]| {
        acc16.convert_from_f32_slice(acc);
        acc16.convert_to_f32_slice(acc);
    };
    let (mut key, mut value) = (vec![0f32; head_dim], vec![0f32; head_dim]);
    let (mut total, mut max) = (0f32, f32::NEG_INFINITY);
    for key_pos in visible {
        rows.keys16[rows.at(key_pos, kv_head)].convert_to_f32_slice(&mut key);
        rows.values16[rows.at(key_pos, kv_head)].convert_to_f32_slice(&mut value);
        let s = dot_f16(&key, &q) * scale;
        let (mut ms, mut vs) = (1f32, 1f32);
        if s > max {
            ms = (max - s).exp();
            max = s;
            acc.iter_mut().for_each(|a| *a *= ms);
            round(&mut acc);
        } else {
            vs = (s - max).exp();
        }
        for (a, v) in acc.iter_mut().zip(&value) {
            *a = v.mul_add(vs, *a);
        }
        round(&mut acc);
        total = total.mul_add(ms, vs);
    }
    let inverse = if total == 0.0 { 0.0 } else { 1.0 / total };
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = a * inverse;
    }
}

/// The one-chunk kernel with F16C: the cache read as f16, eight lanes at a time (ggml's
/// sixteen-lane accumulators as pairs of eight: each lane's arithmetic is the same).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
// The tile products index their register blocks by row and lane group on purpose: fixed
// trip counts the compiler unrolls into named registers.
#[allow(clippy::needless_range_loop)]
mod simd {
    use std::arch::x86_64::*;

    use half::f16;

    use super::Rows;

    /// [`super::widen`] (exact), eight values at a time, the rest one by one.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn widen(values: &[f16], out: &mut [f32]) {
        let n = values.len().min(out.len());
        let mut chunks = out[..n].chunks_exact_mut(8);
        for (out, values) in chunks.by_ref().zip(values.chunks_exact(8)) {
            // SAFETY: eight values read from `values` (by `load`), eight written to `out`.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), load(values)) };
        }
        let done = n / 8 * 8;
        for (o, v) in out[done..n].iter_mut().zip(&values[done..n]) {
            *o = v.to_f32();
        }
    }

    /// [`super::transpose_keys`] for `cells` (a multiple of eight) keys and `head_dim` (a
    /// multiple of eight): blocks of eight keys by eight dimensions widened and transposed
    /// in registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn transpose_keys(keys: &[f16], width: usize, cells: usize, head_dim: usize, out: &mut [f32]) {
        assert!(cells.is_multiple_of(8) && head_dim.is_multiple_of(8));
        assert!(cells == 0 || (cells - 1) * width + head_dim <= keys.len());
        assert!(cells == 0 || (head_dim - 1) * super::KEY_STRIDE + cells <= out.len());
        for c0 in (0..cells).step_by(8) {
            for d0 in (0..head_dim).step_by(8) {
                // SAFETY: keys (c0 + r)·width + d0 .. + 8 lie within `keys` (checked above).
                let r: [__m256; 8] = std::array::from_fn(|i| {
                    load(unsafe { std::slice::from_raw_parts(keys.as_ptr().add((c0 + i) * width + d0), 8) })
                });
                // The 8×8 transpose: pairs, then quadruples, then halves.
                let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                let columns = [
                    _mm256_permute2f128_ps::<0x20>(u0, u4),
                    _mm256_permute2f128_ps::<0x20>(u1, u5),
                    _mm256_permute2f128_ps::<0x20>(u2, u6),
                    _mm256_permute2f128_ps::<0x20>(u3, u7),
                    _mm256_permute2f128_ps::<0x31>(u0, u4),
                    _mm256_permute2f128_ps::<0x31>(u1, u5),
                    _mm256_permute2f128_ps::<0x31>(u2, u6),
                    _mm256_permute2f128_ps::<0x31>(u3, u7),
                ];
                for (d, column) in columns.into_iter().enumerate() {
                    // SAFETY: (d0 + d)·KEY_STRIDE + c0 + 8 ≤ out.len() (checked above).
                    unsafe { _mm256_storeu_ps(out.as_mut_ptr().add((d0 + d) * super::KEY_STRIDE + c0), column) };
                }
            }
        }
    }

    /// Eight f16 values widened.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn load(values: &[f16]) -> __m256 {
        assert!(values.len() >= 8);
        // SAFETY: eight values (checked above) are read.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(values.as_ptr().cast()) })
    }

    /// Eight f32 values rounded to f16 (to nearest, ties to even).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn store(values: &mut [f16], v: __m256) {
        assert!(values.len() >= 8);
        // SAFETY: eight values (checked above) are written.
        unsafe { _mm_storeu_si128(values.as_mut_ptr().cast(), _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)) };
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn lanes(v: __m256) -> [f32; 8] {
        let mut out = [0f32; 8];
        // SAFETY: eight lanes are written to an array of eight.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
        out
    }

    /// `ggml_vec_dot_f16` for a multiple of 64 values: four sixteen-lane accumulators
    /// (here low and high halves), reduced `(0+2) + (1+3)`, then as `reduce_add_16`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot(k: &[f16], q: &[f32]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 8];
        for (k, q) in k.chunks_exact(64).zip(q.chunks_exact(64)) {
            for (j, acc) in acc.iter_mut().enumerate() {
                let at = j * 8;
                // SAFETY: q holds 64 values; at + 8 ≤ 64.
                let qv = unsafe { _mm256_loadu_ps(q.as_ptr().add(at)) };
                *acc = _mm256_fmadd_ps(load(&k[at..]), qv, *acc);
            }
        }
        // acc[2j] and acc[2j + 1] are the low and high halves of accumulator j.
        let lo = _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6]));
        let hi = _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7]));
        let h8 = lanes(_mm256_add_ps(hi, lo));
        let h4 = [h8[4] + h8[0], h8[5] + h8[1], h8[6] + h8[2], h8[7] + h8[3]];
        (h4[0] + h4[2]) + (h4[1] + h4[3])
    }

    /// The largest of a tile row's scores (none is NaN where it matters: a NaN score makes
    /// the row's output NaN whatever the maximum).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn max(row: &[f32; super::TILE_CELLS]) -> f32 {
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        for chunk in row.chunks_exact(8) {
            // SAFETY: eight readable values.
            m = _mm256_max_ps(m, unsafe { _mm256_loadu_ps(chunk.as_ptr()) });
        }
        lanes(m).into_iter().fold(f32::NEG_INFINITY, f32::max)
    }

    /// `numerics::v_expf(x - max)` for sixteen lanes, each lane's arithmetic the same; their
    /// sum as `reduce_add_16`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn exp_minus(values: &mut [f32; 16], max: f32) -> f32 {
        let max = _mm256_set1_ps(max);
        // SAFETY: sixteen readable and writable values.
        let (lo, hi) = unsafe {
            let lo = exp(_mm256_sub_ps(_mm256_loadu_ps(values.as_ptr()), max));
            let hi = exp(_mm256_sub_ps(_mm256_loadu_ps(values.as_ptr().add(8)), max));
            _mm256_storeu_ps(values.as_mut_ptr(), lo);
            _mm256_storeu_ps(values.as_mut_ptr().add(8), hi);
            (lo, hi)
        };
        // h8[i] = v[i + 8] + v[i]; h4[i] = h8[i + 4] + h8[i]; (h4[0] + h4[2]) + (h4[1] + h4[3]).
        let h8 = _mm256_add_ps(hi, lo);
        let h4 = _mm_add_ps(_mm256_extractf128_ps::<1>(h8), _mm256_castps256_ps128(h8));
        let h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
        _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)))
    }

    /// `numerics::v_expf` for eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn exp(x: __m256) -> __m256 {
        let c = |bits: u32| _mm256_set1_ps(f32::from_bits(bits));
        let r = c(0x4b40_0000);
        let z = _mm256_fmadd_ps(x, c(0x3fb8_aa3b), r);
        let n = _mm256_sub_ps(z, r);
        let minus_n = _mm256_sub_ps(_mm256_setzero_ps(), n);
        let b = _mm256_fmadd_ps(minus_n, c(0x35bf_be8e), _mm256_fmadd_ps(minus_n, c(0x3f31_7200), x));
        let u = _mm256_mul_ps(b, b);
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(
                _mm256_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17)),
                u,
                _mm256_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb)),
            ),
            u,
            _mm256_fmadd_ps(c(0x3f7f_fff6), b, _mm256_set1_ps(1.0)),
        );
        let ni = _mm256_cvtps_epi32(n);
        // j lies in [0.7, 1.5): for -125 ≤ n ≤ 126 in every lane, j · 2^n is a normal float,
        // exact, and adding n to j's exponent bits is the one rounding-free step.
        let normal = _mm256_and_ps(
            _mm256_cmp_ps::<_CMP_GE_OQ>(n, _mm256_set1_ps(-125.0)),
            _mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_set1_ps(126.0)),
        );
        if _mm256_movemask_ps(normal) == 0xFF {
            return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(j), _mm256_slli_epi32::<23>(ni)));
        }
        // Otherwise j · 2^n with one rounding, in f64 (exact for |n| ≤ 192).
        let scaled = |j: __m128, ni: __m128i| -> __m128 {
            let exponent =
                _mm256_slli_epi64::<52>(_mm256_add_epi64(_mm256_cvtepi32_epi64(ni), _mm256_set1_epi64x(1023)));
            _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(j), _mm256_castsi256_pd(exponent)))
        };
        let low = scaled(_mm256_castps256_ps128(j), _mm256_castsi256_si128(ni));
        let high = scaled(_mm256_extractf128_ps::<1>(j), _mm256_extracti128_si256::<1>(ni));
        let result = _mm256_set_m128(high, low);
        // |n| > 192: 0 below, infinity above.
        let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
        let out_of_range = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(192.0));
        let limit = _mm256_blendv_ps(
            _mm256_set1_ps(f32::INFINITY),
            _mm256_setzero_ps(),
            _mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_setzero_ps()),
        );
        _mm256_blendv_ps(result, limit, out_of_range)
    }

    /// Registers of eight lanes per row for the next block of a tile product with `R` rows
    /// and `left` (≥ 8) values to go: as many as keep `R·N` accumulators, the `N` operands
    /// and a broadcast within the sixteen registers (more, and the compiler spills
    /// accumulators to memory inside the loop).
    #[inline(always)]
    pub(super) fn lanes_per_row<const R: usize>(left: usize) -> usize {
        let fit = match R {
            1 | 2 => 4,
            3 => 3,
            _ => 2,
        };
        fit.min(left / 8).max(1)
    }

    /// [`super::accumulate`] for the columns `col..col + 8·N`: `R·N` accumulators in
    /// registers, each operand row of `b` read once for the rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn accumulate<const R: usize, const N: usize>(
        b: &[f32],
        first: usize,
        stride: usize,
        a: [&[f32]; R],
        out: &mut [&mut [f32]; R],
        col: usize,
    ) {
        let steps = a.iter().map(|a| a.len()).min().unwrap_or(0);
        assert!(steps == 0 || first + (steps - 1) * stride + col + 8 * N <= b.len());
        assert!(out.iter().all(|out| col + 8 * N <= out.len()));
        let mut acc = [[_mm256_setzero_ps(); N]; R];
        for r in 0..R {
            for j in 0..N {
                // SAFETY: col + 8N ≤ out[r].len() (checked above).
                acc[r][j] = unsafe { _mm256_loadu_ps(out[r].as_ptr().add(col + 8 * j)) };
            }
        }
        for i in 0..steps {
            // SAFETY: first + (steps - 1)·stride + col + 8N values are readable (checked above).
            let row = unsafe { b.as_ptr().add(first + i * stride + col) };
            for r in 0..R {
                // SAFETY: i < steps ≤ a[r].len().
                let x = _mm256_set1_ps(unsafe { *a[r].get_unchecked(i) });
                for j in 0..N {
                    // SAFETY: as above.
                    let v = unsafe { _mm256_loadu_ps(row.add(8 * j)) };
                    acc[r][j] = _mm256_fmadd_ps(v, x, acc[r][j]);
                }
            }
        }
        for r in 0..R {
            for j in 0..N {
                // SAFETY: as for the loads.
                unsafe { _mm256_storeu_ps(out[r].as_mut_ptr().add(col + 8 * j), acc[r][j]) };
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn attend_one_chunk(
        rows: &Rows,
        kv_head: usize,
        q: &[f32],
        scale: f32,
        visible: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        let q = super::rounded_to_f16(q);
        // The running sum of V in f16, its normaliser and the running maximum score.
        let mut acc = vec![f16::ZERO; rows.head_dim];
        let (mut total, mut max) = (0f32, f32::NEG_INFINITY);
        for key_pos in visible {
            let at = rows.at(key_pos, kv_head);
            let s = dot(&rows.keys16[at.clone()], &q) * scale;
            let (mut ms, mut vs) = (1f32, 1f32);
            if s > max {
                ms = (max - s).exp();
                max = s;
                let msv = _mm256_set1_ps(ms);
                for a in acc.chunks_exact_mut(8) {
                    store(a, _mm256_mul_ps(load(a), msv));
                }
            } else {
                vs = (s - max).exp();
            }
            let vsv = _mm256_set1_ps(vs);
            for (a, v) in acc.chunks_exact_mut(8).zip(rows.values16[at].chunks_exact(8)) {
                store(a, _mm256_fmadd_ps(load(v), vsv, load(a)));
            }
            total = total.mul_add(ms, vs);
        }
        let inverse = if total == 0.0 { 0.0 } else { 1.0 / total };
        for (o, a) in out.iter_mut().zip(&acc) {
            *o = a.to_f32() * inverse;
        }
    }
}

/// Scales the scores of the cells `visible` (within the tile) of a tile row, hides the
/// others (−∞), and returns the row's largest score.
#[inline(always)]
fn scale_and_max(row: &mut [f32; TILE_CELLS], visible: std::ops::Range<usize>, scale: f32) -> f32 {
    row[..visible.start].fill(f32::NEG_INFINITY);
    row[visible.clone()].iter_mut().for_each(|score| *score *= scale);
    row[visible.end..].fill(f32::NEG_INFINITY);
    #[cfg(target_arch = "x86_64")]
    if crate::numerics::has_avx2_fma_f16c() {
        #[allow(unsafe_code)]
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
        return unsafe { simd::max(row) };
    }
    row.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `ggml_vec_soft_max_f32` on a tile row: each score replaced by `v_expf(score - max)`,
/// and their sum, each 16 lanes reduced as `_mm512_reduce_add_ps` and summed in f64.
#[inline(always)]
fn exp_and_sum(row: &mut [f32; TILE_CELLS], max: f32) -> f64 {
    let mut sum = 0f64;
    for lanes in row.chunks_exact_mut(16) {
        let Ok(lanes) = <&mut [f32; 16]>::try_from(lanes) else {
            continue;
        };
        #[cfg(target_arch = "x86_64")]
        if crate::numerics::has_avx2_fma_f16c() {
            #[allow(unsafe_code)]
            // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
            let lanes_sum = unsafe { simd::exp_minus(lanes, max) };
            sum += f64::from(lanes_sum);
            continue;
        }
        for s in lanes.iter_mut() {
            *s = v_expf(*s - max);
        }
        sum += f64::from(reduce_add_16(*lanes));
    }
    sum
}

/// `out[r][c] += Σᵢ a[r][i] · b[first + i·stride + c]` for the columns `c < cols` of `R`
/// rows, each output one fused multiply-add chain over `i` in order: ggml's tile products,
/// Q·Kᵀ (`i` over the head dimension, the columns a tile's cells, keys transposed) and P·V
/// (`i` over the cells, the columns the head dimension). Whole groups of eight columns go
/// through the AVX2 kernel in register blocks sized to the row count, the rest plainly.
#[inline(always)]
fn accumulate<const R: usize>(
    b: &[f32],
    first: usize,
    stride: usize,
    a: [&[f32]; R],
    out: &mut [&mut [f32]; R],
    cols: usize,
) {
    #[allow(unused_mut)]
    let mut col = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::numerics::has_avx2_fma_f16c() {
        while cols - col >= 8 {
            let n = simd::lanes_per_row::<R>(cols - col);
            #[allow(unsafe_code)]
            // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
            unsafe {
                match n {
                    4 => simd::accumulate::<R, 4>(b, first, stride, a, out, col),
                    3 => simd::accumulate::<R, 3>(b, first, stride, a, out, col),
                    2 => simd::accumulate::<R, 2>(b, first, stride, a, out, col),
                    _ => simd::accumulate::<R, 1>(b, first, stride, a, out, col),
                }
            }
            col += 8 * n;
        }
    }
    accumulate_plain(b, first, stride, a, out, col..cols);
}

/// [`accumulate`] for the columns `cols`, without SIMD.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // `i` steps through all `R` rows of `a` at once
fn accumulate_plain<const R: usize>(
    b: &[f32],
    first: usize,
    stride: usize,
    a: [&[f32]; R],
    out: &mut [&mut [f32]; R],
    cols: std::ops::Range<usize>,
) {
    if cols.is_empty() {
        return;
    }
    let steps = a.iter().map(|a| a.len()).min().unwrap_or(0);
    for i in 0..steps {
        let at = first + i * stride;
        let row = &b[at + cols.start..at + cols.end];
        for r in 0..R {
            let x = a[r][i];
            for (o, &v) in out[r][cols.clone()].iter_mut().zip(row) {
                *o = v.mul_add(x, *o);
            }
        }
    }
}

/// The scores of the cells `cells` of a tile for `R` query rows (Q·Kᵀ); the others are
/// left at zero. Cells past the cache's end (up to the tile's) are zero keys.
#[inline(always)]
fn tile_scores<const R: usize>(
    rows: &Rows,
    kv_head: usize,
    q: [&[f32]; R],
    tile_start: usize,
    cells: std::ops::Range<usize>,
) -> [[f32; TILE_CELLS]; R] {
    let mut scores = [[0f32; TILE_CELLS]; R];
    let mut parts = scores.iter_mut();
    let mut out: [&mut [f32]; R] =
        std::array::from_fn(|_| parts.next().map(|s| &mut s[cells.start..]).unwrap_or_default());
    let first = rows.key_tile(kv_head, tile_start) + cells.start;
    accumulate(rows.keys_t, first, KEY_STRIDE, q, &mut out, cells.len());
    scores
}

/// `acc[r] += Σ p[r][cell]·value[cell]` over the visible `cells` of a tile (P·V).
#[inline(always)]
fn tile_values<const R: usize>(
    rows: &Rows,
    kv_head: usize,
    scores: &[[f32; TILE_CELLS]; R],
    tile_start: usize,
    cells: std::ops::Range<usize>,
    acc: &mut [&mut [f32]; R],
) {
    if cells.is_empty() {
        return;
    }
    let p: [&[f32]; R] = std::array::from_fn(|r| &scores[r][cells.start - tile_start..cells.end - tile_start]);
    let first = rows.value_row(kv_head, cells.start);
    accumulate(rows.values, first, rows.head_dim, p, acc, rows.head_dim);
}

/// `ggml_compute_forward_flash_attn_ext_tiled` for `R` query rows that see the same keys
/// (`visible`): the cache in tiles of [`TILE_CELLS`] cells from position 0, one
/// [`step`](Self::step) per tile; tiles without a visible key are skipped. Each row is
/// computed exactly as alone; the rows share the reads of K and V.
struct TiledRows<'a, const R: usize> {
    q: [&'a [f32]; R],
    /// The weighted values so far, in the rows' outputs.
    acc: [&'a mut [f32]; R],
    /// The online softmax's running maximum and normaliser of each row.
    max: [f32; R],
    total: [f32; R],
    scale: f32,
    visible: std::ops::Range<usize>,
}

impl<'a, const R: usize> TiledRows<'a, R> {
    fn new(q: [&'a [f32]; R], mut acc: [&'a mut [f32]; R], scale: f32, visible: std::ops::Range<usize>) -> Self {
        acc.iter_mut().for_each(|acc| acc.fill(0.0));
        Self { q, acc, max: [f32::NEG_INFINITY; R], total: [0.0; R], scale, visible }
    }

    fn first_tile(&self) -> usize {
        self.visible.start / TILE_CELLS * TILE_CELLS
    }

    /// The tile from `tile_start`, unless none of its keys is visible.
    #[inline(always)]
    fn step(&mut self, rows: &Rows, kv_head: usize, tile_start: usize) {
        if tile_start < self.first_tile() || tile_start >= self.visible.end {
            return;
        }
        let Self { q, acc, max, total, scale, visible } = self;
        tile_step(rows, kv_head, *q, *scale, visible, tile_start, acc, max, total);
    }

    fn finish(self) {
        for (acc, total) in self.acc.into_iter().zip(self.total) {
            finish_row(acc, total);
        }
    }
}

/// Divides a row's weighted values by its softmax normaliser.
fn finish_row(acc: &mut [f32], total: f32) {
    let inverse = if total == 0.0 { 0.0 } else { 1.0 / total };
    acc.iter_mut().for_each(|a| *a *= inverse);
}

/// One tile of [`attend_tiled`] for `R` rows: their scores over the tile's cells, the online
/// softmax's running maximum and normaliser (`max`, `total`), the weighted values added to
/// `acc` (rescaled first when the maximum rises).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile_step<const R: usize>(
    rows: &Rows,
    kv_head: usize,
    q: [&[f32]; R],
    scale: f32,
    visible: &std::ops::Range<usize>,
    tile_start: usize,
    acc: &mut [&mut [f32]; R],
    max: &mut [f32; R],
    total: &mut [f32; R],
) {
    // The visible cells of the tile.
    let lo = visible.start.saturating_sub(tile_start).min(TILE_CELLS);
    let hi = visible.end.saturating_sub(tile_start).min(TILE_CELLS);
    // simd_gemm: each score one fused multiply-add chain over the head dimension, the
    // scores of the tile side by side; only those of the visible cells, in whole registers
    // (the rest hidden below, whatever their value).
    let mut scores = tile_scores(rows, kv_head, q, tile_start, lo / 8 * 8..hi.next_multiple_of(8).min(TILE_CELLS));
    for r in 0..R {
        let row = &mut scores[r];
        let tile_max = scale_and_max(row, lo..hi, scale);
        let new_max = max[r].max(tile_max);
        if new_max > max[r] {
            let ms = (max[r] - new_max).exp();
            acc[r].iter_mut().for_each(|a| *a *= ms);
            total[r] *= ms;
        }
        max[r] = new_max;
        total[r] = (f64::from(total[r]) + exp_and_sum(row, new_max)) as f32;
    }
    // The weighted values of the visible cells.
    let cells = tile_start.max(visible.start)..(tile_start + TILE_CELLS).min(visible.end);
    tile_values(rows, kv_head, &scores, tile_start, cells, acc);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic keys and values that rise and fall, as test inputs.
    fn value(i: usize) -> f32 {
        ((i * 2_654_435_761) % 1_000) as f32 / 250.0 - 2.0
    }

    /// A cache of `len` positions of [`value`]s.
    fn filled(n_kv: usize, head_dim: usize, len: usize) -> HostKvCache {
        let keys: Vec<f32> = (0..len * n_kv * head_dim).map(value).collect();
        let values: Vec<f32> = (0..len * n_kv * head_dim).map(|i| value(i + 17)).collect();
        let mut cache = HostKvCache::new(n_kv, head_dim, len);
        cache.append(&keys, &values);
        cache
    }

    /// One position's walk over the tiles (`R` rows of K/V head `kv_head`).
    fn attend_tiled<const R: usize>(
        rows: &Rows,
        kv_head: usize,
        q: [&[f32]; R],
        scale: f32,
        visible: std::ops::Range<usize>,
        acc: [&mut [f32]; R],
    ) {
        let mut walk = TiledRows::new(q, acc, scale, visible.clone());
        for tile_start in (walk.first_tile()..visible.end).step_by(TILE_CELLS) {
            walk.step(rows, kv_head, tile_start);
        }
        walk.finish();
    }

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

    /// The F16C one-chunk kernel computes the scalar one's bits (head sizes 64 and 256,
    /// with and without a window, scores that rise and fall so both softmax branches run).
    #[test]
    fn one_chunk_kernels_agree_bit_for_bit() {
        for head_dim in [64, 256] {
            let (n_kv, len) = (2, 97);
            let cache = filled(n_kv, head_dim, len);
            let rows = Rows {
                keys16: &cache.keys,
                values16: &cache.values,
                keys_t: &[],
                values: &[],
                from: 0,
                n_kv,
                head_dim,
                len,
            };
            let q: Vec<f32> = (0..head_dim).map(|i| value(i * 7 + 3) * 1.37).collect();
            for visible in [0..len, 40..len, 0..1] {
                let mut scalar = vec![0f32; head_dim];
                attend_one_chunk_scalar(&rows, 1, &q, 0.125, visible.clone(), &mut scalar);
                let mut dispatched = vec![0f32; head_dim];
                attend_one_chunk(&rows, 1, &q, 0.125, visible.clone(), &mut dispatched);
                assert_eq!(scalar, dispatched, "head_dim {head_dim}, keys {visible:?}");
            }
        }
    }

    /// The widened cache holds each key and value where the kernels read them: whole and
    /// partial tiles, from the first tile or a later one, head sizes the vector transpose
    /// takes (64, 72) and one it leaves to the plain loop (60).
    #[test]
    fn widened_cache_holds_every_key_and_value() {
        for head_dim in [64, 72, 60] {
            let (n_kv, len) = (2, 150);
            let cache = filled(n_kv, head_dim, len);
            for from in [0, 64] {
                let (keys_t, values) = cache.widened(from);
                let rows =
                    Rows { keys16: &[], values16: &[], keys_t: &keys_t, values: &values, from, n_kv, head_dim, len };
                let tiles = (len - from).div_ceil(TILE_CELLS);
                assert_eq!(keys_t.len(), n_kv * tiles * head_dim * KEY_STRIDE);
                for kv_head in 0..n_kv {
                    for position in from..len {
                        let at = (position * n_kv + kv_head) * head_dim;
                        let tile_start = position / TILE_CELLS * TILE_CELLS;
                        for dim in 0..head_dim {
                            let key =
                                keys_t[rows.key_tile(kv_head, tile_start) + dim * KEY_STRIDE + position - tile_start];
                            assert_eq!(key, cache.keys[at + dim].to_f32(), "key {position}/{dim}, head_dim {head_dim}");
                            let value = values[rows.value_row(kv_head, position) + dim];
                            assert_eq!(value, cache.values[at + dim].to_f32(), "value {position}/{dim}");
                        }
                    }
                    // The last tile's cells past the cache's end are zero keys.
                    let last = rows.key_tile(kv_head, from + (tiles - 1) * TILE_CELLS);
                    for dim in 0..head_dim {
                        let pad = &keys_t
                            [last + dim * KEY_STRIDE + (len - from) % TILE_CELLS..last + dim * KEY_STRIDE + TILE_CELLS];
                        assert!(pad.iter().all(|&k| k == 0.0));
                    }
                }
            }
        }
    }

    /// Two or four rows through the tiled kernel together give each row's bits alone (head sizes
    /// 64, 256 and 72, which has a partial chunk; a partial last tile; windows).
    #[test]
    fn tiled_rows_together_agree_with_rows_alone() {
        for head_dim in [64, 256, 72] {
            let (n_kv, len) = (2, 150);
            let (keys_t, values) = filled(n_kv, head_dim, len).widened(0);
            let rows =
                Rows { keys16: &[], values16: &[], keys_t: &keys_t, values: &values, from: 0, n_kv, head_dim, len };
            let q0: Vec<f32> = (0..head_dim).map(|i| value(i * 7 + 3) * 0.37).collect();
            let q1: Vec<f32> = (0..head_dim).map(|i| value(i * 5 + 1) * 0.41).collect();
            for visible in [0..len, 70..len, 0..100, 0..1] {
                let (mut alone0, mut alone1) = (vec![0f32; head_dim], vec![0f32; head_dim]);
                attend_tiled(&rows, 1, [&q0], 0.125, visible.clone(), [&mut alone0]);
                attend_tiled(&rows, 1, [&q1], 0.125, visible.clone(), [&mut alone1]);
                let (mut both0, mut both1) = (vec![0f32; head_dim], vec![0f32; head_dim]);
                attend_tiled(&rows, 1, [&q0, &q1], 0.125, visible.clone(), [&mut both0, &mut both1]);
                let mut four = [0; 4].map(|_| vec![0f32; head_dim]);
                let [f0, f1, f2, f3] = &mut four;
                attend_tiled(&rows, 1, [&q0, &q1, &q1, &q0], 0.125, visible.clone(), [f0, f1, f2, f3]);
                assert_eq!(four, [alone0.clone(), alone1.clone(), alone1.clone(), alone0.clone()]);
                assert_eq!((alone0, alone1), (both0, both1), "head_dim {head_dim}, keys {visible:?}");
            }
        }
    }

    /// Positions walking the tiles in blocks (the last one partial) give each position's bits
    /// alone: groups of four query heads and one (six heads per K/V head), with and without
    /// a window (one so short that the call widens the cache from the second tile on), keys
    /// scaled first or not.
    #[test]
    fn blocked_walks_agree_with_positions_alone() {
        let (n_head, n_kv, head_dim, len, seq) = (12, 2, 64, 150, 70);
        let cache = filled(n_kv, head_dim, len);
        let (keys_t, widened) = cache.widened(0);
        let rows = Rows { keys16: &[], values16: &[], keys_t: &keys_t, values: &widened, from: 0, n_kv, head_dim, len };
        let queries: Vec<f32> = (0..seq * n_head * head_dim).map(|i| value(i * 3 + 5) * 0.3).collect();
        let pos = len - seq;
        for (window, scale_q_first) in [(None, false), (Some(100), false), (Some(10), false), (None, true)] {
            let shape = AttentionShape { n_head, n_kv, head_dim, scale: 0.125, scale_q_first, window };
            let got = attend(&cache, &queries, pos, &shape);
            for (i, (position, out)) in queries.chunks(n_head * head_dim).zip(got.chunks(n_head * head_dim)).enumerate()
            {
                let end = pos + i + 1;
                let visible = window.map_or(0, |w: usize| end.saturating_sub(w))..end;
                for (head, (q, out)) in position.chunks(head_dim).zip(out.chunks(head_dim)).enumerate() {
                    let (q, scale): (Vec<f32>, f32) =
                        if scale_q_first { (q.iter().map(|x| x * 0.125).collect(), 1.0) } else { (q.to_vec(), 0.125) };
                    let mut alone = vec![0f32; head_dim];
                    attend_tiled(&rows, head / (n_head / n_kv), [&q], scale, visible.clone(), [&mut alone]);
                    assert_eq!(out, alone.as_slice(), "position {i}, head {head}, window {window:?}");
                }
            }
        }
    }

    /// The vectorised softmax pieces give the lane formula's bits: `v_expf` over a wide range
    /// (both cut-offs, −∞ for hidden cells), and the maximum.
    #[test]
    fn tile_softmax_matches_the_lane_formula() {
        let mut inputs: Vec<f32> = (-3000..3000).map(|i| i as f32 / 13.7).collect();
        inputs.extend([f32::NEG_INFINITY, -0.0, 0.0, 88.7, -103.9, 1e-30, -1e-30, 133.0, -140.0]);
        for max in [0.0f32, 2.5, -7.25] {
            for chunk in inputs.chunks(TILE_CELLS) {
                let mut row = [f32::NEG_INFINITY; TILE_CELLS];
                row[..chunk.len()].copy_from_slice(chunk);
                let want: Vec<f32> = row.iter().map(|&s| v_expf(s - max)).collect();
                let want_sum: f64 =
                    want.chunks(16).map(|l| f64::from(reduce_add_16(l.try_into().expect("16 lanes")))).sum();
                let want_max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                assert_eq!(scale_and_max(&mut row, 0..TILE_CELLS, 1.0), want_max);
                let sum = exp_and_sum(&mut row, max);
                let got: Vec<u32> = row.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "max {max}, {chunk:?}");
                assert_eq!(sum.to_bits(), want_sum.to_bits());
            }
        }
    }

    /// The register-blocked tile products compute each score and each output as one plain
    /// chain of fused multiply-adds in order (head sizes 64, 256 and 72, whose last
    /// dimensions are outside the blocks; one to four rows; a partial range of cells).
    #[test]
    fn tile_blocks_keep_each_chain() {
        for head_dim in [64, 256, 72] {
            let (n_kv, len) = (2, 150usize);
            let tiles = len.div_ceil(TILE_CELLS);
            let keys_t: Vec<f32> = (0..n_kv * tiles * head_dim * KEY_STRIDE).map(value).collect();
            let values: Vec<f32> = (0..len * n_kv * head_dim).map(|i| value(i + 17)).collect();
            let rows =
                Rows { keys16: &[], values16: &[], keys_t: &keys_t, values: &values, from: 0, n_kv, head_dim, len };
            // Where the widened layouts keep key `d` of cell `t` of the tile from 64, and value `d`
            // of position `c`, of K/V head 1.
            let key_at = |d: usize, t: usize| ((tiles + 1) * head_dim + d) * KEY_STRIDE + t;
            let value_at = |c: usize, d: usize| (len + c) * head_dim + d;
            let q: Vec<Vec<f32>> = (0..4).map(|r| (0..head_dim).map(|i| value(i * 7 + r) * 0.37).collect()).collect();
            let (tile_start, cells) = (64, 70..128);
            let plain_scores = |q: &[f32]| -> Vec<f32> {
                (0..TILE_CELLS)
                    .map(|t| (0..head_dim).fold(0f32, |s, d| keys_t[key_at(d, t)].mul_add(q[d], s)))
                    .collect()
            };
            let plain_values = |p: &[f32]| -> Vec<f32> {
                (0..head_dim)
                    .map(|d| cells.clone().fold(0.5f32, |a, c| values[value_at(c, d)].mul_add(p[c - tile_start], a)))
                    .collect()
            };
            fn check<const R: usize>(
                rows: &Rows,
                q: &[Vec<f32>],
                plain_scores: &dyn Fn(&[f32]) -> Vec<f32>,
                plain_values: &dyn Fn(&[f32]) -> Vec<f32>,
                cells: std::ops::Range<usize>,
            ) {
                let q: [&[f32]; R] = std::array::from_fn(|r| q[r].as_slice());
                let scores = tile_scores(rows, 1, q, 64, 0..TILE_CELLS);
                // Some of the cells (a tile's visible ones): as in the whole tile, the rest zero.
                let partial = tile_scores(rows, 1, q, 64, 8..45);
                let mut out = [0; R].map(|_| vec![0.5f32; rows.head_dim]);
                let mut acc: [&mut [f32]; R] = {
                    let mut it = out.iter_mut();
                    std::array::from_fn(|_| it.next().map(Vec::as_mut_slice).unwrap_or_default())
                };
                tile_values(rows, 1, &scores, 64, cells.clone(), &mut acc);
                // And the plain loops alone (what a CPU without AVX2 runs).
                let mut portable = [[0f32; TILE_CELLS]; R];
                let mut acc: [&mut [f32]; R] = {
                    let mut it = portable.iter_mut();
                    std::array::from_fn(|_| it.next().map(|s| &mut s[..]).unwrap_or_default())
                };
                let first = rows.key_tile(1, 64);
                accumulate_plain(rows.keys_t, first, KEY_STRIDE, q, &mut acc, 0..TILE_CELLS);
                let mut out_portable = [0; R].map(|_| vec![0.5f32; rows.head_dim]);
                let mut acc: [&mut [f32]; R] = {
                    let mut it = out_portable.iter_mut();
                    std::array::from_fn(|_| it.next().map(Vec::as_mut_slice).unwrap_or_default())
                };
                let p: [&[f32]; R] = std::array::from_fn(|r| &scores[r][cells.start - 64..cells.end - 64]);
                let first = rows.value_row(1, cells.start);
                accumulate_plain(rows.values, first, rows.head_dim, p, &mut acc, 0..rows.head_dim);
                for r in 0..R {
                    assert_eq!(partial[r][8..45], scores[r][8..45], "{R} rows, head_dim {}", rows.head_dim);
                    assert_eq!(partial[r][..8], [0.0; 8]);
                }
                for r in 0..R {
                    assert_eq!(scores[r].to_vec(), plain_scores(q[r]), "{R} rows, head_dim {}", rows.head_dim);
                    assert_eq!(portable[r], scores[r], "{R} rows, head_dim {}", rows.head_dim);
                    assert_eq!(out[r], plain_values(&scores[r]), "{R} rows, head_dim {}", rows.head_dim);
                    assert_eq!(out_portable[r], out[r], "{R} rows, head_dim {}", rows.head_dim);
                }
            }
            check::<1>(&rows, &q, &plain_scores, &plain_values, cells.clone());
            check::<3>(&rows, &q, &plain_scores, &plain_values, cells.clone());
            check::<4>(&rows, &q, &plain_scores, &plain_values, cells.clone());
        }
    }

    #[test]
    fn matches_naive_attention_within_f16_precision() {
        let head_dim = 8;
        let mut cache = HostKvCache::new(1, head_dim, 0);
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
        // A batch of 64 queries or more takes the tiled kernel: same attention, other rounding.
        let mut long = HostKvCache::new(1, head_dim, 0);
        let keys: Vec<Vec<f32>> =
            (0..150).map(|j| (0..head_dim).map(|d| ((j * 7 + d * 3) % 11) as f32 / 11.0 - 0.5).collect()).collect();
        let values: Vec<Vec<f32>> =
            (0..150).map(|j| (0..head_dim).map(|d| ((j * 5 + d) % 13) as f32 / 13.0).collect()).collect();
        for (k, v) in keys.iter().zip(&values) {
            long.append(k, v);
        }
        let queries: Vec<f32> =
            (0..80).flat_map(|i| (0..head_dim).map(move |d| ((i + d) % 9) as f32 / 4.0 - 1.0)).collect();
        let tiled = attend(&long, &queries, 70, &shape);
        for (i, (got, query)) in tiled.chunks(head_dim).zip(queries.chunks(head_dim)).enumerate() {
            let want = naive(&keys[..71 + i], &values[..71 + i], query, 0.5);
            for (g, w) in got.iter().zip(&want) {
                assert!((f64::from(*g) - w).abs() < 2e-3, "row {i}: {got:?} vs {want:?}");
            }
        }
        // Truncating forgets positions.
        cache.truncate(5);
        assert_eq!(cache.len(), 5);
    }
}
