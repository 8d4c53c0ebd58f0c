"""Reference for the SFT-step benchmark: transformers (+ peft for LoRA) on a SmolLM2-135M-shaped
Llama, fp32, AdamW (torch.optim.AdamW, foreach), same inputs and thread count as VoltTrain.

Prints one JSON line: {"step_seconds": [...], "tokens_per_step": N, "trainable": N, "peak_rss_mb": X}.
The model is written to --model-dir first when --write-model is given (VoltTrain then loads the
very same weights)."""
import argparse
import json
import os
import resource
import time

import torch


def smollm_config(layers):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )


def batch(seed, b, t, vocab):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    mask = torch.ones(b, t, dtype=torch.long)
    return ids, mask, labels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["lora", "full"], required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--write-model", action="store_true")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    if args.write_model:
        torch.manual_seed(0)
        m = LlamaForCausalLM(smollm_config(args.layers))
        m.save_pretrained(args.model_dir, safe_serialization=True)
        del m
    model = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    if args.mode == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, foreach=True)
    ids, mask, labels = batch(1, args.batch, args.seq, 49152)
    if args.write_model:
        from safetensors.torch import save_file

        save_file({"input_ids": ids.contiguous()}, os.path.join(args.model_dir, "batch.safetensors"))

    def step():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({
        "step_seconds": times,
        "tokens_per_step": args.batch * args.seq,
        "trainable": sum(p.numel() for p in params),
        "peak_rss_mb": rss,
    }))


if __name__ == "__main__":
    main()
