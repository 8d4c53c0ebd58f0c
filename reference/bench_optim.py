#!/usr/bin/env python3
"""Reference timings for VoltTrain's optimizer benchmark (`bench/src/optim.rs`).

Parameters: the matrices of a SmolLM2-135M-shaped model (hidden 576, intermediate 1536, 9 heads
of 64, 3 kv heads; per layer q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536),
`--muon-layers` / `--adamw-layers` layers of them, fp32 on CPU, gradients fixed.

  muon:  the reference `Muon` of optim_ref.py (Keller Jordan's formulas, one parameter at a time)
  adamw: torch.optim.AdamW(foreach=True)

Prints one JSON line: {"muon_s": [seconds per step...], "adamw_s": [...], "threads": n, ...}.

With --serve, builds both optimizers, prints {"ready": true, ...}, then reads commands from
standard input, one a line: `muon` or `adamw` runs one step and prints {"s": seconds}; `quit`
ends. VoltTrain's benchmark uses this to interleave its steps with the reference's, so that both
see the same machine load (the shared CPU this was written on had a load average near 10).
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from optim_ref import Muon  # noqa: E402

HIDDEN, INTER, HEAD_DIM, HEADS, KV_HEADS = 576, 1536, 64, 9, 3


def layer_shapes():
    q = (HEADS * HEAD_DIM, HIDDEN)
    kv = (KV_HEADS * HEAD_DIM, HIDDEN)
    return [q, kv, kv, (HIDDEN, HEADS * HEAD_DIM), (INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)]


def make_params(layers, seed):
    g = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(layers):
        for shape in layer_shapes():
            p = torch.randn(shape, generator=g) * 0.02
            p.requires_grad_(True)
            p.grad = torch.randn(shape, generator=g)
            params.append(p)
    return params


def time_steps(opt, warmup, runs):
    for _ in range(warmup):
        opt.step()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        opt.step()
        out.append(time.perf_counter() - t)
    return out


def serve(args, which):
    opts = {}
    if "muon" in which:
        opts["muon"] = Muon(make_params(args.muon_layers, args.seed), lr=0.02, weight_decay=0.1,
                            scale="match_adamw")
    if "adamw" in which:
        opts["adamw"] = torch.optim.AdamW(make_params(args.adamw_layers, args.seed), lr=1e-3,
                                          weight_decay=0.01, foreach=True)
    print(json.dumps({"ready": True, "threads": torch.get_num_threads(),
                      "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        t = time.perf_counter()
        opts[cmd].step()
        print(json.dumps({"s": time.perf_counter() - t}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--muon-layers", type=int, default=30)
    ap.add_argument("--adamw-layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--which", default="muon,adamw")
    ap.add_argument("--serve", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    which = args.which.split(",")
    if args.serve:
        serve(args, which)
        return
    res = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    if "muon" in which:
        params = make_params(args.muon_layers, args.seed)
        opt = Muon(params, lr=0.02, weight_decay=0.1, scale="match_adamw")
        res["muon_s"] = time_steps(opt, args.warmup, args.runs)
        res["muon_params"] = sum(p.numel() for p in params)
        del opt, params
    if "adamw" in which:
        params = make_params(args.adamw_layers, args.seed)
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=True)
        res["adamw_s"] = time_steps(opt, args.warmup, args.runs)
        res["adamw_params"] = sum(p.numel() for p in params)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
