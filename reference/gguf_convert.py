"""Runs llama.cpp's own `convert_hf_to_gguf.py` on a Hugging Face model directory and compares
its GGUF files, with the `gguf` package it ships with, to GGUF files made by VoltTrain.

The converter is the one `tools/provision.sh --reference` extracts from the llama-cpp-python
0.3.36 sdist (sha256-pinned) into $VOLTTRAIN_LLAMA_CPP_CONVERTER: convert_hf_to_gguf.py, its
`conversion` package and gguf-py 0.19.0. It runs as shipped (its own `main()`, command-line
arguments `MODEL --outtype FTYPE --outfile FILE`) with one exception:

  `TextModel.get_vocab_base_pre` identifies a BPE pre-tokenizer by hashing the tokenization of a
  fixed text against llama.cpp's table of known tokenizers and raises NotImplementedError for any
  other one, such as the bundled test tokenizer. Here, when (and only when) the original raises,
  it returns "gpt2" (the pre-tokenizer of a plain ByteLevel BPE, which is what VoltTrain writes);
  a tokenizer the table knows gets the converter's own answer.

Usage:
  gguf_convert.py compare MODEL_DIR FTYPE=OURS.gguf [FTYPE=OURS.gguf ...]   (f32|f16|bf16|q8_0)
      Prints {FTYPE: {"kv_keys", "tensors", "kv_mismatch": [...], "tensor_mismatch": [...],
              "dequant_max_abs_err", "q8_0_dequant_max_err_over_step"}, ...}: every metadata key
      and value (with its GGUF types) and every tensor's name, type, shape and bytes, except the
      model-card naming keys in NAMING_KEYS, which the converter derives from the directory name
      with heuristics (gguf.Metadata). Dequantized tensors of ours are compared with the
      converter's own f32 output.
  gguf_convert.py make OUT_DIR TOKENIZER_DIR NAME [NAME ...]
      Tiny random models OUT_DIR/NAME of the families VoltTrain exports (configs of
      make_model_fixtures.py / ssm_ref.py with the vocabulary size of the tokenizer in
      TOKENIZER_DIR, whose tokenizer files are copied in (NAME_fp16: variant NAME saved in float16); Gemma 2, Jamba and NAME_spm (variant NAME) get a SentencePiece
      tokenizer.model (+ tokenizer.json) trained on the bundled eval data; Phi-3 ones get Phi-4's
      `tokenizer_class: GPT2Tokenizer` (phi3_spm: Phi-3-mini's SentencePiece layout instead),
      qwen3 Qwen3's sampling defaults in generation_config.json).
Prints one JSON line last.
"""
import copy
import json
import logging
import os
import shutil
import sys
import tempfile

import numpy as np

CONVERTER = os.environ.get("VOLTTRAIN_LLAMA_CPP_CONVERTER")
if not CONVERTER or not os.path.isfile(os.path.join(CONVERTER, "convert_hf_to_gguf.py")):
    sys.exit(
        "VOLTTRAIN_LLAMA_CPP_CONVERTER does not point at llama.cpp's converter; "
        "run the tests through ./dev test (tools/provision.sh --reference fetches it)"
    )
# the converter's own gguf-py first (as convert_hf_to_gguf.py does), then its `conversion` package
sys.path.insert(0, os.path.join(CONVERTER, "gguf-py"))
sys.path.insert(0, CONVERTER)

import gguf  # noqa: E402

# model-card naming keys, derived by gguf.Metadata's heuristics from the directory name
NAMING_KEYS = {"general.name", "general.basename", "general.finetune", "general.version",
               "general.organization"}


def load_converter():
    import runpy

    import conversion.base as base

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            return "gpt2"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    script = os.path.join(CONVERTER, "convert_hf_to_gguf.py")
    return script, runpy.run_path(script, run_name="convert_hf_to_gguf")["main"]


def convert(main, script, model_dir, ftype, out):
    sys.argv = [script, model_dir, "--outtype", ftype, "--outfile", out]
    main()
    logging.getLogger().setLevel(logging.WARNING)


def fields(reader):
    out = {}
    for k, f in reader.fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        if isinstance(v, np.ndarray):
            v = v.tolist()
        if isinstance(v, float) or (isinstance(v, list) and v and isinstance(v[0], float)):
            v = np.float32(v).tolist()
        out[k] = (v, [int(t) for t in f.types])
    return out


