"""Greedy generation with transformers, the reference of VoltTrain's `generate` parity tests.

Usage:
  generate_ref.py JOBS_JSON
      JOBS_JSON is a list of {"model": DIR, "max_new_tokens": N, "prompts": [...]}, each prompt a
      list of token ids or {"text": ..., "chat": bool} (text is tokenized as `tokenizer(text)`;
      chat renders one user turn with the chat template and the generation prompt). Prints
      {"transformers": version, "jobs": [[{"prompt": ids, "tokens": new ids, "text": decoded new
      text (special tokens skipped) or null}, ...], ...]}.
  generate_ref.py --make-smollm2 OUT_DIR LAYERS VOCAB
      Writes a random LlamaForCausalLM with SmolLM2-135M's per-layer shape (hidden 576, 9 heads,
      3 KV heads, intermediate 1536, tied embeddings, RoPE theta 100000, RMSNorm eps 1e-5) with
      LAYERS layers and a VOCAB vocabulary (fixed seed, fp32).

Decoding is `generate(do_sample=False, max_new_tokens=N)` with the model's generation config
(its eos ids), eager attention, fp32, one prompt at a time (no padding).
"""
import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM


def make_smollm2(out_dir, layers, vocab):
    torch.manual_seed(135)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        initializer_range=0.041666666666666664,
    )
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        # spread the logits so that greedy choices are not near-ties of a fresh init
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(2.0)
    model.save_pretrained(out_dir)
    print(json.dumps({"made": out_dir}))


def main():
    if sys.argv[1] == "--make-smollm2":
        make_smollm2(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    jobs = json.loads(sys.argv[1])
    results = []
    for job in jobs:
        model_dir, max_new, prompts = job["model"], int(job["max_new_tokens"]), job["prompts"]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
        tok = None
        outputs = []
        for p in prompts:
            if isinstance(p, dict):
                if tok is None:
                    tok = AutoTokenizer.from_pretrained(model_dir)
                if p.get("chat"):
                    ids = tok.apply_chat_template(
                        [{"role": "user", "content": p["text"]}], add_generation_prompt=True, tokenize=True, return_dict=False
                    )
                    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                        ids = ids["input_ids"]
                else:
                    ids = tok(p["text"])["input_ids"]
            else:
                ids = p
            x = torch.tensor([list(ids)])
            with torch.no_grad():
                y = model.generate(
                    input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new
                )
            new = y[0, x.shape[1]:].tolist()
            text = tok.decode(new, skip_special_tokens=True) if tok is not None else None
            outputs.append({"prompt": list(ids), "tokens": new, "text": text})
        results.append(outputs)
    print(json.dumps({"transformers": transformers.__version__, "jobs": results}))


if __name__ == "__main__":
    main()
