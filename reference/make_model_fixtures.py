"""Makes tiny random Hugging Face causal LMs and their reference logits for VoltTrain's parity tests.

Usage: make_model_fixtures.py OUT_DIR [NAME ...]

For each variant NAME (default: all) writes OUT_DIR/NAME/ with config.json, the weights
(model.safetensors, or shards + model.safetensors.index.json) and expected.safetensors holding:
  left_ids, left_mask, left_pos, left_logits     batch with left padding
  right_ids, right_mask, right_pos, right_logits batch with right padding
  left_gw, grad.<param>                          gradients of sum(left_logits * left_gw)
  packed_ids, packed_pos, packed_seg, packed_logits  one packed row of several sequences; the
      reference logits are those of each sequence run on its own (what a block-diagonal causal
      mask must reproduce)
Position ids follow `cumsum(mask) - 1` clamped at 0. The reference runs transformers in fp32
with eager attention.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
import transformers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def variants():
    return {
        # plain Llama, GQA, fp32 on disk
        "llama": (LlamaForCausalLM, LlamaConfig(**COMMON, rope_theta=10000.0), torch.float32, None),
        # Llama 3 rope scaling, attention/mlp biases, bf16 on disk
        "llama3": (
            LlamaForCausalLM,
            LlamaConfig(
                **{**COMMON, "max_position_embeddings": 512},
                attention_bias=True,
                mlp_bias=True,
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    # small so that low, medium and high frequency bands all occur at head_dim 16
                    "original_max_position_embeddings": 64,
                },
            ),
            torch.bfloat16,
            None,
        ),
        # SmolLM-like: tied embeddings, fp16 on disk, sharded
        "llama_tied": (
            LlamaForCausalLM,
            LlamaConfig(**{**COMMON, "tie_word_embeddings": True, "num_key_value_heads": 1}, rope_theta=100000.0),
            torch.float16,
            "20KB",
        ),
        # Mistral with explicit head_dim != hidden/heads and a short sliding window
        "mistral": (
            MistralForCausalLM,
            MistralConfig(**COMMON, head_dim=32, sliding_window=3, rope_theta=1000000.0),
            torch.float32,
            None,
        ),
        # Qwen2: q/k/v biases, sharded
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(**COMMON, rope_theta=1000000.0), torch.float32, "40KB"),
        # Qwen2 with a sliding window on the layers from max_window_layers on (layer 1 only)
        "qwen2_swa": (
            Qwen2ForCausalLM,
            Qwen2Config(
                **COMMON, rope_theta=1000000.0, use_sliding_window=True, sliding_window=4, max_window_layers=1
            ),
            torch.float32,
            None,
        ),
        # ---- the families of issue 16 (tests/model_families.rs) ----
        # Qwen3: q/k norms, explicit head_dim (transformers' default is 128), sliding window on
        # layer 1 via max_window_layers
        "qwen3": (
            Qwen3ForCausalLM,
            Qwen3Config(
                **COMMON,
                head_dim=16,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                use_sliding_window=True,
                sliding_window=4,
                max_window_layers=1,
            ),
            torch.float32,
            None,
        ),
        # Gemma 2: small soft-caps so that tanh bends the scores and logits, query_pre_attn_scalar
        # != head_dim, sliding layer 0, tied head, pad 0
        "gemma2": (
            Gemma2ForCausalLM,
            Gemma2Config(
                **{**COMMON, "tie_word_embeddings": True},
                head_dim=16,
                query_pre_attn_scalar=24,
                sliding_window=4,
                attn_logit_softcapping=2.0,
                final_logit_softcapping=3.0,
                pad_token_id=0,
            ),
            torch.bfloat16,
            None,
        ),
        # Gemma 3 (text): q/k norms, linear-scaled global RoPE and a local base for the
        # sliding layer, final soft-cap, untied head
        "gemma3": (
            Gemma3ForCausalLM,
            Gemma3TextConfig(
                **COMMON,
                head_dim=16,
                query_pre_attn_scalar=16,
                sliding_window=4,
                layer_types=["sliding_attention", "full_attention"],
                rope_parameters={
                    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                },
                final_logit_softcapping=3.0,
                pad_token_id=0,
            ),
            torch.float32,
            "40KB",
        ),
        # Phi-3: fused qkv/gate_up, half the head rotary, LongRoPE with original context 8 (the
        # 9-token padded batches take the long factors, the packed pieces the short ones),
        # sliding window 5
        "phi3": (
            Phi3ForCausalLM,
            Phi3Config(
                **{**COMMON, "max_position_embeddings": 64},
                original_max_position_embeddings=8,
                rope_parameters={
                    "rope_type": "longrope",
                    "rope_theta": 10000.0,
                    "partial_rotary_factor": 0.5,
                    "short_factor": [1.0, 1.1, 1.3, 1.7],
                    "long_factor": [1.0, 2.0, 4.5, 9.0],
                },
                sliding_window=5,
                pad_token_id=0,
            ),
            torch.float32,
            None,
        ),
        # Phi-4 style: fused projections, full rotary, default RoPE
        "phi4": (
            Phi3ForCausalLM,
            Phi3Config(**COMMON, rope_parameters={"rope_type": "default", "rope_theta": 250000.0}, pad_token_id=0),
            torch.float32,
            None,
        ),
        # SmolLM3: layer 1 has no RoPE, tied head
        "smollm3": (
            SmolLM3ForCausalLM,
            SmolLM3Config(**{**COMMON, "tie_word_embeddings": True}, no_rope_layers=[1, 0], pad_token_id=0),
            torch.float32,
            None,
        ),
        # YaRN on Llama: factor 4 over an original context of 16
        "llama_yarn": (
            LlamaForCausalLM,
            LlamaConfig(
                **COMMON,
                rope_parameters={
                    "rope_type": "yarn",
                    "rope_theta": 10000.0,
                    "factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
            ),
            torch.float32,
            None,
        ),
        # dynamic NTK on Llama with max_position_embeddings 8: the 9-token padded batches grow
        # the base, the packed pieces do not
        "llama_dynamic": (
            LlamaForCausalLM,
            LlamaConfig(
                **{**COMMON, "max_position_embeddings": 8},
                rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
            ),
            torch.float32,
            None,
        ),
    }


def positions(mask):
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def make(out_dir, name, cls, config, disk_dtype, shard):
    torch.manual_seed(sum(map(ord, name)))
    config._attn_implementation = "eager"
    model = cls(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = os.path.join(out_dir, name)
    model = model.to(disk_dtype)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(d, **kw)
    ref = cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()

    g = torch.Generator().manual_seed(7)
    v = config.vocab_size
    lens = [9, 6, 3]
    T = max(lens)
    out = {}
    for side in ("left", "right"):
        ids = torch.randint(0, v, (len(lens), T), generator=g)
        mask = torch.zeros(len(lens), T, dtype=torch.long)
        for b, n in enumerate(lens):
            if side == "left":
                mask[b, T - n:] = 1
            else:
                mask[b, :n] = 1
        ids = ids * mask  # pad id 0
        pos = positions(mask)
        with torch.no_grad():
            logits = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        out[f"{side}_ids"] = ids
        out[f"{side}_mask"] = mask
        out[f"{side}_pos"] = pos
        out[f"{side}_logits"] = logits.float().contiguous()

    # gradients of sum(left_logits * left_gw) (left_gw zero at padding) for every parameter
    gw = torch.randn(out["left_logits"].shape, generator=g) * out["left_mask"][..., None]
    ref.zero_grad()
    y = ref(input_ids=out["left_ids"], attention_mask=out["left_mask"], position_ids=out["left_pos"]).logits
    (y * gw).sum().backward()
    out["left_gw"] = gw
    for n, p in ref.named_parameters():
        out[f"grad.{n}"] = p.grad.float().contiguous()

    segs = [4, 5, 3]
    ids = torch.randint(0, v, (1, sum(segs)), generator=g)
    parts, pos, seg = [], [], []
    start = 0
    for i, n in enumerate(segs):
        piece = ids[:, start:start + n]
        with torch.no_grad():
            parts.append(ref(input_ids=piece, position_ids=torch.arange(n)[None]).logits)
        pos.append(torch.arange(n))
        seg.append(torch.full((n,), i))
        start += n
    out["packed_ids"] = ids
    out["packed_pos"] = torch.cat(pos)[None]
    out["packed_seg"] = torch.cat(seg)[None]
    out["packed_logits"] = torch.cat(parts, dim=1).float().contiguous()
    save_file(out, os.path.join(d, "expected.safetensors"))
    return d


def main():
    out_dir = sys.argv[1]
    names = sys.argv[2:] or list(variants())
    all_v = variants()
    made = {}
    for n in names:
        cls, cfg, dt, shard = all_v[n]
        made[n] = make(out_dir, n, cls, cfg, dt, shard)
    print(json.dumps({"transformers": transformers.__version__, "made": made}))


if __name__ == "__main__":
    main()
