#!/usr/bin/env python3
"""Reference for VoltTrain's data module, run live from `tests/data_*.rs`.

  chat    --tok DIR --input IN.json [--template FILE] [--kwargs JSON]
                                      for each case {messages, add_generation_prompt, [template],
                                      [kwargs]}: the text and ids of transformers'
                                      apply_chat_template, or its error
  sft     --tok DIR --input IN.jsonl [--all] [--max-len N] [--template FILE] [--kwargs JSON]
                                      input_ids/labels per record, computed with transformers:
                                      full conversation tokenized once (apply_chat_template), each
                                      assistant turn's span found by rendering prefixes (as TRL),
                                      tokens mapped with return_offsets_mapping; EOS appended;
                                      prompt/completion and text records as TRL tokenizes them
  trl-sft --tok DIR --input IN.json --template FILE
                                      IN = [{conversations: [[message]], kwargs}]: per group, the
                                      input_ids/labels of each conversation in TRL's SFTTrainer
                                      dataset with assistant_only_loss=True (the training chat
                                      template TRL swaps in, {% generation %} masks; kwargs as each
                                      record's chat_template_kwargs), a tiny random Llama as the
                                      model; and whether TRL swapped in its training template
  collate --tok DIR --input IN.json  IN = {examples: [{input_ids, labels}], padding_side}: the batch
                                      of DataCollatorForSeq2Seq(padding=True, label_pad=-100) and
                                      the packed row of DataCollatorWithFlattening
  parquet --input IN.jsonl --out OUT.parquet [--messages-as-string] [--compression C]
                                      writes the records as Parquet with pyarrow

Prints one JSON document on the last line of stdout.
"""
import argparse
import json
import sys


def load_tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def cmd_chat(args):
    tok = load_tok(args.tok)
    cases = json.load(open(args.input, encoding="utf-8"))
    kw = json.loads(args.kwargs) if args.kwargs else {}
    if args.template:
        kw["chat_template"] = open(args.template, encoding="utf-8").read()
    out = []
    for c in cases:
        # a case may bring its own template file and keyword arguments
        ckw = dict(kw, **c.get("kwargs", {}))
        if c.get("template"):
            ckw["chat_template"] = open(c["template"], encoding="utf-8").read()
        try:
            text = tok.apply_chat_template(
                c["messages"], tokenize=False, add_generation_prompt=c["add_generation_prompt"], **ckw
            )
            ids = tok.apply_chat_template(
                c["messages"],
                tokenize=True,
                return_dict=False,
                add_generation_prompt=c["add_generation_prompt"],
                **ckw,
            )
            out.append({"text": text, "ids": list(ids)})
        except Exception as e:  # the template's raise_exception
            out.append({"error": str(e)})
    return out


def sft_record(tok, rec, all_tokens, max_len, kw=None):
    kw = kw or {}
    eos = tok.eos_token_id
    if "messages" in rec:
        msgs = rec["messages"]
        full = tok.apply_chat_template(msgs, tokenize=False, **kw)
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        if all_tokens:
            labels = list(ids)
        else:
            spans = []
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                before = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True, **kw) if i else ""
                upto = tok.apply_chat_template(msgs[: i + 1], tokenize=False, **kw)
                assert full.startswith(before) and full.startswith(upto)
                # offsets from the fast tokenizer are character offsets: convert spans to chars
                spans.append((len(before), len(upto)))
            labels = [-100] * len(ids)
            for j, (s, e) in enumerate(enc["offset_mapping"]):
                if any(a <= s < b for a, b in spans):
                    labels[j] = ids[j]
        eos_label = msgs[-1]["role"] == "assistant" or all_tokens
    elif "prompt" in rec:
        p, c = rec["prompt"], rec["completion"]
        # TRL (non-conversational prompt-completion): tokenize prompt and prompt+completion
        prompt_ids = tok(p)["input_ids"]
        ids = list(tok(p + c)["input_ids"])
        assert ids[: len(prompt_ids)] == prompt_ids
        labels = list(ids) if all_tokens else [-100] * len(prompt_ids) + ids[len(prompt_ids):]
        eos_label = True
    else:
        ids = list(tok(rec["text"])["input_ids"])
        labels = list(ids)
        eos_label = True
    if not ids or ids[-1] != eos:
        ids.append(eos)
        labels.append(eos if eos_label else -100)
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}


def cmd_sft(args):
    tok = load_tok(args.tok)
    kw = json.loads(args.kwargs) if args.kwargs else {}
    if args.template:
        kw["chat_template"] = open(args.template, encoding="utf-8").read()
    out = []
    with open(args.input, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(sft_record(tok, json.loads(line), args.all, args.max_len, kw))
    return out


def cmd_trl_sft(args):
    import tempfile

    import transformers
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import get_training_chat_template

    transformers.logging.set_verbosity_error()
    tok = load_tok(args.tok)
    tok.chat_template = open(args.template, encoding="utf-8").read()
    training = get_training_chat_template(tok)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    out = []
    for group in json.load(open(args.input, encoding="utf-8")):
        rows = [{"messages": msgs} for msgs in group["conversations"]]
        if group.get("kwargs"):
            for r in rows:
                r["chat_template_kwargs"] = group["kwargs"]
        with tempfile.TemporaryDirectory() as tmp:
            sft = SFTConfig(
                output_dir=tmp,
                assistant_only_loss=True,
                max_length=None,
                bf16=False,
                use_cpu=True,
                report_to=[],
            )
            trainer = SFTTrainer(
                model=transformers.LlamaForCausalLM(cfg),
                args=sft,
                train_dataset=Dataset.from_list(rows),
                processing_class=tok,
            )
        out.append(
            {
                "swapped": training is not None and trainer.chat_template == training,
                "records": [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in trainer.train_dataset],
            }
        )
    return out


def cmd_collate(args):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    tok = load_tok(args.tok)
    inp = json.load(open(args.input, encoding="utf-8"))
    tok.padding_side = inp["padding_side"]
    feats = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in inp["examples"]]
    pad = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100, return_tensors="pt")(
        [dict(f) for f in feats]
    )
    flat = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100, return_tensors="pt")(
        [dict(f) for f in feats]
    )
    return {
        "padded": {k: v.tolist() for k, v in pad.items()},
        "flat": {k: v.tolist() for k, v in flat.items()},
    }


def cmd_parquet(args):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(l) for l in open(args.input, encoding="utf-8") if l.strip()]
    if args.messages_as_string:
        for r in rows:
            r["messages"] = json.dumps(r["messages"])
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, args.out, compression=args.compression)
    return {"rows": len(rows), "schema": str(table.schema)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["chat", "sft", "trl-sft", "collate", "parquet"])
    ap.add_argument("--tok")
    ap.add_argument("--input", required=True)
    ap.add_argument("--out")
    ap.add_argument("--template", help="chat template file to use instead of the tokenizer's")
    ap.add_argument("--kwargs", help="JSON object of extra apply_chat_template keyword arguments")
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--max-len", type=int, default=1 << 30)
    ap.add_argument("--messages-as-string", action="store_true")
    ap.add_argument("--compression", default="snappy")
    args = ap.parse_args()
    res = {"chat": cmd_chat, "sft": cmd_sft, "trl-sft": cmd_trl_sft, "collate": cmd_collate, "parquet": cmd_parquet}[args.cmd](args)
    sys.stdout.write(json.dumps(res, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
