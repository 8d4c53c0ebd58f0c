"""The reference GGUF of a Hugging Face llama-family model, built with the `gguf` package's own
writer, constants, SpecialVocab and quantizers the way llama.cpp's `convert_hf_to_gguf.py`
(`LlamaModel`, ggml-org/llama.cpp commit 0024aa74, read, not vendored) converts it, and a
field-by-field comparison with a GGUF file made by VoltTrain.

Usage: gguf_ref.py MODEL_DIR FTYPE=OURS.gguf [FTYPE=OURS.gguf ...]   (FTYPE: f32|f16|bf16|q8_0)
Prints {FTYPE: {"kv_keys": n, "tensors": n, "kv_mismatch": [...], "tensor_mismatch": [...],
        "q8_0_dequant_max_err_over_step": x, "dequant_max_abs_err": y}, ...}.

What is reproduced: TextModel/LlamaModel.set_gguf_parameters (hyperparameters, file type,
vocab size, rope dimension count, linear rope scaling), `_set_vocab_gpt2` (get_vocab_base's
tokens and token types; SpecialVocab(load_merges=True) for merges, special ids, add_*_token and
the chat template), LlamaModel.modify_tensors' q/k permutation, prepare_tensors' type policy (1-D
and norm tensors F32, Q8_0 falling back to F16 on rows not a multiple of 32) and
`add_quantization_version`. Left out of the comparison: `general.name` and the other
model-card naming keys (derived by the script's metadata heuristics from the directory name),
and `tokenizer.ggml.pre`, which the script finds by hashing the tokenization of a test text
against its table of known tokenizers (it refuses unknown ones, such as the bundled test
tokenizer); here it is `gpt2` for a plain ByteLevel pre-tokenizer.
"""
import json
import os
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file

import gguf
from transformers import AutoTokenizer

SKIP_KEYS = {"general.name", "tokenizer.ggml.pre"}


def looks_special(t):
    return (
        t in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (t.startswith("<|") and t.endswith("|>"))
        or (t.startswith("<｜") and t.endswith("｜>"))
        or (t.startswith("<unused") and t.endswith(">"))
    )


def vocab(model_dir, hp):
    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab_size = hp.get("vocab_size", len(tok.vocab))
    reverse = {i: t for t, i in tok.vocab.items()}
    added = tok.get_added_vocab()
    dec = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        t = reverse[i]
        if t in added:
            if not dec[i].normalized:
                t = tok.decode(tok.encode(t, add_special_tokens=False))
            if dec[i].special or looks_special(t):
                types.append(gguf.TokenType.CONTROL)
            else:
                t = t.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(t)
    return tokens, types


def permute(w, n_head, n_head_kv):
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def tensor_name(tmap, hf):
    # the gguf package's own HF -> GGUF name map
    name = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ValueError(f"no GGUF name for {hf}")
    return name