def compare_files(ref_path, ours_path, f32_path):
    ref, ours, f32 = gguf.GGUFReader(ref_path), gguf.GGUFReader(ours_path), gguf.GGUFReader(f32_path)
    fr, fo = fields(ref), fields(ours)
    kv_mismatch = []
    for k in sorted(set(fr) | set(fo)):
        if k in NAMING_KEYS:
            continue
        if k not in fo:
            kv_mismatch.append(f"missing in ours: {k} = {str(fr[k])[:200]}")
        elif k not in fr:
            kv_mismatch.append(f"only in ours: {k} = {str(fo[k])[:200]}")
        elif fr[k] != fo[k]:
            kv_mismatch.append(f"{k}: ref {str(fr[k])[:200]} ours {str(fo[k])[:200]}")
    tr = {t.name: t for t in ref.tensors}
    to = {t.name: t for t in ours.tensors}
    weights = {t.name: np.asarray(t.data, dtype=np.float32).reshape(list(reversed(t.shape.tolist())))
               for t in f32.tensors}
    tensor_mismatch = []
    worst_step, worst_abs = 0.0, 0.0
    for n in sorted(set(tr) | set(to)):
        if n not in to or n not in tr:
            tensor_mismatch.append(f"{n}: only in {'ref' if n in tr else 'ours'}")
            continue
        a, b = tr[n], to[n]
        if a.tensor_type != b.tensor_type or list(a.shape) != list(b.shape):
            tensor_mismatch.append(
                f"{n}: ref {a.tensor_type.name} {list(a.shape)} ours {b.tensor_type.name} {list(b.shape)}")
            continue
        if bytes(a.data.tobytes()) != bytes(b.data.tobytes()):
            tensor_mismatch.append(f"{n}: bytes differ")
        w = weights[n]
        deq = gguf.quants.dequantize(b.data, b.tensor_type).reshape(w.shape).astype(np.float32)
        err = np.abs(deq - w)
        worst_abs = max(worst_abs, float(err.max()))
        if b.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            step = np.maximum(np.abs(w).reshape(-1, 32).max(axis=1) / 127, 1e-30)
            worst_step = max(worst_step, float((err.reshape(-1, 32).max(axis=1) / step).max()))
    return {
        "kv_keys": len(fo), "tensors": len(to),
        "kv_mismatch": kv_mismatch, "tensor_mismatch": tensor_mismatch,
        "q8_0_dequant_max_err_over_step": worst_step, "dequant_max_abs_err": worst_abs,
    }


def compare(model_dir, pairs):
    script, main = load_converter()
    out = {}
    with tempfile.TemporaryDirectory() as d:
        f32 = os.path.join(d, "ref-f32.gguf")
        convert(main, script, model_dir, "f32", f32)
        for pair in pairs:
            ftype, ours = pair.split("=", 1)
            ref = f32 if ftype == "f32" else os.path.join(d, f"ref-{ftype}.gguf")
            if ftype != "f32":
                convert(main, script, model_dir, ftype, ref)
            out[ftype] = compare_files(ref, ours, f32)
    return out


