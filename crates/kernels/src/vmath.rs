//! Row kernels with a vectorisable `exp` (and the SiLU and tanh-GELU gates built on it),
//! compiled three times: for the baseline x86-64 target, with AVX2 + FMA and with AVX-512F, the
//! best the CPU path allows picked at run time ([`crate::cpu`]; the workspace builds for the
//! baseline CPU, where libm's scalar `expf` and 4-wide SSE loops are all the compiler can use).
//!
//! Every build runs the same arithmetic in the same order (element-wise IEEE operations,
//! explicit 8-lane accumulators for the sums, no fused multiply-adds), so the results do not
//! depend on the CPU or on [`crate::cpu::CpuPath`]: the AVX2 and AVX-512 builds give the same bits.

#[cfg(test)]
use crate::cpu::CpuPath;
use crate::cpu::dispatch;

/// Lanes of the explicit accumulators (one AVX2 register of f32).
const LANES: usize = 8;

/// `e^x` in f32 without a libm call, so loops over it vectorise: Cody-Waite range reduction
/// `x = n ln 2 + r` (`|r| <= ln 2 / 2`), Cephes' degree-6 polynomial for `e^r` (relative error
/// about 2e-7, as libm's `expf` within a few ulp), times `2^n` built in the exponent bits.
/// Inputs are clamped to [-87.3, 88] (below: ~1e-38 instead of a denormal or 0; above:
/// ~1.7e38 instead of infinity); NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // `shifted`'s low mantissa bits hold n (in [-126, 127] after the clamp) above 0x4B40_0000;
    // integer arithmetic on them gives 2^n's exponent bits (an `as i32` cast would not vectorise).
    // For NaN, y is NaN and so is the product.
    let pow2 = shifted.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23;
    y * f32::from_bits(pow2)
}

/// `v / (1 + e^-v)` (SiLU, as candle writes it).
#[inline(always)]
fn silu(v: f32) -> f32 {
    v / (1.0 + exp(-v))
}

dispatch! {
    /// SwiGLU of one row: `out[j] = silu(gate[j]) * up[j]`.
    pub fn swiglu_row(out: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = silu(g) * u;
        }
    }
}

dispatch! {
    /// SwiGLU backward of one row: `d up = d act * silu(gate)`,
    /// `d gate = d act * up * s (1 + gate (1 - s))` with `s = sigmoid(gate)`.
    pub fn swiglu_bwd_row(dgate: &mut [f32], dup: &mut [f32], gate: &[f32], up: &[f32], dact: &[f32]) {
        for ((((dg, du), &g), &u), &a) in dgate.iter_mut().zip(dup.iter_mut()).zip(gate).zip(up).zip(dact) {
            let s = 1.0 / (1.0 + exp(-g));
            *du = a * (g * s);
            *dg = a * u * (s * (1.0 + g * (1.0 - s)));
        }
    }
}

dispatch! {
    /// [`swiglu_row`] and [`swiglu_bwd_row`] in one pass, `e^-gate` computed once: the same
    /// arithmetic, so the same bits.
    pub fn swiglu_act_bwd_row(act: &mut [f32], dgate: &mut [f32], dup: &mut [f32], gate: &[f32], up: &[f32], dact: &[f32]) {
        let outs = act.iter_mut().zip(dgate.iter_mut()).zip(dup.iter_mut());
        for ((((o, dg), du), (&g, &u)), &a) in outs.zip(gate.iter().zip(up)).zip(dact) {
            let e = exp(-g);
            *o = g / (1.0 + e) * u;
            let s = 1.0 / (1.0 + e);
            *du = a * (g * s);
            *dg = a * u * (s * (1.0 + g * (1.0 - s)));
        }
    }
}

/// `sqrt(2 / pi)` and the cubic coefficient of the tanh approximation of GELU.
const GELU_C: f32 = 0.797_884_6;
const GELU_A: f32 = 0.044_715;

