//! `slime-step-bench`: training-step speed on the reference workload (docs/performance.md), one JSON line
//! per run (what `cargo xtask bench` runs, one fresh process per objective).
//!
//! Workload (kept identical to the PyTorch/TRL anchors in `bench/pytorch-anchor`): a random-init
//! Llama (vocab 512, hidden 256, intermediate 688, 4 layers, 8 heads, 4 key/value heads, untied
//! embeddings, f32, 3,164,416 parameters); 256 seeded pairs (prompt = `<bos>` + 31 tokens, chosen
//! and rejected = 95 tokens + `</s>`); batches of 8 pairs as one `[16, 128]` forward (chosen rows,
//! then rejected rows), or with `--parallel-micro-batches K` as K micro-batches run at once, each
//! loss scaled by its share of the batch and the gradients summed in order; AdamW lr 1e-5 with linear decay, weight decay 0, gradient clipping 1.0;
//! 20 steps; 2 threads. Objectives: `simpo` (beta 0.1, gamma 0.5), `slime` (paper preset),
//! `dpo-precomputed` (beta 0.1, reference log-prob sums computed once before timing) and
//! `dpo-live` (beta 0.1, a frozen reference model's forward pass every step).
//!
//! Timing: per-step wall time end to end (batch assembly, forward, loss, backward, norm,
//! optimiser), the first step excluded as warm-up, median of the rest. Tokens per step count 224
//! per pair (prompt once + chosen + rejected = 1,792 per step), as the anchors do. GFLOP/s =
//! `6 x 3,033,344 trainable non-embedding parameters (every layer, the final norm and lm_head;
//! not the input embedding) x 2,048 positions` per step (`+ 2 x params x positions` for the live
//! reference forward) / median step time. Peak RSS is `VmHWM` from `/proc/self/status`.
//!
//! Pairs are scored with `Model::pair_token_logps` (each pair packed around its shared prompt,
//! 1,792 positions instead of 2,048; the same numbers within float rounding); `--separate-rows`
//! scores the 16 rows as they are. The GFLOP count stays the workload's (2,048 positions), so
//! packing shows as a higher rate. `--hidden H --seq S` scale the workload (`cargo xtask bench
//! --scaling`): intermediate `688 / 256 x H` rounded to a multiple of 8, heads 8 and 4 (head_dim
//! `H / 8`), prompt `S / 4` and responses `3 S / 4` tokens; `attention_gflop_per_step` counts the
//! causal score and value products (forward `2 x 2 x rows x heads x head_dim x S^2 / 2` a layer,
//! backward twice that) and `total_gflop_per_s` divides both counts by the step time.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use slime_models::step::{DirectGrads, on_this_thread};
use slime_models::{CausalLm, LlamaConfig, LoraConfig};
use slime_objectives::{
    DpoParams, Objective, ObjectiveInputs, ReferenceLogps, SequenceLogps, SimpoParams, SlimeParams,
};
use slime_trainer::optim::{AdamW, AdamWConfig, clip_coefficient};
use slime_trainer::schedule::Schedule;

const VOCAB: usize = 512;
const LAYERS: usize = 4;
const HEADS: usize = 8;
const KV_HEADS: usize = 4;
const PAIRS: usize = 256;
const BOS: u32 = 1;
const EOS: u32 = 2;
const FIRST_WORD: u32 = 4;

/// The model width and sequence length of a run (the reference workload: 256 and 128).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Shape {
    hidden: usize,
    seq: usize,
}

impl Shape {
    /// Prompt tokens: a quarter of the sequence (32 of 128).
    fn prompt(&self) -> usize {
        self.seq / 4
    }

    /// Tokens of each response: the rest (96 of 128).
    fn completion(&self) -> usize {
        self.seq - self.prompt()
    }

    /// The MLP width: 688 / 256 of the hidden size, rounded to a multiple of 8 (688, 1376, 2752).
    fn intermediate(&self) -> usize {
        ((self.hidden * 688) as f64 / 256.0 / 8.0).round() as usize * 8
    }

