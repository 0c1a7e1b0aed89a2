//! CUDA against the CPU (built only with `--features cuda`, run by `scripts/gpu-run.sh` on a
//! machine with a GPU): every objective's loss and gradients, a tiny Llama's and Gemma 3's
//! log-prob gradients, and a short SFT + SLIME run, each equal to the CPU's within f32 rounding.
#![cfg(feature = "cuda")]

use std::collections::HashMap;

mod step_losses;

use candle_core::{DType, Device, Tensor, Var};
use slime_models::{CausalLm, GemmaConfig, LlamaConfig};
use slime_objectives::{
    CpoParams, DpoParams, IpoParams, Objective, ObjectiveInputs, OrpoParams, ReferenceLogps, SequenceLogps,
    SimpoParams, SlimeParams,
};
use slime_trainer::config::RunConfig;
use slime_trainer::run::run;
use step_losses::losses;

fn cuda() -> Device {
    Device::new_cuda(0).expect("a CUDA device (this test runs only on a GPU machine)")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_device(&Device::Cpu).and_then(|t| t.to_dtype(DType::F64)).expect("a");
    let b = b.to_device(&Device::Cpu).and_then(|t| t.to_dtype(DType::F64)).expect("b");
    (a - b).and_then(|d| d.abs()).and_then(|d| d.max_all()).and_then(|d| d.to_scalar::<f64>()).expect("diff")
}

/// Loss and gradients w.r.t. both sides' token log-probs of `objective` on `dev`.
fn objective_on(objective: &Objective, dev: &Device) -> (Tensor, Tensor, Tensor) {
    let chosen = [[-0.3f32, -1.2, -0.05, -2.0], [-0.9, -0.4, -0.7, -0.1], [-2.5, -0.2, -1.1, -0.6]];
    let rejected = [[-1.7f32, -0.6, -3.1, -0.2], [-0.35, -2.2, -1.4, -4.0], [-0.8, -0.5, -1.9, -2.6]];
    let mask = Tensor::new(&[[1u8, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dev).expect("mask");
    let c = Var::new(&chosen, dev).expect("chosen");
    let r = Var::new(&rejected, dev).expect("rejected");
    let mut inputs = ObjectiveInputs::preference(
        SequenceLogps::from_tokens(c.as_tensor(), &mask).expect("chosen logps"),
        SequenceLogps::from_tokens(r.as_tensor(), &mask).expect("rejected logps"),
    );
    let reference = ReferenceLogps::new(
        &Tensor::new(&[-2.0f32, -1.5, -3.0], dev).expect("ref"),
        &Tensor::new(&[-4.5f32, -8.0, -1.0], dev).expect("ref"),
    )
    .expect("reference");
    inputs = inputs.with_reference(reference);
    let loss = objective.compute(&inputs).expect("compute").loss;
    let grads = loss.backward().expect("backward");
    let grad =
        |v: &Var| grads.get(v.as_tensor()).cloned().unwrap_or_else(|| v.as_tensor().zeros_like().expect("zeros"));
    (loss, grad(&c), grad(&r))
}

#[test]
fn objectives_match_the_cpu() {
    let gpu = cuda();
    let objectives = [
        Objective::Slime(SlimeParams::paper()),
        Objective::Dpo(DpoParams::default()),
        Objective::Ipo(IpoParams::default()),
        Objective::Simpo(SimpoParams::default()),
        Objective::Cpo(CpoParams::default()),
        Objective::Orpo(OrpoParams::default()),
    ];
    for objective in objectives {
        let (cpu_loss, cpu_c, cpu_r) = objective_on(&objective, &Device::Cpu);
        let (gpu_loss, gpu_c, gpu_r) = objective_on(&objective, &gpu);
        for (what, a, b) in
            [("loss", &cpu_loss, &gpu_loss), ("d chosen", &cpu_c, &gpu_c), ("d rejected", &cpu_r, &gpu_r)]
        {
            let diff = max_abs_diff(a, b);
            assert!(diff <= 1e-5, "{objective:?} {what}: CPU and CUDA differ by {diff}");
        }
    }
}

/// Summed token log-probs of a fixed batch and their gradients, by weight name.
fn logp_gradients(lm: &CausalLm, dev: &Device) -> (Tensor, HashMap<String, Tensor>) {
    let ids = Tensor::new(&[[1u32, 5, 9, 3, 7, 2, 0, 0], [4, 8, 6, 1, 2, 9, 5, 3]], dev).expect("ids");
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], dev).expect("mask");
    let total = lm.model().token_logps(&ids, Some(&mask), 64).and_then(|t| Ok(t.sum_all()?)).expect("logps");
    let grads = total.backward().expect("backward");
    let by_name = lm
        .trainable_vars()
        .into_iter()
        .map(|(name, var)| (name, grads.get(var.as_tensor()).expect("gradient").clone()))
        .collect();
    (total, by_name)
}

#[test]
fn models_match_the_cpu() {
    let gpu = cuda();
    let llama = LlamaConfig::tiny(10, 32, 64, 2, 4, 2);
    let gemma = GemmaConfig::tiny3(10, 32, 64, 2, 4, 2);
    let makers: [(&str, Box<dyn Fn(&Device) -> CausalLm>); 2] = [
        ("llama", Box::new(|d: &Device| CausalLm::random(&llama, 3, d).expect("llama"))),
        ("gemma3", Box::new(|d: &Device| CausalLm::random(&gemma, 3, d).expect("gemma"))),
    ];
    for (name, make) in makers {
        let (cpu_total, cpu_grads) = logp_gradients(&make(&Device::Cpu), &Device::Cpu);
        let (gpu_total, gpu_grads) = logp_gradients(&make(&gpu), &gpu);
        let diff = max_abs_diff(&cpu_total, &gpu_total);
        assert!(diff <= 1e-3, "{name}: summed log-probs differ by {diff}");
        for (weight, g) in &cpu_grads {
            let diff = max_abs_diff(g, &gpu_grads[weight]);
            assert!(diff <= 1e-4, "{name} {weight}: gradients differ by {diff}");
        }
    }
}

#[test]
fn a_short_run_matches_the_cpu() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut cfg = RunConfig::default();
    cfg.model.hidden = 32;
    cfg.model.layers = 2;
    cfg.data.pairs = 48;
    cfg.data.eval_pairs = 8;
    cfg.sft.steps = 4;
    cfg.preference.steps = 4;
    cfg.preference.objective = Objective::Slime(SlimeParams::paper());
    cfg.eval.generations = 2;
    cfg.eval.max_new_tokens = 6;
    cfg.eval.every = 100;
    cfg.checkpoint.every = 0;
    run(&cfg, &tmp.path().join("cpu")).expect("CPU run");
    cfg.model.device = "cuda".into();
    run(&cfg, &tmp.path().join("cuda")).expect("CUDA run");
    let (cpu, gpu) = (losses(&tmp.path().join("cpu")), losses(&tmp.path().join("cuda")));
    assert_eq!(cpu.keys().collect::<Vec<_>>(), gpu.keys().collect::<Vec<_>>(), "logged steps differ");
    assert!(cpu.len() >= 8, "expected SFT and preference steps, got {cpu:?}");
    for (step, x) in &cpu {
        let y = gpu[step];
        assert!((x - y).abs() <= 1e-3 * x.abs().max(1.0), "{step:?}: CPU loss {x}, CUDA {y}");
    }
}
