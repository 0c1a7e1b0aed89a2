//! Host-side f32 building blocks of the fused CPU kernels in [`crate::fused`]: borrowed views of
//! tensor storage, scratch buffers, and the row kernels (RMSNorm, per-head q/k RMSNorm, bias rows
//! and column sums, SwiGLU and GeGLU, the rotary embedding's backward, log-sum-exp) with their
//! derivatives. Matrix products and the vectorised row math are `slime_kernels`'.
//!
//! Everything here is plain slices and explicit strides, so the kernels can read a head out of a
//! `[tokens, heads * head_dim]` activation or write a transposed product without a copy.

use candle_core::{CpuStorage, Layout, Storage, StorageRef, Tensor};
use rayon::prelude::*;
use slime_kernels::{MatMut, MatRef, Threads, matmul, product, vmath};

use crate::fused::Glu;

/// Rows handed to one rayon task by the row-parallel loops (a few KiB of work each).
pub(crate) const ROW_BLOCK: usize = 16;

/// `dy [m, k_1 + k_2 + ...] @ [W_1; W_2; ...]` for row-major weights `W_i [k_i, n]` stacked by
/// rows: `[m, n]`, the pieces' products added in order (the backward of a product with the
/// pieces side by side, [`slime_kernels::product_cols`]).
pub(crate) fn product_stacked(m: usize, n: usize, dy: &[f32], pieces: &[&[f32]]) -> Vec<f32> {
    let ks: usize = pieces.iter().map(|w| w.len() / n).sum();
    let Some((first, rest)) = pieces.split_first() else { return vec![0.0; m * n] };
    let k = first.len() / n;
    let mut out = product(MatRef::new(dy, m, k, ks), MatRef::row_major(first, k, n), Threads::Pool);
    let mut k0 = k;
    for w in rest {
        let k = w.len() / n;
        let a = MatRef::new(&dy[k0..], m, k, ks);
        matmul(MatMut::row_major(&mut out, m, n), a, MatRef::row_major(w, k, n), true, Threads::Pool);
        k0 += k;
    }
    out
}

/// `x [m, k] @ [W_1; W_2; ...]^T` for row-major weights `W_i [n_i, k]` stacked by rows (a block's
/// `[gate; up]` or `[q; k; v]`, each in its own storage): `[m, n_1 + n_2 + ...]`, one product per
/// piece into its columns.
pub(crate) fn product_stacked_t(m: usize, k: usize, x: &[f32], pieces: &[&[f32]]) -> Vec<f32> {
    let ts: Vec<MatRef<'_>> = pieces.iter().map(|w| MatRef::row_major(w, w.len() / k, k).t()).collect();
    slime_kernels::product_cols(MatRef::row_major(x, m, k), &ts, Threads::Pool)
}

thread_local! {
    /// Buffers given back with [`recycle`], for [`scratch`] on the same thread.
    static SPARE: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Spare buffers a thread keeps at most.
const SPARE_BUFFERS: usize = 16;

/// A buffer of `len` floats with unspecified contents (left from an earlier use, or zeros), for
/// an output the caller overwrites completely: a buffer given back on this thread with
/// [`recycle`] when one is between `len` and twice `len` floats large, so the large per-layer
/// buffers of a step are not zero-filled again every step; otherwise a fresh zeroed one.
pub(crate) fn scratch(len: usize) -> Vec<f32> {
    let spare = SPARE.with(|spare| {
        let mut spare = spare.borrow_mut();
        let fits = spare.iter().position(|v| v.capacity() >= len && v.capacity() <= 2 * len.max(1))?;
        Some(spare.swap_remove(fits))
    });
    match spare {
        Some(mut v) => {
            // Already initialised up to its length; only a shorter one is extended (with zeros).
            v.truncate(len);
            v.resize(len, 0.0);
            v
        }
        None => vec![0f32; len],
    }
}

/// Gives `buffer` back for [`scratch`] on this thread (dropped when the thread keeps
/// [`SPARE_BUFFERS`] already).
pub(crate) fn recycle(buffer: Vec<f32>) {
    SPARE.with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.len() < SPARE_BUFFERS && buffer.capacity() > 0 {
            spare.push(buffer);
        }
    });
}