def edit_json(path, **kv):
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.update(kv)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def sentencepiece_tokenizer(d, tok_dir):
    """A SentencePiece unigram model (byte fallback, two user-defined symbols) trained on the
    bundled eval data, as tokenizer.model, and the same as a tokenizers tokenizer.json."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers.implementations import SentencePieceUnigramTokenizer

    data = os.path.join(os.path.dirname(tok_dir.rstrip("/")), "data", "eval.jsonl")
    corpus = os.path.join(d, "corpus.txt")
    with open(data) as f, open(corpus, "w") as out:
        for line in f:
            out.write(json.dumps(json.loads(line), ensure_ascii=False) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(d, "tokenizer"), vocab_size=400, model_type="unigram",
        byte_fallback=True, character_coverage=0.995, user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2, num_threads=1)
    os.remove(corpus)
    os.remove(os.path.join(d, "tokenizer.vocab"))
    # tokenizers' from_spm imports the protobuf module under its top-level name
    sys.modules.setdefault("sentencepiece_model_pb2", sentencepiece_model_pb2)
    SentencePieceUnigramTokenizer.from_spm(os.path.join(d, "tokenizer.model")).save(
        os.path.join(d, "tokenizer.json"))
    shutil.copy(os.path.join(tok_dir, "chat_template.jinja"), os.path.join(d, "chat_template.jinja"))
    edit_json(os.path.join(d, "tokenizer_config.json"), bos_token="<s>", eos_token="</s>", pad_token="<pad>",
              unk_token="<unk>", add_bos_token=True, tokenizer_class="GemmaTokenizer")


# Phi-3-mini's added tokens (past the SentencePiece pieces)
PHI3_ADDED = [("<|endoftext|>", True), ("<|assistant|>", True), ("<|placeholder1|>", False),
              ("<|end|>", True), ("<|user|>", True), ("\u2581x\u2581", False), ("<|system|>", True)]


def phi3_sentencepiece(d):
    """Phi-3-mini's tokenizer layout over the SentencePiece model of sentencepiece_tokenizer:
    `tokenizer_class: LlamaTokenizer`, added tokens past the pieces in tokenizer.json,
    added_tokens.json and tokenizer_config.json's `added_tokens_decoder`, EOS `<|endoftext|>`,
    Phi-3-mini's chat template in tokenizer_config.json. Cases where Phi3MiniModel.set_vocab
    differs from TextModel's: a non-special token that looks special (`<|placeholder1|>`), a
    non-special one with `\u2581`, and one (`<|system|>`) only tokenizer.json's `added_tokens`
    lists."""
    from tokenizers import AddedToken, Tokenizer

    path = os.path.join(d, "tokenizer.json")
    tok = Tokenizer.from_file(path)
    for content, special in PHI3_ADDED:
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
    tok.save(path)
    with open(path) as f:
        added = json.load(f)["added_tokens"]
    decoder = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word",
                                                "special")}
               for t in added if t["content"] != "<|system|>"}
    os.remove(os.path.join(d, "chat_template.jinja"))
    # Phi-3-mini-4k-instruct's own chat template (tests/fixtures/templates/README.md)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "tests", "fixtures", "templates", "phi3_mini.jinja")) as f:
        template = f.read()
    edit_json(os.path.join(d, "tokenizer_config.json"), tokenizer_class="LlamaTokenizer",
              eos_token="<|endoftext|>", pad_token="<|endoftext|>", add_bos_token=False,
              added_tokens_decoder=decoder, chat_template=template)
    first = len(added) - len(PHI3_ADDED)
    with open(os.path.join(d, "added_tokens.json"), "w") as f:
        json.dump({t["content"]: t["id"] for t in added[first:] if t["content"] != "<|system|>"}, f, indent=2)


def make(out_dir, tok_dir, names):
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import make_model_fixtures
    import ssm_ref

    with open(os.path.join(tok_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    known = {**make_model_fixtures.variants(), **{k: (c, cfg, torch.float32, None)
                                                   for k, (c, cfg) in ssm_ref.variants().items()}}
    made = {}
    for name in names:
        # NAME_spm: variant NAME with a SentencePiece tokenizer; NAME_fp16: saved in float16
        spm, fp16 = name.endswith("_spm"), name.endswith("_fp16")
        cls, cfg, dtype, _ = known[name.removesuffix("_spm").removesuffix("_fp16")]
        if fp16:
            dtype = torch.float16
        cfg = copy.deepcopy(cfg)
        cfg.vocab_size = vocab
        torch.manual_seed(sum(map(ord, name)))
        model = cls(cfg).float().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        d = os.path.join(out_dir, name)
        model.to(dtype).save_pretrained(d)
        if spm or cls.__name__.startswith(("Gemma2", "Jamba")):
            # Gemma 2's converter reads a SentencePiece tokenizer.model only
            sentencepiece_tokenizer(d, tok_dir)
        else:
            for f in os.listdir(tok_dir):
                if f.startswith(("tokenizer", "chat_template", "special_tokens")):
                    shutil.copy(os.path.join(tok_dir, f), os.path.join(d, f))
        if cls.__name__.startswith("Phi3") and spm:
            phi3_sentencepiece(d)
        elif cls.__name__.startswith("Phi3"):
            # Phi-4's tokenizer class: the converter takes its BPE vocabulary as for GPT-2
            edit_json(os.path.join(d, "tokenizer_config.json"), tokenizer_class="GPT2Tokenizer")
        if name == "qwen3":
            # sampling defaults, as Qwen3 ships them (general.sampling.*)
            edit_json(os.path.join(d, "generation_config.json"), temperature=0.6, top_p=0.95, top_k=20)
        made[name] = d
    return made


def main():
    cmd = sys.argv[1]
    if cmd == "compare":
        result = compare(sys.argv[2], sys.argv[3:])
    elif cmd == "make":
        result = make(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.exit(f"unknown command {cmd!r} (compare | make)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
