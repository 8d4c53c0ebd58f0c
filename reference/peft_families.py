"""PEFT reference for VoltTrain's per-family LoRA tests (tests/lora_families.rs), many models
in one process (peft 0.21.2, transformers 5.23, fp32, eager).

Usage: peft_families.py JOBS_JSON
JOBS_JSON is a list of jobs:
  {"op": "make", "base": DIR, "adapter": DIR, "config": {...}}  like `peft_ref.py make`
  {"op": "eval", "base": DIR, "adapter": DIR, "out": FILE}      like `peft_ref.py eval`
  {"op": "all_linear", "base": DIR, "out": FILE}
      writes the module names PEFT's `target_modules="all-linear"` adapts, as a JSON list
Prints one JSON line last.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peft import LoraConfig, get_peft_model  # noqa: E402

from peft_ref import base, evaluate, make  # noqa: E402


def all_linear(base_dir, out_file):
    m = get_peft_model(base(base_dir), LoraConfig(task_type="CAUSAL_LM", r=2, target_modules="all-linear"))
    names = sorted(
        n[len("base_model.model."):-len(".lora_A.default.weight")]
        for n, _ in m.named_parameters()
        if n.endswith(".lora_A.default.weight")
    )
    with open(out_file, "w") as f:
        json.dump(names, f)


def main():
    jobs = json.loads(open(sys.argv[1]).read())
    for j in jobs:
        if j["op"] == "make":
            make(j["base"], j["adapter"], json.dumps(j["config"]))
        elif j["op"] == "eval":
            evaluate(j["base"], j["adapter"], j["out"])
        else:
            all_linear(j["base"], j["out"])
    print(json.dumps({"jobs": len(jobs)}))


if __name__ == "__main__":
    main()
