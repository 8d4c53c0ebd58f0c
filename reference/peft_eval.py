"""Eval loss of a PEFT adapter with transformers + peft, the way `volttrain eval` defines it:
cross-entropy summed over the label tokens (assistant tokens, labels shifted by one) of every
example of a JSONL file, divided by their count. Tokenization and masks come from
`data_ref.sft_record` (transformers' apply_chat_template + TRL-style prefix rendering).

Usage: peft_eval.py BASE_DIR ADAPTER_DIR EVAL.jsonl MAX_LEN
(ADAPTER_DIR `-`: the model in BASE_DIR alone, e.g. a merged one)
Prints {"eval_loss": ..., "tokens": ...}."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data_ref import sft_record  # noqa: E402


def main():
    base, adapter, path, max_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter != "-":
        model = PeftModel.from_pretrained(model, adapter)
    model = model.eval()
    total, count = 0.0, 0
    with open(path, encoding="utf-8") as f, torch.no_grad():
        for line in f:
            if not line.strip():
                continue
            ex = sft_record(tok, json.loads(line), False, max_len)
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor([ex["labels"]])
            logits = model(input_ids=ids).logits[0, :-1].float()
            target = labels[0, 1:]
            loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((target != -100).sum())
    print(json.dumps({"eval_loss": total / count, "tokens": count}))


if __name__ == "__main__":
    main()
