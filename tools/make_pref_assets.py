"""Writes the bundled preference pairs `assets/data/pref_train.jsonl` and `pref_eval.jsonl`.

Made from the bundled synthetic chats (no downloads, fixed seed, reproducible byte for byte):
each single-turn chat gives a pair whose `chosen` is its own answer and whose `rejected` is the
answer of another chat. Train pairs are in TRL's conversational form (message lists); eval pairs
alternate between the conversational and the plain-string form, so both paths run.

    python3 tools/make_pref_assets.py
"""

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pairs(src, n, seed, strings_every=0):
    rows = [json.loads(l) for l in (ROOT / src).read_text().splitlines() if l.strip()]
    single = [r["messages"] for r in rows if [m["role"] for m in r["messages"]] == ["user", "assistant"]]
    rng = random.Random(seed)
    out = []
    for i, m in enumerate(single[:n]):
        other = m
        while other[1]["content"] == m[1]["content"]:
            other = rng.choice(single)
        if strings_every and i % strings_every == 1:
            out.append({"prompt": f"Question: {m[0]['content']}\nAnswer: ",
                        "chosen": m[1]["content"], "rejected": other[1]["content"]})
        else:
            out.append({"prompt": [m[0]],
                        "chosen": [m[1]],
                        "rejected": [{"role": "assistant", "content": other[1]["content"]}]})
    return out


def write(path, recs):
    (ROOT / path).write_text("".join(json.dumps(r) + "\n" for r in recs))


write("assets/data/pref_train.jsonl", pairs("assets/data/train.jsonl", 128, 19))
write("assets/data/pref_eval.jsonl", pairs("assets/data/eval.jsonl", 24, 20, strings_every=2))