def build(model_dir, ftype, path):
    hp = json.load(open(os.path.join(model_dir, "config.json")))
    arch = gguf.MODEL_ARCH.LLAMA
    n_layers = hp["num_hidden_layers"]
    tmap = gguf.get_tensor_name_map(arch, n_layers)
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    ft = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[ftype]
    w.add_type(gguf.GGUFType.MODEL)
    # TextModel.set_gguf_parameters
    w.add_block_count(n_layers)
    if "max_position_embeddings" in hp:
        w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    if "intermediate_size" in hp:
        w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    if "num_key_value_heads" in hp:
        w.add_head_count_kv(hp["num_key_value_heads"])
    rope = hp.get("rope_parameters") or hp.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hp.get("rope_theta"))
    if theta is not None:
        w.add_rope_freq_base(theta)
    if "rms_norm_eps" in hp:
        w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    w.add_file_type(ft)
    # LlamaModel.set_gguf_parameters
    w.add_vocab_size(hp["vocab_size"])
    w.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])
    if rope.get("rope_type", rope.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    # _set_vocab_gpt2
    tokens, types = vocab(model_dir, hp)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True).add_to_gguf(w, quiet=True)
    # tensors
    sd = {}
    for f in sorted(os.listdir(model_dir)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(model_dir, f)))
    n_head, n_kv = hp["num_attention_heads"], hp.get("num_key_value_heads")
    weights = {}
    for hf, t in sd.items():
        t = t.to(torch.float32)
        if hf.endswith("q_proj.weight"):
            t = permute(t, n_head, n_head)
        if hf.endswith("k_proj.weight"):
            t = permute(t, n_head, n_kv)
        name = tensor_name(tmap, hf)
        data = t.numpy()
        if data.ndim <= 1 or name.endswith("_norm.weight"):
            qt = gguf.GGMLQuantizationType.F32
        else:
            qt = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                  "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[ftype]
        try:
            q = gguf.quants.quantize(data, qt)
        except gguf.QuantError:
            qt = gguf.GGMLQuantizationType.F16
            q = gguf.quants.quantize(data, qt)
        weights[name] = data
        w.add_tensor(name, q, raw_dtype=qt)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


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


def compare(model_dir, ours_path, ftype):
    with tempfile.TemporaryDirectory() as d:
        ref_path = os.path.join(d, "ref.gguf")
        weights = build(model_dir, ftype, ref_path)
        ref = gguf.GGUFReader(ref_path)
        ours = gguf.GGUFReader(ours_path)
        fr, fo = fields(ref), fields(ours)
        kv_mismatch = []
        for k in sorted(set(fr) | set(fo)):
            if k in SKIP_KEYS:
                continue
            if k not in fo:
                kv_mismatch.append(f"missing in ours: {k}")
            elif k not in fr:
                kv_mismatch.append(f"only in ours: {k}")
            elif fr[k] != fo[k]:
                a, b = str(fr[k])[:200], str(fo[k])[:200]
                kv_mismatch.append(f"{k}: ref {a} ours {b}")
        tr = {t.name: t for t in ref.tensors}
        to = {t.name: t for t in ours.tensors}
        tensor_mismatch = []
        worst_step, worst_abs = 0.0, 0.0
        for n in sorted(set(tr) | set(to)):
            if n not in to or n not in tr:
                tensor_mismatch.append(f"{n}: only in {'ref' if n in tr else 'ours'}")
                continue
            a, b = tr[n], to[n]
            if a.tensor_type != b.tensor_type or list(a.shape) != list(b.shape):
                tensor_mismatch.append(f"{n}: ref {a.tensor_type.name} {list(a.shape)} ours {b.tensor_type.name} {list(b.shape)}")
                continue
            if bytes(a.data.tobytes()) != bytes(b.data.tobytes()):
                tensor_mismatch.append(f"{n}: bytes differ")
            deq = gguf.quants.dequantize(b.data, b.tensor_type).reshape(weights[n].shape).astype(np.float32)
            err = np.abs(deq - weights[n])
            worst_abs = max(worst_abs, float(err.max()))
            if b.tensor_type == gguf.GGMLQuantizationType.Q8_0:
                blocks = np.abs(weights[n]).reshape(-1, 32).max(axis=1) / 127
                step = np.maximum(blocks, 1e-30)
                worst_step = max(worst_step, float((err.reshape(-1, 32).max(axis=1) / step).max()))
        return {
            "kv_keys": len(fo), "tensors": len(to),
            "kv_mismatch": kv_mismatch, "tensor_mismatch": tensor_mismatch,
            "q8_0_dequant_max_err_over_step": worst_step, "dequant_max_abs_err": worst_abs,
        }


def main():
    model_dir = sys.argv[1]
    out = {}
    for pair in sys.argv[2:]:
        ftype, path = pair.split("=", 1)
        out[ftype] = compare(model_dir, path, ftype)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
