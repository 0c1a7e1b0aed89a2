//! Loading safetensors checkpoints as bf16 (`CausalLm::from_dir_as`): every weight is the f32
//! weight rounded to bf16, the forward pass, chunked log-probs and cached decoding run and stay
//! close to f32, and `None` keeps the stored dtype.

use candle_core::{DType, Device, Tensor};
use slime_models::{CausalLm, GemmaConfig, KvCache, LlamaConfig, ModelConfig, ModelError, Result};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

#[test]
fn safetensors_load_as_bf16_on_request() -> Result<()> {
    let configs: Vec<ModelConfig> =
        vec![LlamaConfig::tiny(97, 32, 64, 2, 4, 2).into(), GemmaConfig::tiny2(97, 32, 64, 2, 4, 2).into()];
    for cfg in configs {
        let lm = CausalLm::random(&cfg, 2, &Device::Cpu)?;
        for (_, var) in lm.trainable_vars() {
            var.set(&(var.as_tensor() * 10.0)?)?;
        }
        let dir = tempfile::tempdir().map_err(|e| ModelError::Io { path: "tmp".into(), reason: e.to_string() })?;
        lm.save_dir(dir.path())?;
        let same = CausalLm::from_dir_as(dir.path(), &Device::Cpu, None)?;
        assert!(same.weights().values().all(|t| t.dtype() == DType::F32));
        let bf16 = CausalLm::from_dir_as(dir.path(), &Device::Cpu, Some(DType::BF16))?;
        let f32_weights = lm.weights();
        for (name, t) in bf16.weights() {
            assert_eq!(t.dtype(), DType::BF16, "{name}");
            assert_eq!(max_abs_diff(&t, &f32_weights[&name].to_dtype(DType::BF16)?)?, 0.0, "{name}");
        }
        let ids = Tensor::new(&[[1u32, 5, 9, 3, 7, 2, 11, 4]], &Device::Cpu)?;
        let (want, have) = (lm.model().last_logits(&ids, None)?, bf16.model().last_logits(&ids, None)?);
        let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let diff = max_abs_diff(&have, &want)?;
        assert!(scale > 0.1 && diff < 0.05 * scale, "bf16 logits differ by {diff} (scale {scale})");
        let logps = bf16.model().token_logps(&ids, None, 3)?;
        assert_eq!(logps.dtype(), DType::F32);
        let want_logps = lm.model().token_logps(&ids, None, 3)?;
        let lp_scale = want_logps.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let lp_diff = max_abs_diff(&logps, &want_logps)?;
        assert!(lp_diff < 0.1 * lp_scale, "bf16 log-probs differ by {lp_diff} (scale {lp_scale})");
        let mut cache = KvCache::new(bf16.model());
        let cached = bf16.model().forward_cached(&ids, &mut cache)?;
        assert!(max_abs_diff(&cached, &have)? < 0.05 * scale);
    }
    Ok(())
}