    fn check(&self) -> Result<()> {
        if self.hidden == 0 || !self.hidden.is_multiple_of(2 * HEADS) {
            bail!(
                "--hidden {} must be a positive multiple of {} (an even head_dim over {HEADS} heads)",
                self.hidden,
                2 * HEADS
            );
        }
        if self.seq < 8 || !self.seq.is_multiple_of(4) {
            bail!("--seq {} must be a multiple of 4, at least 8", self.seq);
        }
        Ok(())
    }

    /// Causal attention score and value products a step, in GFLOP (not in the 6 x params x
    /// positions count): forward `2 products x 2 x rows x heads x head_dim x seq^2 / 2` a layer,
    /// backward twice the forward, for `rows` sequences of `seq` tokens.
    fn attention_gflop(&self, rows: usize) -> f64 {
        let head_dim = (self.hidden / HEADS) as f64;
        let forward = 2.0 * 2.0 * rows as f64 * HEADS as f64 * head_dim * (self.seq * self.seq) as f64 / 2.0;
        3.0 * forward * LAYERS as f64 / 1e9
    }
}

#[derive(Parser)]
#[command(about = "Training-step speed on the reference workload (docs/performance.md); prints one JSON line")]
struct Args {
    /// `simpo`, `slime`, `dpo-precomputed` or `dpo-live`.
    #[arg(long)]
    objective: String,
    /// Optimiser steps (the first is warm-up and not in the median).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Pairs per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Threads (sets `RAYON_NUM_THREADS` unless it is already set).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seed of the model initialisation (the data seed is fixed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Model width (heads stay 8 and 4, so head_dim = hidden / 8; the MLP scales along).
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Tokens per sequence: a quarter prompt, the rest response.
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Score chosen and rejected as separate rows (the prompt computed twice) instead of
    /// packing each pair around its shared prompt (`Model::pair_token_logps`).
    #[arg(long)]
    separate_rows: bool,
    /// Gradient checkpointing: the fused blocks keep only their inputs and recompute their
    /// activations in the backward pass (less memory, about a third more forward work).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Route the weights' gradients through candle's graph instead of handing them over
    /// directly (`slime_models::step::DirectGrads`, what the trainer does).
    #[arg(long)]
    graph_weight_grads: bool,
    /// Split each batch into this many micro-batches run at once, one per pool thread, with
    /// their gradients summed in order (the trainer's `parallel_micro_batches`); 1 = one forward
    /// pass of the whole batch
    #[arg(long, default_value_t = 1)]
    parallel_micro_batches: usize,
    /// Train LoRA adapters of this rank (alpha twice the rank, on q, k, v, o, gate, up and
    /// down; seed 1) on the frozen model instead of every weight; 0 = full fine-tuning. The
    /// GFLOP figures then count the adapters as the trained parameters: compare step times.
    #[arg(long, default_value_t = 0)]
    lora: usize,
}

fn config(shape: Shape) -> LlamaConfig {
    let mut cfg = LlamaConfig::tiny(VOCAB, shape.hidden, shape.intermediate(), LAYERS, HEADS, KV_HEADS);
    cfg.tie_word_embeddings = false;
    cfg.max_position_embeddings = shape.seq.max(512);
    cfg.rms_norm_eps = 1e-6;
    cfg
}

/// `(prompt + chosen, prompt + rejected)` token rows of the 256 synthetic pairs.
fn pairs(seed: u64, shape: Shape) -> Vec<(Vec<u32>, Vec<u32>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut words = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(FIRST_WORD..VOCAB as u32)).collect() };
    (0..PAIRS)
        .map(|_| {
            let mut prompt = vec![BOS];
            prompt.extend(words(shape.prompt() - 1));
            let mut chosen = prompt.clone();
            chosen.extend(words(shape.completion() - 1));
            chosen.push(EOS);
            let mut rejected = prompt;
            rejected.extend(words(shape.completion() - 1));
            rejected.push(EOS);
            (chosen, rejected)
        })
        .collect()
}

