//! PyTorch's AdamW update of one f32 parameter, in place (decoupled weight decay, bias
//! correction, `eps` added after the bias-corrected square root), the gradient scaled first by
//! the clipping coefficient:
//!
//! ```text
//! g     <- g * grad_scale
//! m     <- beta1 * m + (1 - beta1) * g            v <- beta2 * v + (1 - beta2) * g^2
//! theta <- theta * decay - lr * inv_bias1 * m / (sqrt(v) * inv_sqrt_bias2 + eps)
//! ```
//!
//! with `decay = 1 - lr * weight_decay`, `inv_bias1 = 1 / (1 - beta1^t)` and
//! `inv_sqrt_bias2 = 1 / sqrt(1 - beta2^t)`. Element-wise IEEE operations only, in this order,
//! so every CPU build and thread count gives the same bits.

use rayon::prelude::*;

use crate::cpu::dispatch;

/// Elements per rayon task (a parameter smaller than this is updated on one thread).
const CHUNK: usize = 64 * 1024;

/// The per-step constants of the update (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f32,
    /// `1 - lr * weight_decay`.
    pub decay: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Factor on the gradient (the clipping coefficient).
    pub grad_scale: f32,
    /// `1 / (1 - beta1^t)`.
    pub inv_bias1: f32,
    /// `1 / sqrt(1 - beta2^t)`.
    pub inv_sqrt_bias2: f32,
}

/// One AdamW step of `theta` with moments `m`, `v` and gradient `g`, in place, over rayon's
/// pool. Panics unless all four have the same length.
pub fn update(step: &AdamWStep, theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
    assert!(
        m.len() == theta.len() && v.len() == theta.len() && g.len() == theta.len(),
        "adamw: {} parameters, {} / {} moments, {} gradients",
        theta.len(),
        m.len(),
        v.len(),
        g.len()
    );
    theta
        .par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((t, m), v), g)| update_chunk(step, t, m, v, g));
}

dispatch! {
    /// [`update`] of one chunk on this thread, in the widest build the CPU path allows.
    fn update_chunk(s: &AdamWStep, theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        for (((t, m), v), &g) in theta.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let g = g * s.grad_scale;
            *m = s.beta1 * *m + (1.0 - s.beta1) * g;
            *v = s.beta2 * *v + (1.0 - s.beta2) * g * g;
            let denom = v.sqrt() * s.inv_sqrt_bias2 + s.eps;
            *t = *t * s.decay - s.lr * s.inv_bias1 * *m / denom;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{CpuPath, with_path};

    /// The update against the definition in f64 over several chunks and an odd tail, and the
    /// same bits on every CPU path.
    #[test]
    fn update_matches_the_definition_and_every_path_has_the_same_bits() {
        let n = CHUNK * 2 + 37;
        let wave =
            |k: usize, s: f32| -> Vec<f32> { (0..n).map(|i| ((i * k) % 1000) as f32 / 997.0 * s - 0.5 * s).collect() };
        let (theta0, m0, g) = (wave(7919, 2.0), wave(31, 0.1), wave(104_729, 1.0));
        let v0: Vec<f32> = wave(17, 0.01).iter().map(|x| x.abs()).collect();
        let step = AdamWStep {
            lr: 1e-2,
            decay: 1.0 - 1e-2 * 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            grad_scale: 0.7,
            inv_bias1: 1.0 / (1.0 - 0.9f32.powi(3)),
            inv_sqrt_bias2: 1.0 / (1.0 - 0.999f32.powi(3)).sqrt(),
        };
        let run = |p: CpuPath| {
            let (mut t, mut m, mut v) = (theta0.clone(), m0.clone(), v0.clone());
            with_path(p, || update(&step, &mut t, &mut m, &mut v, &g));
            (t, m, v)
        };
        let (t, m, v) = run(CpuPath::Native);
        fn f(x: f32) -> f64 {
            f64::from(x)
        }
        for i in 0..n {
            let gs = f(g[i]) * f(step.grad_scale);
            let mi = f(step.beta1) * f(m0[i]) + (1.0 - f(step.beta1)) * gs;
            let vi = f(step.beta2) * f(v0[i]) + (1.0 - f(step.beta2)) * gs * gs;
            let ti = f(theta0[i]) * f(step.decay)
                - f(step.lr) * f(step.inv_bias1) * mi / (vi.sqrt() * f(step.inv_sqrt_bias2) + f(step.eps));
            assert!((f(m[i]) - mi).abs() < 1e-6 && (f(v[i]) - vi).abs() < 1e-7, "moments at {i}");
            assert!((f(t[i]) - ti).abs() < 1e-5 * ti.abs().max(1.0), "theta at {i}: {} vs {ti}", t[i]);
        }
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for p in [CpuPath::Avx2, CpuPath::Baseline] {
            let (t2, m2, v2) = run(p);
            assert_eq!((bits(&t2), bits(&m2), bits(&v2)), (bits(&t), bits(&m), bits(&v)), "{p:?}");
        }
    }

    #[test]
    #[should_panic(expected = "adamw")]
    fn mismatched_lengths_are_refused() {
        let step = AdamWStep {
            lr: 0.1,
            decay: 1.0,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            grad_scale: 1.0,
            inv_bias1: 1.0,
            inv_sqrt_bias2: 1.0,
        };
        update(&step, &mut [0.0; 3], &mut [0.0; 3], &mut [0.0; 3], &[0.0; 2]);
    }
}
