"""PyTorch references for VoltTrain's mixed precision (issue #14; torch 2.11, transformers 5.23,
peft 0.21.2, CPU).

Usage:
  amp_ref.py scaler SPEC_JSON OUT_JSON
      torch.amp.GradScaler("cpu") on a least-squares problem `mean((x W^T - y)^2)` with plain SGD:
      per step scale(loss).backward(), the gradient entries listed in the spec set to inf or NaN
      (injected overflow), unscale_, clip_grad_norm_, step, update. Writes each step's scale
      after update, whether the step was skipped, and the final W.
  amp_ref.py bf16 BASE_DIR ADAPTER_DIR BATCH_FILE OUT_FILE
      The PEFT adapter in ADAPTER_DIR on the transformers model in BASE_DIR (fp32 weights, sdpa
      attention), forward under torch.autocast("cpu", dtype=torch.bfloat16) on the batch
      (input_ids, attention_mask, labels), the loss as transformers' ForCausalLMLoss (logits
      upcast to fp32, shifted labels, -100 ignored, mean over label tokens), backward outside
      autocast. Writes the loss and every LoRA gradient under VoltTrain's names.
Prints one JSON line last.
"""

import json
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


def scaler(spec_path, out_path):
    spec = json.load(open(spec_path))
    w = torch.tensor(spec["w"], dtype=torch.float32).requires_grad_()
    x = torch.tensor(spec["x"], dtype=torch.float32)
    y = torch.tensor(spec["y"], dtype=torch.float32)
    opt = torch.optim.SGD([w], lr=spec["lr"])
    sc = torch.amp.GradScaler(
        "cpu",
        init_scale=spec["init_scale"],
        growth_factor=spec["growth_factor"],
        backoff_factor=spec["backoff_factor"],
        growth_interval=spec["growth_interval"],
    )
    inject = {int(k): v for k, v in spec["inject"].items()}
    scales, skipped = [], []
    for step in range(spec["steps"]):
        opt.zero_grad(set_to_none=True)
        loss = ((x @ w.T - y) ** 2).mean()
        sc.scale(loss).backward()
        if step in inject:
            with torch.no_grad():
                w.grad[0, 0] = float(inject[step])
        sc.unscale_(opt)
        torch.nn.utils.clip_grad_norm_([w], spec["clip"])
        found = sum(v.item() for v in sc._found_inf_per_device(opt).values())
        sc.step(opt)
        sc.update()
        scales.append(sc.get_scale())
        skipped.append(bool(found > 0))
    json.dump({"scales": scales, "skipped": skipped, "w": w.detach().reshape(-1).tolist()}, open(out_path, "w"))
    print(json.dumps({"steps": spec["steps"], "skipped": sum(skipped)}))


def bf16(base_dir, adapter_dir, batch_file, out_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    b = load_file(batch_file)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="sdpa")
    m = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    m.train()
    labels = b["labels"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        lg = logits.float()[:, :-1, :].reshape(-1, logits.shape[-1])
        tg = labels[:, 1:].reshape(-1)
        n = (tg != -100).sum()
        loss = F.cross_entropy(lg, tg, ignore_index=-100, reduction="sum") / n
    assert logits.dtype == torch.bfloat16, logits.dtype
    loss.backward()
    out = {"loss": loss.detach().reshape(1).double()}
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
            key = name.removeprefix("base_model.model.").replace(".default.", ".")
            out["grad." + key] = p.grad.detach().contiguous()
    save_file(out, out_file)
    print(json.dumps({"loss": loss.item(), "grads": len(out) - 1}))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "scaler":
        scaler(sys.argv[2], sys.argv[3])
    elif cmd == "bf16":
        bf16(*sys.argv[2:6])
    else:
        sys.exit(f"unknown command {cmd}")
