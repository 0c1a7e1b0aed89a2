//! Which code runs the training step on the CPU: the fused host kernels (the default), or the
//! portable path of composed candle ops that every other device (CUDA) and dtype (bf16) runs.
//!
//! The portable path is how the device-agnostic code is tested on machines without a GPU: the
//! same run on both paths gives the same numbers within float rounding. The switch is
//! process-wide; `slime-trainer` reads it from `SLIME_KERNELS` (`fused` or `portable`).
//!
//! Independently, `SLIME_CPU` (`native`, `avx2` or `baseline`; [`slime_kernels::cpu`]) caps the
//! instruction sets the fused host kernels use; [`apply_env`] checks its value.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::{Result, TrainError};

/// The environment variable `slime-trainer` reads the kernel path from.
pub const ENV_VAR: &str = "SLIME_KERNELS";

/// The CPU kernel path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    /// Fused CPU kernels: models' fused blocks, the objectives' host custom op, AdamW's host loop.
    Fused,
    /// Composed candle ops only, as on a GPU.
    Portable,
}

static HOST_OPTIMISER: AtomicBool = AtomicBool::new(true);

/// Selects the kernel path for the whole process (models, objectives and the optimiser).
pub fn set_kernel_path(path: KernelPath) {
    let fused = path == KernelPath::Fused;
    slime_models::step::set_fused(fused);
    slime_objectives::numerics::set_cpu_custom_op(fused);
    HOST_OPTIMISER.store(fused, Ordering::Relaxed);
}

/// The kernel path in force.
pub fn kernel_path() -> KernelPath {
    if HOST_OPTIMISER.load(Ordering::Relaxed) { KernelPath::Fused } else { KernelPath::Portable }
}

/// Whether AdamW may update f32 CPU variables with its host loop.
pub(crate) fn host_optimiser_enabled() -> bool {
    HOST_OPTIMISER.load(Ordering::Relaxed)
}

/// Parses a kernel path name: `fused` or `portable`.
pub fn parse_kernel_path(name: &str) -> Result<KernelPath> {
    match name {
        "fused" => Ok(KernelPath::Fused),
        "portable" => Ok(KernelPath::Portable),
        other => Err(TrainError::Config(format!("{ENV_VAR} = {other:?}: expected \"fused\" or \"portable\""))),
    }
}

/// Applies `SLIME_KERNELS` if it is set (unset: the fused default), and rejects a `SLIME_CPU`
/// the kernels would not understand.
pub fn apply_env() -> Result<KernelPath> {
    if let Ok(name) = std::env::var(ENV_VAR) {
        set_kernel_path(parse_kernel_path(name.trim())?);
    }
    if let Ok(name) = std::env::var(slime_kernels::cpu::ENV_VAR) {
        parse_cpu_path(name.trim())?;
    }
    Ok(kernel_path())
}

/// Parses a CPU path name for `SLIME_CPU`: `native`, `avx2` or `baseline`.
pub fn parse_cpu_path(name: &str) -> Result<slime_kernels::CpuPath> {
    slime_kernels::CpuPath::parse(name).ok_or_else(|| {
        TrainError::Config(format!(
            "{} = {name:?}: expected \"native\", \"avx2\" or \"baseline\"",
            slime_kernels::cpu::ENV_VAR
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_bad_names_say_what_is_expected() {
        assert_eq!(parse_kernel_path("fused").ok(), Some(KernelPath::Fused));
        assert_eq!(parse_kernel_path("portable").ok(), Some(KernelPath::Portable));
        let err = parse_kernel_path("gpu").expect_err("unknown name").to_string();
        assert!(err.contains("SLIME_KERNELS") && err.contains("portable"), "{err}");
        assert_eq!(parse_cpu_path("avx2").ok(), Some(slime_kernels::CpuPath::Avx2));
        let err = parse_cpu_path("avx512").expect_err("unknown name").to_string();
        assert!(err.contains("SLIME_CPU") && err.contains("baseline"), "{err}");
    }
}
