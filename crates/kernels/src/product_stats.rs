//! Counters of the matrix products ([`crate::matmul`] and friends): how many calls, how many
//! floating-point operations (`2 m n k` a call) and how long the calls took, in total and for
//! the small ones (under [`SMALL_FLOP`]: attention's per-head, per-block products). The products
//! record themselves only with the crate feature `product-stats` (without it every counter stays
//! 0). For profiling: the counters are process-wide atomics, and with products running on
//! several threads at once the summed call time exceeds wall time.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// A product of fewer floating-point operations than this counts as small.
pub const SMALL_FLOP: u64 = 4_000_000;

/// Totals since the last [`reset`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProductStats {
    /// Products run.
    pub calls: u64,
    /// Their floating-point operations.
    pub flop: u64,
    /// Their summed duration, seconds.
    pub seconds: f64,
    /// Products under [`SMALL_FLOP`].
    pub small_calls: u64,
    /// Their floating-point operations.
    pub small_flop: u64,
    /// Their summed duration, seconds.
    pub small_seconds: f64,
}

/// Calls, operations and nanoseconds: of all products, then of the small ones.
struct Counters([AtomicU64; 6]);

impl Counters {
    const fn new() -> Self {
        Self([const { AtomicU64::new(0) }; 6])
    }

    fn record(&self, flop: u64, took: Duration) {
        let nanos = took.as_nanos() as u64;
        let add = |base: usize| {
            self.0[base].fetch_add(1, Relaxed);
            self.0[base + 1].fetch_add(flop, Relaxed);
            self.0[base + 2].fetch_add(nanos, Relaxed);
        };
        add(0);
        if flop < SMALL_FLOP {
            add(3);
        }
    }

    fn snapshot(&self) -> ProductStats {
        let c = |i: usize| self.0[i].load(Relaxed);
        ProductStats {
            calls: c(0),
            flop: c(1),
            seconds: c(2) as f64 * 1e-9,
            small_calls: c(3),
            small_flop: c(4),
            small_seconds: c(5) as f64 * 1e-9,
        }
    }

    fn reset(&self) {
        self.0.iter().for_each(|c| c.store(0, Relaxed));
    }
}

static PRODUCTS: Counters = Counters::new();

/// Adds one product of `flop` operations that took `took`.
#[cfg_attr(not(feature = "product-stats"), allow(dead_code))]
pub(crate) fn record(flop: u64, took: Duration) {
    PRODUCTS.record(flop, took);
}

/// The totals since the last [`reset`] (or the start of the process).
pub fn snapshot() -> ProductStats {
    PRODUCTS.snapshot()
}

/// Sets every counter to 0.
pub fn reset() {
    PRODUCTS.reset();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_products_count_in_both_totals() {
        let c = Counters::new();
        c.record(10, Duration::from_nanos(5));
        c.record(SMALL_FLOP, Duration::from_nanos(7));
        let s = c.snapshot();
        assert_eq!((s.calls, s.flop, s.small_calls, s.small_flop), (2, 10 + SMALL_FLOP, 1, 10));
        assert!((s.seconds - 12e-9).abs() < 1e-15 && (s.small_seconds - 5e-9).abs() < 1e-15);
        c.reset();
        assert_eq!(c.snapshot(), ProductStats::default());
    }
}