/// Token ids `[2 n, seq]` (chosen rows, then rejected rows) of the pairs `idx`.
fn batch_ids(data: &[(Vec<u32>, Vec<u32>)], idx: &[usize], seq: usize) -> Result<Tensor> {
    let mut ids = Vec::with_capacity(2 * idx.len() * seq);
    for &i in idx {
        ids.extend_from_slice(&data[i].0);
    }
    for &i in idx {
        ids.extend_from_slice(&data[i].1);
    }
    Ok(Tensor::from_vec(ids, (2 * idx.len(), seq), &Device::Cpu)?)
}

/// Chosen and rejected per-token log-probs with their completion masks.
fn split(logps: &Tensor, completion: &Tensor, n: usize) -> Result<(SequenceLogps, SequenceLogps)> {
    Ok((
        SequenceLogps::from_tokens(&logps.narrow(0, 0, n)?, &completion.narrow(0, 0, n)?)?,
        SequenceLogps::from_tokens(&logps.narrow(0, n, n)?, &completion.narrow(0, n, n)?)?,
    ))
}

fn vm_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Busy jiffies of the whole machine (user + nice + system + irq + softirq + steal).
fn machine_busy_jiffies() -> u64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> =
        text.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 8 {
        return 0;
    }
    v[..8].iter().sum::<u64>() - v[3] - v[4]
}

/// CPU jiffies of this process (user + system).
fn own_jiffies() -> u64 {
    let text = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = text.rsplit_once(')').map_or("", |(_, r)| r);
    // After the command: state, ppid, pgrp, session, tty_nr, tpgid, flags, minflt, cminflt,
    // majflt, cmajflt, utime (index 11), stime (index 12).
    let f: Vec<&str> = after.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let m = s.len() / 2;
    if s.len() % 2 == 1 { s[m] } else { (s[m - 1] + s[m]) / 2.0 }
}

/// Non-embedding parameters the step trains: every layer, the final norm and `lm_head`.
fn non_embedding_params(lm: &CausalLm) -> usize {
    lm.trainable_vars().iter().filter(|(n, _)| n != "model.embed_tokens.weight").map(|(_, v)| v.elem_count()).sum()
}

fn main() -> Result<()> {
    slime_trainer::logging::init_logging();
    let args = Args::parse();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: single-threaded at this point (before any pool or candle op exists).
        unsafe { std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string()) };
    }
    // SAFETY: as above.
    unsafe { slime_trainer::threads::keep_candle_off_its_own_pool() };
    if !slime_trainer::malloc::keep_freed_memory() {
        eprintln!("warning: glibc refused an allocator setting");
    }
    let threads: usize = std::env::var("RAYON_NUM_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(args.threads);
    // The step runs on a pool thread, so its parallel regions fork from a worker instead of
    // waking the pool and parking the main thread every time.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().context("rayon pool")?;
    pool.install(|| bench(args, threads))
}

