#!/usr/bin/env python3
"""Reference for the `data_prep` benchmark: JSONL -> tokenized, label-masked, padded batches with
Hugging Face `datasets` and transformers, the way an SFT script does it.

  bench_data.py --tok DIR --data FILE.jsonl --batch-size 8 --max-len 512 --runs 3

Each run uses a fresh `datasets` cache directory (nothing reused between runs):
  load_dataset("json") -> .map(batched=True) rendering the chat template (apply_chat_template)
  and the assistant spans by prefix rendering (as TRL), tokenizing the batch with the fast
  tokenizer (its Rust threads: TOKENIZERS_PARALLELISM / RAYON_NUM_THREADS set by the caller),
  labels from offsets, EOS appended, truncation -> DataCollatorForSeq2Seq over batches.

Prints {"seconds": [...], "examples": N, "tokens": T} on the last line.
"""
import argparse
import json
import os
import shutil
import tempfile
import time

from datasets import load_dataset
from transformers import AutoTokenizer, DataCollatorForSeq2Seq


def make_map_fn(tok, max_len):
    eos = tok.eos_token_id

    def fn(batch):
        texts, spans = [], []
        for msgs in batch["messages"]:
            full = tok.apply_chat_template(msgs, tokenize=False)
            sp = []
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                before = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
                upto = tok.apply_chat_template(msgs[: i + 1], tokenize=False)
                sp.append((len(before), len(upto)))
            texts.append(full)
            spans.append(sp)
        enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        all_ids, all_labels = [], []
        for ids, offs, sp, msgs in zip(enc["input_ids"], enc["offset_mapping"], spans, batch["messages"]):
            labels = [t if any(a <= s < b for a, b in sp) else -100 for t, (s, _) in zip(ids, offs)]
            if not ids or ids[-1] != eos:
                ids = ids + [eos]
                labels = labels + [eos if msgs[-1]["role"] == "assistant" else -100]
            all_ids.append(ids[:max_len])
            all_labels.append(labels[:max_len])
        return {"input_ids": all_ids, "labels": all_labels}

    return fn


def one_run(tok, data, batch_size, max_len):
    cache = tempfile.mkdtemp(prefix="bench_data_hf_")
    try:
        t0 = time.perf_counter()
        ds = load_dataset("json", data_files=data, split="train", cache_dir=cache)
        ds = ds.map(make_map_fn(tok, max_len), batched=True, batch_size=1000,
                    remove_columns=ds.column_names)
        collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100, return_tensors="pt")
        n_tok = 0
        ids_col, lab_col = ds["input_ids"], ds["labels"]
        for s in range(0, len(ds), batch_size):
            feats = [{"input_ids": ids_col[i], "labels": lab_col[i]} for i in range(s, min(s + batch_size, len(ds)))]
            b = collator(feats)
            n_tok += int(b["attention_mask"].sum())
        return time.perf_counter() - t0, len(ds), n_tok
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tok", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(args.tok)
    for _ in range(args.warmup):
        one_run(tok, args.data, args.batch_size, args.max_len)
    secs = []
    for _ in range(args.runs):
        s, n, t = one_run(tok, args.data, args.batch_size, args.max_len)
        secs.append(s)
    print(json.dumps({"seconds": secs, "examples": n, "tokens": t,
                      "threads": os.environ.get("RAYON_NUM_THREADS")}))


if __name__ == "__main__":
    main()
