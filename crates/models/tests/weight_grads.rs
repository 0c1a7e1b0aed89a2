//! Weight gradients handed over directly by the fused blocks (`fused::WeightGrads`) equal the
//! ones candle's graph computes, bit for bit, for every trainable variable: Llama, Qwen3 (biases
//! and q/k norms packed with the weights), Llama with LoRA (only the adapters train, and they are
//! variables) and Gemma 3 (whose blocks keep the graph: its `1 + w` norm weights are computed
//! tensors). And the direct path is really taken where it should be: before the merge the store
//! lacks those weights' gradients.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use slime_models::fused::WeightGrads;
use slime_models::{CausalLm, GemmaConfig, LlamaConfig, Result};

mod common;
use common::randn;

/// A loss over every position's log-prob with uneven weights, so every gradient is non-trivial.
fn loss(lm: &CausalLm) -> Result<Tensor> {
    let dev = Device::Cpu;
    let ids: Vec<u32> = (0..3 * 70).map(|i| (i * 37 + 11) % 61).collect();
    let ids = Tensor::from_vec(ids, (3, 70), &dev)?;
    let mut mask = vec![1u8; 3 * 70];
    mask[2 * 70 + 50..].fill(0);
    let mask = Tensor::from_vec(mask, (3, 70), &dev)?;
    let logps = lm.model().token_logps(&ids, Some(&mask), 16)?;
    let weights = randn(7, 1.0, 0.5, (3, 70));
    Ok((logps * weights)?.sum_all()?)
}

fn values(grads: &GradStore, var: &Tensor) -> Option<Vec<f32>> {
    grads.get(var).map(|g| g.flatten_all().and_then(|g| g.to_vec1::<f32>()).expect("an f32 gradient"))
}

/// The graph's gradients against the direct ones; `direct_expected`: whether some block must
/// have taken the direct path.
fn check(lm: &CausalLm, what: &str, direct_expected: bool) -> Result<()> {
    let graph = loss(lm)?.backward()?;
    let direct = WeightGrads::new();
    let l = direct.scope(|| loss(lm))?;
    let mut grads = l.backward()?;
    assert_eq!(!direct.is_empty(), direct_expected, "{what}: collected {} gradients", direct.len());
    let missing_before_merge = lm.trainable_vars().iter().filter(|(_, v)| grads.get(v.as_tensor()).is_none()).count();
    assert_eq!(missing_before_merge, direct.len(), "{what}: the collected weights are the ones the graph skipped");
    direct.merge_into(&mut grads)?;
    assert!(direct.is_empty(), "{what}: merging empties the collector");
    for (name, var) in lm.trainable_vars() {
        let (want, got) = (values(&graph, var.as_tensor()), values(&grads, var.as_tensor()));
        assert!(want.is_some(), "{what}: {name} has a gradient");
        assert_eq!(want, got, "{what}: {name}");
    }
    Ok(())
}

#[test]
fn direct_weight_gradients_equal_the_graphs_for_llama_and_qwen3() -> Result<()> {
    let mut llama = LlamaConfig::tiny(61, 32, 48, 2, 4, 2);
    llama.tie_word_embeddings = false;
    check(&CausalLm::random(&llama, 3, &Device::Cpu)?, "llama", true)?;
    let qwen3 = LlamaConfig { attention_bias: true, ..LlamaConfig::tiny_qwen3(61, 32, 48, 2, 4, 2, 16) };
    let lm = CausalLm::random(&qwen3, 4, &Device::Cpu)?;
    common::spread_biases_and_norms(&lm)?;
    check(&lm, "qwen3", true)
}

#[test]
fn lora_adapters_take_the_direct_path_and_computed_weights_keep_the_graph() -> Result<()> {
    // LoRA: the blocks' trainable weights are the adapters, variables; the frozen bases get none.
    let cfg = LlamaConfig::tiny(61, 32, 48, 2, 4, 2);
    let lora = slime_models::LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "gate_proj"]);
    let lm = CausalLm::random(&cfg, 6, &Device::Cpu)?.with_lora(lora, 1)?;
    for (i, (name, var)) in lm.trainable_vars().into_iter().enumerate() {
        if name.contains("lora_B") {
            var.set(&randn(200 + i as u64, 0.0, 0.1, var.shape()))?;
        }
    }
    check(&lm, "llama + LoRA", true)?;
    // Gemma 3 with LoRA: its computed `1 + w` norm weights are frozen constants here.
    let lora = slime_models::LoraConfig::new(4, 8.0, &slime_models::lora::ADAPTABLE);
    let lm = CausalLm::random(&GemmaConfig::tiny3(61, 32, 48, 2, 4, 2), 7, &Device::Cpu)?.with_lora(lora, 2)?;
    for (i, (name, var)) in lm.trainable_vars().into_iter().enumerate() {
        if name.contains("lora_B") {
            var.set(&randn(300 + i as u64, 0.0, 0.1, var.shape()))?;
        }
    }
    check(&lm, "gemma3 + LoRA", true)?;
    // Gemma 3: whatever its blocks do, every weight gets the graph's gradient.
    let gemma = CausalLm::random(&GemmaConfig::tiny3(61, 32, 48, 2, 4, 2), 8, &Device::Cpu)?;
    let graph = loss(&gemma)?.backward()?;
    let direct = WeightGrads::new();
    let mut grads = direct.scope(|| loss(&gemma))?.backward()?;
    direct.merge_into(&mut grads)?;
    for (name, var) in gemma.trainable_vars() {
        assert_eq!(values(&graph, var.as_tensor()), values(&grads, var.as_tensor()), "gemma3: {name}");
    }
    Ok(())
}

#[test]
fn a_forward_pass_outside_the_scope_uses_the_graph() -> Result<()> {
    let lm = CausalLm::random(&LlamaConfig::tiny(61, 32, 48, 1, 4, 2), 2, &Device::Cpu)?;
    let direct = WeightGrads::new();
    let inner = direct.scope(|| loss(&lm))?;
    // The scope has ended: this pass's blocks route through the graph.
    let outer = loss(&lm)?;
    let collected_by_inner = {
        let _ = inner.backward()?;
        direct.len()
    };
    assert!(collected_by_inner > 0);
    let grads = outer.backward()?;
    assert_eq!(direct.len(), collected_by_inner, "the outer pass collected nothing");
    assert!(lm.trainable_vars().iter().all(|(_, v)| grads.get(v.as_tensor()).is_some()));
    Ok(())
}
