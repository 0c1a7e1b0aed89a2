//! Pairs packed around their shared prefix give the log-probs and gradients of the two rows run
//! separately (`Model::token_logps`), within 1e-5 (Gemma's gradients, which reach ~35: relative
//! to their largest magnitude when that exceeds 1): `Model::completion_logps` of a `PairBatch`
//! on every completion token (completions sharing their first tokens or not, one a prefix of
//! the other, identical ones, packed rows longer than one attention block), and
//! `Model::pair_token_logps` of `2 n` rows on every real token (prefixes of different lengths,
//! one pair sharing nothing, one pair of identical rows, a rejected row shorter than its prompt
//! share); Llama, Llama with LoRA, Qwen2, Qwen3 and Gemma 1/2/3 (sliding windows that cut
//! through the prompt and the branches). Both give the same bits on the same pairs.

use candle_core::{DType, Device, Tensor};
use slime_models::{CausalLm, GemmaConfig, LlamaConfig, ModelError, PairBatch, Result};

mod common;
use common::randn;

/// `(prefix, chosen length, rejected length)` of each pair; the rows share exactly `prefix`
/// leading tokens.
const PAIRS: [(usize, usize, usize); 5] = [(20, 50, 65), (5, 70, 12), (0, 40, 40), (33, 33, 33), (9, 9, 30)];

/// `[2 n, seq]` ids (chosen rows, then rejected rows) and the right-padding mask.
fn batch(vocab: u32, dev: &Device) -> Result<(Tensor, Tensor)> {
    let seq = PAIRS.iter().map(|&(_, c, r)| c.max(r)).max().unwrap_or(1);
    let n = PAIRS.len();
    let (mut ids, mut mask) = (vec![0u32; 2 * n * seq], vec![0u8; 2 * n * seq]);
    for (i, &(prefix, chosen, rejected)) in PAIRS.iter().enumerate() {
        for t in 0..seq {
            let shared = (i as u32 * 31 + t as u32 * 7 + 3) % vocab;
            let c = if t < prefix { shared } else { (shared + 1 + t as u32 % 5) % vocab };
            let r = if t < prefix { shared } else { (c + 1 + t as u32 % 3) % vocab };
            assert!(t < prefix || c != r, "the rows must differ right after the prefix");
            if t < chosen {
                ids[i * seq + t] = c;
                mask[i * seq + t] = 1;
            }
            if t < rejected {
                ids[(n + i) * seq + t] = r;
                mask[(n + i) * seq + t] = 1;
            }
        }
    }
    Ok((Tensor::from_vec(ids, (2 * n, seq), dev)?, Tensor::from_vec(mask, (2 * n, seq), dev)?))
}

/// `(prompt, chosen, rejected, shared)` lengths of each pair given as a `PairBatch`: the
/// completions share exactly their first `shared` tokens.
const COMPLETIONS: [(usize, usize, usize, usize); 5] =
    [(20, 30, 45, 0), (5, 65, 7, 2), (1, 39, 39, 3), (12, 21, 21, 21), (9, 1, 21, 1)];

/// The `(prompt, chosen, rejected)` tokens of [`COMPLETIONS`].
fn completion_pairs(vocab: u32) -> Vec<(Vec<u32>, Vec<u32>, Vec<u32>)> {
    COMPLETIONS
        .iter()
        .enumerate()
        .map(|(i, &(p, c, r, shared))| {
            let token = |t: usize| (i as u32 * 31 + t as u32 * 7 + 3) % vocab;
            let prompt = (0..p).map(token).collect();
            let chosen: Vec<u32> =
                (p..p + c).map(|t| if t < p + shared { token(t) } else { (token(t) + 1) % vocab }).collect();
            let rejected: Vec<u32> =
                (p..p + r).map(|t| if t < p + shared { token(t) } else { (token(t) + 2) % vocab }).collect();
            assert_eq!(chosen.iter().zip(&rejected).take_while(|(a, b)| a == b).count(), shared.min(c).min(r));
            (prompt, chosen, rejected)
        })
        .collect()
}

/// `pairs` as `2 n` right-padded rows (chosen rows, then rejected rows), their attention mask
/// and the completion mask.
fn as_rows(pairs: &[(Vec<u32>, Vec<u32>, Vec<u32>)], dev: &Device) -> Result<(Tensor, Tensor, Tensor)> {
    let n = pairs.len();
    let seq = pairs.iter().map(|(p, c, r)| p.len() + c.len().max(r.len())).max().unwrap_or(1);
    let (mut ids, mut mask, mut completion) = (vec![0u32; 2 * n * seq], vec![0u8; 2 * n * seq], vec![0u8; 2 * n * seq]);
    for (i, (p, c, r)) in pairs.iter().enumerate() {
        for (row, rest) in [(i, c), (n + i, r)] {
            for (t, &id) in p.iter().chain(rest).enumerate() {
                ids[row * seq + t] = id;
                mask[row * seq + t] = 1;
                completion[row * seq + t] = u8::from(t >= p.len());
            }
        }
    }
    let shape = (2 * n, seq);
    Ok((
        Tensor::from_vec(ids, shape, dev)?,
        Tensor::from_vec(mask, shape, dev)?,
        Tensor::from_vec(completion, shape, dev)?,
    ))
}

