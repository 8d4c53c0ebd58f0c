#!/usr/bin/env python3
"""Make VoltTrain's bundled assets from scratch: no downloads, deterministic seeds.

Writes
  assets/data/train.jsonl, assets/data/eval.jsonl   synthetic, license-clean chat data
  assets/tiny-llama/                                 a random-init LlamaForCausalLM (fp32
                                                     safetensors) + a byte-level BPE tokenizer
                                                     trained on the data, ChatML template
  tests/fixtures/data/llama2-tok/                    a second tokenizer (Metaspace BPE, <s>/</s>,
                                                     no pad token) with a Llama-2 style template
                                                     kept inline in tokenizer_config.json

Run:  $VOLTTRAIN_PYTHON_REF tools/make_assets.py   (from the repository root)
"""
import json
import os
import random
import sys

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SEED = 1234

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-2 chat style: bos_token, loop.first, system folded into the first user turn, and
# raise_exception on roles out of order.
LLAMA2_TEMPLATE = """{% if messages[0]['role'] == 'system' %}
    {% set loop_messages = messages[1:] %}
    {% set system_message = messages[0]['content'].strip() %}
{% else %}
    {% set loop_messages = messages %}
    {% set system_message = false %}
{% endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if loop.first and system_message != false %}
        {% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}
    {% else %}
        {% set content = message['content'] %}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{- bos_token + '[INST] ' + content.strip() + ' [/INST]' -}}
    {% elif message['role'] == 'assistant' %}
        {{- ' ' + content.strip() + ' ' + eos_token -}}
    {% endif %}
{% endfor %}"""

SYSTEMS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one sentence.",
    "You are VoltBot, a friendly tutor.",
]

COUNTRIES = [
    ("Zorvania", "Quellport"), ("Brintal", "Ashmere"), ("Kelmoria", "Tovik"),
    ("Drasnia", "Umberlee"), ("Fennick", "Salvo"), ("Ostrava Minor", "Glenhollow"),
    ("Pyrrhia", "Cindral"), ("Velmont", "Haverly"), ("Quorra", "Isenbrook"),
    ("Talvane", "Morrowgate"), ("Ulthar", "Nyssa"), ("Wendmark", "Ellory"),
    ("Yarrowdale", "Pike Harbor"), ("Corvath", "Duskhaven"), ("Estmere", "Lindqvist"),
    ("Gallowan", "Rookstead"),
]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange", "silver", "gold"]
ANIMALS = ["cat", "dog", "owl", "fox", "bear", "wolf", "hare", "crow", "seal", "moth"]
UNITS = [("km", "meters", 1000), ("kg", "grams", 1000), ("hours", "minutes", 60),
         ("minutes", "seconds", 60), ("feet", "inches", 12), ("days", "hours", 24)]


def qa_pair(rng):
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    if kind == 1:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"What is {a} times {b}?", f"{a} times {b} is {a * b}."
    if kind == 2:
        words = rng.sample(COLORS + ANIMALS, rng.randint(3, 5))
        return "Reverse the words: " + " ".join(words), " ".join(reversed(words))
    if kind == 3:
        src, dst, f = rng.choice(UNITS)
        n = rng.randint(1, 20)
        return f"Convert {n} {src} to {dst}.", f"{n} {src} is {n * f} {dst}."
    if kind == 4:
        country, capital = rng.choice(COUNTRIES)
        return f"What is the capital of {country}?", f"The capital of {country} is {capital}."
    words = rng.sample(ANIMALS, rng.randint(2, 4))
    return "Uppercase this: " + " ".join(words), " ".join(words).upper()


def make_example(rng):
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    for _ in range(1 if rng.random() < 0.75 else 2):
        q, a = qa_pair(rng)
        messages.append({"role": "user", "content": q})
        messages.append({"role": "assistant", "content": a})
    return {"messages": messages}


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def corpus(rows):
    for r in rows:
        for m in r["messages"]:
            yield m["role"] + "\n" + m["content"]


def train_bytelevel(texts, vocab_size, specials):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def train_metaspace(texts, vocab_size, specials):
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=specials, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


def main():
    rng = random.Random(SEED)
    rows = [make_example(rng) for _ in range(460)]
    train, evals = rows[:400], rows[400:]
    data_dir = os.path.join(ROOT, "assets", "data")
    write_jsonl(os.path.join(data_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(data_dir, "eval.jsonl"), evals)

    # --- asset tokenizer: byte-level BPE, ChatML template --------------------------------------
    specials = ["<|endoftext|>", "<|startoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    texts = list(corpus(rows))
    raw = train_bytelevel(texts, 2048, specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=512,
    )
    tok.chat_template = CHATML_TEMPLATE
    model_dir = os.path.join(ROOT, "assets", "tiny-llama")
    os.makedirs(model_dir, exist_ok=True)
    tok.save_pretrained(model_dir)

    # --- model ------------------------------------------------------------------------------------
    torch.manual_seed(SEED)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(model_dir, safe_serialization=True)

    # --- second fixture tokenizer: Metaspace BPE, Llama-2 template, no pad token -----------------
    fx_dir = os.path.join(ROOT, "tests", "fixtures", "data", "llama2-tok")
    os.makedirs(fx_dir, exist_ok=True)
    llama_texts = texts + [f"[INST] <<SYS>>\n{x}\n<</SYS>>\n\n [/INST]" for x in SYSTEMS]
    raw2 = train_metaspace(llama_texts, 1024, ["<unk>", "<s>", "</s>"])
    raw2.save(os.path.join(fx_dir, "tokenizer.json"))
    cfg2 = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True, "__type": "AddedToken"},
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 512,
        "chat_template": LLAMA2_TEMPLATE,
    }
    with open(os.path.join(fx_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg2, f, indent=2, ensure_ascii=False)
        f.write("\n")

    # --- sanity: everything loads back with transformers ------------------------------------------
    t1 = AutoTokenizer.from_pretrained(model_dir)
    m = LlamaForCausalLM.from_pretrained(model_dir)
    ids = t1.apply_chat_template(train[0]["messages"], tokenize=True, return_dict=False)
    with torch.no_grad():
        out = m(torch.tensor([ids]))
    assert out.logits.shape[-1] == len(t1), out.logits.shape
    t2 = AutoTokenizer.from_pretrained(fx_dir)
    t2.apply_chat_template(train[0]["messages"], tokenize=False)
    print(f"vocab {len(t1)} / {len(t2)}, params {sum(p.numel() for p in m.parameters())}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