/// GELU, tanh approximation (candle's `gelu`, PyTorch's `gelu(approximate="tanh")`):
/// `0.5 v (1 + tanh(u))` with `u = sqrt(2 / pi) v (1 + 0.044715 v^2)`, computed as the equal
/// `v sigmoid(2 u) = v / (1 + e^(-2 u))`, which needs only the vectorisable [`exp`] and, unlike
/// `1 + tanh(u)`, does not cancel for negative `v`.
#[inline(always)]
fn gelu_tanh(v: f32) -> f32 {
    let u = GELU_C * v * (1.0 + GELU_A * v * v);
    v / (1.0 + exp(-2.0 * u))
}

dispatch! {
    /// GeGLU of one row: `out[j] = gelu_tanh(gate[j]) * up[j]`.
    pub fn geglu_row(out: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = gelu_tanh(g) * u;
        }
    }
}

dispatch! {
    /// GeGLU backward of one row: `d up = d act * gelu_tanh(gate)`,
    /// `d gate = d act * up * gelu_tanh'(gate)`, where with `s = sigmoid(2 u)`
    /// `gelu_tanh'(v) = s + 2 v s (1 - s) sqrt(2 / pi) (1 + 3 * 0.044715 v^2)`
    /// (the derivative of `v s`, as `0.5 (1 + tanh u)` = `s` and `tanh' = 1 - tanh^2 = 4 s (1 - s)`).
    pub fn geglu_bwd_row(dgate: &mut [f32], dup: &mut [f32], gate: &[f32], up: &[f32], dact: &[f32]) {
        for ((((dg, du), &g), &u), &a) in dgate.iter_mut().zip(dup.iter_mut()).zip(gate).zip(up).zip(dact) {
            let inner = GELU_C * g * (1.0 + GELU_A * g * g);
            let e = exp(-2.0 * inner);
            let s = 1.0 / (1.0 + e);
            let du_dg = GELU_C * (1.0 + 3.0 * GELU_A * g * g);
            *du = a * (g * s);
            // `1 - s = e s`, without the cancellation of `1 - s` near s = 1.
            *dg = a * u * (s + 2.0 * g * s * (e * s) * du_dg);
        }
    }
}

dispatch! {
    /// [`geglu_row`] and [`geglu_bwd_row`] in one pass, the exponential computed once: the same
    /// arithmetic, so the same bits.
    pub fn geglu_act_bwd_row(act: &mut [f32], dgate: &mut [f32], dup: &mut [f32], gate: &[f32], up: &[f32], dact: &[f32]) {
        let outs = act.iter_mut().zip(dgate.iter_mut()).zip(dup.iter_mut());
        for ((((o, dg), du), (&g, &u)), &a) in outs.zip(gate.iter().zip(up)).zip(dact) {
            let inner = GELU_C * g * (1.0 + GELU_A * g * g);
            let e = exp(-2.0 * inner);
            *o = g / (1.0 + e) * u;
            let s = 1.0 / (1.0 + e);
            let du_dg = GELU_C * (1.0 + 3.0 * GELU_A * g * g);
            *du = a * (g * s);
            *dg = a * u * (s + 2.0 * g * s * (e * s) * du_dg);
        }
    }
}

/// `tanh(x)` in f32 without a libm call: for `|x| < 0.625` Cephes' odd polynomial
/// `x + x^3 P(x^2)`, otherwise `1 - 2 / (1 + e^(2|x|))` with the vectorisable [`exp`] (saturating
/// to exactly +-1), the sign restored; both are computed and one picked, so loops vectorise.
/// Relative error about 2e-7 (within a few ulp of libm's `tanhf`).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let a = x.abs();
    let z = a * a;
    let mut p = -5.704_988_7e-3;
    p = p * z + 2.063_909e-2;
    p = p * z - 5.373_971_6e-2;
    p = p * z + 1.333_144_2e-1;
    p = p * z - 3.333_328e-1;
    let small = p * z * a + a;
    let large = 1.0 - 2.0 / (1.0 + exp(2.0 * a));
    let t = if a < 0.625 { small } else { large };
    t.copysign(x)
}

