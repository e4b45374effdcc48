//! Host kernels that compute in the order llama.cpp's CPU backend (ggml, x86-64 build
//! with AVX-512) computes, so the engine's logits can be checked against llama.cpp's
//! bit for bit rather than within a tolerance.
//!
//! Why it matters: both engines quantize activations to 8 bits before every matrix
//! product, so a difference of one ulp upstream can flip an int8 rounding and move a
//! token's log-probability by a tenth of a nat several layers later. Each function
//! names the ggml routine it follows; where ggml uses SIMD, the lane layout and the
//! order of the horizontal sums are reproduced, and so are the multiply-adds that are
//! fused in ggml (explicit intrinsics, or contracted by the compiler).

use half::f16;
use rayon::prelude::*;

/// Defines a function whose body is compiled twice: for AVX2, FMA and F16C, and plainly
/// (closures in the body inherit the features, so rayon's workers run that code too); the
/// first runs when the CPU has them (checked once, cached by std). (A third copy for
/// AVX-512 made Gemma's prompts 6-10% slower on this project's machine.) For loops left to the compiler to vectorise: a binary
/// built for any x86-64 would otherwise run them as SSE2 and call the C library for every
/// `mul_add` and `round_ties_even`. All copies compute the same values: fused is fused,
/// rounded is rounded, and the compiler never reorders floating-point sums. Helpers called
/// from the body are `#[inline(always)]`, so that each copy compiles them its own way.
macro_rules! multiversion {
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident $(<$($generic:ident: $bound:path),*>)? ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?
        $body:block
    ) => {
        $(#[$attr])*
        $vis fn $name $(<$($generic: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma,f16c")]
                fn fast $(<$($generic: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? $body
                if $crate::numerics::has_avx2_fma_f16c() {
                    #[allow(unsafe_code)]
                    // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
                    return unsafe { fast($($arg),*) };
                }
            }
            $body
        }
    };
}
pub(crate) use multiversion;

multiversion! {
    /// `ggml_rms_norm` followed by `ggml_mul` with the weight, for each row of `x`. The sum
    /// of squares is taken in f64 over f32 products, as `ggml_compute_forward_rms_norm_f32`.
    pub(crate) fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
        let n = weight.len();
        // Rows in parallel: each row's f64 sum is one sequential chain.
        x.par_chunks_exact_mut(n).with_min_len(8).for_each(|row| {
            let sum: f64 = row.iter().map(|v| f64::from(v * v)).sum();
            let mean = (sum / n as f64) as f32;
            let scale = 1.0 / (mean + eps).sqrt();
            for (v, w) in row.iter_mut().zip(weight) {
                *v = (*v * scale) * w;
            }
        });
    }
}

/// Rotary position embedding as `ggml_rope_ext` computes it: the angle of pair `i` at
/// position `p` is `p · θ^i` built by repeated multiplication in f32 (not `p · θ^i`
/// computed directly), then `cosf`/`sinf`.
pub(crate) struct Rope {
    head_dim: usize,
    theta_scale: f32,
    freq_scale: f32,
    freq_factors: Option<Vec<f32>>,
    /// NeoX layout rotates `(i, i + head_dim/2)`; otherwise adjacent pairs `(2i, 2i+1)`.
    neox: bool,
}

impl Rope {
    pub(crate) fn new(head_dim: usize, base: f32, freq_scale: f32, freq_factors: Option<Vec<f32>>, neox: bool) -> Self {
        Self { head_dim, theta_scale: base.powf(-2.0 / head_dim as f32), freq_scale, freq_factors, neox }
    }

    /// cos/sin of every pair at positions `pos..pos + seq`, laid out `[seq][pair][cos, sin]`.
    pub(crate) fn table(&self, pos: usize, seq: usize) -> Vec<f32> {
        let pairs = self.head_dim / 2;
        let mut table = Vec::with_capacity(seq * pairs * 2);
        for p in pos..pos + seq {
            let mut theta = p as f32;
            for i in 0..pairs {
                let factor = self.freq_factors.as_ref().and_then(|f| f.get(i)).copied().unwrap_or(1.0);
                let angle = self.freq_scale * (theta / factor);
                table.push(angle.cos());
                table.push(angle.sin());
                theta *= self.theta_scale;
            }
        }
        table
    }

    /// Rotates `x`, laid out `[seq][heads][head_dim]`, with a table from [`Rope::table`].
    pub(crate) fn apply(&self, x: &mut [f32], table: &[f32]) {
        rope_apply(self.head_dim, self.neox, x, table);
    }
}

multiversion! {
    /// [`Rope::apply`].
    fn rope_apply(head_dim: usize, neox: bool, x: &mut [f32], table: &[f32]) {
        let pairs = head_dim / 2;
        let seq = table.len() / (pairs * 2);
        let per_position = x.len() / seq.max(1);
        x.par_chunks_exact_mut(per_position.max(1)).with_min_len(8).enumerate().for_each(|(t, row)| {
            let angles = &table[t * pairs * 2..(t + 1) * pairs * 2];
            for head in row.chunks_exact_mut(head_dim) {
                for i in 0..pairs {
                    let (cos, sin) = (angles[2 * i], angles[2 * i + 1]);
                    let (a, b) = if neox { (i, i + pairs) } else { (2 * i, 2 * i + 1) };
                    let (x0, x1) = (head[a], head[b]);
                    // GCC contracts `x0*cos - x1*sin` and `x0*sin + x1*cos` into one
                    // fused multiply-add each, the first product fused.
                    head[a] = x0.mul_add(cos, -(x1 * sin));
                    head[b] = x0.mul_add(sin, x1 * cos);
                }
            }
        });
    }
}

/// `ggml_v_expf` (AVX-512 build), one lane: ARM's optimized-routines polynomial, with
/// `scalef` for the power of two. Used by ggml's vectorised SiLU and softmax.
#[inline(always)]
pub(crate) fn v_expf(x: f32) -> f32 {
    let c = f32::from_bits;
    let r = c(0x4b40_0000);
    let z = x.mul_add(c(0x3fb8_aa3b), r);
    let n = z - r;
    let b = (-n).mul_add(c(0x35bf_be8e), (-n).mul_add(c(0x3f31_7200), x));
    let u = b * b;
    let j = c(0x3c07_2010)
        .mul_add(b, c(0x3d2b_9f17))
        .mul_add(u, c(0x3e2a_af33).mul_add(b, c(0x3eff_fedb)))
        .mul_add(u, c(0x3f7f_fff6).mul_add(b, 1.0));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    // scalef: j · 2^n with a single rounding (exact in f64 for |n| ≤ 192). 2^n is built
    // from its exponent bits: `powi` with a variable exponent is a slow library call.
    let two_n = f64::from_bits(((n as i64 + 1023) as u64) << 52);
    (f64::from(j) * two_n) as f32
}

multiversion! {
    /// `ggml_vec_swiglu_f32` on each row of `row_len` values: `silu(gate) · up`, vectorised
    /// SiLU (`x / (1 + v_expf(-x))`) on blocks of 16, the C library's `expf` on the rest.
    /// Rows in parallel, written over `gate`.
    pub(crate) fn swiglu(gate: &mut [f32], up: &[f32], row_len: usize) {
        rows_in_parallel(gate, up, row_len, |gate, up| {
            let vectorised = gate.len() / 16 * 16;
            for (i, (y, &g)) in gate.iter_mut().zip(up).enumerate() {
                let x = *y;
                let e = if i < vectorised { v_expf(0.0 - x) } else { (-x).exp() };
                *y = (x / (1.0 + e)) * g;
            }
        })
    }
}

multiversion! {
    /// GELU (tanh form) as ggml's GEGLU computes it with `GGML_GELU_FP16`: the input rounded
    /// to f16, the result read from a table of f16 values, then multiplied by `up`. Written
    /// over `gate`.
    pub(crate) fn geglu(gate: &mut [f32], up: &[f32], row_len: usize) {
        let table = gelu_table();
        rows_in_parallel(gate, up, row_len, |gate, up| {
            for (y, &g) in gate.iter_mut().zip(up) {
                let x = *y;
                *y = if x <= -10.0 {
                    0.0
                } else if x >= 10.0 {
                    x * g
                } else {
                    table[usize::from(f16::from_f32(x).to_bits())] * g
                };
            }
        })
    }
}

/// `row(gate, up)` on each row of `row_len` values, rows in parallel.
fn rows_in_parallel(gate: &mut [f32], up: &[f32], row_len: usize, row: impl Fn(&mut [f32], &[f32]) + Sync) {
    let row_len = row_len.max(1);
    gate.par_chunks_mut(row_len).zip(up.par_chunks(row_len)).for_each(|(gate, up)| row(gate, up));
}

/// ggml's `ggml_table_gelu_f16`: GELU of every f16 value, rounded to f16 (held as f32),
/// indexed by the input's bits. Built once, on first use.
fn gelu_table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        const COEF_A: f32 = 0.044_715;
        // The table is built by C code that GCC compiles with contraction: `1 + a*x*x` is
        // one fused multiply-add.
        let gelu = |v: f32| 0.5 * v * (1.0 + (SQRT_2_OVER_PI * v * (COEF_A * v).mul_add(v, 1.0)).tanh());
        (0..=u16::MAX).map(|bits| f16::from_f32(gelu(f16::from_bits(bits).to_f32())).to_f32()).collect()
    })
}

