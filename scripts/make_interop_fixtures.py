#!/usr/bin/env python3
"""Writes the Hugging Face / PEFT interoperability fixtures of slime-models.

Usage (the venv of make_model_fixtures.py plus peft; no GPU, no HF hub):

    /tmp/hfvenv/bin/pip install torch transformers peft safetensors
    /tmp/hfvenv/bin/python scripts/make_interop_fixtures.py      # writes crates/models/tests/fixtures/interop/
    cargo test -p slime-models --test hf_interop                  # no Python needed from here on

It needs the parity fixture crates/models/tests/fixtures/hf/llama3 (scripts/make_model_fixtures.py).
Options: --out DIR.

What it writes into <out>/, each file exactly as the library writes it:
- transformers/<model_type>/config.json for llama, qwen2, qwen3, gemma, gemma2 and gemma3_text
  (`PretrainedConfig.save_pretrained`, with `architectures` and token ids set as a released checkpoint has them),
  and transformers/llama/generation_config.json (`GenerationConfig.from_model_config(...).save_pretrained`);
- peft/adapter_config.json: `LoraConfig(task_type="CAUSAL_LM", ...).save_pretrained`, inference_mode true as a
  saved PeftModel has it;
- peft-llama3-rslora/: a PEFT LoRA adapter on the llama3 parity model, saved by `PeftModel.save_pretrained`
  (adapter_config.json, adapter_model.safetensors) with use_rslora, lora_dropout 0.1, a regular-expression
  target_modules and random (non-zero) lora_B, plus expected.safetensors: `token_logps` [2, 24] of the adapted
  model in eval mode (dropout off) on the llama3 fixture's input_ids / attention_mask.

The Rust tests check that the directories slime-models writes carry every key of these files that transformers
and PEFT read, with the same JSON type, and that reading the PEFT adapter reproduces PEFT's log-probs.
"""

import argparse
import json
import os
import shutil

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, GenerationConfig, LlamaForCausalLM

FAMILIES = {
    "llama": ("LlamaForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", {"use_sliding_window": False}),
    "qwen3": ("Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma": ("GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4}),
    "gemma3_text": ("Gemma3ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4}),
}


def write_transformers(out):
    for model_type, (arch, extra) in FAMILIES.items():
        cfg = AutoConfig.for_model(
            model_type,
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            architectures=[arch],
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            **extra,
        )
        d = os.path.join(out, "transformers", model_type)
        cfg.save_pretrained(d)
        if model_type == "llama":
            GenerationConfig.from_model_config(cfg).save_pretrained(d)


def write_peft_config(out):
    cfg = LoraConfig(
        task_type="CAUSAL_LM",
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        base_model_name_or_path="/models/base",
        inference_mode=True,
    )
    cfg.save_pretrained(os.path.join(out, "peft"))


def write_peft_adapter(out, base_dir):
    torch.manual_seed(7)
    base = LlamaForCausalLM.from_pretrained(base_dir, attn_implementation="eager").float()
    cfg = LoraConfig(
        task_type="CAUSAL_LM",
        r=4,
        lora_alpha=6,
        lora_dropout=0.1,
        use_rslora=True,
        target_modules=r".*\.(q_proj|v_proj|down_proj)",
        init_lora_weights=False,
    )
    model = get_peft_model(base, cfg).eval()
    inputs = load_file(os.path.join(base_dir, "expected.safetensors"))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    token_logps = torch.cat([torch.zeros(2, 1), logp], dim=1) * mask
    base_logps = inputs["token_logps"]
    d = os.path.join(out, "peft-llama3-rslora")
    model.save_pretrained(d)
    for extra in os.listdir(d):
        if extra not in ("adapter_config.json", "adapter_model.safetensors"):
            os.remove(os.path.join(d, extra))
    save_file({"token_logps": token_logps.contiguous()}, os.path.join(d, "expected.safetensors"))
    moved = (token_logps - base_logps).abs().max().item()
    print(json.dumps({"fixture": "peft-llama3-rslora", "max_logp_change_vs_base": round(moved, 4)}))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    fixtures = os.path.join(here, "..", "crates", "models", "tests", "fixtures")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(fixtures, "interop"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    shutil.rmtree(args.out, ignore_errors=True)
    write_transformers(args.out)
    write_peft_config(args.out)
    # Relative to the fixtures directory, so the adapter names its base as `hf/llama3`.
    os.chdir(fixtures)
    write_peft_adapter(os.path.abspath(args.out), os.path.join("hf", "llama3"))
    for root, _, files in os.walk(args.out):
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)


if __name__ == "__main__":
    main()
