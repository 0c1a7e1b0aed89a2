//! Matrix products on strided views: [`matmul`], [`product`], [`product_cols`], and
//! [`products_on_this_thread`].
//!
//! A product runs on the AVX-512F register tiles of [`crate::tile`] when the CPU path allows
//! ([`crate::cpu::tiles_available`]) and the right operand's layout suits them, else through the
//! `gemm` crate (what candle itself uses). Either way each element's sum over the shared
//! dimension is the same whichever rows share the product or thread computes it, so the result
//! does not depend on the thread count.

use std::cell::Cell;

use crate::mat::{MatMut, MatRef, Threads};

thread_local! {
    /// Set inside [`products_on_this_thread`]: `Threads::Pool` products stay on this thread.
    static ONE_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the matrix products it starts on this thread kept on this thread, for work
/// that already runs one task per pool thread (concurrent micro-batches): splitting each
/// product over the pool then only adds hand-offs and a second packing of the shared operand
/// on the thread that ends up running both halves. Row-wise work and products started on other
/// threads are unaffected; results are the same bits either way. Scopes nest.
pub fn products_on_this_thread<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ONE_THREAD.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(ONE_THREAD.with(|c| c.replace(true)));
    f()
}

/// A strided operand as the product kernels read it: element `(r, c)` at `ptr + r rs + c cs`.
#[derive(Clone, Copy)]
pub(crate) struct Raw {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}

impl Raw {
    fn of(m: &MatRef<'_>) -> Self {
        let (rs, cs) = m.strides();
        Self { ptr: m.data().as_ptr(), rs, cs }
    }
}

/// Panics unless `dst (m x n) = a (m x k) b (k x n)` fits.
fn check_shapes(m: usize, n: usize, a: &MatRef<'_>, b: &MatRef<'_>) {
    assert!(
        a.rows() == m && b.cols() == n && a.cols() == b.rows(),
        "product shapes: {m} x {n} = ({} x {}) ({} x {})",
        a.rows(),
        a.cols(),
        b.rows(),
        b.cols()
    );
}

/// `dst = [dst +] a b`: `dst` is `m x n`, `a` `m x k`, `b` `k x n` (panics otherwise). With
/// `accumulate` the product is added to what `dst` holds; without, `dst` is overwritten.
/// `threads` says whether the product may split over rayon's pool.
pub fn matmul(mut dst: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool, threads: Threads) {
    let (m, n, rs) = (dst.rows(), dst.cols(), dst.stride());
    check_shapes(m, n, &a, &b);
    let out = dst.data();
    // SAFETY: the views hold every element they name (checked when they were made); `dst`
    // borrows its slice mutably, so it aliases neither input, and no other thread can touch it.
    unsafe { raw_matmul((m, n, a.cols()), out.as_mut_ptr(), rs, accumulate, Raw::of(&a), Raw::of(&b), threads) }
}

/// A fresh row-major `a.rows() x b.cols()` matrix `a b` (threads: the pool), without filling it
/// with zeros first.
pub fn product(a: MatRef<'_>, b: MatRef<'_>, threads: Threads) -> Vec<f32> {
    let (m, n) = (a.rows(), b.cols());
    check_shapes(m, n, &a, &b);
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: `out` has room for m x n floats, which the product writes every one of
    // (accumulate = false) before `set_len`; the operands are checked views.
    unsafe {
        raw_matmul((m, n, a.cols()), out.as_mut_ptr(), n, false, Raw::of(&a), Raw::of(&b), threads);
        out.set_len(m * n);
    }
    out
}