dispatch! {
    /// Soft-capping of scores: `row[j] = cap * tanh(row[j] * scale / cap)` in place; returns the
    /// maximum (NaN entries ignored).
    pub fn scale_cap_max(row: &mut [f32], scale: f32, cap: f32) -> f32 {
        let inv = scale / cap;
        for v in row.iter_mut() {
            *v = cap * tanh(*v * inv);
        }
        max(row)
    }
}

dispatch! {
    /// Multiplies `row` by `scale` in place and returns its maximum (NaN entries ignored).
    pub fn scale_max(row: &mut [f32], scale: f32) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (m, v) in lanes.iter_mut().zip(c.iter_mut()) {
                *v *= scale;
                *m = if *v > *m { *v } else { *m };
            }
        }
        let mut m = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for v in chunks.into_remainder() {
            *v *= scale;
            m = m.max(*v);
        }
        m
    }
}

/// Sum of `row` over [`LANES`] interleaved partial sums, then the tail.
#[inline(always)]
fn lane_sum(row: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            lanes[k] += c[k];
        }
    }
    lanes.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

dispatch! {
    /// `row[j] = e^(row[j] - m)` in place; returns the sum, in f32.
    pub fn exp_shifted_sum(row: &mut [f32], m: f32) -> f32 {
        // A plain loop (the loop vectoriser handles it; per-lane code around `exp` it does not).
        for v in row.iter_mut() {
            *v = exp(*v - m);
        }
        lane_sum(row)
    }
}

dispatch! {
    /// `sum_j e^(row[j] - m)`, accumulated in f64 (the exponentials in blocks of 64 on the
    /// stack, then summed).
    pub fn exp_shifted_sum_f64(row: &[f32], m: f32) -> f64 {
        let mut buf = [0f32; 64];
        let mut lanes = [0f64; LANES];
        for c in row.chunks(buf.len()) {
            let e = &mut buf[..c.len()];
            for (e, &v) in e.iter_mut().zip(c) {
                *e = exp(v - m);
            }
            let chunks = e.chunks_exact(LANES);
            let tail = chunks.remainder();
            for c in chunks {
                for k in 0..LANES {
                    lanes[k] += f64::from(c[k]);
                }
            }
            lanes[0] += tail.iter().map(|&v| f64::from(v)).sum::<f64>();
        }
        lanes.iter().sum()
    }
}

dispatch! {
    /// `sum_j row[j]^2` accumulated in f64 over [`LANES`] independent sums (added in lane order,
    /// then the tail), so the additions do not wait on each other.
    pub fn sum_squares_f64(row: &[f32]) -> f64 {
        let mut lanes = [0f64; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for k in 0..LANES {
                let v = f64::from(c[k]);
                lanes[k] += v * v;
            }
        }
        let mut total: f64 = lanes.iter().sum();
        for &v in tail {
            total += f64::from(v) * f64::from(v);
        }
        total
    }
}

dispatch! {
    /// `sum_j a[j] b[j] c[j]`, each product in f32, accumulated in f64 as [`sum_squares_f64`].
    pub fn dot3_f64(a: &[f32], b: &[f32], c: &[f32]) -> f64 {
        let mut lanes = [0f64; LANES];
        let n = a.len().min(b.len()).min(c.len());
        let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
        let body = n / LANES * LANES;
        for ((a, b), c) in a[..body].chunks_exact(LANES).zip(b[..body].chunks_exact(LANES)).zip(c[..body].chunks_exact(LANES)) {
            for k in 0..LANES {
                lanes[k] += f64::from(a[k] * b[k] * c[k]);
            }
        }
        let mut total: f64 = lanes.iter().sum();
        for j in body..n {
            total += f64::from(a[j] * b[j] * c[j]);
        }
        total
    }
}

