"""Reference quantization for VoltTrain's `quant` parity tests.

Run by the Rust tests in `tests/quant_*.rs` through `$VOLTTRAIN_PYTHON_REF` (the provisioned venv
with torch 2.11.0 and bitsandbytes 0.50.2). Every mode reads the float32 tensors of a safetensors
file and writes the reference results to another safetensors file:

  4bit IN OUT --blocksizes 64,128
      bitsandbytes.functional.quantize_4bit / dequantize_4bit for nf4 and fp4, with and without
      compress_statistics (double quantization). For each input tensor NAME, keys
      NAME.{nf4,fp4}.{bs}.{plain,double}.{packed,absmax,deq,deq_torch} and, for double quantization,
      .{qabsmax,absmax2,code2,offset}.
  int8 IN OUT
      bitsandbytes.functional.int8_vectorwise_quant / int8_vectorwise_dequant (row-wise absmax):
      NAME.int8.{codes,stats,deq}.
  fp8 IN OUT
      torchao Float8Linear's dynamic scaling rule written out in torch (torchao is not installed
      here): scale = finfo(fp8).max / clamp(amax, min=1e-12) (torchao.float8.float8_utils
      .amax_to_scale, EPS = 1e-12), bits = (x * scale).clamp(-max, max).to(fp8), deq = bits / scale.
      amax is the whole tensor's (per_tensor) or each row's (per_row).
      NAME.{e4m3,e5m2}.{per_tensor,per_row}.{bits,scale,deq}; bits are the fp8 bytes as uint8.
  fp8linear IN OUT
      Emulated FP8 training linear (torchao Float8Linear recipe, tensorwise): x and w quantized
      to e4m3 for the forward, the output gradient to e5m2 for both backward matmuls. Inputs x,
      w, gy; outputs y, gx, gw.
  fp8cast IN OUT
      PyTorch's own float8 casts of each input tensor NAME, no scaling: NAME.{e4m3,e5m2} =
      NAME.to(float8_e4m3fn / float8_e5m2) as uint8 bytes.
  fp8qlinear IN OUT
      The frozen-FP8-weight linear of src/quant/fp8.rs, written with the semantics above: for
      each weight format F in {e4m3, e5m2} and scaling S in {per_tensor, per_row}, W is
      quantized to F with scaling S, x (as [tokens, in]) to e4m3 with scaling S (per token row
      for per_row), y = fq(x) @ fq(W)^T in fp32, rounded to bf16 for per_row (the dtype
      `_scaled_mm` returns for row-wise scales); gx = gy @ fq(W) (straight-through for x).
      Inputs x, w, gy; outputs F.S.y and F.S.gx.
"""

import argparse
import sys

import torch
from safetensors.torch import load_file, save_file


def dequantize_4bit_torch(packed, absmax, code, blocksize, shape):
    """bitsandbytes' `_dequantize_4bit_compute` (backends/default/ops.py) without its
    torch.compile wrapper: high nibble first, `code[nibble] * absmax[i // blocksize]`."""
    b = packed.reshape(-1).to(torch.int64)
    nib = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)
    n = shape.numel()
    vals = code[nib][:n]
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (vals * scale).reshape(shape)


def run_4bit(tensors, blocksizes):
    import bitsandbytes.functional as F

    out = {}
    for name, w in tensors.items():
        for qt in ("nf4", "fp4"):
            for bs in blocksizes:
                for double in (False, True):
                    p, s = F.quantize_4bit(w, blocksize=bs, compress_statistics=double, quant_type=qt)
                    deq = F.dequantize_4bit(p, s)
                    k = f"{name}.{qt}.{bs}.{'double' if double else 'plain'}"
                    out[f"{k}.packed"] = p.contiguous()
                    out[f"{k}.deq"] = deq.float().contiguous()
                    # bitsandbytes' torch (default-backend) dequantization of the same state: its
                    # CPU C kernel (used above) mis-assigns blocks when a row's length is not a
                    # multiple of the block size (0.50.2), the torch kernel does not.
                    absmax_fp32 = s.absmax
                    if double:
                        absmax_fp32 = F.dequantize_blockwise(s.absmax, s.state2) + s.offset
                    code = F.get_4bit_type(qt, device="cpu")
                    deq_t = dequantize_4bit_torch(p, absmax_fp32.float(), code, bs, w.shape)
                    out[f"{k}.deq_torch"] = deq_t.float().contiguous()
                    if double:
                        out[f"{k}.qabsmax"] = s.absmax.contiguous()
                        out[f"{k}.absmax2"] = s.state2.absmax.contiguous()
                        out[f"{k}.code2"] = s.state2.code.contiguous()
                        out[f"{k}.offset"] = s.offset.reshape(1).float().contiguous()
                        # the fp32 absmax the nested statistics decode to
                        absmax = F.dequantize_blockwise(s.absmax, s.state2) + s.offset
                        out[f"{k}.absmax"] = absmax.float().contiguous()
                    else:
                        out[f"{k}.absmax"] = s.absmax.contiguous()
    return out


