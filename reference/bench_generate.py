"""Reference for the decode benchmark (issue 18): transformers `generate(do_sample=False)` with its
KV cache (DynamicCache) on a random model, fp32, same threads, prompt and token count as VoltTrain.

Usage: bench_generate.py DIR PROMPT_LEN NEW_TOKENS WARMUP RUNS THREADS
Decode seconds = time(generate N new tokens) - time(generate 1 new token) per run (the first
token is the prefill's); EOS is ignored (min_new_tokens). Prints one JSON line:
{"decode_seconds": [...], "new_tokens": N, "attn": ...}.
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    d, plen, new, warmup, runs, threads = sys.argv[1], *map(int, sys.argv[2:7])
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, plen), generator=g)
    mask = torch.ones_like(ids)

    def gen(n):
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n)
        return time.perf_counter() - t

    for _ in range(warmup):
        gen(new)
    out = []
    for _ in range(runs):
        first = gen(1)
        out.append(gen(new) - first)
    print(json.dumps({"decode_seconds": out, "new_tokens": new, "attn": model.config._attn_implementation}))


if __name__ == "__main__":
    main()