dispatch! {
    /// Rotary embedding (`rotate_half` layout) of one token's `heads` consecutive head vectors:
    /// `out[h * out_stride..][..2 half]` = `x cos + rotate_half(x) sin` of
    /// `x = src[h * 2 half..][..2 half]`, with the token's `cos`, `sin` (`half` each). The same
    /// arithmetic as the composed `x cos + rotate_half(x) sin`.
    pub fn rope_heads(out: &mut [f32], out_stride: usize, src: &[f32], heads: usize, cos: &[f32], sin: &[f32]) {
        let half = cos.len();
        let (c, s) = (cos, &sin[..half]);
        for h in 0..heads {
            let (x1, x2) = src[h * 2 * half..][..2 * half].split_at(half);
            let (o1, o2) = out[h * out_stride..][..2 * half].split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                o1[i] = a * c[i] + -b * s[i];
                o2[i] = b * c[i] + a * s[i];
            }
        }
    }
}

dispatch! {
    /// `sum_j a[j] b[j]` in f32 over [`LANES`] independent sums (added in lane order, then the
    /// tail), so it vectorises.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let body = n / LANES * LANES;
        let mut lanes = [0f32; LANES];
        for (a, b) in a[..body].chunks_exact(LANES).zip(b[..body].chunks_exact(LANES)) {
            for k in 0..LANES {
                lanes[k] += a[k] * b[k];
            }
        }
        let mut total: f32 = lanes.iter().sum();
        for j in body..n {
            total += a[j] * b[j];
        }
        total
    }
}

dispatch! {
    /// The softmax backward of one row's range: `dp[j] = p[j] (dp[j] - dot) scale`.
    pub fn softmax_bwd_row(dp: &mut [f32], p: &[f32], dot: f32, scale: f32) {
        for (dv, &pv) in dp.iter_mut().zip(p) {
            *dv = pv * (*dv - dot) * scale;
        }
    }
}

dispatch! {
    /// `row[j] = -g e^(z - lse) (1 - (z / cap)^2)` with `z = row[j]`: the gradient of a
    /// soft-capped log-softmax w.r.t. the raw logits, before the label's term (`cap` infinite:
    /// no soft-capping, the factor exactly 1).
    pub fn neg_scaled_softmax_row(row: &mut [f32], lse: f32, g: f32, cap: f32) {
        for z in row.iter_mut() {
            let c = *z / cap;
            *z = -g * exp(*z - lse) * (1.0 - c * c);
        }
    }
}

