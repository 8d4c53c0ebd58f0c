"""transformers / PEFT reference for VoltTrain's state-space models (tests/model_ssm.rs):
Mamba, Falcon-Mamba and Jamba (dense MLP) through transformers 5.23's PyTorch path (no CUDA
kernels), fp32, peft 0.21.2.

Usage:
  ssm_ref.py make OUT_DIR [NAMES...]
      Tiny random models OUT_DIR/<name> (save_pretrained) with OUT_DIR/<name>/expected.safetensors:
      left/right padded batches (ids, mask, logits), for each side the gradients of
      sum(logits * gw) (gw zero at padding) of every parameter (`<side>.grad.<name>`), and a
      direct check of `mamba_selective_scan` (`scan.*`: inputs in VoltTrain's layout, output,
      gradients of sum(y * gy)).
  ssm_ref.py peft JOBS_JSON
      Jobs {"op": "make", "base", "adapter", "config"} (random LoRA, saved with save_pretrained,
      logits in ADAPTER/peft_logits.safetensors) and {"op": "eval", "base", "adapter", "out"}
      (loads the adapter with PeftModel.from_pretrained and writes its logits). Logits come from
      the merged model (merge_and_unload): transformers' PyTorch mixer reads `dt_proj.weight`
      directly, so an unmerged LoRA on dt_proj would be ignored there.
      With "allow_out_proj": true, PEFT's `_check_lora_target_modules_mamba` (peft 0.21.2 refuses
      LoRA on `out_proj` for model_type mamba / falcon_mamba, because the CUDA kernel path reads
      `out_proj.weight` directly) is switched off for that job; {"op": "refused", "base",
      "config"} checks that PEFT refuses such a config without it.
Prints one JSON line last.
"""

import copy
import json
import os
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    FalconMambaConfig,
    FalconMambaForCausalLM,
    JambaConfig,
    JambaForCausalLM,
    MambaConfig,
    MambaForCausalLM,
)
from transformers.models.mamba.modeling_mamba import mamba_selective_scan


def variants():
    mamba = dict(vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
                 time_step_rank=4, use_cache=False, pad_token_id=0)
    return {
        "mamba": (MambaForCausalLM, MambaConfig(**mamba)),
        "mamba_untied": (MambaForCausalLM, MambaConfig(**mamba, tie_word_embeddings=False)),
        "falcon_mamba": (FalconMambaForCausalLM, FalconMambaConfig(**mamba, mixer_rms_eps=1e-6)),
        "jamba": (JambaForCausalLM, JambaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, num_experts=1, expert_layer_period=1, expert_layer_offset=0,
            attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
            mamba_dt_rank=4, use_cache=False, pad_token_id=0, tie_word_embeddings=False)),
    }


def base(d):
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()