/// Whether the SIMD kernels (`quant.rs`, `attention.rs`) can run: AVX2, FMA and F16C
/// (checked once, then cached by std).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma_f16c() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// Whether 256-bit VNNI (`vpdpbusd` on AVX registers: AVX-512 VNNI and VL) can run.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_vnni_256() -> bool {
    std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512vl")
}

/// Whether the AVX-512 prompt kernels (`quant.rs`) can run: AVX-512 F, BW, VL and VNNI
/// besides [`has_avx2_fma_f16c`] (checked once, then cached by std).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512_vnni() -> bool {
    has_avx2_fma_f16c()
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}

/// `_mm512_reduce_add_ps` as GCC expands it: halves added pairwise down to one lane.
#[inline(always)]
pub(crate) fn reduce_add_16(v: [f32; 16]) -> f32 {
    let mut h8 = [0f32; 8];
    for i in 0..8 {
        h8[i] = v[i + 8] + v[i];
    }
    let mut h4 = [0f32; 4];
    for i in 0..4 {
        h4[i] = h8[i + 4] + h8[i];
    }
    (h4[0] + h4[2]) + (h4[1] + h4[3])
}

/// `ggml_vec_dot_f16` (AVX-512): four 16-lane accumulators over steps of 64 with fused
/// multiply-adds, reduced `(0+2) + (1+3)` then across lanes; the tail in f64.
/// `x` and `y` hold f16 values widened to f32.
pub(crate) fn dot_f16(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let np = n & !63;
    let mut sum = [[0f32; 16]; 4];
    for i in (0..np).step_by(64) {
        for (j, acc) in sum.iter_mut().enumerate() {
            let at = i + j * 16;
            for (lane, a) in acc.iter_mut().enumerate() {
                *a = x[at + lane].mul_add(y[at + lane], *a);
            }
        }
    }
    let mut total = [0f32; 16];
    for lane in 0..16 {
        total[lane] = (sum[0][lane] + sum[2][lane]) + (sum[1][lane] + sum[3][lane]);
    }
    let mut sumf = f64::from(reduce_add_16(total));
    for i in np..n {
        sumf += f64::from(x[i] * y[i]);
    }
    sumf as f32
}