/// Both sides of `completion_logps`, `[n, chosen | rejected]`, their mask, and the same
/// positions gathered from `[2 n, seq]` per-row log-probs (completion token `j` of pair `i` is
/// position `prompt + j` of its row; padding reads 0).
fn sides(lm: &CausalLm, rows_logps: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = Device::Cpu;
    let pairs = completion_pairs(61);
    let n = pairs.len();
    let batch = PairBatch::new(pairs.iter().map(|(p, c, r)| (p.as_slice(), c.as_slice(), r.as_slice())))?;
    let got = lm.model().completion_logps(&batch, 16)?;
    let seq = rows_logps.dim(1)?;
    let flat = Tensor::cat(&[&rows_logps.flatten_all()?, &Tensor::zeros(1, DType::F32, &dev)?], 0)?;
    let gather = |side: usize, width: usize, len: &dyn Fn(usize) -> usize| -> Result<Tensor> {
        let index: Vec<u32> = (0..n * width)
            .map(|k| {
                let (i, j) = (k / width, k % width);
                if j < len(i) { ((side * n + i) * seq + pairs[i].0.len() + j) as u32 } else { (2 * n * seq) as u32 }
            })
            .collect();
        Ok(flat.index_select(&Tensor::from_vec(index, n * width, &dev)?, 0)?.reshape((n, width))?)
    };
    let expected_chosen = gather(0, got.chosen.dim(1)?, &|i| pairs[i].1.len())?;
    let expected_rejected = gather(1, got.rejected.dim(1)?, &|i| pairs[i].2.len())?;
    let lens = |mask: &Tensor| -> Result<Vec<u8>> { Ok(mask.sum(1)?.to_vec1()?) };
    assert_eq!(lens(&got.chosen_mask)?, pairs.iter().map(|p| p.1.len() as u8).collect::<Vec<_>>());
    assert_eq!(lens(&got.rejected_mask)?, pairs.iter().map(|p| p.2.len() as u8).collect::<Vec<_>>());
    let marked = Tensor::cat(&[&got.chosen_mask, &got.rejected_mask], 1)?;
    let packed = Tensor::cat(&[&got.chosen, &got.rejected], 1)?;
    let unmarked = (packed.abs()? * marked.eq(0u8)?.to_dtype(DType::F32)?)?.sum_all()?.to_scalar::<f32>()?;
    assert_eq!(unmarked, 0.0, "past each completion the log-probs are 0");
    Ok((packed, Tensor::cat(&[&expected_chosen, &expected_rejected], 1)?, marked))
}

/// `completion_logps` against the rows run separately (values and gradients), and against
/// `pair_token_logps_at` of the same pairs as rows, bit for bit.
fn check_completions(lm: &CausalLm, what: &str, relative_grads: bool) -> Result<()> {
    let (ids, mask, completion) = as_rows(&completion_pairs(61), &Device::Cpu)?;
    let separate = lm.model().token_logps(&ids, Some(&mask), 16)?;
    let (packed, expected, marked) = sides(lm, &separate)?;
    check_against_separate_rows(lm, &format!("{what}, completions"), relative_grads, &packed, &expected, &marked)?;
    let rows = lm.model().pair_token_logps_at(&ids, Some(&mask), &completion, 16)?;
    let (packed, from_rows, _) = sides(lm, &rows)?;
    assert_eq!(packed.to_vec2::<f32>()?, from_rows.to_vec2::<f32>()?, "{what}: completions and rows differ");
    Ok(())
}

