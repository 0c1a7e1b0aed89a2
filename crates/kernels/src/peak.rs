//! The machine's measured fused multiply-add peak: the yardstick the products' throughput is
//! quoted against (`slime-step-bench` reports both).
//!
//! Each thread runs [`CHAINS`] independent chains of `acc = acc * b + c` over a vector of f32
//! lanes (8 with AVX2 + FMA, 16 with AVX-512F, as [`crate::cpu`] allows), enough chains to cover
//! the FMA units' latency, so the loop is bound by FMA throughput alone: 2 floating-point
//! operations per lane per FMA.

use std::hint::black_box;
use std::time::Instant;

/// Independent accumulator vectors per thread (registers: 12 of the 16 AVX2 or 32 AVX-512 ones).
pub const CHAINS: usize = 12;

/// `iterations` rounds of [`CHAINS`] x `LANES` fused multiply-adds; returns a value that depends
/// on every one of them.
#[inline(always)]
fn chains<const LANES: usize>(iterations: u64) -> f32 {
    let (b, c) = (black_box(0.999_999_9_f32), black_box(1e-7_f32));
    let mut acc = [[0.0f32; LANES]; CHAINS];
    for (i, chain) in acc.iter_mut().enumerate() {
        chain.fill(i as f32);
    }
    for _ in 0..iterations {
        for chain in &mut acc {
            for lane in chain.iter_mut() {
                *lane = lane.mul_add(b, c);
            }
        }
    }
    acc.iter().map(|chain| chain[0]).sum()
}

/// One thread's chains at the widest width the CPU path allows; returns the lanes used and the
/// result (to keep the work observable).
fn run(iterations: u64) -> (usize, f32) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn avx512(iterations: u64) -> f32 {
            chains::<16>(iterations)
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2(iterations: u64) -> f32 {
            chains::<8>(iterations)
        }
        match crate::cpu::level() {
            // SAFETY: `level` found AVX-512F (hence AVX2 and FMA) on this CPU.
            2 => return (16, unsafe { avx512(iterations) }),
            // SAFETY: `level` found AVX2 and FMA on this CPU.
            1 => return (8, unsafe { avx2(iterations) }),
            _ => {}
        }
    }
    (4, chains::<4>(iterations))
}

/// The FMA peak of `threads` threads running at once, in GFLOP/s (2 per lane per FMA), measured
/// over `iterations` rounds per thread (2e8 take about a second on a 3 GHz core).
pub fn fma_peak_gflops(threads: usize, iterations: u64) -> f64 {
    let started = Instant::now();
    let flop = run_threads(threads, iterations);
    flop / started.elapsed().as_secs_f64() / 1e9
}

/// Runs the chains on `threads` threads (at least one) at once; returns the floating-point
/// operations they did.
fn run_threads(threads: usize, iterations: u64) -> f64 {
    let lanes: Vec<usize> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1)).map(|_| s.spawn(move || black_box(run(iterations)).0)).collect();
        workers.into_iter().map(|w| w.join().unwrap_or(0)).collect()
    });
    lanes.iter().map(|&l| 2.0 * (CHAINS * l) as f64 * iterations as f64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chains_compute_what_they_claim() {
        // One round from the start values: i * b + c per chain.
        let (b, c) = (0.999_999_9_f32, 1e-7_f32);
        let want: f32 = (0..CHAINS).map(|i| (i as f32).mul_add(b, c)).sum();
        assert_eq!(chains::<8>(1), want);
        assert_eq!(run(1).1, want);
    }

    #[test]
    fn every_thread_counts_two_operations_per_lane_per_fma() {
        let lanes = run(1).0;
        assert!([4, 8, 16].contains(&lanes), "{lanes}");
        assert_eq!(run_threads(3, 1000), 3.0 * 2.0 * (CHAINS * lanes) as f64 * 1000.0);
        assert_eq!(run_threads(0, 10), run_threads(1, 10), "zero threads run one");
    }
}
