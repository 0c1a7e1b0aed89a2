#!/usr/bin/env python3
"""Writes the Hugging Face transformers parity fixtures of slime-models.

Usage (a few minutes the first time; the venv stays outside the repository; no GPU, no HF hub):

    python3 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch transformers safetensors numpy
    /tmp/hfvenv/bin/python scripts/make_model_fixtures.py            # writes crates/models/tests/fixtures/hf/
    cargo test -p slime-models --test hf_parity                       # no Python needed from here on

Options: --out DIR (default: crates/models/tests/fixtures/hf next to this script's repository);
--only NAME ... writes only the named fixtures (each keeps its seed, so the others stay as committed).

For each tiny random model (seeded, fp32, eager attention) it writes into <out>/<name>/:
- config.json and model.safetensors, exactly as `save_pretrained` writes them (transformers 5 layout:
  `rope_parameters`, `layer_types`), so the Rust side loads them with `CausalLm::from_dir`;
- expected.safetensors: `input_ids` [2, 24] (i64), `attention_mask` [2, 24] (i64; row 1 is right-padded),
  `last_logits` [2, vocab] (f32, at each row's last real position), `token_logps` [2, 24] (f32:
  log p(ids[b, t] | ids[b, <t]) for t >= 1 where the mask is 1, else 0).

Models (all with non-trivial norm weights, projections large enough that logits spread out, and
sequences longer than every sliding window):
- llama3: Llama with rope_scaling "llama3" (original context 64, so high, medium and low frequencies
  all occur), GQA 4/2, head_dim 16 != hidden / heads, untied lm_head.
- gemma2: Gemma 2 with sliding window 6 on even layers, attention and final logit soft-capping (small caps
  so tanh bites), query_pre_attn_scalar 24 != head_dim, sandwich norms, tied embeddings.
- gemma3: Gemma 3 text with QK-norm, query_pre_attn_scalar 32 != head_dim, alternating local/global layers
  (local RoPE base 10,000; global base 1,000,000 with linear scaling 2), sliding window 5.
- qwen2: Qwen2 (biased q/k/v projections, non-zero biases), GQA 4/2, head_dim = hidden / heads = 8 (Qwen2
  configs have no head_dim), RoPE base 1,000,000, untied lm_head, use_sliding_window false.
- qwen3: Qwen3 dense (per-head q/k RMSNorm before RoPE, no biases: attention_bias false as in Qwen3-4B), GQA
  4/2, head_dim 16 != hidden / heads, RoPE base 1,000,000, tied embeddings (as in Qwen3-4B).
- mistral: Mistral with sliding window 5 on every layer (shorter than both rows, so the window changes the
  logits), GQA 4/2, head_dim 16 != hidden / heads, RoPE base 10,000, untied lm_head.

transformers is the reference: if slime-models disagrees with these fixtures, slime-models is wrong.
"""

import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 128
SEQ = 24
REAL_ROW1 = 17


def configs():
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        attn_implementation="eager",
    )
    llama = LlamaConfig(
        num_hidden_layers=2,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        **common,
    )
    gemma2 = Gemma2Config(
        num_hidden_layers=3,
        sliding_window=6,
        attn_logit_softcapping=3.0,
        final_logit_softcapping=5.0,
        query_pre_attn_scalar=24,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **common,
    )
    gemma3 = Gemma3TextConfig(
        num_hidden_layers=4,
        sliding_window=5,
        query_pre_attn_scalar=32,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        **common,
    )
    qwen_common = {k: v for k, v in common.items() if k != "head_dim"}
    qwen2 = Qwen2Config(
        num_hidden_layers=2,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        **qwen_common,
    )
    qwen3 = Qwen3Config(
        num_hidden_layers=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=False,
        use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        **qwen_common,
    )
    mistral = MistralConfig(
        num_hidden_layers=2,
        sliding_window=5,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **common,
    )
    return [
        ("llama3", LlamaForCausalLM, llama, False),
        ("gemma2", Gemma2ForCausalLM, gemma2, True),
        ("gemma3", Gemma3ForCausalLM, gemma3, True),
        ("qwen2", Qwen2ForCausalLM, qwen2, False),
        ("qwen3", Qwen3ForCausalLM, qwen3, False),
        ("mistral", MistralForCausalLM, mistral, False),
    ]


def randomize(model, gemma, gen):
    """Projections and biases ~ N(0, 0.15^2), embeddings ~ N(0, 1) (Llama, Qwen) or N(0, 0.25^2) (Gemma scales
    them by sqrt(hidden)), norm weights away from their neutral value (Llama, Qwen: 1, Gemma: stored offset 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                u = torch.rand(p.shape, generator=gen) - 0.5
                p.copy_(u * 0.8 if gemma else 1.0 + u * 0.8)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.25 if gemma else 1.0))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(here, "..", "crates", "models", "tests", "fixtures", "hf"))
    parser.add_argument("--only", nargs="+", metavar="NAME", help="write only these fixtures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for seed, (name, cls, cfg, gemma) in enumerate(configs()):
        if args.only and name not in args.only:
            continue
        gen = torch.Generator().manual_seed(1000 + seed)
        torch.manual_seed(seed)
        model = cls(cfg).float().eval()
        randomize(model, gemma, gen)
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
        mask = torch.ones(2, SEQ, dtype=torch.long)
        mask[1, REAL_ROW1:] = 0
        ids[1, REAL_ROW1:] = 0
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        token_logps = torch.cat([torch.zeros(2, 1), logp], dim=1) * mask
        last = mask.sum(1) - 1
        last_logits = logits[torch.arange(2), last]
        out = os.path.join(args.out, name)
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out, safe_serialization=True)
        for extra in os.listdir(out):
            if extra not in ("config.json", "model.safetensors"):
                os.remove(os.path.join(out, extra))
        save_file(
            {
                "input_ids": ids.contiguous(),
                "attention_mask": mask.contiguous(),
                "last_logits": last_logits.contiguous(),
                "token_logps": token_logps.contiguous(),
            },
            os.path.join(out, "expected.safetensors"),
        )
        for f in os.listdir(out):
            os.chmod(os.path.join(out, f), 0o644)
        spread = (last_logits.max(-1).values - last_logits.min(-1).values).min().item()
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        print(json.dumps({"fixture": name, "bytes": size, "min_logit_spread": round(spread, 3)}))


if __name__ == "__main__":
    main()