/// `relative_grads`: the gradient tolerance is 1e-5 times the largest gradient magnitude (at
/// least 1) instead of 1e-5.
fn check(lm: &CausalLm, what: &str, relative_grads: bool) -> Result<()> {
    check_completions(lm, what, relative_grads)?;
    let dev = Device::Cpu;
    let (ids, mask) = batch(61, &dev)?;
    let separate = lm.model().token_logps(&ids, Some(&mask), 16)?;
    let packed = lm.model().pair_token_logps(&ids, Some(&mask), 16)?;
    check_against_separate_rows(lm, what, relative_grads, &packed, &separate, &mask)?;
    // Only the completions (from each row's prefix on) and, in pair 1's rows, every third
    // position: the rest is 0, the wanted positions as before.
    let n = PAIRS.len();
    let seq = ids.dim(1)?;
    let mut wanted = vec![0u8; 2 * n * seq];
    for (r, row) in wanted.chunks_exact_mut(seq).enumerate() {
        let (prefix, ..) = PAIRS[r % n];
        for (t, w) in row.iter_mut().enumerate() {
            *w = u8::from(if r % n == 1 { t % 3 == 0 } else { t >= prefix.max(1) });
        }
    }
    let wanted = (Tensor::from_vec(wanted, ids.dims(), &dev)? * &mask)?;
    let at = lm.model().pair_token_logps_at(&ids, Some(&mask), &wanted, 16)?;
    let unwanted = (at.abs()? * wanted.eq(0u8)?.to_dtype(candle_core::DType::F32)?)?.sum_all()?.to_scalar::<f32>()?;
    assert_eq!(unwanted, 0.0, "{what}: unwanted positions hold log-probs");
    check_against_separate_rows(lm, &format!("{what}, wanted positions"), relative_grads, &at, &separate, &wanted)
}