/// A read guard on a contiguous f32 CPU tensor's storage.
pub(crate) struct HostF32<'a> {
    guard: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl<'a> HostF32<'a> {
    /// Borrows `t`'s elements; `t` must be a contiguous f32 CPU tensor.
    pub fn new(t: &'a Tensor, what: &str) -> candle_core::Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{what}: expected a contiguous tensor")
        };
        if !matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))) {
            candle_core::bail!("{what}: expected an f32 CPU tensor")
        }
        Ok(Self { guard, start, end })
    }

    /// The elements.
    pub fn slice(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.start..self.end],
            _ => &[],
        }
    }
}

/// The contiguous f32 elements of a CPU storage.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else { candle_core::bail!("{what}: expected f32") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// The contiguous u32 elements of a CPU storage.
pub(crate) fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [u32]> {
    let CpuStorage::U32(data) = s else { candle_core::bail!("{what}: expected u32") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// `1 / sqrt(mean(x^2) + eps)` of one row, accumulated in f64.
pub(crate) fn inv_rms(row: &[f32], eps: f64) -> f32 {
    let ms = vmath::sum_squares_f64(row) / row.len() as f64;
    (1.0 / (ms + eps).sqrt()) as f32
}

/// `out = x * inv_rms(x) * w` row by row (`h` = row length), rows in parallel.
pub(crate) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f64, out: &mut [f32]) {
    let h = w.len();
    out.par_chunks_mut(h * ROW_BLOCK).zip(x.par_chunks(h * ROW_BLOCK)).for_each(|(o, x)| {
        for (o, row) in o.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
            let r = inv_rms(row, eps);
            for ((o, &v), &w) in o.iter_mut().zip(row).zip(w) {
                *o = v * r * w;
            }
        }
    });
}

/// RMSNorm backward for rows `x` with upstream gradient `g` (same shape) and weight `w`:
/// `dx = r g w - x r^3 mean(g w x)` (written into `dx`), returns `dw = sum over rows of g x r`.
/// The per-block partial sums of `dw` are added in block order, not in rayon's (work-stealing)
/// reduction order, so the result does not depend on the thread count or scheduling.
pub(crate) fn rms_norm_bwd_rows(x: &[f32], w: &[f32], g: &[f32], eps: f64, dx: &mut [f32]) -> Vec<f32> {
    rms_norm_bwd::<false>(x, w, g, eps, dx)
}

/// [`rms_norm_bwd_rows`] added to what `dx` holds (a residual's gradient, so no zero-filled `dx`
/// and no separate pass adding it; the same bits as adding it afterwards).
pub(crate) fn rms_norm_bwd_rows_add(x: &[f32], w: &[f32], g: &[f32], eps: f64, dx: &mut [f32]) -> Vec<f32> {
    rms_norm_bwd::<true>(x, w, g, eps, dx)
}

fn rms_norm_bwd<const ADD: bool>(x: &[f32], w: &[f32], g: &[f32], eps: f64, dx: &mut [f32]) -> Vec<f32> {
    let h = w.len();
    dx.par_chunks_mut(h * ROW_BLOCK)
        .zip(x.par_chunks(h * ROW_BLOCK))
        .zip(g.par_chunks(h * ROW_BLOCK))
        .map(|((d, x), g)| {
            let mut dw = vec![0f32; h];
            for ((d, row), gr) in d.chunks_exact_mut(h).zip(x.chunks_exact(h)).zip(g.chunks_exact(h)) {
                let r = inv_rms(row, eps);
                let dot = vmath::dot3_f64(row, gr, w);
                let c = (dot / h as f64) as f32 * r * r * r;
                for ((((d, &v), &g), &w), dw) in d.iter_mut().zip(row).zip(gr).zip(w).zip(dw.iter_mut()) {
                    let t = r * g * w - v * c;
                    *d = if ADD { *d + t } else { t };
                    *dw += g * v * r;
                }
            }
            dw
        })
        .collect::<Vec<_>>()
        .into_iter()
        .fold(vec![0f32; h], |mut total, part| {
            total.iter_mut().zip(&part).for_each(|(t, p)| *t += p);
            total
        })
}

/// Rows per partial sum of [`col_sums`]: a fixed partition, so the order of the additions (and
/// the result) does not depend on the thread count or on scheduling.
const COL_SUM_ROWS: usize = 64;

