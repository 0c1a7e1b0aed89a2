//! Matrix products `C (+)= A B` whose right operand `B` and destination `C` are row-major
//! (unit column stride), computed without packing either operand (x86-64 with AVX-512 only;
//! [`crate::matmul`] sends the other products to the `gemm` crate).
//!
//! A register tile of `R` rows by `16 NV` columns of `C` (24 accumulators at most, of the 32
//! vector registers) runs down the whole shared dimension: at each step `p` it loads the `NV`
//! vectors `B[p, j0..j0 + 16 NV]` as they lie in memory and broadcasts the `R` scalars
//! `A[i, p]` straight from `A`'s storage, whatever its strides. `gemm` instead copies both
//! operands into panels before each product (about a tenth of the product time at this
//! project's sizes, more for attention's small per-head products); here every operand the
//! fused kernels use is read in place: weights and activations row-major or transposed as
//! `A`, row-major as `B`. Tiles cover `C` in strips of 64 columns (`R` = 6), narrower at the
//! right edge (48: 8 rows, 32 or 16: 12 rows, a partial vector masked), rows in order.
//!
//! Each element of `C` is the sum over `p` in order, fused multiply-adds from 0, then added to
//! `C` when accumulating (a shared dimension too long for L2 in equal parts, each added in
//! turn): the same bits whatever the tile, so a row's result does not depend on which other
//! rows share the product.

use std::arch::x86_64::{
    __m512, _MM_HINT_ET0, _MM_HINT_T0, _mm_prefetch, _mm512_add_ps, _mm512_castpd_ps, _mm512_castps_pd,
    _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps,
    _mm512_shuffle_f32x4, _mm512_storeu_ps, _mm512_unpackhi_pd, _mm512_unpackhi_ps, _mm512_unpacklo_pd,
    _mm512_unpacklo_ps,
};

use rayon::prelude::*;

use crate::matmul::Raw;

/// A raw pointer the row tasks of one product share: each task writes a disjoint region (see
/// each use). Private to this module.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: dereferenced only by tasks of one product that write disjoint regions of a buffer
// that outlives them.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Send + Sync` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Steps of the shared dimension ahead of the tile at which it prefetches `B`'s rows (and a
/// transposed `A`'s), so strided operands arrive from L2/L3 in time (about 400 cycles ahead).
const AHEAD: usize = 16;

/// Rows of `C` from which a product whose `B` is stored transposed (unit row stride) is worth
/// copying `B` into row-major order first: the copy costs `k n` moves against `m k n`
/// multiply-adds (about 1 % of the product at 64 rows).
const TRANSPOSE_MIN_ROWS: usize = 64;