dispatch! {
    /// The maximum of `row` (NaN entries ignored; `-inf` for an empty row).
    pub fn max(row: &[f32]) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for (m, &v) in lanes.iter_mut().zip(c) {
                *m = if v > *m { v } else { *m };
            }
        }
        tail.iter().copied().fold(lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max), f32::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_libm_over_the_useful_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (ours, libm) = (f64::from(exp(x)), f64::from(x.exp()));
            worst = worst.max(((ours - libm) / libm).abs());
            x += 0.001_7;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1e4) < 1e-37 && exp(-1e4) >= 0.0);
        assert!(exp(1e4).is_finite() && exp(1e4) > 1e38);
    }

    #[test]
    fn row_kernels_match_their_scalar_definitions() {
        let row: Vec<f32> = (0..37).map(|i| ((i * 7919) % 101) as f32 * 0.13 - 6.0).collect();
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max(&row), m);
        let mut scaled = row.clone();
        assert_eq!(scale_max(&mut scaled, 0.5), m * 0.5);
        assert!(scaled.iter().zip(&row).all(|(s, r)| *s == r * 0.5));
        let mut e = row.clone();
        let sum = exp_shifted_sum(&mut e, m);
        let want: f64 = row.iter().map(|&v| f64::from(v - m).exp()).sum();
        assert!((f64::from(sum) - want).abs() < 1e-5 * want, "{sum} vs {want}");
        assert!((exp_shifted_sum_f64(&row, m) - want).abs() < 1e-6 * want);
        for (e, &v) in e.iter().zip(&row) {
            assert!((f64::from(*e) - f64::from(v - m).exp()).abs() < 1e-6);
        }
        let (gate, up): (Vec<f32>, Vec<f32>) = (row.clone(), row.iter().map(|v| 0.3 * v + 1.0).collect());
        let mut out = vec![0f32; row.len()];
        swiglu_row(&mut out, &gate, &up);
        let (mut dg, mut du) = (vec![0f32; row.len()], vec![0f32; row.len()]);
        let dact: Vec<f32> = row.iter().map(|v| 1.0 - 0.1 * v).collect();
        swiglu_bwd_row(&mut dg, &mut du, &gate, &up, &dact);
        for j in 0..row.len() {
            let (g, u, a) = (f64::from(gate[j]), f64::from(up[j]), f64::from(dact[j]));
            let s = 1.0 / (1.0 + (-g).exp());
            assert!((f64::from(out[j]) - g * s * u).abs() < 1e-5, "swiglu {j}");
            assert!((f64::from(du[j]) - a * g * s).abs() < 1e-5, "d up {j}");
            assert!((f64::from(dg[j]) - a * u * s * (1.0 + g * (1.0 - s))).abs() < 1e-5, "d gate {j}");
        }
    }

    #[test]
    fn dot_and_softmax_backward_rows() {
        let a: Vec<f32> = (0..77).map(|k| ((k * 31) % 17) as f32 * 0.25 - 2.0).collect();
        let b: Vec<f32> = a.iter().map(|v| 0.5 - 0.1 * v).collect();
        for n in [0, 3, 8, 77] {
            let want: f64 = (0..n).map(|j| f64::from(a[j]) * f64::from(b[j])).sum();
            assert!((f64::from(dot(&a[..n], &b[..n])) - want).abs() < 1e-5, "{n}");
        }
        let mut dp = b.clone();
        softmax_bwd_row(&mut dp, &a, 0.3, 0.5);
        assert!(dp.iter().zip(&a).zip(&b).all(|((d, &p), &g)| *d == p * (g - 0.3) * 0.5));
    }

    #[test]
    fn lane_sums_equal_the_f64_sums() {
        let a: Vec<f32> = (0..261).map(|k| ((k * 7919) % 103) as f32 * 0.37 - 19.0).collect();
        let b: Vec<f32> = a.iter().map(|v| 1.0 - 0.01 * v).collect();
        let c: Vec<f32> = a.iter().map(|v| 0.5 + 0.002 * v * v).collect();
        for n in [0, 1, 7, 8, 9, 64, 261] {
            let squares: f64 = a[..n].iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            assert!((sum_squares_f64(&a[..n]) - squares).abs() <= 1e-12 * squares.max(1.0), "{n}");
            let dot: f64 = (0..n).map(|j| f64::from(a[j] * b[j] * c[j])).sum();
            assert!((dot3_f64(&a[..n], &b[..n], &c[..n]) - dot).abs() <= 1e-12 * dot.abs().max(1.0), "{n}");
        }
    }

    /// The one-pass gated products and backward give the bits of the two separate kernels.
    #[test]
    fn one_pass_glu_backward_equals_the_separate_kernels_bit_for_bit() {
        let gate: Vec<f32> = (0..2403).map(|k| -12.0 + k as f32 * 0.01).chain([0.0, -0.0, -1e4, 1e4]).collect();
        let up: Vec<f32> = gate.iter().enumerate().map(|(k, _)| 1.0 - (k % 7) as f32 * 0.3).collect();
        let dact: Vec<f32> = gate.iter().enumerate().map(|(k, _)| 0.5 - (k % 5) as f32 * 0.25).collect();
        let n = gate.len();
        type Fwd = fn(&mut [f32], &[f32], &[f32]);
        type Bwd = fn(&mut [f32], &mut [f32], &[f32], &[f32], &[f32]);
        type Both = fn(&mut [f32], &mut [f32], &mut [f32], &[f32], &[f32], &[f32]);
        let kernels: [(Fwd, Bwd, Both); 2] =
            [(swiglu_row, swiglu_bwd_row, swiglu_act_bwd_row), (geglu_row, geglu_bwd_row, geglu_act_bwd_row)];
        for (fwd, bwd, both) in kernels {
            let (mut act, mut dg, mut du) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            fwd(&mut act, &gate, &up);
            bwd(&mut dg, &mut du, &gate, &up, &dact);
            let (mut act1, mut dg1, mut du1) = (vec![1f32; n], vec![1f32; n], vec![1f32; n]);
            both(&mut act1, &mut dg1, &mut du1, &gate, &up, &dact);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!((bits(&act1), bits(&dg1), bits(&du1)), (bits(&act), bits(&dg), bits(&du)));
        }
    }

    #[test]
    fn tanh_is_within_a_few_ulp_of_libm_and_soft_caps_rows() {
        let mut worst = 0f64;
        let mut x = -12.0f32;
        while x < 12.0 {
            let (ours, libm) = (f64::from(tanh(x)), f64::from(x).tanh());
            worst = worst.max(((ours - libm) / libm.abs().max(1e-30)).abs());
            x += 0.000_7;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(tanh(0.0), 0.0);
        assert_eq!((tanh(1e-20), tanh(-1e4), tanh(1e4)), (1e-20, -1.0, 1.0));
        assert!(tanh(f32::NAN).is_nan());
        let mut row: Vec<f32> = (0..37).map(|i| ((i * 7919) % 101) as f32 * 3.1 - 150.0).collect();
        let raw = row.clone();
        let m = scale_cap_max(&mut row, 0.5, 50.0);
        for (v, r) in row.iter().zip(&raw) {
            assert!((f64::from(*v) - 50.0 * (f64::from(*r) * 0.01).tanh()).abs() < 1e-5);
        }
        assert_eq!(m, row.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    }

    /// GeGLU against candle's f32 `gelu` formula (`0.5 v (1 + tanh(..))`, libm's tanh) and the
    /// f64 definition, and its backward against the f64 derivative, over [-12, 12] (both tails
    /// included) and at a few special points.
    #[test]
    fn geglu_matches_candles_gelu_and_the_f64_derivative() {
        let candle = |v: f32| 0.5 * v * (1.0 + f32::tanh(GELU_C * v * (1.0 + GELU_A * v * v)));
        let exact = |v: f64| {
            let u = (2.0 / std::f64::consts::PI).sqrt() * (v + 0.044_715 * v * v * v);
            (0.5 * v * (1.0 + u.tanh()), u)
        };
        let gate: Vec<f32> = (0..2401).map(|k| -12.0 + k as f32 * 0.01).chain([0.0, -0.0, 1e-30, -1e4, 1e4]).collect();
        let up: Vec<f32> = gate.iter().enumerate().map(|(k, _)| 1.0 - (k % 7) as f32 * 0.3).collect();
        let dact: Vec<f32> = gate.iter().enumerate().map(|(k, _)| 0.5 + (k % 5) as f32 * 0.25).collect();
        let n = gate.len();
        let mut out = vec![0f32; n];
        geglu_row(&mut out, &gate, &up);
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        geglu_bwd_row(&mut dg, &mut du, &gate, &up, &dact);
        for j in 0..n {
            let (g, u, a) = (gate[j], f64::from(up[j]), f64::from(dact[j]));
            let (want, inner) = exact(f64::from(g));
            let have = f64::from(out[j]) / u;
            let tol = 2e-7 * want.abs().max(1.0);
            assert!((have - want).abs() < tol, "gelu({g}) = {have}, f64 {want}");
            assert!((have - f64::from(candle(g))).abs() < tol, "gelu({g}) = {have}, candle {}", candle(g));
            let t = inner.tanh();
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let g = f64::from(g);
            let deriv = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044_715 * g * g);
            assert!((f64::from(du[j]) - a * want).abs() < 1e-6 * (a * want).abs().max(1.0), "d up at {g}");
            assert!((f64::from(dg[j]) - a * u * deriv).abs() < 1e-6 * (a * u * deriv).abs().max(1.0), "d gate at {g}");
        }
        assert_eq!(out[gate.len() - 5], 0.0);
    }

    /// Rotary embedding of odd-sized heads into a strided output, and the soft-capped softmax
    /// gradient row, against their definitions.
    #[test]
    fn rope_and_the_softmax_gradient_row_match_their_definitions() {
        let (heads, half, stride) = (3, 5, 13);
        let src: Vec<f32> = (0..heads * 2 * half).map(|k| ((k * 31) % 17) as f32 * 0.2 - 1.5).collect();
        let cos: Vec<f32> = (0..half).map(|i| (0.3 * i as f32).cos()).collect();
        let sin: Vec<f32> = (0..half).map(|i| (0.3 * i as f32).sin()).collect();
        let mut out = vec![9f32; heads * stride];
        rope_heads(&mut out, stride, &src, heads, &cos, &sin);
        for h in 0..heads {
            for i in 0..half {
                let (a, b) = (src[h * 2 * half + i], src[h * 2 * half + half + i]);
                assert_eq!(out[h * stride + i], a * cos[i] + -b * sin[i]);
                assert_eq!(out[h * stride + half + i], b * cos[i] + a * sin[i]);
            }
            assert!(out[h * stride + 2 * half..(h + 1) * stride].iter().all(|&v| v == 9.0), "gap untouched");
        }
        for cap in [f32::INFINITY, 30.0] {
            let z: Vec<f32> = (0..37).map(|k| ((k * 7919) % 101) as f32 * 0.3 - 15.0).collect();
            let mut row = z.clone();
            neg_scaled_softmax_row(&mut row, 2.5, 0.7, cap);
            for (got, &z) in row.iter().zip(&z) {
                let want = -0.7 * (f64::from(z) - 2.5).exp() * (1.0 - (f64::from(z) / f64::from(cap)).powi(2));
                assert!((f64::from(*got) - want).abs() < 1e-5 * want.abs().max(1.0), "{got} vs {want}");
            }
        }
    }

    /// Every CPU path (the widest build, AVX2 + FMA, baseline) gives the same bits, on odd lengths.
    #[test]
    fn every_cpu_path_gives_the_same_bits() {
        use crate::cpu::with_path;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let run = |p: CpuPath| {
            with_path(p, || {
                let n = 1001;
                let a: Vec<f32> = (0..n).map(|k| ((k * 7919) % 1009) as f32 * 0.02 - 10.0).collect();
                let b: Vec<f32> = a.iter().map(|v| 0.5 - 0.03 * v).collect();
                let (mut act, mut dg, mut du) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
                swiglu_act_bwd_row(&mut act, &mut dg, &mut du, &a, &b, &b);
                let mut out = bits(&act);
                out.extend(bits(&dg));
                geglu_act_bwd_row(&mut act, &mut dg, &mut du, &a, &b, &b);
                out.extend(bits(&act).into_iter().chain(bits(&du)));
                let mut row = a.clone();
                let m = scale_cap_max(&mut row, 0.7, 20.0);
                let s = exp_shifted_sum(&mut row, m);
                out.extend([m.to_bits(), s.to_bits(), dot(&a, &b).to_bits(), max(&a).to_bits()]);
                out.extend(bits(&row));
                let sums = [sum_squares_f64(&a), dot3_f64(&a, &b, &a), exp_shifted_sum_f64(&a, 3.0)];
                out.extend(sums.iter().flat_map(|v| {
                    let b = v.to_bits();
                    [b as u32, (b >> 32) as u32]
                }));
                out
            })
        };
        let native = run(CpuPath::Native);
        assert_eq!(native, run(CpuPath::Avx2));
        assert_eq!(native, run(CpuPath::Baseline));
    }
}