/// `hsum_float_8`: the horizontal sum of an 8-lane f32 vector in ggml's x86 kernels.
#[inline(always)]
pub(crate) fn hsum_8(v: [f32; 8]) -> f32 {
    let r = [v[4] + v[0], v[5] + v[1], v[6] + v[2], v[7] + v[3]];
    (r[0] + r[2]) + (r[1] + r[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v_expf_is_close_to_exp() {
        for i in -2000..2000 {
            let x = i as f32 / 37.0;
            let (got, want) = (v_expf(x), x.exp());
            assert!(((got - want) / want).abs() < 4e-7, "{x}: {got} vs {want}");
        }
        assert_eq!(v_expf(-200.0), 0.0);
        assert_eq!(v_expf(200.0), f32::INFINITY);
    }

    #[test]
    fn dot_f16_matches_f64_sum() {
        let x: Vec<f32> = (0..200).map(|i| f16::from_f32((i as f32 * 0.37).sin()).to_f32()).collect();
        let y: Vec<f32> = (0..200).map(|i| f16::from_f32((i as f32 * 0.11).cos()).to_f32()).collect();
        let want: f64 = x.iter().zip(&y).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
        assert!((f64::from(dot_f16(&x, &y)) - want).abs() < 1e-4);
    }

    #[test]
    fn rms_norm_normalises_rows() {
        let mut x = vec![3.0, 4.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        rms_norm(&mut x, &[1.0, 1.0, 1.0, 2.0], 0.0);
        assert!((x[0] - 1.2).abs() < 1e-6 && (x[1] - 1.6).abs() < 1e-6);
        assert_eq!(&x[4..], &[1.0, 1.0, 1.0, 2.0]);
    }

    #[test]
    fn rope_rotates_pairs_by_position() {
        let rope = Rope::new(4, 10_000.0, 1.0, None, false);
        let table = rope.table(3, 1);
        let mut x = vec![1.0, 0.0, 1.0, 0.0];
        rope.apply(&mut x, &table);
        assert!((x[0] - 3f32.cos()).abs() < 1e-6 && (x[1] - 3f32.sin()).abs() < 1e-6);
        let neox = Rope::new(4, 10_000.0, 1.0, None, true);
        let mut y = vec![1.0, 1.0, 0.0, 0.0];
        neox.apply(&mut y, &neox.table(3, 1));
        assert!((y[0] - 3f32.cos()).abs() < 1e-6 && (y[2] - 3f32.sin()).abs() < 1e-6);
    }

    /// The table holds GELU of each input's f16 rounding, at the input's bits; the ends
    /// are cut off at ±10 as ggml does.
    #[test]
    fn geglu_reads_gelu_of_the_rounded_input() {
        let gate: Vec<f32> = (-1300..1300).map(|i| i as f32 / 117.0).collect();
        let up: Vec<f32> = gate.iter().map(|x| 1.0 + x.abs()).collect();
        let mut out = gate.clone();
        geglu(&mut out, &up, 100);
        for ((y, &x), &g) in out.iter().zip(&gate).zip(&up) {
            let rounded = f64::from(f16::from_f32(x).to_f32());
            let gelu = 0.5
                * rounded
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (rounded + 0.044715 * rounded.powi(3))).tanh());
            let want = if x <= -10.0 {
                0.0
            } else if x >= 10.0 {
                f64::from(x * g)
            } else {
                gelu * f64::from(g)
            };
            // One f16 rounding of the GELU value (relative 2^-11), then the product.
            assert!((f64::from(*y) - want).abs() <= 1e-3 * want.abs() + 1e-6, "{x}: {y} vs {want}");
        }
    }
}