thread_local! {
    /// This thread's row-major copy of a transposed `B`, kept between products (at most
    /// `k n` floats of the largest one: 1.4 MiB for the reference model's gate|up weights).
    static ROW_MAJOR_B: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Floats of B one strip of 64 columns may hold (384 KiB, in the 1 MiB L2 of a Zen 4 core with
/// room for A and C): a longer shared dimension is split into equal parts of at most 1,536 rows
/// of B at 64 columns or more (3,072 at 32, attention's head_dim), each added to C in turn. The
/// reference model's largest strip is 688 x 64; hidden 512 and up, or one pass of 8 pairs
/// (weight gradients over 1,792 rows), have larger ones.
const B_STRIP_FLOATS: usize = 96 << 10;

/// Rows of C a thread takes at least when a product is split over the pool (a multiple of
/// every tile height).
const ROWS_PER_TASK: usize = 48;

/// [`product`] for [`crate::matmul::raw_matmul`]'s operands when `B`'s layout allows
/// (`B` row-major, or stored transposed with at least [`TRANSPOSE_MIN_ROWS`] rows of `C`,
/// then copied row-major into a scratch buffer first): returns whether it ran. With `threads`
/// above 1 the rows of C are split over the rayon pool (each row's sum is the same whichever
/// task computes it, so the result has the same bits).
///
/// # Safety
/// The CPU must support AVX-512F ([`crate::cpu::tiles_available`]); as
/// [`crate::matmul::raw_matmul`]: every operand valid for the extents and strides given, `dst`
/// not overlapping the inputs.
pub(crate) unsafe fn try_product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Raw,
    rhs: Raw,
    threads: usize,
) -> bool {
    let run = |b: *const f32, b_rs: usize| {
        let tasks = threads.min(m / ROWS_PER_TASK).max(1);
        if tasks == 1 {
            // SAFETY: AVX-512F is present; operands as the caller promised.
            unsafe { product((m, n, k), (lhs.ptr, lhs.rs, lhs.cs), (b, b_rs), (dst, dst_rs), accumulate) };
            return;
        }
        let per = m.div_ceil(tasks).next_multiple_of(24);
        let (a, b, c) = (SendPtr(lhs.ptr.cast_mut()), SendPtr(b.cast_mut()), SendPtr(dst));
        (0..m.div_ceil(per)).into_par_iter().for_each(|t| {
            let (r0, rows) = (t * per, per.min(m - t * per));
            // SAFETY: as above; task t alone writes rows r0..r0 + rows of C.
            unsafe {
                product(
                    (rows, n, k),
                    (a.get().wrapping_add(r0 * lhs.rs).cast_const(), lhs.rs, lhs.cs),
                    (b.get().cast_const(), b_rs),
                    (c.get().wrapping_add(r0 * dst_rs), dst_rs),
                    accumulate,
                )
            }
        });
    };
    if rhs.cs == 1 {
        run(rhs.ptr, rhs.rs);
        return true;
    }
    if rhs.rs != 1 || m < TRANSPOSE_MIN_ROWS {
        return false;
    }
    let transpose_and_run = |scratch: &mut Vec<f32>| {
        scratch.clear();
        scratch.reserve(k * n);
        // SAFETY: B's column j is `k` contiguous floats at `rhs.ptr + j cs` (caller's
        // contract); `transpose` writes all `k n` elements before `set_len`.
        unsafe {
            let (src, dst) = (SendPtr(rhs.ptr.cast_mut()), SendPtr(scratch.as_mut_ptr()));
            if threads > 1 && m < threads * TRANSPOSE_ALONE_ROWS {
                // Split over the pool too: alone, the copy would leave the other threads idle
                // for a tenth of a product this small. Task `t` writes columns `t * 64..` of
                // every row of the copy.
                (0..n.div_ceil(64)).into_par_iter().for_each(|t| {
                    let (j0, cols) = (t * 64, 64.min(n - t * 64));
                    transpose_into(
                        src.get().cast_const().wrapping_add(j0 * rhs.cs),
                        rhs.cs,
                        k,
                        cols,
                        n,
                        dst.get().wrapping_add(j0),
                    )
                });
            } else {
                transpose_into(rhs.ptr, rhs.cs, k, n, n, scratch.as_mut_ptr());
            }
            scratch.set_len(k * n);
        }
        run(scratch.as_ptr(), n);
    };
    // A product started by this thread while it waits inside another one's split (rayon runs
    // queued work there) finds the scratch in use and takes a buffer of its own.
    ROW_MAJOR_B.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut scratch) => transpose_and_run(&mut scratch),
        Err(_) => transpose_and_run(&mut Vec::new()),
    });
    true
}

/// Rows of C per thread under which a product split over the pool also splits the copy of a
/// transposed B.
const TRANSPOSE_ALONE_ROWS: usize = 512;

/// `dst [k x n]` (row-major, row stride `dst_rs`) `= src^T` for `src` holding `n` rows of `k`
/// contiguous floats at row stride `src_rs`: whole 16 x 16 blocks through registers, the edges
/// element by element.
///
/// # Safety
/// AVX-512F; `src` valid for `n` rows of `k` floats at stride `src_rs`; `dst` for `k` rows of
/// `n` writes at stride `dst_rs`.
#[target_feature(enable = "avx512f")]
unsafe fn transpose_into(src: *const f32, src_rs: usize, k: usize, n: usize, dst_rs: usize, dst: *mut f32) {
    let (k16, n16) = (k / 16 * 16, n / 16 * 16);
    // SAFETY (all blocks and edges): rows j < n of `src`, columns p < k; `dst` k rows of n.
    unsafe {
        for j0 in (0..n16).step_by(16) {
            for p0 in (0..k16).step_by(16) {
                let rows: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(src.add((j0 + i) * src_rs + p0)));
                for (q, v) in transpose16(rows).into_iter().enumerate() {
                    _mm512_storeu_ps(dst.add((p0 + q) * dst_rs + j0), v);
                }
            }
        }
        let scalar = |j: usize, p: usize| *dst.add(p * dst_rs + j) = *src.add(j * src_rs + p);
        for j in 0..n {
            for p in if j < n16 { k16..k } else { 0..k } {
                scalar(j, p);
            }
        }
    }
}