/// Column sums of a row-major `[rows, cols]` matrix (a bias gradient): one partial sum per block
/// of [`COL_SUM_ROWS`] rows (its rows added in order), the partials added in block order.
pub(crate) fn col_sums(m: &[f32], cols: usize) -> Vec<f32> {
    m.par_chunks(cols * COL_SUM_ROWS)
        .map(|block| {
            let mut sums = vec![0f32; cols];
            for row in block.chunks_exact(cols) {
                sums.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            sums
        })
        .collect::<Vec<_>>()
        .into_iter()
        .fold(vec![0f32; cols], |mut total, part| {
            total.iter_mut().zip(&part).for_each(|(t, p)| *t += p);
            total
        })
}

/// `m[r, c] += b[c]` for every row of a row-major `[rows, b.len()]` matrix (a bias), rows in
/// parallel.
pub(crate) fn add_rows(m: &mut [f32], b: &[f32]) {
    let cols = b.len();
    m.par_chunks_mut(cols * ROW_BLOCK).for_each(|block| {
        for row in block.chunks_exact_mut(cols) {
            row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
    });
}

/// Per-head RMSNorm of the query and key columns of q|k|v rows (Qwen3's q/k norm): in each row,
/// the first `heads` head vectors of `head_dim = q.len()` columns are normalised with weight `q`,
/// the next `kv_heads` with weight `k` (each over its own `head_dim` values, as [`rms_norm_rows`]);
/// the value columns after them are left alone.
pub(crate) struct HeadNorm<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub heads: usize,
    pub kv_heads: usize,
    pub eps: f64,
}

impl HeadNorm<'_> {
    /// Columns of a row holding query and key heads.
    fn qk_cols(&self) -> usize {
        (self.heads + self.kv_heads) * self.q.len()
    }

    /// Normalises the query and key heads of `qkv` (`[rows, cols]`) in place.
    pub fn apply(&self, qkv: &mut [f32], cols: usize) {
        let (d, qk) = (self.q.len(), self.qk_cols());
        qkv.par_chunks_mut(cols * ROW_BLOCK).for_each(|block| {
            for row in block.chunks_exact_mut(cols) {
                for (j, head) in row[..qk].chunks_exact_mut(d).enumerate() {
                    let w = if j < self.heads { self.q } else { self.k };
                    let r = inv_rms(head, self.eps);
                    head.iter_mut().zip(w).for_each(|(v, &w)| *v = *v * r * w);
                }
            }
        });
    }

    /// Backward pass in place: `g` (`[rows, cols]`, the gradient of the normalised rows) becomes
    /// the gradient of the rows before normalising, `x`, in the query and key columns (the value
    /// columns are unchanged): per head `dx = r g w - x r^3 mean(g w x)`. Returns the gradients of
    /// the `q` and `k` weights, `sum g x r` over rows and heads; per-block partial sums added in
    /// block order (independent of the thread count, as [`rms_norm_bwd_rows`]).
    pub fn backward(&self, x: &[f32], cols: usize, g: &mut [f32]) -> (Vec<f32>, Vec<f32>) {
        let (d, qk) = (self.q.len(), self.qk_cols());
        g.par_chunks_mut(cols * ROW_BLOCK)
            .zip(x.par_chunks(cols * ROW_BLOCK))
            .map(|(gb, xb)| {
                let (mut dq, mut dk) = (vec![0f32; d], vec![0f32; d]);
                for (gr, xr) in gb.chunks_exact_mut(cols).zip(xb.chunks_exact(cols)) {
                    for (j, (gh, xh)) in gr[..qk].chunks_exact_mut(d).zip(xr[..qk].chunks_exact(d)).enumerate() {
                        let (w, dw) = if j < self.heads { (self.q, &mut dq) } else { (self.k, &mut dk) };
                        let r = inv_rms(xh, self.eps);
                        let dot = vmath::dot3_f64(xh, gh, w);
                        let c = (dot / d as f64) as f32 * r * r * r;
                        for (((g, &v), &w), dw) in gh.iter_mut().zip(xh).zip(w).zip(dw.iter_mut()) {
                            *dw += *g * v * r;
                            *g = r * *g * w - v * c;
                        }
                    }
                }
                (dq, dk)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .fold((vec![0f32; d], vec![0f32; d]), |(mut tq, mut tk), (pq, pk)| {
                tq.iter_mut().zip(&pq).for_each(|(t, p)| *t += p);
                tk.iter_mut().zip(&pk).for_each(|(t, p)| *t += p);
                (tq, tk)
            })
    }
}

/// The row kernels of a gate `act`: its forward and backward (see [`vmath::swiglu_row`],
/// [`vmath::geglu_row`]), chosen once per call, so SwiGLU runs exactly as it always has.
type GluRow = fn(&mut [f32], &[f32], &[f32]);
type GluBwdRow = fn(&mut [f32], &mut [f32], &[f32], &[f32], &[f32]);

fn glu_kernels(act: Glu) -> (GluRow, GluBwdRow) {
    match act {
        Glu::Silu => (vmath::swiglu_row, vmath::swiglu_bwd_row),
        Glu::GeluTanh => (vmath::geglu_row, vmath::geglu_bwd_row),
    }
}

/// The gated product of a `[rows, 2 i]` gate|up block: `out[r, j] = act(gu[r, j]) * gu[r, i + j]`
/// (SwiGLU: `act = silu`; GeGLU: `act = gelu_tanh`).
pub(crate) fn glu_rows(act: Glu, gu: &[f32], i: usize, out: &mut [f32]) {
    let row_fn = glu_kernels(act).0;
    out.par_chunks_mut(i * ROW_BLOCK).zip(gu.par_chunks(2 * i * ROW_BLOCK)).for_each(|(o, gu)| {
        for (o, row) in o.chunks_exact_mut(i).zip(gu.chunks_exact(2 * i)) {
            let (gate, up) = row.split_at(i);
            row_fn(o, gate, up);
        }
    });
}

/// The gated product's backward: from `d act` `[rows, i]` and the `[rows, 2 i]` gate|up block,
/// the gradient of the block (written into `dgu`, same layout): `d gate = d act * up * act'(gate)`,
/// `d up = d act * act(gate)` (SwiGLU: `silu'(v) = s (1 + v (1 - s))` with `s = sigmoid(v)`).
pub(crate) fn glu_bwd_rows(act: Glu, gu: &[f32], dact: &[f32], i: usize, dgu: &mut [f32]) {
    let bwd_fn = glu_kernels(act).1;
    dgu.par_chunks_mut(2 * i * ROW_BLOCK)
        .zip(gu.par_chunks(2 * i * ROW_BLOCK))
        .zip(dact.par_chunks(i * ROW_BLOCK))
        .for_each(|((d, gu), da)| {
            for ((d, row), da) in d.chunks_exact_mut(2 * i).zip(gu.chunks_exact(2 * i)).zip(da.chunks_exact(i)) {
                let (gate, up) = row.split_at(i);
                let (dg, du) = d.split_at_mut(i);
                bwd_fn(dg, du, gate, up, da);
            }
        });
}

/// [`glu_bwd_rows`] with the block's gradient written over the gate|up block `gu` itself (each
/// row copied aside first): no separate gradient buffer, the same bits.
pub(crate) fn glu_bwd_rows_in_place(act: Glu, gu: &mut [f32], dact: &[f32], i: usize) {
    let bwd_fn = glu_kernels(act).1;
    gu.par_chunks_mut(2 * i * ROW_BLOCK).zip(dact.par_chunks(i * ROW_BLOCK)).for_each_init(
        || vec![0f32; 2 * i],
        |aside, (gu, da)| {
            for (row, da) in gu.chunks_exact_mut(2 * i).zip(da.chunks_exact(i)) {
                aside.copy_from_slice(row);
                let ((gate, up), (dg, du)) = (aside.split_at(i), row.split_at_mut(i));
                bwd_fn(dg, du, gate, up, da);
            }
        },
    );
}

/// [`glu_rows`] and [`glu_bwd_rows_in_place`] in one pass (the gate's exponential once): the
/// gated product into `out` `[rows, i]` and the block's gradient over `gu`, the same bits as
/// the two.
pub(crate) fn glu_act_bwd_rows_in_place(act: Glu, gu: &mut [f32], dact: &[f32], i: usize, out: &mut [f32]) {
    let both_fn = match act {
        Glu::Silu => vmath::swiglu_act_bwd_row,
        Glu::GeluTanh => vmath::geglu_act_bwd_row,
    };
    gu.par_chunks_mut(2 * i * ROW_BLOCK)
        .zip(out.par_chunks_mut(i * ROW_BLOCK))
        .zip(dact.par_chunks(i * ROW_BLOCK))
        .for_each_init(
            || vec![0f32; 2 * i],
            |aside, ((gu, o), da)| {
                for ((row, o), da) in gu.chunks_exact_mut(2 * i).zip(o.chunks_exact_mut(i)).zip(da.chunks_exact(i)) {
                    aside.copy_from_slice(row);
                    let ((gate, up), (dg, du)) = (aside.split_at(i), row.split_at_mut(i));
                    both_fn(o, dg, du, gate, up, da);
                }
            },
        );
}

/// The transpose of the rotary embedding of one head vector ([`vmath::rope_heads`], rotation by
/// the negative angle): the gradient of its input.
#[inline]
pub(crate) fn rope_row_bwd(out: &mut [f32], g: &[f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    let (o1, o2) = out.split_at_mut(half);
    let (g1, g2) = g.split_at(half);
    for i in 0..half {
        let (a, b) = (g1[i], g2[i]);
        o1[i] = a * cos[i] + b * sin[i];
        o2[i] = b * cos[i] - a * sin[i];
    }
}

/// Row maximum-shifted `log sum exp` of one row of logits, accumulated in f64 (the log-softmax
/// normaliser of `fused::log_softmax_gather` and `logps::lm_head_logps`).
pub(crate) fn row_lse(row: &[f32]) -> f32 {
    let m = vmath::max(row);
    m + vmath::exp_shifted_sum_f64(row, m).ln() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_reuses_a_recycled_buffer_of_a_fitting_size_only() {
        // Each test runs on its own thread: the spare buffers start empty.
        let fresh = scratch(100);
        assert_eq!(fresh, vec![0.0; 100]);
        let mut used = fresh;
        used.fill(7.0);
        let at = used.as_ptr();
        recycle(used);
        // Too small a request (the buffer is over twice as large): a fresh zeroed buffer.
        assert_eq!(scratch(40), vec![0.0; 40]);
        // A fitting request gets the recycled allocation, truncated, contents left as they were.
        let again = scratch(80);
        assert_eq!((again.as_ptr(), again.len()), (at, 80));
        assert!(again.iter().all(|&v| v == 7.0));
        recycle(again);
        // Longer than its initialised part (but within its capacity): the tail is zeros.
        let longer = scratch(100);
        assert_eq!((longer.as_ptr(), longer.len()), (at, 100));
        assert!(longer[..80].iter().all(|&v| v == 7.0) && longer[80..].iter().all(|&v| v == 0.0));
    }

    /// Adding RMSNorm's backward into the residual's gradient gives the bits of writing it and
    /// adding the residual's gradient afterwards (IEEE addition commutes).
    #[test]
    fn rms_norm_backward_added_in_place_equals_written_then_added() {
        let (rows, h) = (37, 24);
        let x: Vec<f32> = (0..rows * h).map(|k| ((k * 7919) % 1000) as f32 / 250.0 - 2.0).collect();
        let g: Vec<f32> = (0..rows * h).map(|k| ((k * 104_729) % 997) as f32 / 300.0 - 1.6).collect();
        let res: Vec<f32> = (0..rows * h).map(|k| ((k * 31) % 101) as f32 / 50.0 - 1.0).collect();
        let w: Vec<f32> = (0..h).map(|k| 0.5 + k as f32 * 0.05).collect();
        let mut written = vec![0f32; rows * h];
        let dw_written = rms_norm_bwd_rows(&x, &w, &g, 1e-6, &mut written);
        written.iter_mut().zip(&res).for_each(|(d, r)| *d += r);
        let mut added = res.clone();
        let dw_added = rms_norm_bwd_rows_add(&x, &w, &g, 1e-6, &mut added);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&written), bits(&added));
        assert_eq!(bits(&dw_written), bits(&dw_added));
        assert_ne!(bits(&added), bits(&res), "the backward added something");
    }
}