def run_int8(tensors):
    import bitsandbytes.functional as F

    out = {}
    for name, w in tensors.items():
        codes, stats, _ = F.int8_vectorwise_quant(w.clone())
        out[f"{name}.int8.codes"] = codes.contiguous()
        out[f"{name}.int8.stats"] = stats.float().contiguous()
        out[f"{name}.int8.deq"] = F.int8_vectorwise_dequant(codes, stats).float().contiguous()
    return out


FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def fp8_quant(x, dtype, per_row):
    fmax = torch.finfo(dtype).max
    amax = x.abs().amax(dim=-1, keepdim=True) if per_row else x.abs().amax()
    scale = (fmax / torch.clamp(amax.to(torch.float64), min=1e-12)).to(torch.float32)
    bits = (x * scale).clamp(-fmax, fmax).to(dtype)
    return bits, scale


def fp8_fq(x, dtype, per_row=False):
    bits, scale = fp8_quant(x, dtype, per_row)
    return bits.to(torch.float32) / scale


def run_fp8(tensors):
    out = {}
    for name, w in tensors.items():
        for fmt, dtype in FP8.items():
            for scaling in ("per_tensor", "per_row"):
                bits, scale = fp8_quant(w, dtype, scaling == "per_row")
                k = f"{name}.{fmt}.{scaling}"
                out[f"{k}.bits"] = bits.view(torch.uint8).contiguous()
                out[f"{k}.scale"] = scale.reshape(-1).contiguous()
                out[f"{k}.deq"] = (bits.to(torch.float32) / scale).contiguous()
    return out


def run_fp8linear(tensors):
    x, w, gy = tensors["x"], tensors["w"], tensors["gy"]
    x2 = x.reshape(-1, x.shape[-1])
    gy2 = gy.reshape(-1, gy.shape[-1])
    xq = fp8_fq(x2, torch.float8_e4m3fn)
    wq = fp8_fq(w, torch.float8_e4m3fn)
    y = xq @ wq.t()
    gyq = fp8_fq(gy2, torch.float8_e5m2)
    gx = gyq @ wq
    gw = gyq.t() @ xq
    return {
        "y": y.reshape(*x.shape[:-1], w.shape[0]).contiguous(),
        "gx": gx.reshape(x.shape).contiguous(),
        "gw": gw.contiguous(),
    }


def run_fp8cast(tensors):
    out = {}
    for name, x in tensors.items():
        for fmt, dtype in FP8.items():
            out[f"{name}.{fmt}"] = x.to(dtype).view(torch.uint8).contiguous()
    return out


def run_fp8qlinear(tensors):
    x, w, gy = tensors["x"], tensors["w"], tensors["gy"]
    x2 = x.reshape(-1, x.shape[-1])
    gy2 = gy.reshape(-1, gy.shape[-1])
    out = {}
    for fmt, dtype in FP8.items():
        for scaling in ("per_tensor", "per_row"):
            per_row = scaling == "per_row"
            wq = fp8_fq(w, dtype, per_row)
            xq = fp8_fq(x2, torch.float8_e4m3fn, per_row)
            y = xq @ wq.t()
            if per_row:
                y = y.to(torch.bfloat16).float()
            out[f"{fmt}.{scaling}.y"] = y.reshape(*x.shape[:-1], w.shape[0]).contiguous()
            out[f"{fmt}.{scaling}.gx"] = (gy2 @ wq).reshape(x.shape).contiguous()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["4bit", "int8", "fp8", "fp8linear", "fp8cast", "fp8qlinear"])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--blocksizes", default="64")
    a = ap.parse_args()
    tensors = {k: v.float() for k, v in load_file(a.input).items()}
    if a.mode == "4bit":
        out = run_4bit(tensors, [int(b) for b in a.blocksizes.split(",")])
    elif a.mode == "int8":
        out = run_int8(tensors)
    elif a.mode == "fp8":
        out = run_fp8(tensors)
    elif a.mode == "fp8cast":
        out = run_fp8cast(tensors)
    elif a.mode == "fp8qlinear":
        out = run_fp8qlinear(tensors)
    else:
        out = run_fp8linear(tensors)
    save_file(out, a.output)
    print("ok", len(out), file=sys.stderr)


if __name__ == "__main__":
    main()
