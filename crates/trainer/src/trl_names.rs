//! Hints for TRL and `transformers` `TrainingArguments` names in a run config.
//!
//! Names that mean the same as ours are serde aliases on the config fields. A name that is
//! unknown where it was written is either accepted in another table (the config is nested, TRL's
//! is flat) or has no counterpart; [`hint`] says which, so the error tells the user what to write.

/// `(TRL name, what to write instead)`.
const HINTS: [(&str, &str); 30] = [
    ("learning_rate", "it belongs in [sft.schedule] or [preference.schedule] (ours: lr)"),
    ("lr_scheduler_type", "it belongs in [sft.schedule] or [preference.schedule] (ours: decay)"),
    ("warmup_ratio", "it belongs in [sft.schedule] or [preference.schedule]"),
    (
        "warmup_steps",
        "warmup is a fraction here: set warmup_ratio = warmup_steps / steps in [sft.schedule] or \
         [preference.schedule]",
    ),
    (
        "num_train_epochs",
        "stages count optimiser steps, not epochs: set steps = epochs * pairs / (batch_size * grad_accum) \
         in [sft] or [preference]",
    ),
    ("max_steps", "it belongs in [sft] or [preference] (ours: steps)"),
    ("per_device_train_batch_size", "it belongs in [sft] or [preference] (ours: batch_size)"),
    ("gradient_accumulation_steps", "it belongs in [sft] or [preference] (ours: grad_accum)"),
    ("max_grad_norm", "it belongs in [sft] or [preference]"),
    ("weight_decay", "it belongs in [sft] or [preference]"),
    ("per_device_eval_batch_size", "it belongs in [eval] (ours: batch_size)"),
    ("eval_steps", "it belongs in [eval] (ours: every)"),
    ("save_steps", "it belongs in [checkpoint] (ours: every)"),
    ("save_total_limit", "it belongs in [checkpoint] (ours: keep_last)"),
    ("max_length", "it belongs in [data]"),
    ("max_prompt_length", "it belongs in [data]"),
    ("max_completion_length", "there is no completion limit: completions are cut to fit data.max_length"),
    ("beta", "it belongs in the objective table: objective = { type = \"dpo\", beta = 0.1 }"),
    ("loss_type", "it belongs in the objective table: objective = { type = \"dpo\", loss_type = \"sigmoid\" }"),
    ("gradient_checkpointing", "it belongs in [model]"),
    ("bf16", "set model.dtype = \"bf16\""),
    ("fp16", "fp16 is not supported; set model.dtype = \"bf16\" or \"f32\""),
    ("lora_alpha", "it belongs in [model.lora]"),
    ("lora_dropout", "LoRA dropout is not supported (adapters train without dropout)"),
    ("output_dir", "the run directory is the command line's --run-dir"),
    ("logging_steps", "every optimiser step is written to metrics.jsonl"),
    (
        "precompute_ref_log_probs",
        "reference log-probs are always computed once before the stage (or read from preference.reference_logps)",
    ),
    ("reference_free", "choose a reference-free objective instead: slime, simpo, cpo or orpo"),
    ("rpo_alpha", "DPO with an added NLL term (RPO) is not implemented; cpo and orpo have an NLL term"),
    ("cpo_alpha", "it belongs in the objective table: objective = { type = \"cpo\", cpo_alpha = 1.0 }"),
];

/// The hint for the first `unknown field `name`` in a deserialisation error, if `name` is a TRL
/// name.
pub(crate) fn hint(error: &str) -> Option<&'static str> {
    let (_, rest) = error.split_once("unknown field `")?;
    let (name, _) = rest.split_once('`')?;
    HINTS.iter().find(|(trl, _)| *trl == name).map(|(_, hint)| *hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_trl_names_get_their_hint() {
        let err = "unknown field `num_train_epochs`, expected one of `steps`, `batch_size`";
        assert!(hint(err).is_some_and(|h| h.contains("steps = epochs")));
        assert_eq!(hint("unknown field `stpes`, expected `steps`"), None);
        assert_eq!(hint("invalid type: string, expected u64"), None);
    }

    #[test]
    fn every_name_has_one_hint() {
        let mut names: Vec<&str> = HINTS.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), HINTS.len());
    }
}