/// `[a b_1 | a b_2 | ...]`: the products with each piece side by side in the columns of one
/// fresh row-major matrix (`a.rows()` rows, the pieces' columns summed), one product per piece;
/// e.g. `x [W_q; W_k; W_v]^T` from weights in separate storage.
pub fn product_cols(a: MatRef<'_>, pieces: &[MatRef<'_>], threads: Threads) -> Vec<f32> {
    let m = a.rows();
    let cols: usize = pieces.iter().map(MatRef::cols).sum();
    for b in pieces {
        check_shapes(m, b.cols(), &a, b);
    }
    let mut out: Vec<f32> = Vec::with_capacity(m * cols);
    let mut col = 0;
    for b in pieces {
        // SAFETY: `out` has room for m x cols; this piece writes its b.cols() columns of every
        // row (accumulate = false) at row stride `cols`, inside the allocation; the pieces
        // cover every column before `set_len`; the operands are checked views.
        unsafe {
            let dst = out.as_mut_ptr().add(col);
            raw_matmul((m, b.cols(), a.cols()), dst, cols, false, Raw::of(&a), Raw::of(b), threads);
        }
        col += b.cols();
    }
    // SAFETY: every element was written above.
    unsafe { out.set_len(m * cols) };
    out
}

/// `dst (m x n) = [dst +] lhs (m x k) @ rhs (k x n)`; `dst` is row-major with row stride `dst_rs`.
///
/// # Safety
/// Every operand must be valid for the extents and strides given; `dst` must not alias the
/// inputs, and no other thread may access the `dst` region during the call. When `accumulate` is
/// false `dst` need not be initialised: every element is written.
pub(crate) unsafe fn raw_matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Raw,
    rhs: Raw,
    threads: Threads,
) {
    if m == 0 || n == 0 {
        return;
    }
    let parallelism = match threads {
        Threads::Pool if rayon::current_num_threads() > 1 && !ONE_THREAD.with(Cell::get) => {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        }
        _ => gemm::Parallelism::None,
    };
    #[cfg(feature = "product-stats")]
    let started = std::time::Instant::now();
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::tiles_available() {
        let threads = match parallelism {
            gemm::Parallelism::Rayon(t) => t,
            _ => 1,
        };
        // SAFETY: AVX-512F is present (checked just above); operands as the caller promised.
        if unsafe { crate::tile::try_product((m, n, k), dst, dst_rs, accumulate, lhs, rhs, threads) } {
            #[cfg(feature = "product-stats")]
            crate::product_stats::record((2 * m * n * k) as u64, started.elapsed());
            return;
        }
    }
    // SAFETY: forwarded from the caller's contract (gemm reads `dst` only when accumulating).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.ptr,
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.ptr,
            rhs.cs as isize,
            rhs.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    #[cfg(feature = "product-stats")]
    crate::product_stats::record((2 * m * n * k) as u64, started.elapsed());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{CpuPath, with_path};

    /// Deterministic values in [-0.5, 0.5).
    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 * 1e-3 - 0.5).collect()
    }

    /// `c0 [+] a b` in f64 by the definition.
    fn naive(a: &MatRef<'_>, b: &MatRef<'_>, c0: Option<&MatRef<'_>>) -> Vec<f64> {
        let (m, n, k) = (a.rows(), b.cols(), a.cols());
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let start = c0.map_or(0.0, |c| f64::from(c.get(i, j)));
                out[i * n + j] = start + (0..k).map(|p| f64::from(a.get(i, p)) * f64::from(b.get(p, j))).sum::<f64>();
            }
        }
        out
    }

    /// An `rows x cols` operand with padding between rows (stride `cols + pad`), transposed
    /// (stored `cols x rows`) when `t`.
    fn operand(data: &[f32], rows: usize, cols: usize, pad: usize, t: bool) -> MatRef<'_> {
        if t { MatRef::new(data, cols, rows, rows + pad).t() } else { MatRef::new(data, rows, cols, cols + pad) }
    }

    /// Every public product against the definition on odd shapes, padded strides and every
    /// layout, on both paths (tiles where the CPU has them, and `gemm`), one thread and the pool.
    #[test]
    fn products_match_the_definition_in_every_layout_and_path() {
        let shapes = [(1, 1, 1), (7, 17, 3), (13, 33, 29), (70, 80, 40), (65, 3, 130), (9, 130, 0), (0, 5, 4)];
        for path in [CpuPath::Native, CpuPath::Avx2] {
            for (m, n, k) in shapes {
                for (a_t, b_t, accumulate) in
                    [(false, false, false), (true, false, true), (false, true, false), (true, true, true)]
                {
                    for threads in [Threads::Single, Threads::Pool] {
                        let what = format!("{path:?} m {m} n {n} k {k} a_t {a_t} b_t {b_t} {threads:?}");
                        let (av, bv) = (values((m + 2) * (k + 2), 1), values((k + 2) * (n + 2), 2));
                        let (a, b) = (operand(&av, m, k, 2, a_t), operand(&bv, k, n, 1, b_t));
                        let c0 = values(m * (n + 3), 3);
                        let mut c = c0.clone();
                        with_path(path, || matmul(MatMut::new(&mut c, m, n, n + 3), a, b, accumulate, threads));
                        let start = MatRef::new(&c0, m, n, n + 3);
                        let want = naive(&a, &b, accumulate.then_some(&start));
                        for i in 0..m {
                            for j in 0..n + 3 {
                                let got = c[i * (n + 3) + j];
                                if j >= n {
                                    assert_eq!(got, c0[i * (n + 3) + j], "{what}: column {j} past n was written");
                                } else {
                                    let w = want[i * n + j];
                                    assert!((f64::from(got) - w).abs() < 1e-5, "{what}: ({i}, {j}) {got} vs {w}");
                                }
                            }
                        }
                        let fresh = with_path(path, || product(a, b, threads));
                        let plain = naive(&a, &b, None);
                        assert_eq!(fresh.len(), m * n);
                        assert!(fresh.iter().zip(&plain).all(|(g, w)| (f64::from(*g) - w).abs() < 1e-5), "{what}");
                    }
                }
            }
        }
    }

    #[test]
    fn products_side_by_side_equal_each_product() {
        let (m, k) = (37, 19);
        let av = values(m * k, 4);
        let a = MatRef::row_major(&av, m, k);
        let ws: Vec<Vec<f32>> = [5, 16, 33].iter().map(|&n| values(n * k, n)).collect();
        let pieces: Vec<MatRef<'_>> = ws.iter().map(|w| MatRef::row_major(w, w.len() / k, k).t()).collect();
        let cols: usize = pieces.iter().map(MatRef::cols).sum();
        let joined = product_cols(a, &pieces, Threads::Pool);
        let mut col = 0;
        for b in &pieces {
            let want = naive(&a, b, None);
            for i in 0..m {
                for j in 0..b.cols() {
                    let got = f64::from(joined[i * cols + col + j]);
                    assert!((got - want[i * b.cols() + j]).abs() < 1e-5, "({i}, {})", col + j);
                }
            }
            col += b.cols();
        }
        assert!(product_cols(a, &[], Threads::Pool).is_empty());
    }

    /// The same product on one thread, on the pool and inside `products_on_this_thread` gives the
    /// same bits.
    #[test]
    fn products_have_the_same_bits_on_any_thread_count() {
        for (m, n, k) in [(100, 70, 33), (300, 130, 64), (70, 300, 9)] {
            let (av, bv) = (values(m * k, 7), values(k * n, 8));
            for b_t in [false, true] {
                let a = MatRef::row_major(&av, m, k);
                let b = if b_t { MatRef::row_major(&bv, n, k).t() } else { MatRef::row_major(&bv, k, n) };
                let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
                let one = bits(product(a, b, Threads::Single));
                assert_eq!(one, bits(product(a, b, Threads::Pool)), "m {m} n {n} k {k} b_t {b_t}");
                assert_eq!(one, bits(products_on_this_thread(|| product(a, b, Threads::Pool))));
            }
        }
    }

    #[test]
    #[should_panic(expected = "product shapes")]
    fn mismatched_shapes_are_refused() {
        let (a, b) = ([0f32; 6], [0f32; 6]);
        let _ = product(MatRef::row_major(&a, 2, 3), MatRef::row_major(&b, 2, 3), Threads::Single);
    }
}
