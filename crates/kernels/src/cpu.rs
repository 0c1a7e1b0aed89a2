//! Which instruction sets the kernels may use: everything the CPU has (the default), or at most
//! AVX2 + FMA, or the baseline x86-64 build, chosen once per process from `SLIME_CPU` and
//! overridable per thread ([`with_path`]). This module is the one place the crate asks the CPU
//! what it has (`is_x86_feature_detected!`) and the one place `#[target_feature]` builds are
//! chosen ([`dispatch!`], for the row kernels and AdamW; the AVX-512F tile products check
//! [`tiles_available`]).
//!
//! Not the `multiversion` crate: its dispatcher always takes the best build the CPU supports and
//! cannot be capped per process or per thread (`SLIME_CPU`, and the tests that compare every
//! path), so every kernel would have to be multiversioned twice over; and its macros need `syn`
//! with `full` and `extra-traits`, which changes `syn`'s features for the whole workspace and
//! rebuilds every procedural macro and everything that depends on one.

use std::cell::Cell;
use std::sync::OnceLock;

/// The environment variable that caps the CPU path: `native` (default), `avx2` or `baseline`.
pub const ENV_VAR: &str = "SLIME_CPU";

/// The instruction sets the kernels may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuPath {
    /// Everything the CPU has: AVX-512F tile products, the widest row-kernel build.
    #[default]
    Native,
    /// At most AVX2 + FMA: products through `gemm` (which still picks its own kernels from the
    /// CPU), row kernels built for AVX2 + FMA when the CPU has them: what an AVX2-only CPU runs.
    Avx2,
    /// The baseline x86-64 build of the row kernels, products through `gemm`.
    Baseline,
}

impl CpuPath {
    /// Parses `native`, `avx2` or `baseline`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "native" => Some(Self::Native),
            "avx2" => Some(Self::Avx2),
            "baseline" => Some(Self::Baseline),
            _ => None,
        }
    }

    /// The name [`Self::parse`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Avx2 => "avx2",
            Self::Baseline => "baseline",
        }
    }
}

/// The process-wide path: `SLIME_CPU` when set to a valid name, else [`CpuPath::Native`]
/// (callers that take user input validate the variable first with [`CpuPath::parse`]).
fn process_path() -> CpuPath {
    static PATH: OnceLock<CpuPath> = OnceLock::new();
    *PATH.get_or_init(|| std::env::var(ENV_VAR).ok().and_then(|v| CpuPath::parse(v.trim())).unwrap_or_default())
}

thread_local! {
    /// A path set for this thread by [`with_path`].
    static THREAD_PATH: Cell<Option<CpuPath>> = const { Cell::new(None) };
}

/// The path in force on this thread.
#[inline]
pub fn path() -> CpuPath {
    THREAD_PATH.with(Cell::get).unwrap_or_else(process_path)
}

/// Runs `f` with the kernels this thread calls on `path` (for tests and measurements: work that
/// a product or row loop hands to other pool threads keeps the process-wide path, which changes
/// nothing but the instruction set of those row kernels). Scopes nest.
pub fn with_path<R>(path: CpuPath, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<CpuPath>);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD_PATH.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(THREAD_PATH.with(|c| c.replace(Some(path))));
    f()
}

/// The widest build the path and the CPU allow: 2 = AVX-512F (with AVX2 and FMA), 1 = AVX2 + FMA,
/// 0 = baseline (`std` caches the detection).
#[inline]
pub(crate) fn level() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = || std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
        match path() {
            CpuPath::Native if std::arch::is_x86_feature_detected!("avx512f") => 2,
            CpuPath::Native | CpuPath::Avx2 if avx2() => 1,
            _ => 0,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        0
    }
}

/// Defines `fn $name(args) -> ret` from one body, compiled as written, with AVX2 + FMA and with
/// AVX-512F enabled; calls the widest build [`level`] allows (AVX-512F: 16-lane loops, about 4 %
/// off the reference step on Zen 4). The body must give the same bits in every build
/// (element-wise IEEE operations and explicit lanes: no build contracts to fused multiply-adds).
macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                match $crate::cpu::level() {
                    // SAFETY: `level` found AVX-512F (hence AVX2 and FMA) on this CPU.
                    2 => return unsafe { avx512($($arg),*) },
                    // SAFETY: `level` found AVX2 and FMA on this CPU.
                    1 => return unsafe { avx2($($arg),*) },
                    _ => {}
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use dispatch;

/// Whether the AVX-512F tile products run: the path is native and the CPU has AVX-512F
/// (`std` caches the detection).
#[inline]
pub fn tiles_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        path() == CpuPath::Native && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_thread_scopes_restore() {
        for p in [CpuPath::Native, CpuPath::Avx2, CpuPath::Baseline] {
            assert_eq!(CpuPath::parse(p.name()), Some(p));
        }
        assert_eq!(CpuPath::parse("avx512"), None);
        let outer = path();
        with_path(CpuPath::Baseline, || {
            assert_eq!(path(), CpuPath::Baseline);
            assert!(!tiles_available());
            with_path(CpuPath::Avx2, || assert_eq!(path(), CpuPath::Avx2));
            assert_eq!(path(), CpuPath::Baseline);
        });
        assert_eq!(path(), outer);
    }
}
