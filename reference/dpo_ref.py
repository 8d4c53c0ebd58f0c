"""Reference numbers for preference tuning, from TRL itself (trl 1.16.0, pinned in
tools/provision.sh), for tests/pref_parity.rs.

    $VOLTTRAIN_PYTHON_REF reference/dpo_ref.py MODEL DATA OUT --steps 3 --lr 1e-3 --beta 0.1

For each of `sigmoid`, `ipo`, `hinge`, `robust` (label_smoothing 0.1) it builds TRL's
DPOTrainer on MODEL (fp32, CPU) with a fresh LoRA adapter (PEFT's init: A Kaiming-uniform, B zero)
saved to `OUT/init_adapter/`, which VoltTrain loads too, and the pairs of DATA (all in one batch,
so every step sees the same batch whatever the order). A fresh adapter makes TRL's reference (the
base model) and VoltTrain's (the model with its adapters off) the same model:

- `OUT/<loss>.json`: the collated batch (`input_ids`, `attention_mask`, `completion_mask`), the
  loss and TRL's metrics of the first batch before any update (`compute_loss`), and TRL's logged
  metrics of every step of `--steps` AdamW steps (constant lr, no clipping, no weight decay);
- `OUT/<loss>_final.safetensors`: the LoRA parameters after those steps (PEFT names, without the
  `base_model.model.` prefix and adapter name).

ORPO (`orpo.json`, `orpo_final.safetensors`): TRL's ORPOTrainer code (`concatenated_forward`,
`odds_ratio_loss`), first without a gradient and then over `--steps` AdamW steps, on the
same rows, called on the collated DPO batch, with the adapter as loaded (ORPO's own tokenizer path
is not used: VoltTrain tokenizes pairs once, the DPO way).
"""

import argparse
import json
import math
import os
import types
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
from trl.experimental.orpo import ORPOTrainer

torch.use_deterministic_algorithms(True)


def load_rows(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def base(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)


def make_init_adapter(model_dir, out):
    torch.manual_seed(0)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    m = get_peft_model(base(model_dir), cfg)
    m.save_pretrained(out / "init_adapter")


def lora_state(model):
    out = {}
    for n, p in model.named_parameters():
        # TRL may add a frozen copy named "ref"; the trained adapter is "default"
        if "lora_" in n and ".default." in n:
            k = n.removeprefix("base_model.model.").replace(".default", "")
            out[k] = p.detach().clone().contiguous()
    return out


def trainer_for(model_dir, data, out, loss_type, args):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(base(model_dir), out / "init_adapter", is_trainable=True)
    cfg = DPOConfig(
        output_dir=str(out / f"trl-{loss_type}"),
        loss_type=loss_type,
        beta=args.beta,
        label_smoothing=0.1 if loss_type == "robust" else 0.0,
        per_device_train_batch_size=len(data),
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=False,
        fp16=False,
        use_cpu=True,
        seed=0,
        max_length=args.max_length,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        gradient_checkpointing=False,
    )
    ds = Dataset.from_list(data)
    return DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)


def first_batch(trainer, n):
    feats = [trainer.train_dataset[i] for i in range(n)]
    return trainer.data_collator(feats)


def dpo(model_dir, data, out, loss_type, args):
    trainer = trainer_for(model_dir, data, out, loss_type, args)
    batch = first_batch(trainer, len(data))
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    first = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    trainer._metrics["train"].clear()
    trainer.train()
    steps = [
        {k: h[k] for k in h if k.startswith(("rewards/", "logps/")) or k == "loss"}
        for h in trainer.state.log_history
        if "rewards/chosen" in h
    ]
    rec = {
        "input_ids": batch["input_ids"].tolist(),
        "attention_mask": batch["attention_mask"].tolist(),
        "completion_mask": batch["completion_mask"].tolist(),
        "loss": loss.item(),
        "metrics": first,
        "steps": steps,
    }
    (out / f"{loss_type}.json").write_text(json.dumps(rec))
    save_file(lora_state(trainer.model), str(out / f"{loss_type}_final.safetensors"))
    return batch


def orpo(model_dir, out, batch, args):
    model = PeftModel.from_pretrained(base(model_dir), out / "init_adapter", is_trainable=True)
    model.train()
    n = batch["input_ids"].shape[0] // 2
    ids, mask, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    labels = ids.masked_fill(comp == 0, -100)
    b = {
        "chosen_input_ids": ids[:n],
        "chosen_attention_mask": mask[:n],
        "chosen_labels": labels[:n],
        "rejected_input_ids": ids[n:],
        "rejected_attention_mask": mask[n:],
        "rejected_labels": labels[n:],
    }
    this = types.SimpleNamespace(
        is_encoder_decoder=False,
        padding_value=0,
        aux_loss_enabled=False,
        beta=args.beta,
        accelerator=types.SimpleNamespace(device=torch.device("cpu")),
        concatenated_inputs=ORPOTrainer.concatenated_inputs,
        get_batch_logps=ORPOTrainer.get_batch_logps,
    )
    def step_values():
        c_logps, r_logps, _, _, nll = ORPOTrainer.concatenated_forward(this, model, b)
        losses, c_rew, r_rew, _, _ = ORPOTrainer.odds_ratio_loss(this, c_logps, r_logps)
        loss = nll - losses.mean()
        metrics = {
            "rewards/chosen": c_rew.mean().item(),
            "rewards/rejected": r_rew.mean().item(),
            "rewards/accuracies": (c_rew > r_rew).float().mean().item(),
            "rewards/margins": (c_rew - r_rew).mean().item(),
            "logps/chosen": c_logps.mean().item(),
            "logps/rejected": r_logps.mean().item(),
        }
        return loss, metrics

    with torch.no_grad():
        loss, metrics = step_values()
    first = {"loss": loss.item(), "metrics": metrics}
    # `--steps` optimizer steps as the DPO runs take them (torch AdamW, constant lr, no weight
    # decay, no clipping), each step's loss and metrics measured before its update, as TRL logs.
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    steps = []
    for _ in range(args.steps):
        opt.zero_grad()
        loss, metrics = step_values()
        loss.backward()
        opt.step()
        steps.append(dict(metrics, loss=loss.item()))
    first["steps"] = steps
    (out / "orpo.json").write_text(json.dumps(first))
    save_file(lora_state(model), str(out / "orpo_final.safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--losses", default="sigmoid,ipo,hinge,robust,orpo")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_rows(args.data)
    make_init_adapter(args.model, out)
    batch = None
    for lt in args.losses.split(","):
        if lt == "orpo":
            continue
        batch = dpo(args.model, data, out, lt, args)
    if "orpo" in args.losses.split(","):
        if batch is None:
            batch = first_batch(trainer_for(args.model, data, out, "sigmoid", args), len(data))
        orpo(args.model, out, batch, args)


if __name__ == "__main__":
    main()
