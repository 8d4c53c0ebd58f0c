"""Model-load benchmark reference: makes a random SmolLM2-135M-shaped Llama checkpoint and times
transformers' `from_pretrained` on it.

Usage:
  bench_load.py make DIR            write config.json + model.safetensors (random, bf16 on disk)
  bench_load.py time DIR RUNS       time AutoModelForCausalLM.from_pretrained(DIR, dtype=float32)
Prints one JSON line last.
"""

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM


def smollm2_135m():
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )


def make(d):
    torch.manual_seed(0)
    with torch.device("meta"):
        m = LlamaForCausalLM(smollm2_135m())
    m = m.to_empty(device="cpu")
    m.tie_weights()  # to_empty gives the head its own storage; tie it back as from_pretrained does
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.02)
    m = m.to(torch.bfloat16)
    m.save_pretrained(d)
    n = sum(p.numel() for p in m.parameters())
    print(json.dumps({"params": n}))


def timeit(d, runs):
    torch.set_num_threads(torch.get_num_threads())
    out = []
    for _ in range(runs + 1):
        t = time.perf_counter()
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        out.append(time.perf_counter() - t)
        del m
    print(json.dumps({"seconds": out[1:], "warmup": out[0]}))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2])
    else:
        timeit(sys.argv[2], int(sys.argv[3]))
