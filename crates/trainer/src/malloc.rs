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
/// at once): 256 MiB, so only weight-sized allocations of large models are mapped.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 256 << 20;

/// Free memory at the top of a heap glibc keeps before returning it: 1 GiB.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 1 << 30;

/// Keeps freed memory in the process (glibc on Linux; elsewhere nothing), unless the user set
/// `MALLOC_MMAP_THRESHOLD_` or `MALLOC_TRIM_THRESHOLD_` (glibc's own tunables, which then win).
/// Call first thing in `main`, before large allocations.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_set = |name: &str| std::env::var_os(name).is_some();
        if !user_set("MALLOC_MMAP_THRESHOLD_") && !user_set("MALLOC_TRIM_THRESHOLD_") {
            // SAFETY: `mallopt` only changes the allocator's parameters; it is thread-safe in
            // glibc and takes plain integers.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
                libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            }
        }
    }
}