/// The transpose of the 16 x 16 block whose rows are `r`: within each 128-bit lane a 4 x 4
/// transpose of every group of four rows (`unpack` of floats, then of pairs), then a 4 x 4
/// transpose of the lanes across the groups (`shuffle_f32x4`).
#[target_feature(enable = "avx512f")]
fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    // s[4 g + c], lane l: rows 4 g..4 g + 4 of column 4 l + c.
    let mut s = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        let [a, b, c, d] = [r[4 * g], r[4 * g + 1], r[4 * g + 2], r[4 * g + 3]];
        let (t0, t1) = (_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        let (t2, t3) = (_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
        let pd = _mm512_castps_pd;
        s[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t0), pd(t2)));
        s[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t0), pd(t2)));
        s[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t1), pd(t3)));
        s[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t1), pd(t3)));
    }
    let mut out = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        let [a, b, cc, d] = [s[c], s[4 + c], s[8 + c], s[12 + c]];
        // Lanes [a0 a1 b0 b1], [a2 a3 b2 b3], then the same of cc, d.
        let (u0, u1) = (_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b));
        let (u2, u3) = (_mm512_shuffle_f32x4::<0x44>(cc, d), _mm512_shuffle_f32x4::<0xEE>(cc, d));
        // Row 4 l + c of the transpose: lane l of a, b, cc, d.
        out[c] = _mm512_shuffle_f32x4::<0x88>(u0, u2);
        out[4 + c] = _mm512_shuffle_f32x4::<0xDD>(u0, u2);
        out[8 + c] = _mm512_shuffle_f32x4::<0x88>(u1, u3);
        out[12 + c] = _mm512_shuffle_f32x4::<0xDD>(u1, u3);
    }
    out
}

/// `C [m x n] (+)= A [m x k] B [k x n]`: element `(i, p)` of `A` at `a + i a_rs + p a_cs`,
/// `B` row-major with row stride `b_rs`, `C` row-major with row stride `c_rs`; with
/// `accumulate` false `C` is overwritten (it need not be initialised).
///
/// # Safety
/// The CPU must support AVX-512F; every operand must be valid for the extents
/// and strides given, and `C` must not overlap `A` or `B`.
#[target_feature(enable = "avx512f")]
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    (a, a_rs, a_cs): (*const f32, usize, usize),
    (b, b_rs): (*const f32, usize),
    (c, c_rs): (*mut f32, usize),
    accumulate: bool,
) {
    // The shared dimension in equal parts whose strips of B fit [`B_STRIP_FLOATS`].
    let parts = k.div_ceil((B_STRIP_FLOATS / n.clamp(1, 64)).max(1)).max(1);
    let per = k.div_ceil(parts);
    for part in 0..parts {
        let (p0, len) = (part * per, per.min(k - part * per));
        let (a, b) = (a.wrapping_add(p0 * a_cs), b.wrapping_add(p0 * b_rs));
        // SAFETY: forwarded from the caller's contract (rows p0..p0 + len of B, columns of A).
        unsafe { strips((m, n, len), (a, a_rs, a_cs), (b, b_rs), (c, c_rs), accumulate || part > 0) };
    }
}

/// [`product`] for a shared dimension whose strips of B fit L2: strips of 64 columns.
#[target_feature(enable = "avx512f")]
unsafe fn strips(
    (m, n, k): (usize, usize, usize),
    (a, a_rs, a_cs): (*const f32, usize, usize),
    (b, b_rs): (*const f32, usize),
    (c, c_rs): (*mut f32, usize),
    accumulate: bool,
) {
    let mut j0 = 0;
    while j0 < n {
        let width = (n - j0).min(64);
        let vectors = width.div_ceil(16);
        let tail = width - 16 * (vectors - 1);
        let last = if tail == 16 { u16::MAX } else { (1u16 << tail) - 1 };
        let s =
            Strip { m, k, a, a_rs, a_cs, b: b.wrapping_add(j0), b_rs, c: c.wrapping_add(j0), c_rs, accumulate, last };
        // SAFETY: forwarded from the caller's contract; the strip's columns are inside C and B.
        unsafe {
            match vectors {
                4 => s.run::<6, 4>(),
                3 => s.run::<8, 3>(),
                2 => s.run::<12, 2>(),
                _ => s.run::<12, 1>(),
            }
        }
        j0 += 64;
    }
}

/// Columns `j0..j0 + 16 NV` of a product (pointers already at column `j0`): `last` masks the
/// columns of the final vector that exist.
struct Strip {
    m: usize,
    k: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    c: *mut f32,
    c_rs: usize,
    accumulate: bool,
    last: u16,
}

