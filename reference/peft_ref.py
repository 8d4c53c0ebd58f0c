"""PEFT reference for VoltTrain's LoRA tests (peft 0.21.2, transformers 5.23, fp32, eager).

Usage:
  peft_ref.py make BASE_DIR ADAPTER_DIR CONFIG_JSON
      Builds a LoRA adapter on the base model with peft (CONFIG_JSON: LoraConfig keyword
      arguments), gives every LoRA and modules_to_save parameter random values (so B is not zero),
      saves it with save_pretrained, and writes ADAPTER_DIR/peft_logits.safetensors with the
      adapted model's logits on BASE_DIR/expected.safetensors' left/right batches.
  peft_ref.py eval BASE_DIR ADAPTER_DIR OUT_FILE
      Loads an adapter with PeftModel.from_pretrained and writes its logits on the same batches.
Prints one JSON line last.
"""

import json
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


def base(d):
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()


def logits(model, base_dir):
    e = load_file(base_dir + "/expected.safetensors")
    out = {}
    with torch.no_grad():
        for side in ("left", "right"):
            y = model(
                input_ids=e[f"{side}_ids"], attention_mask=e[f"{side}_mask"], position_ids=e[f"{side}_pos"]
            ).logits
            out[f"{side}_logits"] = y.float().contiguous()
    return out


def make(base_dir, adapter_dir, cfg_json):
    torch.manual_seed(1234)
    cfg = LoraConfig(task_type="CAUSAL_LM", **json.loads(cfg_json))
    m = get_peft_model(base(base_dir), cfg).eval()
    n = 0
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
                n += 1
    m.save_pretrained(adapter_dir)
    save_file(logits(m, base_dir), adapter_dir + "/peft_logits.safetensors")
    print(json.dumps({"perturbed": n}))


def evaluate(base_dir, adapter_dir, out_file):
    m = PeftModel.from_pretrained(base(base_dir), adapter_dir).eval()
    save_file(logits(m, base_dir), out_file)
    n = sum(1 for name, _ in m.named_parameters() if "lora_" in name)
    print(json.dumps({"lora_params": n}))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        evaluate(sys.argv[2], sys.argv[3], sys.argv[4])
