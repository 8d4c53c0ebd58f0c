"""Reference side of VoltTrain's quantization benchmark (bench/src/quant.rs).

Prints one JSON line with
  bytes_per_param.{nf4,nf4+dq,fp4,fp4+dq,int8,fp8_e4m3,fp8_e5m2}: bytes held by bitsandbytes'
      4-bit / int8 results (codes + QuantState tensors) and torch FP8 (bits + scale) for one
      SmolLM2-135M decoder layer's linear weights, divided by their parameter count;
  copy_gbps: torch Tensor.copy_ of the fp32 output size, GB/s;
  dequant_gbps_<format>: dequantization to fp32 in GB/s of output (bitsandbytes' CPU kernels for
      4-bit and int8, torch casts for FP8), same shapes and repetitions as the Rust side.
Stats are {median, min, max, n}. Thread count comes from OMP_NUM_THREADS (set by the caller).
"""

import argparse
import json
import os
import statistics
import time

import torch
import bitsandbytes.functional as F

LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
FOUR_BIT = {"nf4": ("nf4", False), "nf4+dq": ("nf4", True), "fp4": ("fp4", False), "fp4+dq": ("fp4", True)}


def nbytes(t):
    return t.numel() * t.element_size()


def state_bytes(packed, s):
    total = nbytes(packed) + nbytes(s.absmax) + nbytes(s.code)
    if s.nested:
        total += nbytes(s.state2.absmax) + nbytes(s.state2.code) + nbytes(s.offset)
    return total


def fp8_quant(x, dtype):
    fmax = torch.finfo(dtype).max
    scale = (fmax / torch.clamp(x.abs().amax().to(torch.float64), min=1e-12)).to(torch.float32)
    return (x * scale).clamp(-fmax, fmax).to(dtype), scale


def stats(samples, scale):
    rates = sorted(scale / s for s in samples)
    return {"median": statistics.median(rates), "min": rates[0], "max": rates[-1], "n": len(rates)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)

    res = {"bytes_per_param": {}}
    params = sum(o * i for o, i in LAYER)
    ws = [torch.randn(o, i) * 0.02 for o, i in LAYER]
    for name, (qt, dq) in FOUR_BIT.items():
        held = 0
        for w in ws:
            p, s = F.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type=qt)
            held += state_bytes(p, s)
        res["bytes_per_param"][name] = held / params
    held = 0
    for w in ws:
        codes, st, _ = F.int8_vectorwise_quant(w.clone())
        held += nbytes(codes) + nbytes(st)
    res["bytes_per_param"]["int8"] = held / params
    for name, dt in (("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        held = 0
        for w in ws:
            b, sc = fp8_quant(w, dt)
            held += nbytes(b) + nbytes(sc)
        res["bytes_per_param"][name] = held / params

    rows, cols = 1536, 576
    reps = a.reps or (4 if a.runs <= 3 else 16)
    out_bytes = rows * cols * 4 * reps
    w = torch.randn(rows, cols)
    src = torch.randn(rows * reps, cols)
    dst = torch.empty(rows * reps, cols)
    fns = {"copy_gbps": lambda: dst.copy_(src)}
    for name, (qt, dq) in FOUR_BIT.items():
        qs = [F.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type=qt) for _ in range(reps)]
        fns[f"dequant_gbps_{name}"] = lambda qs=qs: [F.dequantize_4bit(p, s) for p, s in qs]
    q8 = [F.int8_vectorwise_quant(w.clone())[:2] for _ in range(reps)]
    fns["dequant_gbps_int8"] = lambda: [F.int8_vectorwise_dequant(c, s) for c, s in q8]
    for name, dt in (("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        qf = [fp8_quant(w, dt) for _ in range(reps)]
        fns[f"dequant_gbps_{name}"] = lambda qf=qf: [b.to(torch.float32) / sc for b, sc in qf]
    # timed in turn within each run, like the Rust side, so that all share the machine's load
    times = {k: [] for k in fns}
    for r in range(a.warmup + a.runs * 3):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            if r >= a.warmup:
                times[k].append(time.perf_counter() - t)
    for k, ts in times.items():
        res[k] = stats(ts, out_bytes / 1e9)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