impl Strip {
    /// Tiles of `MR` rows down the strip, then the remaining rows as tiles of 8, 4, 2 and 1.
    #[target_feature(enable = "avx512f")]
    unsafe fn run<const MR: usize, const NV: usize>(&self) {
        let mut i0 = 0;
        // SAFETY (every tile): rows i0.. of A and C exist (i0 + rows <= m).
        unsafe {
            while i0 + MR <= self.m {
                self.tile::<MR, NV>(i0);
                i0 += MR;
            }
            if self.m - i0 >= 8 {
                self.tile::<8, NV>(i0);
                i0 += 8;
            }
            if self.m - i0 >= 4 {
                self.tile::<4, NV>(i0);
                i0 += 4;
            }
            if self.m - i0 >= 2 {
                self.tile::<2, NV>(i0);
                i0 += 2;
            }
            if self.m - i0 >= 1 {
                self.tile::<1, NV>(i0);
            }
        }
    }

    /// Rows `i0..i0 + R` of the strip.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const R: usize, const NV: usize>(&self, i0: usize) {
        let masks: [u16; NV] = std::array::from_fn(|j| if j + 1 == NV { self.last } else { u16::MAX });
        let mut sum = [[_mm512_setzero_ps(); NV]; R];
        let (mut a, mut b) = (self.a.wrapping_add(i0 * self.a_rs), self.b);
        let c = self.c.wrapping_add(i0 * self.c_rs);
        // SAFETY: A's rows i0.. and B's rows 0..k, masked to the strip's columns, are inside
        // the operands (caller's contract); C likewise.
        unsafe {
            // The tile of C, for writing at the end (its lines arrive during the loop).
            for i in 0..R {
                for j in 0..NV {
                    _mm_prefetch::<_MM_HINT_ET0>(c.wrapping_add(i * self.c_rs + 16 * j).cast());
                }
            }
            for _ in 0..self.k {
                for j in 0..NV {
                    _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(AHEAD * self.b_rs + 16 * j).cast());
                }
                if self.a_rs == 1 {
                    _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(AHEAD * self.a_cs).cast());
                }
                let bv: [__m512; NV] = std::array::from_fn(|j| _mm512_maskz_loadu_ps(masks[j], b.add(16 * j)));
                for (i, row) in sum.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(i * self.a_rs));
                    for (s, bv) in row.iter_mut().zip(&bv) {
                        *s = _mm512_fmadd_ps(av, *bv, *s);
                    }
                }
                a = a.wrapping_add(self.a_cs);
                b = b.wrapping_add(self.b_rs);
            }
            for (i, row) in sum.iter().enumerate() {
                for (j, (&s, &mask)) in row.iter().zip(&masks).enumerate() {
                    let p = c.add(i * self.c_rs + 16 * j);
                    let v = if self.accumulate { _mm512_add_ps(s, _mm512_maskz_loadu_ps(mask, p)) } else { s };
                    _mm512_mask_storeu_ps(p, mask, v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row-major operand with `cols` columns.
    fn rows(data: &[f32], cols: usize) -> Raw {
        Raw { ptr: data.as_ptr(), rs: cols, cs: 1 }
    }

    /// The transpose of a row-major operand with `cols` columns.
    fn rows_t(data: &[f32], cols: usize) -> Raw {
        Raw { ptr: data.as_ptr(), rs: 1, cs: cols }
    }

    /// Deterministic values in [-0.5, 0.5).
    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 * 1e-3 - 0.5).collect()
    }

    #[test]
    fn transpose_matches_the_definition_on_blocks_and_edges() {
        if !crate::cpu::tiles_available() {
            return;
        }
        for (n, k, src_rs) in [(16, 16, 16), (48, 32, 40), (37, 21, 21), (5, 70, 75), (1, 1, 1)] {
            let src = values(n * src_rs, 1);
            let mut dst = vec![f32::NAN; k * n];
            // SAFETY: AVX-512F present; extents as allocated.
            unsafe { transpose_into(src.as_ptr(), src_rs, k, n, n, dst.as_mut_ptr()) };
            for j in 0..n {
                for p in 0..k {
                    assert_eq!(dst[p * n + j], src[j * src_rs + p], "n {n} k {k}: element ({p}, {j})");
                }
            }
        }
    }

    /// A shared dimension too long for one strip of B in L2 is summed in parts: the result still
    /// matches f64 sums (within the rounding of that many terms).
    #[test]
    fn products_over_a_long_shared_dimension_match_f64_sums() {
        if !crate::cpu::tiles_available() {
            return;
        }
        let shapes = [(7, 64, B_STRIP_FLOATS / 64 * 2 + 5, true), (13, 32, B_STRIP_FLOATS / 32 + 1, false)];
        for (m, n, k, accumulate) in shapes {
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            let mut c = values(m * n, 3);
            let c0 = c.clone();
            // SAFETY: operands as allocated.
            let ran = unsafe { try_product((m, n, k), c.as_mut_ptr(), n, accumulate, rows(&a, k), rows(&b, n), 1) };
            assert!(ran);
            for i in 0..m {
                for j in 0..n {
                    let start = if accumulate { c0[i * n + j] as f64 } else { 0.0 };
                    let want: f64 = start + (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum::<f64>();
                    let got = c[i * n + j] as f64;
                    assert!((got - want).abs() < 2e-4, "m {m} n {n} k {k}: ({i}, {j}) {got} vs {want}");
                }
            }
        }
    }

    /// Products split over the pool (rows over tasks, and a transposed B's copy over tasks when
    /// the product is small) give the same bits as on one thread.
    #[test]
    fn products_split_over_threads_have_the_same_bits() {
        if !crate::cpu::tiles_available() {
            return;
        }
        for (m, n, k) in [(100, 70, 33), (300, 130, 64), (1100, 40, 20), (70, 300, 9)] {
            for b_t in [false, true] {
                let (a, b) = (values(m * k, 7), values(k * n, 8));
                let rhs = if b_t { rows_t(&b, k) } else { rows(&b, n) };
                let run = |threads: usize| {
                    let mut c = values(m * n, 9);
                    // SAFETY: operands as allocated.
                    let ran = unsafe { try_product((m, n, k), c.as_mut_ptr(), n, true, rows(&a, k), rhs, threads) };
                    (ran, c.into_iter().map(f32::to_bits).collect::<Vec<_>>())
                };
                let ((ran1, one), (ran4, four)) = (run(1), run(4));
                assert!(ran1 && ran4, "m {m} n {n} k {k} b_t {b_t}");
                assert!(one == four, "m {m} n {n} k {k} b_t {b_t}: different bits");
            }
        }
    }

    /// `try_product` against sums in f64, for every operand layout the fused kernels use and
    /// edge sizes of each tile shape.
    #[test]
    fn products_match_f64_sums_in_every_layout() {
        if !crate::cpu::tiles_available() {
            return;
        }
        for (m, n, k) in [(1, 1, 1), (7, 17, 3), (13, 33, 29), (64, 64, 32), (70, 80, 40), (9, 130, 0)] {
            for (a_t, b_t, accumulate) in
                [(false, false, false), (true, false, true), (false, true, false), (true, true, true)]
            {
                let a = values(m * k, 2);
                let b = values(k * n, 3);
                let lhs = if a_t { Raw { ptr: a.as_ptr(), rs: 1, cs: m } } else { rows(&a, k) };
                let rhs = if b_t { rows_t(&b, k) } else { rows(&b, n) };
                let c0 = values(m * (n + 3), 4);
                let mut c = c0.clone();
                // SAFETY: operands as allocated; C has row stride n + 3.
                let ran = unsafe { try_product((m, n, k), c.as_mut_ptr(), n + 3, accumulate, lhs, rhs, 1) };
                if !ran {
                    assert!(b_t && m < TRANSPOSE_MIN_ROWS, "m {m} n {n} k {k} a_t {a_t} b_t {b_t} did not run");
                    continue;
                }
                for i in 0..m {
                    for j in 0..n + 3 {
                        let got = c[i * (n + 3) + j];
                        if j >= n {
                            assert_eq!(got, c0[i * (n + 3) + j], "column {j} past n was written");
                            continue;
                        }
                        let at = |t: bool, r: usize, q: usize, rows: usize, cols: usize, v: &[f32]| {
                            if t { v[q * rows + r] } else { v[r * cols + q] }
                        };
                        let mut want: f64 =
                            (0..k).map(|p| at(a_t, i, p, m, k, &a) as f64 * at(b_t, p, j, k, n, &b) as f64).sum();
                        if accumulate {
                            want += c0[i * (n + 3) + j] as f64;
                        }
                        assert!(
                            (got as f64 - want).abs() < 1e-5,
                            "m {m} n {n} k {k} a_t {a_t} b_t {b_t}: ({i}, {j}) {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
