//! The portable path (composed candle ops, what CUDA and bf16 run) checked on the CPU against the
//! fused kernels: a model's log-prob gradients, and short SFT + SLIME and SFT + DPO runs, give
//! the same numbers within float rounding; a bf16 run stays within bf16's precision of f32.
//!
//! The kernel path is process-wide, so everything runs in one test, one path after the other.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

mod step_losses;

use candle_core::{DType, Device, Tensor};
use slime_models::{CausalLm, GemmaConfig, LlamaConfig};
use slime_objectives::{DpoParams, Objective, SlimeParams};
use slime_trainer::config::RunConfig;
use slime_trainer::kernels::{KernelPath, set_kernel_path};
use slime_trainer::run::run;
use step_losses::losses;

/// Gradients of the summed token log-probs of a fixed batch, by weight name.
fn logp_gradients(lm: &CausalLm) -> (f64, HashMap<String, Tensor>) {
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[1u32, 5, 9, 3, 7, 2, 0, 0], [4, 8, 6, 1, 2, 9, 5, 3]], &dev).expect("ids");
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], &dev).expect("mask");
    let logps = lm.model().token_logps(&ids, Some(&mask), 64).expect("logps");
    let total = logps.sum_all().expect("sum");
    let grads = total.backward().expect("backward");
    let by_name = lm
        .trainable_vars()
        .into_iter()
        .map(|(name, var)| (name, grads.get(var.as_tensor()).expect("every weight has a gradient").clone()))
        .collect();
    (total.to_scalar::<f32>().expect("scalar") as f64, by_name)
}

fn max_abs_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(name, x)| {
            let y = b[name].to_dtype(DType::F32).expect("f32");
            let d = (x.to_dtype(DType::F32).expect("f32") - y).expect("sub").abs().expect("abs");
            d.max_all().expect("max").to_scalar::<f32>().expect("scalar") as f64
        })
        .fold(0.0, f64::max)
}

fn check_model_gradients(name: &str, make: &dyn Fn() -> CausalLm) {
    set_kernel_path(KernelPath::Fused);
    let (fused_total, fused) = logp_gradients(&make());
    set_kernel_path(KernelPath::Portable);
    let (portable_total, portable) = logp_gradients(&make());
    set_kernel_path(KernelPath::Fused);
    assert!(
        (fused_total - portable_total).abs() <= 1e-4 * fused_total.abs().max(1.0),
        "{name}: {fused_total} vs {portable_total}"
    );
    let diff = max_abs_diff(&fused, &portable);
    assert!(diff <= 1e-4, "{name}: gradients differ by {diff}");
}

fn tiny_run(objective: Objective, dtype: &str) -> RunConfig {
    let mut cfg = RunConfig::default();
    cfg.model.hidden = 32;
    cfg.model.layers = 2;
    cfg.model.dtype = dtype.into();
    cfg.data.pairs = 48;
    cfg.data.eval_pairs = 8;
    cfg.sft.steps = 4;
    cfg.preference.steps = 4;
    cfg.preference.objective = objective;
    cfg.eval.generations = 2;
    cfg.eval.max_new_tokens = 6;
    cfg.eval.every = 100;
    cfg.checkpoint.every = 0;
    cfg
}

fn weights(run_dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(run_dir.join("model/model.safetensors"), &Device::Cpu).expect("model")
}

/// Runs `cfg` on `path`; the per-step losses and final weights.
fn train(cfg: &RunConfig, path: KernelPath, dir: &Path) -> (BTreeMap<(String, u64), f64>, HashMap<String, Tensor>) {
    set_kernel_path(path);
    let result = run(cfg, dir);
    set_kernel_path(KernelPath::Fused);
    result.expect("run");
    (losses(dir), weights(dir))
}

fn assert_losses_close(what: &str, a: &BTreeMap<(String, u64), f64>, b: &BTreeMap<(String, u64), f64>, rel: f64) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}: logged steps differ");
    assert!(a.len() >= 8, "{what}: expected SFT and preference steps, got {a:?}");
    for (key, x) in a {
        let y = b[key];
        assert!((x - y).abs() <= rel * x.abs().max(1.0), "{what} {key:?}: {x} vs {y}");
    }
}

#[test]
fn the_portable_path_gives_the_fused_numbers() {
    check_model_gradients("llama", &|| {
        CausalLm::random(&LlamaConfig::tiny(10, 32, 64, 2, 4, 2), 3, &Device::Cpu).expect("llama")
    });
    check_model_gradients("gemma3", &|| {
        CausalLm::random(&GemmaConfig::tiny3(10, 32, 64, 2, 4, 2), 3, &Device::Cpu).expect("gemma")
    });

    let tmp = tempfile::tempdir().expect("tmp");
    let objectives = [("slime", Objective::Slime(SlimeParams::paper())), ("dpo", Objective::Dpo(DpoParams::default()))];
    for (name, objective) in objectives {
        let cfg = tiny_run(objective, "f32");
        let fused_dir = tmp.path().join(format!("{name}-fused"));
        let portable_dir = tmp.path().join(format!("{name}-portable"));
        let (fused_losses, fused_weights) = train(&cfg, KernelPath::Fused, &fused_dir);
        let (portable_losses, portable_weights) = train(&cfg, KernelPath::Portable, &portable_dir);
        assert_losses_close(name, &fused_losses, &portable_losses, 1e-4);
        // AdamW divides by sqrt(v): where a gradient is nearly zero, rounding moves a weight by
        // up to the learning rate per step, so the weights get a wider bound than the losses.
        let diff = max_abs_diff(&fused_weights, &portable_weights);
        assert!(diff <= 1e-3, "{name}: final weights differ by {diff}");

        // bf16 runs the portable path whatever the switch says; its losses track f32's
        // within bf16's 8-bit mantissa over a few steps.
        let bf16_dir = tmp.path().join(format!("{name}-bf16"));
        let (bf16_losses, _) = train(&tiny_run(cfg.preference.objective.clone(), "bf16"), KernelPath::Fused, &bf16_dir);
        assert_losses_close(&format!("{name} bf16"), &fused_losses, &bf16_losses, 3e-2);
    }
}
