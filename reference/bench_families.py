"""Reference for the model-family benchmark (issue 16): random Qwen3-0.6B- and Gemma-2-2B-shaped
checkpoints, transformers' `from_pretrained` load time and a transformers + peft LoRA step
(r 16 on every attention and MLP projection, fp32, AdamW foreach), same thread count and tokens as
VoltTrain.

Usage:
  bench_families.py make FAMILY DIR LAYERS BATCH SEQ
      writes a random checkpoint (bf16 safetensors, tied embeddings) and DIR/batch.safetensors;
      FAMILY qwen3, gemma2, or llama-qwen3 / llama-gemma2 (a Llama with that family's shape)
  bench_families.py load DIR RUNS THREADS
      times AutoModelForCausalLM.from_pretrained(DIR, dtype=float32), one warm-up first
  bench_families.py lora DIR WARMUP RUNS THREADS
      times LoRA training steps on DIR/batch.safetensors
Prints one JSON line last.
"""

import json
import os
import resource
import sys
import time

import torch


def config(family, layers):
    if family.startswith("llama-"):
        # Llama with the other family's widths, heads, vocabulary and tying: the same-shape
        # Llama row that family's row is compared with
        from transformers import LlamaConfig

        c = config(family[len("llama-") :], layers)
        return LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=c.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=True,
        )
    if family == "qwen3":
        from transformers import Qwen3Config

        # Qwen/Qwen3-0.6B
        return Qwen3Config(
            vocab_size=151936,
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=layers,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=True,
        )
    from transformers import Gemma2Config

    # google/gemma-2-2b
    return Gemma2Config(
        vocab_size=256000,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )


def make(family, d, layers, b, t):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = config(family, layers)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    m = m.to_empty(device="cpu")
    m.tie_weights()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.02)
    m = m.to(torch.bfloat16)
    m.save_pretrained(d)
    n = sum(p.numel() for p in m.parameters())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=g)
    save_file({"input_ids": ids.contiguous()}, os.path.join(d, "batch.safetensors"))
    print(json.dumps({"params": n}))


def load(d, runs, threads):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    out = []
    for _ in range(runs + 1):
        t = time.perf_counter()
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        out.append(time.perf_counter() - t)
        del m
    print(json.dumps({"seconds": out[1:], "warmup": out[0]}))


def lora(d, warmup, runs, threads):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model.config.use_cache = False
    cfg = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    ids = load_file(os.path.join(d, "batch.safetensors"))["input_ids"]
    mask = torch.ones_like(ids)

    def step():
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"step_seconds": times, "peak_rss_mb": rss, "attn": model.config._attn_implementation}))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        make(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    elif cmd == "load":
        load(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        lora(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