def run(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def batches(vocab, g):
    lens = [9, 6, 3]
    T = max(lens)
    out = {}
    for side in ("left", "right"):
        ids = torch.randint(1, vocab, (len(lens), T), generator=g)
        mask = torch.zeros(len(lens), T, dtype=torch.long)
        for b, n in enumerate(lens):
            if side == "left":
                mask[b, T - n:] = 1
            else:
                mask[b, :n] = 1
        out[f"{side}_ids"] = ids * mask
        out[f"{side}_mask"] = mask
    return out


def scan_case(g):
    b, d, t, n = 2, 6, 21, 5
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = {
        "u": r(b, d, t), "dt": r(b, d, t) * 0.5, "A": -torch.exp(r(d, n) * 0.5), "B": r(b, t, n),
        "C": r(b, t, n), "D": r(d), "z": r(b, d, t), "bias": r(d) * 0.5,
    }
    x["dt"][0, 0, 3] = 25.0  # softplus above its threshold
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    y = mamba_selective_scan(leaves["u"], leaves["dt"], leaves["A"], leaves["B"].transpose(1, 2),
                             leaves["C"].transpose(1, 2), D=leaves["D"], z=leaves["z"],
                             delta_bias=leaves["bias"], delta_softplus=True)
    gy = r(*y.shape)
    (y * gy).sum().backward()
    out = {f"scan.{k}": v for k, v in x.items()}
    out["scan.y"] = y.detach()
    out["scan.gy"] = gy
    for k, v in leaves.items():
        out[f"scan.grad.{k}"] = v.grad
    return out


def make(out_dir, name, cls, config):
    torch.manual_seed(sum(map(ord, name)))
    config._attn_implementation = "eager"
    model = cls(config).float().eval()
    with torch.no_grad():
        for pn, p in model.named_parameters():
            if "A_log" in pn:
                continue
            p.add_(torch.randn_like(p) * 0.05)
    d = os.path.join(out_dir, name)
    model.save_pretrained(d)
    ref = base(d)
    g = torch.Generator().manual_seed(7)
    out = batches(config.vocab_size, g)
    for side in ("left", "right"):
        ids, mask = out[f"{side}_ids"], out[f"{side}_mask"]
        with torch.no_grad():
            out[f"{side}_logits"] = run(ref, ids, mask).float().contiguous()
        gw = torch.randn(out[f"{side}_logits"].shape, generator=g) * mask[..., None]
        ref.zero_grad()
        (run(ref, ids, mask) * gw).sum().backward()
        out[f"{side}_gw"] = gw
        for n, p in ref.named_parameters():
            out[f"{side}.grad.{n}"] = p.grad.float().contiguous()
    # eval loss with labels (transformers' own shift and mean)
    labels = out["right_ids"].masked_fill(out["right_mask"] == 0, -100)
    with torch.no_grad():
        out["right_loss"] = ref(input_ids=out["right_ids"], attention_mask=out["right_mask"], labels=labels,
                                use_cache=False).loss.reshape(1)
    out.update(scan_case(g))
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(d, "expected.safetensors"))
    return d


def merged_logits(model, base_dir):
    e = load_file(base_dir + "/expected.safetensors")
    m = model.merge_and_unload()
    out = {}
    with torch.no_grad():
        for side in ("left", "right"):
            out[f"{side}_logits"] = run(m, e[f"{side}_ids"], e[f"{side}_mask"]).float().contiguous()
    return out


def peft_jobs(path):
    from peft import LoraConfig, PeftModel, get_peft_model

    import peft.tuners.tuners_utils as tu

    check = tu._check_lora_target_modules_mamba
    jobs = json.loads(open(path).read())
    refused = []
    for j in jobs:
        tu._check_lora_target_modules_mamba = (lambda *a, **k: None) if j.get("allow_out_proj") else check
        if j["op"] == "refused":
            try:
                get_peft_model(base(j["base"]), LoraConfig(task_type="CAUSAL_LM", **j["config"]))
            except ValueError as e:
                refused.append(str(e))
                continue
            raise SystemExit(f"PEFT accepted {j['config']} on {j['base']}")
        elif j["op"] == "make":
            torch.manual_seed(1234)
            m = get_peft_model(base(j["base"]), LoraConfig(task_type="CAUSAL_LM", **j["config"])).eval()
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if "lora_" in n:
                        p.add_(torch.randn_like(p) * 0.1)
            m.save_pretrained(j["adapter"])
            save_file(merged_logits(copy.deepcopy(m), j["base"]), j["adapter"] + "/peft_logits.safetensors")
        else:
            m = PeftModel.from_pretrained(base(j["base"]), j["adapter"]).eval()
            save_file(merged_logits(m, j["base"]), j["out"])
    print(json.dumps({"jobs": len(jobs), "refused": refused}))


def main():
    if sys.argv[1] == "peft":
        peft_jobs(sys.argv[2])
        return
    out_dir = sys.argv[2]
    all_v = variants()
    names = sys.argv[3:] or list(all_v)
    made = {n: make(out_dir, n, *all_v[n]) for n in names}
    print(json.dumps({"transformers": transformers.__version__, "made": made}))


if __name__ == "__main__":
    main()