fn bench(args: Args, threads: usize) -> Result<()> {
    let (objective, reference) = match args.objective.as_str() {
        "simpo" => (Objective::Simpo(SimpoParams { beta: 0.1, gamma_beta_ratio: 5.0, label_smoothing: 0.0 }), None),
        "slime" => (Objective::Slime(SlimeParams::paper()), None),
        "dpo-precomputed" => (Objective::Dpo(DpoParams::default()), Some(false)),
        "dpo-live" => (Objective::Dpo(DpoParams::default()), Some(true)),
        other => bail!("unknown objective `{other}` (simpo, slime, dpo-precomputed, dpo-live)"),
    };
    if args.steps < 2 || args.batch == 0 || args.batch > PAIRS {
        bail!("need --steps >= 2 and 1 <= --batch <= {PAIRS}");
    }
    let parallel = args.parallel_micro_batches;
    if parallel == 0 || !args.batch.is_multiple_of(parallel) {
        bail!("--parallel-micro-batches {parallel}: expected a divisor of --batch {}", args.batch);
    }
    let shape = Shape { hidden: args.hidden, seq: args.seq };
    shape.check()?;
    let (seq, prompt) = (shape.seq, shape.prompt());
    // Positions per log-prob chunk: the whole sequence (seq x 512 logits per row are small).
    let logp_chunk = seq;
    let separate = args.separate_rows;
    // Log-probs of the completion positions `wanted` marks (the objectives read no others).
    let token_logps = |lm: &CausalLm, ids: &Tensor, mask: &Tensor, wanted: &Tensor| -> Result<Tensor> {
        Ok(if separate {
            lm.model().token_logps(ids, Some(mask), logp_chunk)?
        } else {
            lm.model().pair_token_logps_at(ids, Some(mask), wanted, logp_chunk)?
        })
    };
    let rss_start_kib = vm_kib("VmRSS:");
    let t_setup = Instant::now();
    let dev = Device::Cpu;
    let cfg = config(shape);
    let mut lm = CausalLm::random(&cfg, args.seed, &dev)?;
    if args.lora > 0 {
        let r = args.lora;
        lm = lm.with_lora(LoraConfig::new(r, 2.0 * r as f64, &slime_models::lora::ADAPTABLE), 1)?;
    }
    lm.model().set_gradient_checkpointing(args.gradient_checkpointing)?;
    let data = pairs(1234, shape);
    let n = args.batch;
    let mut completion = vec![0u8; 2 * n * seq];
    for row in completion.chunks_exact_mut(seq) {
        row[prompt..].fill(1);
    }
    let completion = Tensor::from_vec(completion, (2 * n, seq), &dev)?;
    let attention = Tensor::ones((2 * n, seq), DType::U8, &dev)?;
    let mut order: Vec<usize> = (0..PAIRS).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(0));
    let pick = |step: usize| -> Vec<usize> { (0..n).map(|j| order[(step * n + j) % PAIRS]).collect() };

    // The frozen reference: a copy of the starting weights (TRL's `ref_model`).
    let reference_model = match reference {
        Some(_) => {
            let weights = lm.weights().into_iter().map(|(k, t)| Ok((k, t.copy()?))).collect::<Result<_>>()?;
            Some(CausalLm::from_tensors(&cfg, weights)?)
        }
        None => None,
    };
    // The live reference's sums for the pairs of `ids` (`[2 pairs, seq]`: a batch or a micro-batch).
    let reference_sums = |ids: &Tensor| -> Result<ReferenceLogps> {
        let model = reference_model.as_ref().context("reference model")?;
        let rows = ids.dim(0)?;
        let wanted = completion.narrow(0, 0, rows)?;
        let logps = token_logps(model, ids, &attention.narrow(0, 0, rows)?, &wanted)?.detach();
        let (c, r) = split(&logps, &wanted, rows / 2)?;
        Ok(ReferenceLogps::new(c.sum(), r.sum())?)
    };
    // dpo-precomputed: every pair's reference sums once, before timing (as `run` does).
    let mut precomputed: Vec<(f32, f32)> = vec![(0.0, 0.0); PAIRS];
    let t_ref = Instant::now();
    if reference == Some(false) {
        let model = reference_model.as_ref().context("reference model")?;
        for chunk in (0..PAIRS).collect::<Vec<_>>().chunks(n) {
            let ids = batch_ids(&data, chunk, seq)?;
            let mask = Tensor::ones((2 * chunk.len(), seq), DType::U8, &dev)?;
            let wanted = completion.narrow(0, 0, 2 * chunk.len())?;
            let logps = token_logps(model, &ids, &mask, &wanted)?.detach();
            let (c, r) = split(&logps, &wanted, chunk.len())?;
            let (c, r): (Vec<f32>, Vec<f32>) = (c.sum().to_vec1()?, r.sum().to_vec1()?);
            for (k, &i) in chunk.iter().enumerate() {
                precomputed[i] = (c[k], r[k]);
            }
        }
    }
    let reference_precompute_s = t_ref.elapsed().as_secs_f64();

    let mut opt = AdamW::new(lm.trainable_vars(), AdamWConfig::default())?;
    let schedule = Schedule::default(); // lr 1e-5, linear decay, no warmup
    let setup_s = t_setup.elapsed().as_secs_f64();
    let rss_before_train_kib = vm_kib("VmRSS:");

    let meter = lm.model().activation_meter();
    if let Some(m) = meter {
        m.reset_peak();
    }
    // One micro-batch: forward, loss (scaled by its share of the optimiser batch, as the
    // trainer's `BatchTotals` normalisation does), backward.
    let per = n / parallel;
    let micro_batch = |idx: &[usize]| -> Result<(candle_core::backprop::GradStore, f64)> {
        let ids = batch_ids(&data, idx, seq)?;
        let rows = 2 * idx.len();
        let wanted = completion.narrow(0, 0, rows)?;
        let direct = DirectGrads::new();
        let logps = if args.graph_weight_grads {
            token_logps(&lm, &ids, &attention.narrow(0, 0, rows)?, &wanted)?
        } else {
            direct.forward(|| token_logps(&lm, &ids, &attention.narrow(0, 0, rows)?, &wanted))?
        };
        let (chosen, rejected) = split(&logps, &wanted, idx.len())?;
        let mut inputs = ObjectiveInputs::preference(chosen, rejected);
        match reference {
            Some(true) => inputs = inputs.with_reference(reference_sums(&ids)?),
            Some(false) => {
                let (c, r): (Vec<f32>, Vec<f32>) = idx.iter().map(|&i| precomputed[i]).unzip();
                inputs = inputs.with_reference(ReferenceLogps::new(&Tensor::new(c, &dev)?, &Tensor::new(r, &dev)?)?);
            }
            None => {}
        }
        let mut loss = objective.as_loss().compute(&inputs)?.loss;
        if parallel > 1 {
            loss = (loss * (idx.len() as f64 / n as f64))?;
        }
        let value = f64::from(loss.to_scalar::<f32>()?);
        let grads = direct.backward(&loss)?;
        Ok((grads, value))
    };
    let (mut step_s, mut fwd_bwd_s, mut opt_s, mut losses) = (vec![], vec![], vec![], vec![]);
    let (busy0, own0) = (machine_busy_jiffies(), own_jiffies());
    let loop_start = Instant::now();
    let mut prev = loop_start;
    for step in 0..args.steps {
        let idx = pick(step);
        #[cfg(feature = "product-stats")]
        if step == 1 {
            slime_kernels::product_stats::reset();
        }
        let t0 = Instant::now();
        let outcomes: Vec<Result<_>> = if parallel == 1 {
            vec![micro_batch(&idx)]
        } else {
            idx.par_chunks(per).map(|c| on_this_thread(|| micro_batch(c))).collect()
        };
        let (mut grads, mut loss) = (None, 0.0);
        for outcome in outcomes {
            let (g, value) = outcome?;
            loss += value;
            match &mut grads {
                None => grads = Some(g),
                Some(acc) => opt.accumulate(acc, &g)?,
            }
        }
        let grads = grads.context("no micro-batch")?;
        let t1 = Instant::now();
        let norm = opt.grad_norm(&grads)?;
        opt.step(&grads, schedule.lr_at(step as u64, args.steps as u64), clip_coefficient(norm, Some(1.0)))?;
        drop(grads);
        losses.push(loss);
        let t2 = Instant::now();
        step_s.push((t2 - prev).as_secs_f64());
        fwd_bwd_s.push((t1 - t0).as_secs_f64());
        opt_s.push((t2 - t1).as_secs_f64());
        prev = t2;
    }
    let loop_wall = loop_start.elapsed().as_secs_f64();
    #[cfg(feature = "product-stats")]
    let products = product_figures(
        slime_kernels::product_stats::snapshot(),
        args.steps.saturating_sub(1),
        // Concurrent micro-batches run each product on one thread, one pass on all of them.
        slime_kernels::peak::fma_peak_gflops(if args.parallel_micro_batches > 1 { 1 } else { threads }, 200_000_000),
    );
    #[cfg(not(feature = "product-stats"))]
    let products = serde_json::Value::Null;
    let hz = 100.0; // USER_HZ on Linux
    let (busy, own) = ((machine_busy_jiffies() - busy0) as f64 / hz, (own_jiffies() - own0) as f64 / hz);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let foreign = ((busy - own).max(0.0) / (loop_wall * cpus) * 1000.0).round() / 1000.0;
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let steady = &step_s[1..];
    let s_step = median(steady);
    let tokens_per_step = n * (prompt + 2 * shape.completion());
    let positions = 2 * n * seq;
    let params = non_embedding_params(&lm);
    let mut flop = 6.0 * params as f64 * positions as f64;
    if reference == Some(true) {
        flop += 2.0 * params as f64 * positions as f64;
    }
    let r4 = |v: f64| (v * 1e4).round() / 1e4;
    let mib = |kib: u64| (kib as f64 / 1024.0 * 10.0).round() / 10.0;
    let attention_flop = shape.attention_gflop(2 * n) * 1e9;
    let mut line = serde_json::json!({
        "label": format!("{}-slime-rs", args.objective),
        "objective": args.objective,
        "hidden": shape.hidden,
        "seq": seq,
        "pairs_packed": !separate,
        "gradient_checkpointing": args.gradient_checkpointing,
        "graph_weight_grads": args.graph_weight_grads,
        "steps": args.steps,
        "batch_pairs": n,
        "parallel_micro_batches": parallel,
        "lora_rank": args.lora,
        "threads": threads,
        "tokens_per_step": tokens_per_step,
        "first_step_s": r4(step_s[0]),
        "s_per_step_steady_median": r4(s_step),
        "s_per_step_steady_mean": r4(steady.iter().sum::<f64>() / steady.len() as f64),
        "s_per_step_steady_min": r4(steady.iter().copied().fold(f64::INFINITY, f64::min)),
        "tok_per_s_steady": (tokens_per_step as f64 / s_step * 10.0).round() / 10.0,
        "forward_backward_s_median": r4(median(&fwd_bwd_s[1..])),
        "optimizer_s_median": r4(median(&opt_s[1..])),
        "gflop_per_step": (flop / 1e9 * 100.0).round() / 100.0,
        "gflop_per_s": (flop / 1e9 / s_step * 10.0).round() / 10.0,
        "attention_gflop_per_step": (attention_flop / 1e9 * 100.0).round() / 100.0,
        "total_gflop_per_s": ((flop + attention_flop) / 1e9 / s_step * 10.0).round() / 10.0,
        "non_embedding_params": params,
        "peak_rss_mib": mib(vm_kib("VmHWM:")),
        // What the fused blocks kept for the backward pass at most (q|k|v, attention output,
        // gate|up; 0 with gradient checkpointing); the rest of the RSS is weights, gradients,
        // AdamW moments, the residual stream and transient buffers.
        "saved_activations_peak_mib": meter.map(|m| (m.peak_bytes() as f64 / (1 << 20) as f64 * 10.0).round() / 10.0),
        "rss_start_mib": mib(rss_start_kib),
        "rss_before_train_mib": mib(rss_before_train_kib),
        "rss_end_mib": mib(vm_kib("VmRSS:")),
        "setup_s": r4(setup_s),
        "reference_precompute_s": r4(reference_precompute_s),
        "own_cpu_util": ((own / loop_wall) * 100.0).round() / 100.0,
        "loop_own_cpu_s": (own * 100.0).round() / 100.0,
        "loop_wall_s": r4(loop_wall),
        "foreign_cpu_frac": foreign,
        "loadavg": loadavg.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        "train_loss": r4(losses.iter().sum::<f64>() / losses.len() as f64),
        "first_loss": r4(losses[0]),
        "last_loss": r4(*losses.last().unwrap_or(&f64::NAN)),
        // Feature `product-stats` only: the fused kernels' matrix products over the steady steps.
        "products": products,
    });
    // `SLIME_CPU`: what the kernels may use (`native`, or capped at `avx2` / `baseline`).
    line["cpu_path"] = slime_kernels::cpu::path().name().into();
    println!("{line}");
    Ok(())
}

