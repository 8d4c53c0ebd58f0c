"""Reference for the DPO-step benchmark: TRL's DPOTrainer (trl 1.16.0, pinned in
tools/provision.sh) on a SmolLM2-135M-shaped Llama with LoRA r16 (peft), fp32, AdamW
(torch.optim.AdamW, foreach), sigmoid loss, reference log-probs from the model with its adapter
off (TRL's default for a PEFT model).

One step is `trainer.training_step(model, batch)` (TRL's compute_loss: policy and reference
forward, the loss, backward) then `optimizer.step()` and `zero_grad`: what the HF training loop
does per step, without its data loading. The batch is 2 pairs = 4 rows of 128 random prompt
tokens + 128 random completion tokens (TRL's collated form: chosen rows, then rejected rows, with a
`completion_mask`); the model and the rows are written to --model-dir for VoltTrain.

Prints one JSON line: {"step_seconds": [...], "tokens_per_step": N, "trl": version}.
"""
import argparse
import json
import os
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--tokenizer", required=True, help="any tokenizer dir (TRL requires one)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--completion", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import trl
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    from bench_sft import smollm_config

    torch.manual_seed(0)
    m = LlamaForCausalLM(smollm_config(args.layers))
    m.save_pretrained(args.model_dir, safe_serialization=True)
    del m
    model = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    cfg = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)

    rows = 2 * args.pairs
    t = args.prompt + args.completion
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 49152, (rows, t), generator=g)
    save_file({"input_ids": ids.contiguous()}, os.path.join(args.model_dir, "pref_batch.safetensors"))
    comp = torch.zeros(rows, t, dtype=torch.long)
    comp[:, args.prompt:] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones(rows, t, dtype=torch.long), "completion_mask": comp}

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    dummy = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    targs = DPOConfig(
        output_dir=os.path.join(args.model_dir, "trl-out"),
        per_device_train_batch_size=args.pairs,
        learning_rate=1e-4,
        weight_decay=0.0,
        optim="adamw_torch",
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        max_length=None,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(model=model, args=targs, train_dataset=dummy, processing_class=tok)
    trainer.create_optimizer()
    opt = trainer.optimizer
    trainer.current_gradient_accumulation_steps = 1  # set by the HF loop before its first step
    trainer.model.train()

    def step():
        trainer.training_step(trainer.model, dict(batch))
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"step_seconds": times, "tokens_per_step": rows * t, "trl": trl.__version__}))


if __name__ == "__main__":
    main()
