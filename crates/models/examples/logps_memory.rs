//! Peak memory of the token log-prob computation (issue 4: 8 x 2048 tokens, a 262,144-token
//! vocabulary, under 1 GiB; the full f32 logits alone would be 16 GiB):
//!
//! ```text
//! cargo run --release -p slime-models --example logps_memory -- [--train-head] [--old] [batch seq hidden vocab chunk]
//! ```
//!
//! `--old` runs the composition the crate used before the fused op (per chunk `fused::linear` then
//! `fused::log_softmax_gather`: the autograd graph keeps every chunk's logits until backward).
//!
//! Builds hidden states `[batch, seq, hidden]` (a variable, as they are in training) and an
//! lm_head `[vocab, hidden]` (frozen, as with LoRA; `--train-head`: a variable too, as in full
//! fine-tuning), then runs [`slime_models::logps::chunked_token_logps`] forward and backward to the
//! hidden states. Prints, from `/proc/self/status`, the resident set after the inputs exist and the
//! peak (`VmHWM`, reset before each pass through `/proc/self/clear_refs`) above it, per pass, and
//! the size of the gradients the backward pass returns (part of the peak: they are its output).
//! Defaults: 8 2048 640 262144 64 (Gemma-3-270M's width and vocabulary).

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use slime_models::logps::chunked_token_logps;

const MIB: f64 = 1024.0 * 1024.0;

/// A `/proc/self/status` field in bytes (`VmRSS`, `VmHWM`).
fn status(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        })
        .map_or(f64::NAN, |kb| kb * 1024.0)
}

/// Resets `VmHWM` to the current resident set (Linux `clear_refs` value 5).
fn reset_peak() {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        eprintln!("cannot reset the peak ({e}); figures include earlier peaks");
    }
}

fn main() -> slime_models::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let train_head = args.iter().any(|a| a == "--train-head");
    let old = args.iter().any(|a| a == "--old");
    let nums: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let get = |i: usize, d: usize| nums.get(i).copied().unwrap_or(d);
    let (batch, seq, hidden, vocab, chunk) = (get(0, 8), get(1, 2048), get(2, 640), get(3, 262_144), get(4, 64));
    let dev = Device::Cpu;
    let base = status("VmRSS");
    let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, seq, hidden), &dev)?)?;
    // A variable holds its own copy; the random tensor is dropped at the end of the block.
    let w = {
        let r = Tensor::randn(0f32, 0.02, (vocab, hidden), &dev)?;
        if train_head { Var::from_tensor(&r)?.as_tensor().clone() } else { r }
    };
    let ids: Vec<u32> = (0..batch * seq).map(|i| ((i as u64 * 2_654_435_761) % vocab as u64) as u32).collect();
    let ids = Tensor::from_vec(ids, (batch, seq), &dev)?;
    let inputs = status("VmRSS");
    let input_bytes = ((batch * seq * hidden + vocab * hidden) * 4 + batch * seq * 4) as f64;
    println!(
        "{}tokens {batch} x {seq}, hidden {hidden}, vocab {vocab}, chunk {chunk}, lm_head {}; inputs {:.0} MiB (RSS {:.0} -> {:.0} MiB)",
        if old { "OLD per-chunk composition: " } else { "" },
        if train_head { "trained" } else { "frozen" },
        input_bytes / MIB,
        base / MIB,
        inputs / MIB
    );
    reset_peak();
    let t = Instant::now();
    let logps = if old {
        old_logps(h.as_tensor(), &w, &ids, chunk)?
    } else {
        chunked_token_logps(h.as_tensor(), &w, &ids, chunk)?
    };
    let loss = logps.sum_all()?;
    let total = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let fwd_peak = status("VmHWM") - inputs;
    println!(
        "forward:  {:.1} s, peak above inputs {:.0} MiB (sum of log-probs {total:.1})",
        t.elapsed().as_secs_f64(),
        fwd_peak / MIB
    );
    reset_peak();
    let t = Instant::now();
    let grads = loss.backward()?;
    let bwd_peak = status("VmHWM") - inputs;
    let grad_bytes: usize = [h.as_tensor(), &w].iter().filter_map(|t| grads.get(t)).map(|g| g.elem_count() * 4).sum();
    println!(
        "backward: {:.1} s, peak above inputs {:.0} MiB, of which gradients {:.0} MiB (workspace {:.0} MiB)",
        t.elapsed().as_secs_f64(),
        bwd_peak / MIB,
        grad_bytes as f64 / MIB,
        (bwd_peak - grad_bytes as f64) / MIB
    );
    Ok(())
}

/// The previous implementation: per chunk of positions, `linear` then `log_softmax_gather`.
fn old_logps(hidden: &Tensor, w: &Tensor, ids: &Tensor, chunk: usize) -> slime_models::Result<Tensor> {
    let (batch, seq, _) = hidden.dims3()?;
    let mut parts = vec![Tensor::zeros((batch, 1), DType::F32, hidden.device())?];
    let mut start = 1;
    while start < seq {
        let len = chunk.min(seq - start);
        let h = hidden.narrow(1, start - 1, len)?.contiguous()?.reshape((batch * len, ()))?;
        let logits = slime_models::fused::linear(&h, w)?;
        let labels = ids.narrow(1, start, len)?.contiguous()?.flatten_all()?;
        parts.push(slime_models::fused::log_softmax_gather(&logits, &labels)?.reshape((batch, len))?);
        start += len;
    }
    Ok(Tensor::cat(&parts, 1)?)
}
