//! Thread setup for the binaries.
//!
//! The fused CPU kernels of `slime-models` and candle's matrix products run on rayon's pool
//! (`RAYON_NUM_THREADS`). candle also keeps a second pool of its own for large element-wise
//! ops (`CANDLE_NUM_THREADS`, by default as many threads as rayon's): its idle workers spin for
//! a while before they park, so on a small machine they take cores from rayon's workers, and
//! it runs one op at a time behind a lock, so micro-batches processed at once
//! (`parallel_micro_batches`) queue on it. Measured on the 2-core reference workload
//! (docs/performance.md), one thread for candle's own pool is as fast or faster in every mode.

/// Sets `CANDLE_NUM_THREADS=1` unless the user set it (candle reads it once, at its first
/// large element-wise op), so those ops run on the calling thread.
///
/// # Safety
/// Call before any other thread exists (first thing in `main`): it changes the environment.
pub unsafe fn keep_candle_off_its_own_pool() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: the caller guarantees no other thread is running.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}
