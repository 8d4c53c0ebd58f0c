"""Reference for the Mamba benchmark (issue 17): a random mamba-130m-shaped checkpoint
(d_model 768, d_state 16, expand 2, conv 4, vocab 50280, tied embeddings; 24 layers, fewer in
quick mode) and transformers' forward + backward through its PyTorch mixer path (no CUDA
kernels: `MambaMixer` falls back to the sequential scan), fp32, same threads and batch as
VoltTrain.

Usage:
  bench_mamba.py make DIR LAYERS BATCH SEQ
      writes the checkpoint (fp32 safetensors) and DIR/batch.safetensors
  bench_mamba.py fwdbwd DIR WARMUP RUNS THREADS
      times model(input_ids, labels=input_ids).loss.backward() (train mode, no cache)
Prints one JSON line last.
"""

import json
import os
import resource
import sys
import time

import torch


def make(d, layers, b, t):
    from safetensors.torch import save_file
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    # state-spaces/mamba-130m-hf
    cfg = MambaConfig(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=layers, expand=2,
                      conv_kernel=4, use_cache=False)
    m = MambaForCausalLM(cfg).float()
    m.save_pretrained(d)
    n = sum(p.numel() for p in m.parameters())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=g)
    save_file({"input_ids": ids.contiguous()}, os.path.join(d, "batch.safetensors"))
    print(json.dumps({"params": n}))


def fwdbwd(d, warmup, runs, threads):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model.train()
    ids = load_file(os.path.join(d, "batch.safetensors"))["input_ids"]

    def step():
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"step_seconds": times, "peak_rss_mb": rss}))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        make(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        fwdbwd(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
