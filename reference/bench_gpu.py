"""Reference for the GPU acceptance run (tools/gpu_check.py, `./dev gpu-check`): the same
training steps as `volttrain-gpu-check steps`, in PyTorch + transformers + PEFT, on the same
checkpoint and token batch.

  --mode lora   LlamaForCausalLM in bf16, PEFT LoRA r16 / alpha 32 / dropout 0 on q,k,v,o,gate,
                up,down (PEFT keeps the adapters in fp32 over a bf16 base), bf16 autocast.
  --mode qlora  the same LoRA over an NF4 base (block 64, double quantization, bf16 compute):
                bitsandbytes through transformers' BitsAndBytesConfig when bitsandbytes imports;
                otherwise the plain-PyTorch NF4 linear below (bitsandbytes' NF4 code book and
                absmax blocks, dequantized to bf16 in each forward; LoRA written out in torch) and
                the output says `"impl": "plain-torch-nf4"`.
  --mode full   every weight trained in bf16.

AdamW (torch.optim.AdamW, fused on CUDA) at lr 1e-4 (full: 1e-5), weight decay 0. Peak memory is
torch.cuda.max_memory_allocated after a reset once the model is on the device (weights included,
loading transients not), as VoltTrain reports it. On the CPU (--cpu, the driver's smoke run) fp32
and the peak resident set.

Prints one JSON line: {"step_seconds": [...], "peak_bytes": N, "tokens_per_step": N,
"trainable_params": N, "impl": "..."}; or {"unavailable": "why"} when a package is missing.
"""
import argparse
import json
import resource
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# bitsandbytes' NF4 code book (bitsandbytes/functional.py, get_4bit_type("nf4")).
NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


class PlainNf4Linear(torch.nn.Module):
    """A frozen NF4 weight (block-wise absmax, 4-bit codes packed two per byte, the absmax
    itself 8-bit quantized in blocks of 256 as double quantization does) dequantized to the
    compute dtype in every forward, plus a LoRA branch (A: kaiming-uniform, B: zeros)."""

    def __init__(self, linear, r, alpha, block=64, compute=torch.bfloat16):
        super().__init__()
        w = linear.weight.detach().float()
        self.shape = w.shape
        self.compute = compute
        self.block = block
        flat = w.reshape(-1, block)
        absmax = flat.abs().amax(dim=1).clamp(min=1e-12)
        code = torch.tensor(NF4, device=w.device)
        idx = (flat / absmax[:, None]).unsqueeze(-1).sub(code).abs().argmin(-1).to(torch.uint8)
        idx = idx.reshape(-1)
        self.register_buffer("packed", (idx[0::2] << 4) | idx[1::2])
        # double quantization of the absmax: 8-bit codes over blocks of 256 around their mean
        self.offset = absmax.mean()
        a = (absmax - self.offset).reshape(-1, 256) if absmax.numel() % 256 == 0 else None
        if a is not None:
            s2 = a.abs().amax(dim=1).clamp(min=1e-12)
            self.register_buffer("qabs", torch.round(a / s2[:, None] * 127).to(torch.int8))
            self.register_buffer("abs2", s2)
        else:
            self.register_buffer("qabs", None)
            self.register_buffer("abs2", absmax)
        self.register_buffer("code", code.to(compute))
        out_f, in_f = self.shape
        self.lora_A = torch.nn.Parameter(torch.empty(r, in_f, device=w.device))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)
        self.lora_B = torch.nn.Parameter(torch.zeros(out_f, r, device=w.device))
        self.scale = alpha / r

    def weight(self):
        if self.qabs is not None:
            absmax = (self.qabs.float() / 127 * self.abs2[:, None]).reshape(-1) + self.offset
        else:
            absmax = self.abs2
        idx = torch.stack([self.packed >> 4, self.packed & 15], dim=1).reshape(-1).long()
        vals = self.code[idx].reshape(-1, self.block) * absmax[:, None].to(self.compute)
        return vals.reshape(self.shape)

    def forward(self, x):
        x = x.to(self.compute)
        y = torch.nn.functional.linear(x, self.weight())
        lora = (x.float() @ self.lora_A.t()) @ self.lora_B.t()
        return y + (lora * self.scale).to(y.dtype)


def plain_qlora(model, r, alpha):
    for name, mod in list(model.named_modules()):
        for t in TARGETS:
            child = getattr(mod, t, None)
            if isinstance(child, torch.nn.Linear):
                setattr(mod, t, PlainNf4Linear(child, r, alpha))
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("lora_A") or n.endswith("lora_B"))
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--mode", choices=["lora", "qlora", "full"], required=True)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args()

    try:
        import transformers
        from safetensors.torch import load_file
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"unavailable": f"transformers/safetensors not importable: {e}"}))
        return
    device = torch.device("cpu" if args.cpu else "cuda:0")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    ids = load_file(f"{args.model}/batch.safetensors")["input_ids"].to(device)
    impl = "transformers" if args.mode == "full" else "transformers+peft"
    kw = {"torch_dtype": dtype, "attn_implementation": "sdpa"}
    model = None
    impl_note = None
    if args.mode == "qlora":
        try:
            import bitsandbytes  # noqa: F401

            if not cuda:
                raise RuntimeError("bitsandbytes 4-bit training is the CUDA path")
            q = transformers.BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
            model = transformers.AutoModelForCausalLM.from_pretrained(
                args.model, quantization_config=q, device_map={"": 0}, **kw
            )
            impl = "transformers+peft+bitsandbytes"
        except Exception as e:  # noqa: BLE001
            impl = "plain-torch-nf4"
            impl_note = f"bitsandbytes not used: {type(e).__name__}: {str(e)[:200]}"
            model = None
    if model is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, **kw).to(device)
    if args.mode == "lora" or impl == "transformers+peft+bitsandbytes":
        try:
            import peft
        except Exception as e:  # noqa: BLE001
            print(json.dumps({"unavailable": f"peft not importable: {e}"}))
            return
        cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
        model = peft.get_peft_model(model, cfg)
    elif args.mode == "qlora":
        model = plain_qlora(model, 16, 32.0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    lr = 1e-5 if args.mode == "full" else 1e-4
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=cuda)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()  # synchronizes, as VoltTrain's step does
        times.append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "step_seconds": times[args.warmup:],
        "peak_bytes": peak,
        "tokens_per_step": ids.numel(),
        "trainable_params": sum(p.numel() for p in params),
        "impl": impl,
        "impl_note": impl_note,
        "final_train_loss": loss,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }))


if __name__ == "__main__":
    main()