/// Per steady step: the products' summed call time (wall time when one micro-batch runs at a
/// time; concurrent micro-batches' calls overlap), GFLOP and calls, and the small ones'
/// (attention's per-head products) separately; their rate (operations over summed call time)
/// against the FMA peak, measured after the steps ([`slime_kernels::peak`]) with the threads one
/// product runs on.
#[cfg(feature = "product-stats")]
fn product_figures(s: slime_kernels::product_stats::ProductStats, steps: usize, peak: f64) -> serde_json::Value {
    let per = |v: f64| (v / steps.max(1) as f64 * 1e4).round() / 1e4;
    let rate = s.flop as f64 / 1e9 / s.seconds.max(1e-9);
    serde_json::json!({
        "gflop_per_s": (rate * 10.0).round() / 10.0,
        "fma_peak_gflop_per_s": (peak * 10.0).round() / 10.0,
        "share_of_fma_peak": (rate / peak * 1000.0).round() / 1000.0,
        "call_s_per_step": per(s.seconds),
        "gflop_per_step": per(s.flop as f64 / 1e9),
        "calls_per_step": per(s.calls as f64),
        "small_call_s_per_step": per(s.small_seconds),
        "small_gflop_per_step": per(s.small_flop as f64 / 1e9),
        "small_calls_per_step": per(s.small_calls as f64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_workload_keeps_its_shape_and_flop_count() -> Result<()> {
        let shape = Shape { hidden: 256, seq: 128 };
        assert_eq!((shape.prompt(), shape.completion(), shape.intermediate()), (32, 96, 688));
        let lm = CausalLm::random(&config(shape), 0, &Device::Cpu)?;
        // 4 x (4 x 256^2 q,o + 2 x 256 x 128 k,v + 3 x 256 x 688 + 2 x 256 norms) + 256 + 512 x 256
        assert_eq!(non_embedding_params(&lm), 3_033_344);
        let gflop: f64 = 6.0 * 3_033_344.0 * 2048.0 / 1e9;
        assert!((gflop - 37.27).abs() < 0.01, "{gflop}");
        // 3 x 4 layers x 2 x 2 x 16 rows x 8 heads x 32 x 128^2 / 2 = 1.61 GFLOP
        assert!((shape.attention_gflop(16) - 1.610_612_736).abs() < 1e-9);
        Ok(())
    }

    /// Every objective runs end to end, as one pass and as 2 micro-batches at once (a small
    /// shape: the timing is not the point); a micro-batch count that does not divide the batch is
    /// refused.
    #[test]
    fn every_objective_runs_as_one_pass_and_as_parallel_micro_batches() -> Result<()> {
        for objective in ["simpo", "slime", "dpo-precomputed", "dpo-live"] {
            for parallel in ["1", "2"] {
                let args = Args::parse_from([
                    "slime-step-bench",
                    "--objective",
                    objective,
                    "--steps",
                    "2",
                    "--batch",
                    "4",
                    "--hidden",
                    "32",
                    "--seq",
                    "16",
                    "--parallel-micro-batches",
                    parallel,
                ]);
                bench(args, 1).with_context(|| format!("{objective} with {parallel} micro-batches at once"))?;
            }
        }
        let odd = Args::parse_from([
            "slime-step-bench",
            "--objective",
            "simpo",
            "--batch",
            "4",
            "--parallel-micro-batches",
            "3",
        ]);
        let e = bench(odd, 1).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("--parallel-micro-batches 3"), "{e}");
        Ok(())
    }

    #[test]
    fn wider_and_longer_shapes_scale_the_mlp_and_the_split() -> Result<()> {
        assert_eq!(Shape { hidden: 512, seq: 512 }.intermediate(), 1376);
        assert_eq!(Shape { hidden: 1024, seq: 2048 }.intermediate(), 2752);
        assert_eq!(
            (Shape { hidden: 256, seq: 2048 }.prompt(), Shape { hidden: 256, seq: 2048 }.completion()),
            (512, 1536)
        );
        assert!(Shape { hidden: 250, seq: 128 }.check().is_err());
        assert!(Shape { hidden: 256, seq: 130 }.check().is_err());
        Ok(())
    }
}
