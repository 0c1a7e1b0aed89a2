//! Allocator setup for the binaries.
//!
//! A training step frees and allocates the same large buffers every step (activations,
//! gradients, scratch). glibc's `malloc` by default hands large blocks back to the kernel when
//! they are freed (`munmap` above its mmap threshold, heap trimming above its trim threshold),
//! and the next step faults them in again, zero-filled page by page: about 2,500 page faults a
//! step on the reference workload (docs/performance.md). Keeping freed memory in the process
//! removes them; the peak resident size is unchanged, but between steps the resident size
//! stays at the peak instead of falling back.

/// Largest block glibc still maps on its own (above it, a freed block goes back to the kernel
/// at once): 32 MiB, the largest value glibc accepts on 64-bit targets (half its 64 MiB arena
/// heap; `mallopt` refuses more and keeps its sliding default).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Free memory at the top of a heap glibc keeps before returning it: 1 GiB.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 1 << 30;

/// Extra memory glibc asks the kernel for whenever a heap grows, and keeps when it trims one:
/// 256 MiB. Without it the worker threads' arenas shrink back after each large free and fault
/// the same pages in again on the next step (measured: a third of an evaluation's system time).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TOP_PAD: libc::c_int = 256 << 20;

/// Keeps freed memory in the process (glibc on Linux; elsewhere nothing), unless the user set
/// `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` or `MALLOC_TOP_PAD_` (glibc's own tunables,
/// which then win). Call first thing in `main`, before large allocations. Returns whether glibc
/// took every setting (always true elsewhere).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_set = |name: &str| std::env::var_os(name).is_some();
        if ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"].iter().any(|n| user_set(n)) {
            return true;
        }
        [(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD), (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD), (libc::M_TOP_PAD, TOP_PAD)]
            .into_iter()
            // SAFETY: `mallopt` only changes the allocator's parameters; it is thread-safe in
            // glibc, takes plain integers and returns 1 when it accepted the value.
            .all(|(param, value)| unsafe { libc::mallopt(param, value) } == 1)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    true
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_accepts_every_setting() {
        assert!(super::keep_freed_memory(), "mallopt refused a setting");
    }
}