/// `packed` equals `separate` (`token_logps`, the rows run separately) at the positions
/// `marked` marks, values and gradients (through a random weighting of those positions).
fn check_against_separate_rows(
    lm: &CausalLm,
    what: &str,
    relative_grads: bool,
    packed: &Tensor,
    separate: &Tensor,
    marked: &Tensor,
) -> Result<()> {
    let real = marked.to_dtype(candle_core::DType::F32)?;
    let coef = (randn(1, 0.0, 1.0, marked.dims()) * &real)?;
    let diff = ((packed - separate)? * &real)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert!(diff < 1e-5, "{what}: log-probs differ by {diff}");
    let g_packed = (packed * &coef)?.sum_all()?.backward()?;
    let g_separate = (separate * &coef)?.sum_all()?.backward()?;
    for (name, var) in lm.trainable_vars() {
        let a = g_packed.get(var.as_tensor()).unwrap_or_else(|| panic!("{what}: packed gradient for {name}"));
        let b = g_separate.get(var.as_tensor()).unwrap_or_else(|| panic!("{what}: gradient for {name}"));
        let d = a.sub(b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let tolerance = if relative_grads { 1e-5 * scale.max(1.0) } else { 1e-5 };
        assert!(d < tolerance, "{what}: gradients of {name} differ by {d} (largest {scale})");
    }
    Ok(())
}

#[test]
fn packed_pairs_equal_separate_rows_for_llama() -> Result<()> {
    // Grouped-query attention, untied embeddings; packed rows of up to 105 tokens span two
    // 64-row query blocks, the second wholly in the rejected branch for the first pair.
    let mut cfg = LlamaConfig::tiny(61, 32, 48, 2, 4, 2);
    cfg.tie_word_embeddings = false;
    check(&CausalLm::random(&cfg, 5, &Device::Cpu)?, "llama", false)
}

#[test]
fn packed_pairs_equal_separate_rows_for_qwen() -> Result<()> {
    // Qwen2 (q/k/v biases) and Qwen3 with `attention_bias` (q/k norm, q/k/v/o biases, head_dim
    // 16 != 32 / 4), with non-zero biases and norm weights away from 1 so they matter.
    let qwen3 = LlamaConfig { attention_bias: true, ..LlamaConfig::tiny_qwen3(61, 32, 48, 2, 4, 2, 16) };
    for (what, cfg) in [("qwen2", LlamaConfig::tiny_qwen2(61, 32, 48, 2, 4, 2)), ("qwen3", qwen3)] {
        let lm = CausalLm::random(&cfg, 9, &Device::Cpu)?;
        common::spread_biases_and_norms(&lm)?;
        check(&lm, what, false)?;
    }
    Ok(())
}

#[test]
fn packed_pairs_with_lora_adapters_equal_separate_rows() -> Result<()> {
    let cfg = LlamaConfig::tiny(61, 32, 48, 2, 4, 2);
    let lora = slime_models::LoraConfig::new(
        4,
        8.0,
        &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    );
    let lm = CausalLm::random(&cfg, 6, &Device::Cpu)?.with_lora(lora, 1)?;
    // Non-zero B, so the adapters change the model.
    for (i, (name, var)) in lm.trainable_vars().into_iter().enumerate() {
        if name.contains("lora_B") {
            var.set(&randn(200 + i as u64, 0.0, 0.1, var.shape()))?;
        }
    }
    check(&lm, "llama + LoRA", false)
}

#[test]
fn packed_pairs_equal_separate_rows_for_gemma() -> Result<()> {
    // Gemma 1 (head_dim 12 != 32 / 4); Gemma 2 (soft-capping at 1, so it bites, window 4 on
    // layers 0 and 2); Gemma 3 (QK-norm, window 6 on local layers, local and global RoPE
    // bases): norm weights away from 0 and queries/keys scaled up so the scores spread out.
    let gemma1 = GemmaConfig { head_dim: 12, ..GemmaConfig::tiny(61, 32, 48, 2, 4, 2) };
    let gemma2 = GemmaConfig {
        attn_logit_softcapping: Some(1.0),
        final_logit_softcapping: Some(5.0),
        ..GemmaConfig::tiny2(61, 32, 48, 3, 4, 2)
    };
    let gemma3 = GemmaConfig { sliding_window: Some(6), ..GemmaConfig::tiny3(61, 32, 48, 3, 4, 1) };
    for (what, cfg) in [("gemma1", gemma1), ("gemma2", gemma2), ("gemma3", gemma3)] {
        let lm = CausalLm::random(&cfg, 10, &Device::Cpu)?;
        for (i, (name, var)) in lm.trainable_vars().into_iter().enumerate() {
            if name.contains("norm") {
                var.set(&randn(300 + i as u64, 0.0, 0.2, var.shape()))?;
            } else if name.contains("q_proj") || name.contains("k_proj") {
                var.set(&(var.as_tensor() * 8.0)?)?;
            }
        }
        // f32 rounding scales with these gradients (up to ~35): gemma2's o_proj differs by
        // 1.14e-5 at magnitude 23 (6 ulp), so the tolerance is relative here.
        check(&lm, what, true)?;
    }
    Ok(())
}

#[test]
fn models_without_the_fused_path_fall_back_to_separate_rows() -> Result<()> {
    // Gemma with the erf GELU keeps the composed path.
    let cfg = GemmaConfig { hidden_activation: Some("gelu".into()), ..GemmaConfig::tiny3(61, 32, 48, 2, 4, 2) };
    let lm = CausalLm::random(&cfg, 7, &Device::Cpu)?;
    let (ids, mask) = batch(61, &Device::Cpu)?;
    let packed = lm.model().pair_token_logps(&ids, Some(&mask), 16)?;
    let separate = lm.model().token_logps(&ids, Some(&mask), 16)?;
    assert_eq!(packed.to_vec2::<f32>()?, separate.to_vec2::<f32>()?);
    let (ids, mask, _) = as_rows(&completion_pairs(61), &Device::Cpu)?;
    let (packed, separate, _) = sides(&lm, &lm.model().token_logps(&ids, Some(&mask), 16)?)?;
    assert_eq!(packed.to_vec2::<f32>()?, separate.to_vec2::<f32>()?);
    Ok(())
}

#[test]
fn an_odd_number_of_rows_is_an_error() -> Result<()> {
    let lm = CausalLm::random(&LlamaConfig::tiny(61, 32, 48, 2, 4, 2), 8, &Device::Cpu)?;
    let ids = Tensor::zeros((3, 4), candle_core::DType::U32, &Device::Cpu)?;
    match lm.model().pair_token_logps(&ids, None, 4) {
        Err(ModelError::Input { input: "input_ids", reason }) => assert!(reason.contains("3 rows"), "{reason}"),
        other => panic!("expected an input error, got {other:?}"),
    }
    Ok(())
}

#[test]
fn a_wanted_mask_of_another_shape_and_rows_past_the_batch_are_errors() -> Result<()> {
    let dev = Device::Cpu;
    let lm = CausalLm::random(&LlamaConfig::tiny(61, 32, 48, 2, 4, 2), 8, &dev)?;
    let (ids, mask) = batch(61, &dev)?;
    let wrong = Tensor::ones((ids.dim(0)?, 3), candle_core::DType::U8, &dev)?;
    match lm.model().pair_token_logps_at(&ids, Some(&mask), &wrong, 4) {
        Err(ModelError::Input { input: "wanted", reason }) => assert!(reason.contains("does not match"), "{reason}"),
        other => panic!("expected an input error, got {other:?}"),
    }
    let slime_models::Model::Llama(llama) = lm.model() else { panic!("a Llama") };
    let packed = Tensor::zeros((1, 6), candle_core::DType::U32, &dev)?;
    let packed_mask = Tensor::ones((1, 6), candle_core::DType::U8, &dev)?;
    let rows = Tensor::new(&[0u32, 6], &dev)?;
    match llama.forward_hidden_branched(&packed, &packed_mask, &[(2, 2)], Some(&rows)) {
        Err(ModelError::Input { input: "rows", reason }) => assert!(reason.contains("invalid index 6"), "{reason}"),
        other => panic!("expected an input error, got {other:?}"),
    }
    Ok(())
}
