//! GGUF v3 files for llama.cpp and Ollama (<https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>).
//!
//! What is written is what llama.cpp's own `convert_hf_to_gguf.py` writes for the same model
//! directory (the converter vendored in llama-cpp-python 0.3.36, with its gguf-py 0.19.0; the
//! export tests run it and compare every key and tensor): for each architecture of
//! [`GGUF_ARCHITECTURES`] the metadata of its converter class ([`ConverterClass`]), the
//! tensor names of `gguf.TensorNameMap`, the class's tensor transforms (llama q/k permutation,
//! Gemma norms + 1, Mamba `A = -exp(A_log)`, Phi-3 LongRoPE factor tensors, ...), the type policy
//! of `prepare_tensors`, the `general.size_label` / `general.sampling.*` metadata, and the
//! tokenizer the class's `set_vocab` writes: `_set_vocab_sentencepiece` from a SentencePiece
//! `tokenizer.model` where the class prefers one (llama, Qwen, Gemma, Jamba), Phi-3's own
//! SentencePiece variant (Phi-3-mini's `LlamaTokenizer`), else `_set_vocab_gpt2` (byte-level
//! BPE from tokenizer.json, Phi-4's `GPT2Tokenizer`), with `SpecialVocab`. A vocabulary the
//! converter would read otherwise (Jamba's Llama-BPE without `tokenizer.model`), and any other
//! architecture, is an error naming it. `general.name` is the
//! directory's name.
//!
//! Tensor types: 1-D tensors, norms, SSM convolutions and tensors not named `*.weight` are
//! always F32; the others are F32, F16, BF16 or Q8_0 (blocks of 32: an f16 scale `amax / 127` and
//! 32 int8 `round(x / scale)`, ggml's `quantize_row_q8_0_ref`; a row length that is not a
//! multiple of 32 falls back to F16 as the converter does).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use serde_json::Value;
use tch::{Kind, Tensor};

use crate::adapter::{load_peft_adapter, merge_adapters};
use crate::data::Tokenizer;
use crate::error::{Error, Result, TchResultExt};
use crate::model::{LoadOptions, load_model, read_config};

/// GGUF format version written.
pub const GGUF_VERSION: u32 = 3;
/// Data alignment (`general.alignment` default).
pub const ALIGNMENT: usize = 32;
/// ggml's `GGML_QNT_VERSION`, written as `general.quantization_version`.
pub const QUANT_VERSION: u32 = 2;
/// Values per Q8_0 block.
pub const Q8_0_BLOCK: usize = 32;

/// The `convert_hf_to_gguf.py` model class whose metadata, tensor names and tensor transforms an
/// architecture follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConverterClass {
    /// `LlamaModel` (and `SmolLM3Model`, its subclass): `TextModel`'s parameters plus the vocab
    /// size and RoPE dimension count; q/k rows (weights and biases) permuted to ggml's order.
    Llama,
    /// `Qwen2Model` / `Qwen3Model`: `TextModel`'s parameters; tensors as they are.
    Qwen,
    /// `Gemma2Model`: its own parameters (both soft-caps, sliding window, no RoPE base); every
    /// `*norm.weight` + 1; a SentencePiece vocabulary only (`tokenizer.model`).
    Gemma2,
    /// `Gemma3Model`: Gemma's defaults, soft-cap and sliding window; every `*norm.weight` + 1
    /// (`Gemma3RMSNorm` multiplies by `1 + w`), embedding rows past the tokenizer's size dropped.
    Gemma3,
    /// `Phi3MiniModel`: its own parameters (partial rotary, original context, sliding window);
    /// fused `qkv_proj` / `gate_up_proj` kept; LongRoPE factors written as tensors; its own
    /// SentencePiece vocabulary unless the tokenizer class is `GPT2Tokenizer` (Phi-4).
    Phi3,
    /// `MambaModel` (Mamba and Falcon-Mamba): SSM sizes; `A = -exp(A_log)`, `conv1d` squeezed
    /// to 2-D; the vocabulary padded to a multiple of `pad_vocab_size_multiple` (8).
    Mamba,
    /// `JambaModel`: SSM sizes, per-layer KV head counts (0 on Mamba layers), expert counts; the
    /// Mamba transforms; a SentencePiece vocabulary only (`tokenizer.model`).
    Jamba,
}

/// One Hugging Face architecture [`export_gguf`] converts.
#[derive(Debug, Clone, Copy)]
pub struct GgufArchitecture {
    /// `architectures[0]` of `config.json`.
    pub hf: &'static str,
    /// llama.cpp's architecture (`general.architecture`).
    pub arch: &'static str,
    /// The converter class it follows.
    pub class: ConverterClass,
}

const fn family(hf: &'static str, arch: &'static str, class: ConverterClass) -> GgufArchitecture {
    GgufArchitecture { hf, arch, class }
}

/// Architectures [`export_gguf`] converts (those of `convert_hf_to_gguf.py` that VoltTrain
/// loads and whose tokenizer it can write).
pub const GGUF_ARCHITECTURES: [GgufArchitecture; 11] = [
    family("LlamaForCausalLM", "llama", ConverterClass::Llama),
    family("MistralForCausalLM", "llama", ConverterClass::Llama),
    family("SmolLM3ForCausalLM", "smollm3", ConverterClass::Llama),
    family("Qwen2ForCausalLM", "qwen2", ConverterClass::Qwen),
    family("Qwen3ForCausalLM", "qwen3", ConverterClass::Qwen),
    family("Gemma2ForCausalLM", "gemma2", ConverterClass::Gemma2),
    family("Gemma3ForCausalLM", "gemma3", ConverterClass::Gemma3),
    family("Phi3ForCausalLM", "phi3", ConverterClass::Phi3),
    family("MambaForCausalLM", "mamba", ConverterClass::Mamba),
    family("FalconMambaForCausalLM", "mamba", ConverterClass::Mamba),
    family("JambaForCausalLM", "jamba", ConverterClass::Jamba),
];

/// The tensor encodings of `--type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    /// 32-bit floats.
    F32,
    /// 16-bit floats (IEEE half).
    F16,
    /// bfloat16.
    Bf16,
    /// 8-bit blocks of 32 values with one f16 scale (ggml's `Q8_0`); rows whose length is not a
    /// multiple of 32 fall back to F16.
    Q8_0,
}

impl std::str::FromStr for GgufType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(GgufType::F32),
            "f16" => Ok(GgufType::F16),
            "bf16" => Ok(GgufType::Bf16),
            "q8_0" => Ok(GgufType::Q8_0),
            other => Err(Error::config(
                "type",
                format!("`{other}` is not one of f32, f16, bf16, q8_0"),
            )),
        }
    }
}

impl GgufType {
    /// llama.cpp's `LlamaFileType` (`general.file_type`).
    pub fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
            GgufType::Bf16 => 32,
        }
    }
}

/// ggml tensor types written here (`GGMLQuantizationType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum GgmlType {
    /// 32-bit floats.
    F32 = 0,
    /// 16-bit floats.
    F16 = 1,
    /// Blocks of 32 int8 values and an f16 scale.
    Q8_0 = 8,
    /// bfloat16.
    Bf16 = 30,
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// An unsigned 32-bit integer.
    U32(u32),
    /// A signed 32-bit integer.
    I32(i32),
    /// A 32-bit float.
    F32(f32),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    Str(String),
    /// An array of strings (the vocabulary).
    StrArray(Vec<String>),
    /// An array of signed 32-bit integers (token types).
    I32Array(Vec<i32>),
    /// An array of 32-bit floats (SentencePiece token scores).
    F32Array(Vec<f32>),
}

impl GgufValue {
    fn type_id(&self) -> u32 {
        match self {
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::Str(_) => 8,
            GgufValue::StrArray(_) | GgufValue::I32Array(_) | GgufValue::F32Array(_) => 9,
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    out.extend_from_slice(&v.type_id().to_le_bytes());
    match v {
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::Str(s) => put_str(out, s),
        GgufValue::StrArray(a) => {
            out.extend_from_slice(&8u32.to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for s in a {
                put_str(out, s);
            }
        }
        GgufValue::I32Array(a) => {
            out.extend_from_slice(&5u32.to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for x in a {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        GgufValue::F32Array(a) => {
            out.extend_from_slice(&6u32.to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for x in a {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// One tensor to write: the shape in PyTorch order (written reversed, as ggml orders it).
#[derive(Debug)]
pub struct GgufTensor {
    /// llama.cpp's tensor name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Shape in PyTorch order.
    pub shape: Vec<usize>,
    /// How `data` is encoded.
    pub ty: GgmlType,
    /// The encoded values, little-endian.
    pub data: Vec<u8>,
}

/// A GGUF file being assembled: metadata in insertion order (a repeated key replaces the value
/// in place, as the Python writer does), then tensors.
#[derive(Debug, Default)]
pub struct GgufWriter {
    kv: Vec<(String, GgufValue)>,
    tensors: Vec<GgufTensor>,
}

impl GgufWriter {
    /// A writer for `arch` (`general.architecture` first, as `GGUFWriter(arch=...)`).
    pub fn new(arch: &str) -> Self {
        let mut w = GgufWriter::default();
        w.add("general.architecture", GgufValue::Str(arch.into()));
        w
    }

    /// Sets a metadata key.
    pub fn add(&mut self, key: &str, v: GgufValue) {
        match self.kv.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = v,
            None => self.kv.push((key.to_string(), v)),
        }
    }

    /// Metadata by key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.kv.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Adds a tensor.
    pub fn add_tensor(&mut self, t: GgufTensor) -> Result<()> {
        if self.tensors.iter().any(|x| x.name == t.name) {
            return Err(Error::invalid(format!(
                "gguf: duplicate tensor `{}`",
                t.name
            )));
        }
        self.tensors.push(t);
        Ok(())
    }

    /// The tensors added so far.
    pub fn tensors(&self) -> &[GgufTensor] {
        &self.tensors
    }

    /// The whole file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let pad = |n: usize| n.div_ceil(ALIGNMENT) * ALIGNMENT;
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&GGUF_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut out, k);
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in t.shape.iter().rev() {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            out.extend_from_slice(&(t.ty as u32).to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += pad(t.data.len());
        }
        out.resize(pad(out.len()), 0);
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            out.resize(pad(out.len()), 0);
        }
        out
    }

    /// Writes the file atomically (temporary file in the same directory, then rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
        {
            let mut w = std::io::BufWriter::new(tmp.as_file_mut());
            w.write_all(&self.to_bytes())
                .and_then(|()| w.flush())
                .map_err(|e| Error::io(path, e))?;
        }
        tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
        tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
        Ok(())
    }
}

/// ggml's `quantize_row_q8_0_ref` on f32 values (a multiple of 32): per block of 32, the f16
/// scale `d = amax / 127` then the int8 values `round(x / d)` (half away from zero), 34 bytes.
pub fn quantize_q8_0(values: &[f32]) -> Result<Vec<u8>> {
    if !values.len().is_multiple_of(Q8_0_BLOCK) {
        return Err(Error::Shape {
            op: "q8_0".into(),
            msg: format!("{} values are not a multiple of {Q8_0_BLOCK}", values.len()),
        });
    }
    let mut out = Vec::with_capacity(values.len() / Q8_0_BLOCK * 34);
    for block in values.chunks_exact(Q8_0_BLOCK) {
        let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        for x in block {
            out.push(((x * id).round() as i8) as u8);
        }
    }
    Ok(out)
}

/// Q8_0 bytes back to f32 values.
pub fn dequantize_q8_0(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(34)
        .flat_map(|b| {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            b[2..].iter().map(move |&q| f32::from(q as i8) * d)
        })
        .collect()
}

/// llama.cpp's q/k row order: `permute(w, n_head, n_head_kv)` of `LlamaModel.modify_tensors`,
/// which turns the Hugging Face rotate-half layout into ggml's interleaved pairs.
fn permute_rows(w: &Tensor, n_head: i64) -> Result<Tensor> {
    let s = w.size();
    let rows = s[0];
    let mut shape = vec![n_head, 2, rows / n_head / 2];
    shape.extend_from_slice(&s[1..]);
    w.f_reshape(shape.as_slice())
        .ctx("q/k permute")?
        .f_swapaxes(1, 2)
        .ctx("q/k permute")?
        .f_reshape(s.as_slice())
        .ctx("q/k permute")
}

/// A tensor's bytes in `ty`.
fn encode(t: &Tensor, ty: GgmlType) -> Result<Vec<u8>> {
    let v: Vec<f32> = Vec::<f32>::try_from(
        t.f_to_kind(Kind::Float)
            .ctx("to f32")?
            .f_contiguous()
            .ctx("contiguous")?
            .f_flatten(0, -1)
            .ctx("flatten")?,
    )
    .ctx("tensor to a vector")?;
    Ok(match ty {
        GgmlType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        GgmlType::F16 => v
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect(),
        GgmlType::Bf16 => v
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
            .collect(),
        GgmlType::Q8_0 => quantize_q8_0(&v)?,
    })
}

/// The GGUF name of a Hugging Face tensor (`gguf.TensorNameMap` for the families of
/// [`GGUF_ARCHITECTURES`]).
fn tensor_name(class: ConverterClass, hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" | "backbone.embeddings.weight" => Some("token_embd.weight"),
        "model.norm.weight" | "backbone.norm_f.weight" | "model.final_layernorm.weight" => {
            Some("output_norm.weight")
        }
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf
        .strip_prefix("model.layers.")
        .or_else(|| hf.strip_prefix("backbone.layers."))?;
    let (layer, module) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = module.rsplit_once('.')?;
    // the SSM's A and D have no `.weight` in either naming
    match (module, suffix) {
        ("mixer" | "mamba", "A_log") => return Some(format!("blk.{layer}.ssm_a")),
        ("mixer" | "mamba", "D") => return Some(format!("blk.{layer}.ssm_d")),
        _ => {}
    }
    if !["weight", "bias"].contains(&suffix) {
        return None;
    }
    let m = match module {
        "input_layernorm" | "norm" => "attn_norm",
        // Gemma: post-attention norm, then a pre-feed-forward one
        "post_attention_layernorm"
            if matches!(class, ConverterClass::Gemma2 | ConverterClass::Gemma3) =>
        {
            "post_attention_norm"
        }
        "post_attention_layernorm" | "pre_feedforward_layernorm" | "pre_ff_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.qkv_proj" => "attn_qkv",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" | "feed_forward.gate_proj" => "ffn_gate",
        "mlp.up_proj" | "mlp.gate_up_proj" | "feed_forward.up_proj" => "ffn_up",
        "mlp.down_proj" | "feed_forward.down_proj" => "ffn_down",
        "mixer.in_proj" | "mamba.in_proj" => "ssm_in",
        "mixer.conv1d" | "mamba.conv1d" => "ssm_conv1d",
        "mixer.x_proj" | "mamba.x_proj" => "ssm_x",
        "mixer.dt_proj" | "mamba.dt_proj" => "ssm_dt",
        "mixer.out_proj" | "mamba.out_proj" => "ssm_out",
        "mamba.dt_layernorm" => "ssm_dt_norm",
        "mamba.b_layernorm" => "ssm_b_norm",
        "mamba.c_layernorm" => "ssm_c_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{m}.{suffix}"))
}

/// A `config.json` read the way the converter's `find_hparam` reads it: the first of `keys`
/// present decides (a `null` there is "absent").
struct Hparams<'a> {
    v: &'a Value,
    file: &'a Path,
}

impl Hparams<'_> {
    fn find(&self, keys: &[&str]) -> Option<&Value> {
        keys.iter()
            .find_map(|k| self.v.get(*k))
            .filter(|v| !v.is_null())
    }

    fn uint(&self, keys: &[&str]) -> Option<u64> {
        self.find(keys).and_then(Value::as_u64)
    }

    fn float(&self, keys: &[&str]) -> Option<f64> {
        self.find(keys).and_then(Value::as_f64)
    }

    /// An error about `key` of config.json.
    fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::Config {
            file: Some(self.file.to_path_buf()),
            key: key.into(),
            msg: msg.into(),
        }
    }

    fn need(&self, keys: &[&str]) -> Result<u64> {
        self.uint(keys)
            .ok_or_else(|| self.err(keys[0], "missing or not an integer (GGUF export needs it)"))
    }

    /// `TextModel.__init__`'s `rope_parameters`: `rope_parameters` (or `rope_scaling`) with the
    /// top-level RoPE keys mirrored in when it is not split per layer type.
    fn rope_parameters(&self) -> serde_json::Map<String, Value> {
        let mut rp = self
            .find(&["rope_parameters"])
            .or_else(|| self.find(&["rope_scaling"]))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        if rp.contains_key("full_attention") || rp.contains_key("sliding_attention") {
            return rp;
        }
        let local = self.find(&[
            "local_rope_theta",
            "rope_local_theta",
            "rope_theta_local",
            "swa_rope_theta",
            "rope_local_base_freq",
        ]);
        if let Some(t) = local {
            rp.insert(
                "sliding_attention".into(),
                serde_json::json!({ "rope_theta": t }),
            );
        }
        let mirrored = [
            (
                "rope_theta",
                self.find(&[
                    "global_rope_theta",
                    "rope_global_theta",
                    "rope_theta_global",
                    "rope_theta",
                    "rotary_emb_base",
                ]),
            ),
            ("rope_type", rp.get("type").filter(|v| !v.is_null())),
            (
                "partial_rotary_factor",
                self.find(&["partial_rotary_factor", "rope_pct", "rope_percent"]),
            ),
            (
                "original_max_position_embeddings",
                self.find(&["original_max_position_embeddings"]),
            ),
        ]
        .map(|(k, v)| (k, v.cloned()));
        for (k, v) in mirrored {
            if let Some(v) = v
                && !rp.contains_key(k)
            {
                rp.insert(k.into(), v);
            }
        }
        rp
    }
}

fn f32_of(v: f64) -> GgufValue {
    GgufValue::F32(v as f32)
}

fn u32_of(v: u64) -> GgufValue {
    GgufValue::U32(v as u32)
}

/// `LlamaModel.generate_extra_tensors` for llama3 RoPE scaling: one factor per frequency of a
/// head of `dim` (`rope_freqs`). The converter computes them with float32 torch operations; the
/// same libtorch operations are used here, so that the values are bit-equal.
fn llama3_rope_factors(rope: &serde_json::Map<String, Value>, dim: u64) -> Result<Tensor> {
    let get = |k: &str, d: f64| rope.get(k).and_then(Value::as_f64).unwrap_or(d);
    let base = get("rope_theta", 10000.0);
    let factor = get("factor", 8.0);
    let low = get("low_freq_factor", 1.0);
    let high = get("high_freq_factor", 4.0);
    let old_ctx = get("original_max_position_embeddings", 8192.0);
    let (low_wavelen, high_wavelen) = (old_ctx / low, old_ctx / high);
    let ctx = "llama3 rope factors";
    // freqs = 1.0 / (base ** (arange(0, dim, 2, float32) / dim)); `x / t` is t.reciprocal() * x
    let exps = Tensor::f_arange_start_step(0, dim as i64, 2, (Kind::Float, tch::Device::Cpu))
        .ctx(ctx)?
        .f_div_scalar(dim as i64)
        .ctx(ctx)?;
    let freqs = Tensor::f_pow_scalar(base, &exps)
        .ctx(ctx)?
        .f_reciprocal()
        .ctx(ctx)?;
    let wavelen = freqs
        .f_reciprocal()
        .ctx(ctx)?
        .f_mul_scalar(2.0 * std::f64::consts::PI)
        .ctx(ctx)?;
    // smooth = (old_ctx / wavelen - low) / (high - low); 1 / ((1 - smooth) / factor + smooth)
    let smooth = wavelen
        .f_reciprocal()
        .ctx(ctx)?
        .f_mul_scalar(old_ctx)
        .ctx(ctx)?
        .f_sub_scalar(low)
        .ctx(ctx)?
        .f_div_scalar(high - low)
        .ctx(ctx)?;
    let mid = smooth
        .f_neg()
        .ctx(ctx)?
        .f_add_scalar(1.0)
        .ctx(ctx)?
        .f_div_scalar(factor)
        .ctx(ctx)?
        .f_add(&smooth)
        .ctx(ctx)?
        .f_reciprocal()
        .ctx(ctx)?;
    let wavelen = Vec::<f32>::try_from(&wavelen).ctx(ctx)?;
    let mid = Vec::<f32>::try_from(&mid).ctx(ctx)?;
    let factors: Vec<f32> = wavelen
        .iter()
        .zip(mid)
        .map(|(&w, m)| {
            if w < high_wavelen as f32 {
                1.0
            } else if w > low_wavelen as f32 {
                factor as f32
            } else {
                m
            }
        })
        .collect();
    Ok(Tensor::from_slice(&factors))
}

/// `TextModel.set_gguf_parameters`.
fn text_parameters(
    w: &mut GgufWriter,
    hp: &Hparams,
    rp: &serde_json::Map<String, Value>,
    arch: &str,
    ty: GgufType,
    llama3_ok: bool,
) -> Result<()> {
    let p = |k: &str| format!("{arch}.{k}");
    w.add(&p("block_count"), u32_of(hp.need(BLOCK_KEYS)?));
    let keyed: [(&str, &[&str]); 5] = [
        (
            "context_length",
            &[
                "max_position_embeddings",
                "n_ctx",
                "n_positions",
                "max_length",
                "max_sequence_length",
                "model_max_length",
            ],
        ),
        ("embedding_length", &["hidden_size", "n_embd", "dim"]),
        (
            "feed_forward_length",
            &[
                "prefix_dense_intermediate_size",
                "dense_intermediate_size",
                "intermediate_size",
                "n_inner",
                "hidden_dim",
            ],
        ),
        (
            "attention.head_count",
            &["num_attention_heads", "n_head", "n_heads"],
        ),
        (
            "attention.head_count_kv",
            &["num_key_value_heads", "n_kv_heads"],
        ),
    ];
    for (key, names) in keyed {
        if let Some(n) = hp.uint(names) {
            w.add(&p(key), u32_of(n));
        }
    }
    if hp.find(&["is_causal"]) == Some(&Value::Bool(false)) {
        w.add(&p("attention.causal"), GgufValue::Bool(false));
    }
    let rope = rp
        .get("full_attention")
        .and_then(Value::as_object)
        .unwrap_or(rp);
    let factor = rope.get("factor").and_then(Value::as_f64);
    match rope.get("rope_type").and_then(Value::as_str) {
        None | Some("default") => {}
        // the Llama class writes llama3 scaling as the `rope_freqs` tensor
        Some(t) if t.eq_ignore_ascii_case("llama3") && llama3_ok => {}
        Some("linear") => {
            if let Some(f) = factor {
                w.add(&p("rope.scaling.type"), GgufValue::Str("linear".into()));
                w.add(&p("rope.scaling.factor"), f32_of(f));
            }
        }
        Some("yarn") => {
            if let Some(f) = factor {
                w.add(&p("rope.scaling.type"), GgufValue::Str("yarn".into()));
                w.add(&p("rope.scaling.factor"), f32_of(f));
                let orig = rope
                    .get("original_max_position_embeddings")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| {
                        hp.err(
                            "rope_parameters.original_max_position_embeddings",
                            "missing (yarn RoPE needs it)",
                        )
                    })?;
                w.add(&p("rope.scaling.original_context_length"), u32_of(orig));
                let yarn: [(&[&str], &str); 4] = [
                    (&["extrapolation_factor"], "yarn_ext_factor"),
                    (&["attention_factor", "attn_factor"], "yarn_attn_factor"),
                    (&["beta_fast"], "yarn_beta_fast"),
                    (&["beta_slow"], "yarn_beta_slow"),
                ];
                for (names, key) in yarn {
                    if let Some(v) = names
                        .iter()
                        .find_map(|n| rope.get(*n))
                        .and_then(Value::as_f64)
                    {
                        w.add(&p(&format!("rope.scaling.{key}")), f32_of(v));
                    }
                }
            }
        }
        Some(other) => {
            // longrope / su without Phi-3's factor tensors, dynamic NTK (which llama.cpp does
            // not implement) and unknown types: the converter would write a file without them
            return Err(hp.err("rope_parameters.rope_type", format!(
                    "GGUF export of `{arch}` supports the default, linear and yarn RoPE{}, not `{other}` (llama.cpp's converter would drop it)",
                    if llama3_ok { " and llama3" } else { "" }
                )));
        }
    }
    if let Some(t) = rope.get("rope_theta").and_then(Value::as_f64) {
        w.add(&p("rope.freq_base"), f32_of(t));
    }
    if let Some(t) = rp
        .get("sliding_attention")
        .and_then(|s| s.get("rope_theta"))
        .and_then(Value::as_f64)
    {
        w.add(&p("rope.freq_base_swa"), f32_of(t));
    }
    if let Some(e) = hp.float(&["rms_norm_eps", "norm_eps"]) {
        w.add(&p("attention.layer_norm_rms_epsilon"), f32_of(e));
    }
    if let Some(e) = hp.float(&["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"]) {
        w.add(&p("attention.layer_norm_epsilon"), f32_of(e));
    }
    if let Some(n) = hp.uint(&["num_local_experts", "num_experts", "n_routed_experts"]) {
        w.add(&p("expert_count"), u32_of(n));
    }
    if let Some(n) = hp.uint(&[
        "num_experts_per_tok",
        "num_experts_per_token",
        "top_k_experts",
    ]) {
        w.add(&p("expert_used_count"), u32_of(n));
    }
    if let Some(hd) = hp.uint(&["head_dim"]) {
        w.add(&p("attention.key_length"), u32_of(hd));
        w.add(&p("attention.value_length"), u32_of(hd));
    }
    w.add("general.file_type", GgufValue::U32(ty.file_type()));
    Ok(())
}

const BLOCK_KEYS: &[&str] = &["n_layers", "num_hidden_layers", "n_layer", "num_layers"];

/// The architecture parameters of `class.set_gguf_parameters`, and the extra tensors of its
/// `generate_extra_tensors` (Phi-3's LongRoPE factors).
fn architecture_parameters(
    w: &mut GgufWriter,
    hp: &Hparams,
    family: &GgufArchitecture,
    ty: GgufType,
) -> Result<Vec<(String, Tensor)>> {
    let arch = family.arch;
    let p = |k: &str| format!("{arch}.{k}");
    let rp = hp.rope_parameters();
    let mut extra = Vec::new();
    match family.class {
        ConverterClass::Qwen => text_parameters(w, hp, &rp, arch, ty, false)?,
        ConverterClass::Llama => {
            text_parameters(w, hp, &rp, arch, ty, true)?;
            w.add(&p("vocab_size"), u32_of(hp.need(&["vocab_size"])?));
            let rope_dim = match hp.uint(&["head_dim"]) {
                Some(d) => d,
                None => hp.need(&["hidden_size"])? / hp.need(&["num_attention_heads"])?,
            };
            w.add(&p("rope.dimension_count"), u32_of(rope_dim));
            let rope = rp
                .get("full_attention")
                .and_then(Value::as_object)
                .unwrap_or(&rp);
            if rope
                .get("rope_type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.eq_ignore_ascii_case("llama3"))
            {
                extra.push((
                    "rope_freqs.weight".to_string(),
                    llama3_rope_factors(rope, rope_dim)?,
                ));
            }
        }
        ConverterClass::Gemma3 => {
            text_parameters(w, hp, &rp, arch, ty, false)?;
            let or = |k: &str, d: u64| hp.uint(&[k]).unwrap_or(d);
            w.add(
                &p("context_length"),
                u32_of(or("max_position_embeddings", 131072)),
            );
            w.add(
                &p("attention.head_count"),
                u32_of(or("num_attention_heads", 8)),
            );
            w.add(
                &p("attention.layer_norm_rms_epsilon"),
                f32_of(hp.float(&["rms_norm_eps"]).unwrap_or(1e-6)),
            );
            w.add(&p("attention.key_length"), u32_of(or("head_dim", 256)));
            w.add(&p("attention.value_length"), u32_of(or("head_dim", 256)));
            let theta = rp
                .get("full_attention")
                .unwrap_or(&Value::Object(rp.clone()))
                .get("rope_theta")
                .and_then(Value::as_f64)
                .unwrap_or(1_000_000.0);
            w.add(&p("rope.freq_base"), f32_of(theta));
            if hp.find(&["attn_logit_softcapping"]).is_some() {
                return Err(hp.err(
                    "attn_logit_softcapping",
                    "Gemma 3 has no attention soft-cap (llama.cpp's converter refuses it)",
                ));
            }
            if let Some(c) = hp.float(&["final_logit_softcapping"]).filter(|c| *c != 0.0) {
                w.add(&p("final_logit_softcapping"), f32_of(c));
            }
            if hp.uint(&["sliding_window_pattern"]) != Some(1) {
                w.add(
                    &p("attention.sliding_window"),
                    u32_of(hp.need(&["sliding_window"])?),
                );
            }
            w.add(
                &p("attention.head_count_kv"),
                u32_of(or("num_key_value_heads", 4)),
            );
        }
        ConverterClass::Gemma2 => {
            let n_head = hp.need(&["num_attention_heads"])?;
            let float = |k: &str| {
                hp.float(&[k]).ok_or_else(|| {
                    hp.err(k, "missing or not a number (Gemma 2 GGUF export needs it)")
                })
            };
            w.add(
                &p("context_length"),
                u32_of(hp.need(&["max_position_embeddings"])?),
            );
            w.add(&p("embedding_length"), u32_of(hp.need(&["hidden_size"])?));
            w.add(&p("block_count"), u32_of(hp.need(BLOCK_KEYS)?));
            w.add(
                &p("feed_forward_length"),
                u32_of(hp.need(&["intermediate_size"])?),
            );
            w.add(&p("attention.head_count"), u32_of(n_head));
            w.add(
                &p("attention.head_count_kv"),
                u32_of(hp.uint(&["num_key_value_heads"]).unwrap_or(n_head)),
            );
            w.add(
                &p("attention.layer_norm_rms_epsilon"),
                f32_of(float("rms_norm_eps")?),
            );
            let head_dim = hp.need(&["head_dim"])?;
            w.add(&p("attention.key_length"), u32_of(head_dim));
            w.add(&p("attention.value_length"), u32_of(head_dim));
            w.add("general.file_type", GgufValue::U32(ty.file_type()));
            w.add(
                &p("attn_logit_softcapping"),
                f32_of(float("attn_logit_softcapping")?),
            );
            w.add(
                &p("final_logit_softcapping"),
                f32_of(float("final_logit_softcapping")?),
            );
            w.add(
                &p("attention.sliding_window"),
                u32_of(hp.need(&["sliding_window"])?),
            );
        }
        ConverterClass::Phi3 => {
            let n_embd = hp.need(&["hidden_size", "n_embd"])?;
            let n_head = hp.need(&["num_attention_heads", "n_head"])?;
            let max_pos = hp.need(&["n_positions", "max_position_embeddings"])?;
            let orig = rp
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .ok_or_else(|| {
                    hp.err(
                        "original_max_position_embeddings",
                        "missing (Phi-3 GGUF export needs it)",
                    )
                })?;
            let rot = rp
                .get("partial_rotary_factor")
                .and_then(Value::as_f64)
                .unwrap_or(1.0);
            let rope_dims = (rot * n_embd as f64) as u64 / n_head;
            w.add(&p("context_length"), u32_of(max_pos));
            w.add(&p("rope.scaling.original_context_length"), u32_of(orig));
            w.add(&p("embedding_length"), u32_of(n_embd));
            w.add(
                &p("feed_forward_length"),
                u32_of(hp.need(&["intermediate_size"])?),
            );
            w.add(&p("block_count"), u32_of(hp.need(BLOCK_KEYS)?));
            w.add(&p("attention.head_count"), u32_of(n_head));
            w.add(
                &p("attention.head_count_kv"),
                u32_of(hp.need(&["num_key_value_heads", "n_head_kv"])?),
            );
            let eps = hp
                .float(&["rms_norm_eps"])
                .ok_or_else(|| hp.err("rms_norm_eps", "missing or not a number"))?;
            w.add(&p("attention.layer_norm_rms_epsilon"), f32_of(eps));
            w.add(&p("rope.dimension_count"), u32_of(rope_dims));
            let rope = rp
                .get("full_attention")
                .and_then(Value::as_object)
                .unwrap_or(&rp);
            let theta = rope
                .get("rope_theta")
                .and_then(Value::as_f64)
                .ok_or_else(|| hp.err("rope_theta", "missing"))?;
            w.add(&p("rope.freq_base"), f32_of(theta));
            w.add("general.file_type", GgufValue::U32(ty.file_type()));
            w.add(
                &p("attention.sliding_window"),
                u32_of(hp.uint(&["sliding_window"]).unwrap_or(0)),
            );
            let factors = |k: &str| -> Option<Vec<f32>> {
                rp.get(k)?
                    .as_array()?
                    .iter()
                    .map(|x| x.as_f64().map(|f| f as f32))
                    .collect()
            };
            if let Some(long) = factors("long_factor").filter(|l| !l.is_empty()) {
                let bad = |msg: String| hp.err("rope_parameters", msg);
                let scale = max_pos as f64 / orig as f64;
                let rope_type = rp
                    .get("rope_type")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_ascii_lowercase();
                let attn_factor = match rope_type.as_str() {
                    _ if scale <= 1.0 => 1.0,
                    "su" | "longrope" => (1.0 + scale.ln() / (orig as f64).ln()).sqrt(),
                    "yarn" => 0.1 * scale.ln() + 1.0,
                    other => {
                        return Err(bad(format!(
                            "rope_type `{other}` with long_factor is not one llama.cpp's converter handles"
                        )));
                    }
                };
                w.add(&p("rope.scaling.attn_factor"), f32_of(attn_factor));
                let short = factors("short_factor").unwrap_or_default();
                if long.len() != short.len() || long.len() as u64 * 2 != rope_dims {
                    return Err(bad(format!(
                        "long_factor and short_factor must have {} values (rope dims / 2); they have {} and {}",
                        rope_dims / 2,
                        long.len(),
                        short.len()
                    )));
                }
                extra.push((
                    "rope_factors_long.weight".to_string(),
                    Tensor::from_slice(&long),
                ));
                extra.push((
                    "rope_factors_short.weight".to_string(),
                    Tensor::from_slice(&short),
                ));
            }
        }
        ConverterClass::Jamba => {
            let d_model = hp.need(&["hidden_size", "mamba_d_model"])?;
            let nonzero = |keys: &[&str]| hp.uint(keys).filter(|x| *x != 0);
            let blocks = hp.need(BLOCK_KEYS)?;
            let n_kv = hp.need(&["num_key_value_heads"])?;
            let offset = hp.need(&["attn_layer_offset"])?;
            let period = hp.need(&["attn_layer_period"])?.max(1);
            let kv: Vec<i32> = (0..blocks)
                .map(|i| {
                    if i >= offset && (i - offset) % period == 0 {
                        n_kv as i32
                    } else {
                        0
                    }
                })
                .collect();
            w.add(&p("block_count"), u32_of(blocks));
            w.add(
                &p("context_length"),
                u32_of(hp.need(&["max_position_embeddings", "n_ctx"])?),
            );
            w.add(&p("embedding_length"), u32_of(d_model));
            w.add(
                &p("feed_forward_length"),
                u32_of(hp.need(&["intermediate_size"])?),
            );
            w.add(
                &p("attention.head_count"),
                u32_of(hp.need(&["num_attention_heads"])?),
            );
            w.add(&p("attention.head_count_kv"), GgufValue::I32Array(kv));
            w.add(
                &p("ssm.conv_kernel"),
                u32_of(nonzero(&["mamba_d_conv"]).unwrap_or(4)),
            );
            w.add(
                &p("ssm.inner_size"),
                u32_of(hp.need(&["mamba_expand"])? * d_model),
            );
            w.add(
                &p("ssm.state_size"),
                u32_of(nonzero(&["mamba_d_state"]).unwrap_or(16)),
            );
            w.add(
                &p("ssm.time_step_rank"),
                u32_of(nonzero(&["mamba_dt_rank"]).unwrap_or(d_model.div_ceil(16))),
            );
            let eps = hp
                .float(&["layer_norm_epsilon", "rms_norm_eps"])
                .filter(|e| *e != 0.0)
                .unwrap_or(1e-6);
            w.add(&p("attention.layer_norm_rms_epsilon"), f32_of(eps));
            w.add(
                &p("expert_count"),
                u32_of(hp.need(&["num_local_experts", "num_experts"])?),
            );
            w.add(
                &p("expert_used_count"),
                u32_of(hp.need(&["num_experts_per_tok", "num_experts_per_token"])?),
            );
            w.add("general.file_type", GgufValue::U32(ty.file_type()));
        }
        ConverterClass::Mamba => {
            let d_model = hp.need(&["hidden_size", "d_model"])?;
            let nonzero = |keys: &[&str]| hp.uint(keys).filter(|x| *x != 0);
            let d_conv = nonzero(&["conv_kernel", "d_conv"]).unwrap_or(4);
            let d_inner = nonzero(&["intermediate_size", "d_inner"]).unwrap_or(2 * d_model);
            let d_state = nonzero(&["state_size", "d_state"]).unwrap_or(16);
            let dt_rank = nonzero(&["time_step_rank", "dt_rank"]).unwrap_or(d_model.div_ceil(16));
            let eps = hp
                .float(&["layer_norm_epsilon", "rms_norm_eps"])
                .filter(|e| *e != 0.0)
                .unwrap_or(1e-5);
            let falcon = hp.find(&["model_type"]).and_then(Value::as_str) == Some("falcon_mamba");
            if d_inner != 2 * d_model {
                return Err(hp.err("intermediate_size", format!(
                        "llama.cpp's mamba needs intermediate_size = 2 * hidden_size ({}), not {d_inner}",
                        2 * d_model
                    )));
            }
            w.add(&p("context_length"), GgufValue::U32(1 << 20));
            w.add(&p("embedding_length"), u32_of(d_model));
            w.add(&p("feed_forward_length"), GgufValue::U32(0));
            w.add(&p("attention.head_count"), GgufValue::U32(0));
            w.add(&p("block_count"), u32_of(hp.need(BLOCK_KEYS)?));
            w.add(&p("ssm.conv_kernel"), u32_of(d_conv));
            w.add(&p("ssm.inner_size"), u32_of(d_inner));
            w.add(&p("ssm.state_size"), u32_of(d_state));
            w.add(&p("ssm.time_step_rank"), u32_of(dt_rank));
            w.add(&p("attention.layer_norm_rms_epsilon"), f32_of(eps));
            w.add(&p("ssm.dt_b_c_rms"), GgufValue::Bool(falcon));
            w.add("general.file_type", GgufValue::U32(ty.file_type()));
        }
    }
    Ok(extra)
}

/// The sampling defaults `gguf.Metadata` reads from `generation_config.json`.
fn add_sampling(w: &mut GgufWriter, dir: &Path) {
    let Some(gc) = std::fs::read_to_string(dir.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
    else {
        return;
    };
    let int = |v: &Value| v.as_i64().map(|x| GgufValue::I32(x as i32));
    let float = |v: &Value| v.as_f64().map(f32_of);
    type Convert<'a> = &'a dyn Fn(&Value) -> Option<GgufValue>;
    let keys: [(&[&str], &str, Convert); 11] = [
        (&["top_k"], "top_k", &int),
        (&["top_p"], "top_p", &float),
        (&["min_p"], "min_p", &float),
        (&["xtc_probability"], "xtc_probability", &float),
        (&["xtc_threshold"], "xtc_threshold", &float),
        (&["temperature"], "temp", &float),
        (&["penalty_last_n"], "penalty_last_n", &int),
        (
            &["penalty_repeat", "repetition_penalty"],
            "penalty_repeat",
            &float,
        ),
        (&["mirostat"], "mirostat", &int),
        (&["mirostat_tau"], "mirostat_tau", &float),
        (&["mirostat_eta"], "mirostat_eta", &float),
    ];
    if let Some(s) = gc.get("sequence").and_then(Value::as_str) {
        w.add("general.sampling.sequence", GgufValue::Str(s.into()));
    }
    for (names, key, conv) in keys {
        if let Some(v) = names
            .iter()
            .find_map(|n| gc.get(*n).filter(|v| !v.is_null()))
            .and_then(conv)
        {
            w.add(&format!("general.sampling.{key}"), v);
        }
    }
}

/// `gguf.size_label` without experts: the parameter count in K/M/B/T with at least two digits.
fn size_label(params: u64) -> String {
    let n = params as f64;
    let (scaled, suffix) = if n > 1e12 {
        (n * 1e-12, "T")
    } else if n > 1e9 {
        (n * 1e-9, "B")
    } else if n > 1e6 {
        (n * 1e-6, "M")
    } else {
        (n * 1e-3, "K")
    };
    let digits = format!("{}", scaled.round_ties_even() as u64)
        .trim_start_matches('0')
        .len();
    let fix = 2usize.saturating_sub(digits);
    format!("{scaled:.fix$}{suffix}")
}

/// `does_token_look_special` of the converter.
fn looks_special(t: &str) -> bool {
    ["<pad>", "<mask>", "<2mass>", "[@BOS@]"].contains(&t)
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// The tokenizer fields of `_set_vocab_gpt2` and `SpecialVocab(load_merges=True)`.
fn add_vocab(w: &mut GgufWriter, dir: &Path, vocab_size: usize, tok: &Tokenizer) -> Result<()> {
    let path = dir.join("tokenizer.json");
    let tj = read_json(&path)?;
    let model_type = tj.pointer("/model/type").and_then(Value::as_str);
    if model_type != Some("BPE") {
        return Err(Error::Tokenizer {
            path,
            msg: format!(
                "GGUF export supports byte-level BPE tokenizers (llama.cpp's `gpt2` model); this one is {model_type:?}"
            ),
        });
    }
    let pre = match tj.get("pre_tokenizer") {
        Some(p)
            if p.get("type").and_then(Value::as_str) == Some("ByteLevel")
                && p.get("use_regex").and_then(Value::as_bool) != Some(false) =>
        {
            "gpt2"
        }
        other => {
            return Err(Error::Tokenizer {
                path,
                msg: format!(
                    "pre-tokenizer {} is not one VoltTrain maps to a llama.cpp `tokenizer.ggml.pre` (supported: a plain ByteLevel, `gpt2`)",
                    other.map(Value::to_string).unwrap_or_else(|| "none".into())
                ),
            });
        }
    };
    let inner = tok.inner();
    let vocab = inner.get_vocab(true);
    let mut by_id: HashMap<u32, String> = HashMap::new();
    for (t, id) in vocab {
        by_id.insert(id, t);
    }
    // get_vocab_base asserts every token id is under the model's vocab_size
    if let Some(max) = by_id.keys().max().filter(|m| **m as usize >= vocab_size) {
        return Err(Error::Tokenizer {
            path: dir.join("tokenizer.json"),
            msg: format!(
                "token id {max} is not under the model's vocab_size {vocab_size} (config.json): the GGUF vocabulary would lose it"
            ),
        });
    }
    let added = inner.get_added_tokens_decoder();
    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    for i in 0..vocab_size as u32 {
        match by_id.get(&i) {
            None => {
                tokens.push(format!("[PAD{i}]"));
                types.push(5); // UNUSED
            }
            Some(t) => {
                match added.get(&i) {
                    Some(a) if a.special || looks_special(t) => types.push(3), // CONTROL
                    Some(_) => types.push(4),                                  // USER_DEFINED
                    None => types.push(1),                                     // NORMAL
                }
                tokens.push(t.clone());
            }
        }
    }
    w.add("tokenizer.ggml.model", GgufValue::Str("gpt2".into()));
    w.add("tokenizer.ggml.pre", GgufValue::Str(pre.into()));
    w.add("tokenizer.ggml.tokens", GgufValue::StrArray(tokens));
    w.add("tokenizer.ggml.token_type", GgufValue::I32Array(types));
    let merges: Vec<String> = match tj.pointer("/model/merges").and_then(Value::as_array) {
        None => Vec::new(),
        Some(a) => a
            .iter()
            .map(|m| match m {
                Value::String(s) => Some(s.clone()),
                Value::Array(p) => {
                    let parts: Option<Vec<String>> = p
                        .iter()
                        .map(|x| x.as_str().map(|s| s.replace(' ', "\u{0120}")))
                        .collect();
                    parts.map(|v| v.join(" "))
                }
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::Tokenizer {
                path: dir.join("tokenizer.json"),
                msg: "model.merges: unknown format".into(),
            })?,
    };
    if !merges.is_empty() {
        w.add("tokenizer.ggml.merges", GgufValue::StrArray(merges));
    }
    add_special_vocab(w, dir, &tj, None)
}

/// A JSON file, with errors naming it.
fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        source: e,
    })
}

/// One piece of a SentencePiece `ModelProto` (`pieces`, field 1).
struct SpmPiece {
    piece: String,
    score: f32,
    /// `SentencePiece.Type`: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
    ty: u64,
}

fn varint(b: &[u8], pos: &mut usize) -> std::result::Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint too long".into())
}

/// One field of a protobuf message: field number, varint / fixed32 value, length-delimited bytes.
type ProtoField<'a> = (u64, u64, &'a [u8]);

/// The fields of a protobuf message.
fn proto_fields(b: &[u8]) -> std::result::Result<Vec<ProtoField<'_>>, String> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < b.len() {
        let key = varint(b, &mut pos)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => out.push((field, varint(b, &mut pos)?, &b[0..0])),
            1 => pos += 8,
            2 => {
                let len = varint(b, &mut pos)? as usize;
                let end = pos.checked_add(len).filter(|e| *e <= b.len());
                let end = end.ok_or("length-delimited field past the end")?;
                out.push((field, 0, &b[pos..end]));
                pos = end;
            }
            5 => {
                let v = b.get(pos..pos + 4).ok_or("truncated fixed32")?;
                out.push((
                    field,
                    u64::from(u32::from_le_bytes(v.try_into().unwrap())),
                    &b[0..0],
                ));
                pos += 4;
            }
            w => return Err(format!("unsupported protobuf wire type {w}")),
        }
    }
    if pos > b.len() {
        return Err("truncated message".into());
    }
    Ok(out)
}

/// The pieces of a SentencePiece model file (what `SentencePieceProcessor` reads).
fn read_spm(path: &Path) -> Result<Vec<SpmPiece>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::Tokenizer {
        path: path.to_path_buf(),
        msg: format!("not a SentencePiece model: {msg}"),
    };
    let mut pieces = Vec::new();
    for (field, _, sub) in proto_fields(&bytes).map_err(bad)? {
        if field != 1 {
            continue;
        }
        let mut p = SpmPiece {
            piece: String::new(),
            score: 0.0,
            ty: 1,
        };
        for (f, v, data) in proto_fields(sub).map_err(bad)? {
            match f {
                1 => {
                    p.piece = String::from_utf8(data.to_vec())
                        .map_err(|_| bad("a piece is not UTF-8".into()))?;
                }
                2 => p.score = f32::from_bits(v as u32),
                3 => p.ty = v,
                _ => {}
            }
        }
        pieces.push(p);
    }
    if pieces.is_empty() {
        return Err(bad("no pieces".into()));
    }
    Ok(pieces)
}

/// The SentencePiece vocabulary of the converter class: tokens, scores and types from
/// `tokenizer.model`, then `added_tokens.json` and tokenizer_config.json's `added_tokens_decoder`,
/// then `SpecialVocab` (without merges, ids under the vocabulary size).
///
/// Most classes follow `TextModel._set_vocab_sentencepiece`: the size is `vocab_size_per_layer_input`
/// or `vocab_size` (0 meaning the model file's), pieces and added ids past it are skipped, an
/// added token is a control token when `special` or when it looks special, else user-defined
/// with `▁` written as a space. `Phi3MiniModel.set_vocab` differs: the size is `vocab_size`,
/// added tokens are control tokens only when `special` and are kept as written, tokenizer.json's
/// `added_tokens` are applied the same way after the decoder's, and an id at or past the size
/// (which the converter fails on) is an error naming the file.
fn set_vocab_sentencepiece(
    w: &mut GgufWriter,
    class: ConverterClass,
    dir: &Path,
    hp: &Hparams,
) -> Result<()> {
    let phi3 = class == ConverterClass::Phi3;
    let model_path = dir.join("tokenizer.model");
    let pieces = read_spm(&model_path)?;
    let size = if phi3 {
        hp.uint(&["vocab_size"])
    } else {
        hp.uint(&["vocab_size_per_layer_input", "vocab_size"])
            .filter(|v| *v != 0)
    };
    let vocab_size = size.map_or(pieces.len(), |v| v as usize);
    let past_the_end = |path: &Path, what: String| Error::Tokenizer {
        path: path.to_path_buf(),
        msg: format!(
            "{what} is not under the model's vocab_size {vocab_size} (config.json): llama.cpp's converter fails on a Phi-3 vocabulary with it"
        ),
    };
    if phi3 && pieces.len() > vocab_size {
        return Err(past_the_end(
            &model_path,
            format!("piece {}", pieces.len() - 1),
        ));
    }
    let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000.0f32; vocab_size];
    let mut types = vec![5i32; vocab_size];
    for (i, p) in pieces.iter().enumerate().take(vocab_size) {
        tokens[i] = p.piece.clone();
        scores[i] = p.score;
        types[i] = match p.ty {
            2 => 2,
            3 => 3,
            5 => 5,
            6 => 6,
            _ => 1,
        };
    }
    // the converter reads each of these files when it `is_file()`
    let read_json = |name: &str| -> Result<Option<Value>> {
        let path = dir.join(name);
        path.is_file().then(|| read_json(&path)).transpose()
    };
    if let Some(Value::Object(added)) = read_json("added_tokens.json")? {
        for (key, id) in added {
            if let Some(id) = id.as_u64().map(|i| i as usize).filter(|i| *i < vocab_size) {
                tokens[id] = key;
                scores[id] = -1000.0;
                types[id] = 4;
            }
        }
    }
    // (file, id, content, `special`) of tokenizer_config.json's added_tokens_decoder, then, for
    // Phi-3, of tokenizer.json's added_tokens
    let mut added: Vec<(&str, usize, String, bool)> = Vec::new();
    let special = |data: &Value| truthy(&data.get("special").cloned());
    if let Some(tc) = read_json("tokenizer_config.json")?
        && let Some(Value::Object(dec)) = tc.get("added_tokens_decoder")
    {
        for (id, data) in dec {
            if let (Ok(id), Some(content)) = (
                id.parse::<usize>(),
                data.get("content").and_then(Value::as_str),
            ) {
                added.push(("tokenizer_config.json", id, content.into(), special(data)));
            }
        }
    }
    let tj = read_json("tokenizer.json")?.unwrap_or(Value::Null);
    if phi3 {
        for t in tj
            .get("added_tokens")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let (Some(id), Some(content)) = (
                t.get("id").and_then(Value::as_u64),
                t.get("content").and_then(Value::as_str),
            ) {
                added.push(("tokenizer.json", id as usize, content.into(), special(t)));
            }
        }
    }
    for (file, id, content, special) in added {
        if id >= vocab_size {
            if phi3 {
                return Err(past_the_end(
                    &dir.join(file),
                    format!("added token {content:?} (id {id})"),
                ));
            }
            continue;
        }
        if special || (!phi3 && looks_special(&content)) {
            types[id] = 3;
            tokens[id] = content;
        } else {
            types[id] = 4;
            tokens[id] = if phi3 {
                content
            } else {
                content.replace('\u{2581}', " ")
            };
        }
        scores[id] = -1000.0;
    }
    let n = tokens.len() as u64;
    w.add("tokenizer.ggml.model", GgufValue::Str("llama".into()));
    w.add("tokenizer.ggml.pre", GgufValue::Str("default".into()));
    w.add("tokenizer.ggml.tokens", GgufValue::StrArray(tokens));
    w.add("tokenizer.ggml.scores", GgufValue::F32Array(scores));
    w.add("tokenizer.ggml.token_type", GgufValue::I32Array(types));
    add_special_vocab(w, dir, &tj, Some(n))
}

/// Python truthiness of an optional JSON value.
fn truthy(v: &Option<Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
    }
}

/// `SpecialVocab._parse_normalizer`.
fn parse_normalizer(n: &Value, lower: &mut Option<bool>, strip: &mut Option<bool>) {
    match n.get("type").and_then(Value::as_str) {
        Some("Lowercase") => *lower = Some(true),
        Some("StripAccents") => *strip = Some(true),
        Some("BertNormalizer") => {
            if let Some(b) = n.get("lowercase").and_then(Value::as_bool) {
                *lower = Some(b);
            }
            if let Some(b) = n.get("strip_accents").and_then(Value::as_bool) {
                *strip = Some(b);
            }
        }
        Some("Sequence") => {
            for m in n
                .get("normalizers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                parse_normalizer(m, lower, strip);
            }
        }
        _ => {}
    }
}

/// `gguf.SpecialVocab(dir, load_merges=True).add_to_gguf` (the gguf-py the converter ships,
/// 0.19.0) after the merges: special token ids (tokenizer_config.json's tokens by added-token
/// content, then config.json's `<type>_token_id`), `add_bos/eos/sep_token` (tokenizer.json's
/// post-processor first, then tokenizer_config.json), the chat template and normalizer flags.
fn add_special_vocab(
    w: &mut GgufWriter,
    dir: &Path,
    tj: &Value,
    n_vocab: Option<u64>,
) -> Result<()> {
    let tc_path = dir.join("tokenizer_config.json");
    let mut tc: serde_json::Map<String, Value> = match std::fs::read_to_string(&tc_path) {
        Ok(t) => serde_json::from_str::<Value>(&t)
            .map_err(|e| Error::Json {
                path: tc_path.clone(),
                source: e,
            })?
            .as_object()
            .cloned()
            .unwrap_or_default(),
        Err(_) => serde_json::Map::new(),
    };
    let has_tc = !tc.is_empty();
    let (mut lower, mut strip) = (None, None);
    if let Some(n) = tj.get("normalizer").filter(|n| !n.is_null()) {
        parse_normalizer(n, &mut lower, &mut strip);
    }
    let mut types: Vec<&str> = vec!["bos", "eos", "unk", "sep", "pad", "cls", "mask"];
    let mut add: Vec<(&str, bool)> = Vec::new();
    let set_add =
        |add: &mut Vec<(&'static str, bool)>, typ: &'static str, b: bool, keep: bool| match add
            .iter_mut()
            .find(|(t, _)| *t == typ)
        {
            Some(slot) if !keep => slot.1 = b,
            Some(_) => {}
            None => add.push((typ, b)),
        };
    let get = |tc: &serde_json::Map<String, Value>, k: &str| tc.get(k).cloned();
    let (mut bos, mut cls) = (get(&tc, "bos_token"), get(&tc, "cls_token"));
    let (mut eos, mut sep) = (get(&tc, "eos_token"), get(&tc, "sep_token"));
    if !truthy(&bos) && truthy(&cls) && has_tc {
        tc.insert("bos_token".into(), cls.clone().unwrap());
        bos = cls.clone();
    }
    if !truthy(&eos) && truthy(&sep) && has_tc {
        tc.insert("eos_token".into(), sep.clone().unwrap());
        eos = sep.clone();
    }
    let special_id = |x: Option<&Value>| -> Option<Value> {
        x?.pointer("/SpecialToken/id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(|s| Value::String(s.into()))
    };
    if let Some(pp) = tj
        .get("post_processor")
        .filter(|p| truthy(&Some((*p).clone())))
    {
        let procs = pp
            .get("processors")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_else(|| vec![pp.clone()]);
        for proc in &procs {
            match proc.get("type").and_then(Value::as_str) {
                Some("ByteLevel") => {
                    set_add(&mut add, "bos", false, true);
                    set_add(&mut add, "eos", false, true);
                }
                Some("RobertaProcessing") => {
                    for typ in ["bos", "eos", "sep"] {
                        set_add(&mut add, typ, true, false);
                    }
                    if !truthy(&cls) && has_tc {
                        cls = proc.pointer("/cls/0").cloned().or(bos.clone());
                        tc.insert("cls_token".into(), cls.clone().unwrap_or(Value::Null));
                    }
                    if !truthy(&sep) && has_tc {
                        sep = proc.pointer("/sep/0").cloned().or(eos.clone());
                        tc.insert("sep_token".into(), sep.clone().unwrap_or(Value::Null));
                    }
                }
                Some("TemplateProcessing") => {
                    let empty = Vec::new();
                    let single = proc
                        .get("single")
                        .and_then(Value::as_array)
                        .unwrap_or(&empty);
                    let pair = proc.get("pair").and_then(Value::as_array).unwrap_or(&empty);
                    let (mut first, mut last) = (None, None);
                    if single.len() > 1 {
                        if let Some(f) = special_id(single.first()) {
                            first = Some(f.clone());
                            if !has_tc {
                                bos = Some(f.clone());
                            } else if Some(&f) != bos.as_ref() && Some(&f) != cls.as_ref() {
                                if !truthy(&bos) {
                                    tc.insert("bos_token".into(), f.clone());
                                    bos = Some(f.clone());
                                }
                                if !truthy(&cls) {
                                    tc.insert("cls_token".into(), f.clone());
                                    cls = Some(f.clone());
                                }
                            }
                            let b = Some(&f) == bos.as_ref() || Some(&f) == cls.as_ref();
                            set_add(&mut add, "bos", b, false);
                        }
                        if let Some(l) = special_id(single.last()) {
                            last = Some(l.clone());
                            if !has_tc {
                                eos = Some(l.clone());
                            } else if Some(&l) != eos.as_ref() {
                                // the template's last token becomes EOS, the old one EOT/EOM
                                for extra in ["eot", "eom"] {
                                    if !types.contains(&extra) {
                                        types.push(extra);
                                        tc.insert(
                                            format!("{extra}_token"),
                                            eos.clone().unwrap_or(Value::Null),
                                        );
                                        break;
                                    }
                                }
                                tc.insert("eos_token".into(), l.clone());
                                eos = Some(l.clone());
                            }
                            set_add(&mut add, "eos", Some(&l) == eos.as_ref(), false);
                        }
                    }
                    if !pair.is_empty() {
                        let start =
                            usize::from(first.is_some() && special_id(pair.first()) == first);
                        let stop = usize::from(last.is_some() && special_id(pair.last()) == last);
                        let p = if start + stop <= pair.len() {
                            &pair[start..pair.len() - stop]
                        } else {
                            &pair[0..0]
                        };
                        fn seq(x: Option<&Value>) -> Option<&str> {
                            x?.pointer("/Sequence/id")?.as_str()
                        }
                        if p.len() > 2 && seq(p.first()) == Some("A") && seq(p.last()) == Some("B")
                        {
                            let mid = &p[1..p.len() - 1];
                            let is_sep =
                                |e: &Value| Some(e) == sep.as_ref() || Some(e) == eos.as_ref();
                            let mut add_sep = false;
                            if let Some(e) = special_id(mid.first())
                                && is_sep(&e)
                                && last.is_none()
                            {
                                add_sep = true;
                            }
                            if mid.len() == 2
                                && let Some(e) = special_id(mid.get(1))
                                && is_sep(&e)
                            {
                                add_sep = true;
                            }
                            set_add(&mut add, "sep", add_sep, false);
                            if add_sep && !truthy(&sep) && has_tc {
                                tc.insert("sep_token".into(), eos.clone().unwrap_or(Value::Null));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let mut ids: Vec<(&str, u64)> = Vec::new();
    let set_id = |ids: &mut Vec<(&'static str, u64)>, typ: &'static str, id: Option<u64>| {
        if let Some(id) = id.filter(|i| n_vocab.is_none_or(|n| *i < n))
            && !ids.iter().any(|(t, _)| *t == typ)
        {
            ids.push((typ, id));
        }
    };
    if has_tc {
        // the chat template: tokenizer_config.json's (when the key is there), else
        // chat_template.jinja, else chat_template.json's
        let alt = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(t) => Some(Value::String(t)),
            Err(_) => std::fs::read_to_string(dir.join("chat_template.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|v| v.get("chat_template").cloned()),
        };
        match tc.get("chat_template").cloned().or(alt) {
            Some(Value::String(t)) => w.add("tokenizer.chat_template", GgufValue::Str(t)),
            None | Some(Value::Null) => {}
            Some(_) => {
                return Err(Error::Tokenizer {
                    path: tc_path,
                    msg: "GGUF export: a list of named chat templates is not supported; keep one template string".into(),
                });
            }
        }
        let added: Vec<(String, u64)> = tj
            .get("added_tokens")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|t| {
                        Some((
                            t.get("content")?.as_str()?.to_string(),
                            t.get("id")?.as_u64()?,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        for typ in types.clone() {
            if let Some(b) = tc.get(&format!("add_{typ}_token")).and_then(Value::as_bool) {
                set_add(&mut add, typ, b, true);
            }
            let content = match tc.get(&format!("{typ}_token")) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(o)) => match o.get("content").and_then(Value::as_str) {
                    Some(c) => c.to_string(),
                    None => continue,
                },
                _ => continue,
            };
            let id = added.iter().find(|(t, _)| *t == content).map(|(_, id)| *id);
            set_id(&mut ids, typ, id);
        }
    }
    let cfg = read_config(dir).map(|(_, v)| v).unwrap_or(Value::Null);
    for typ in types.clone() {
        let key = format!("{typ}_token_id");
        let id = cfg
            .get(&key)
            .filter(|v| !v.is_null())
            .or_else(|| cfg.pointer(&format!("/text_config/{key}")))
            .and_then(Value::as_u64);
        set_id(&mut ids, typ, id);
    }
    // the writer has no key for a CLS id (SpecialVocab skips it with a warning)
    for (typ, id) in ids {
        let key = match typ {
            "bos" => "bos_token_id",
            "eos" => "eos_token_id",
            "eot" => "eot_token_id",
            "eom" => "eom_token_id",
            "unk" => "unknown_token_id",
            "sep" => "seperator_token_id",
            "pad" => "padding_token_id",
            "mask" => "mask_token_id",
            _ => continue,
        };
        w.add(&format!("tokenizer.ggml.{key}"), GgufValue::U32(id as u32));
    }
    for (typ, b) in add {
        if ["bos", "eos", "sep"].contains(&typ) {
            w.add(
                &format!("tokenizer.ggml.add_{typ}_token"),
                GgufValue::Bool(b),
            );
        }
    }
    if let Some(b) = lower {
        w.add("tokenizer.ggml.normalizer.lowercase", GgufValue::Bool(b));
    }
    if let Some(b) = strip {
        w.add(
            "tokenizer.ggml.normalizer.strip_accents",
            GgufValue::Bool(b),
        );
    }
    Ok(())
}

/// What [`export_gguf`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GgufReport {
    /// The GGUF file written.
    pub out: PathBuf,
    /// llama.cpp's architecture name (`llama`).
    pub architecture: String,
    /// Tensors written.
    pub tensors: usize,
    /// Size of the file in bytes.
    pub bytes: u64,
    /// Tensors written as F16 because `q8_0` needs rows of a multiple of 32 values.
    pub f16_fallback: Vec<String>,
}

/// The converter class's `set_vocab` for the vocabularies VoltTrain writes (SentencePiece from
/// `tokenizer.model`, byte-level BPE from tokenizer.json): a family whose converter would read
/// another kind is an error saying so.
fn set_vocab(
    w: &mut GgufWriter,
    class: ConverterClass,
    dir: &Path,
    hp: &Hparams,
    tok: &Tokenizer,
) -> Result<()> {
    let tc_path = dir.join("tokenizer_config.json");
    let tc: Value = std::fs::read_to_string(&tc_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let refuse = |msg: &str| Error::Tokenizer {
        path: dir.to_path_buf(),
        msg: format!("GGUF export: {msg}"),
    };
    let mut vocab_size = hp.need(&["vocab_size"])?;
    let spm = dir.join("tokenizer.model").is_file();
    match class {
        ConverterClass::Llama
        | ConverterClass::Qwen
        | ConverterClass::Gemma2
        | ConverterClass::Gemma3
        | ConverterClass::Jamba
            if spm =>
        {
            if class == ConverterClass::Llama
                && let Some(b) = tc.get("add_prefix_space").and_then(Value::as_bool)
            {
                w.add("tokenizer.ggml.add_space_prefix", GgufValue::Bool(b));
            }
            set_vocab_sentencepiece(w, class, dir, hp)?;
            match class {
                ConverterClass::Gemma2 | ConverterClass::Gemma3 => {
                    w.add("tokenizer.ggml.add_space_prefix", GgufValue::Bool(false));
                }
                ConverterClass::Llama if vocab_size == 49152 => {
                    w.add("tokenizer.ggml.add_bos_token", GgufValue::Bool(false));
                }
                _ => {}
            }
            return Ok(());
        }
        ConverterClass::Gemma2 => {
            return Err(refuse(
                "llama.cpp's converter takes Gemma 2's vocabulary from the SentencePiece `tokenizer.model`, which this directory does not have",
            ));
        }
        ConverterClass::Jamba => {
            return Err(refuse(
                "without a SentencePiece `tokenizer.model`, llama.cpp's converter takes Jamba's vocabulary as a Llama-style (byte-fallback) BPE, which VoltTrain does not write",
            ));
        }
        // Phi3MiniModel.set_vocab: Phi-4's GPT2Tokenizer is a byte-level BPE, any other class
        // reads tokenizer.model
        ConverterClass::Phi3
            if tc.get("tokenizer_class").and_then(Value::as_str) != Some("GPT2Tokenizer") =>
        {
            if !spm {
                return Err(refuse(
                    "llama.cpp's converter takes a Phi-3 vocabulary from the SentencePiece `tokenizer.model` unless tokenizer_config.json's `tokenizer_class` is `GPT2Tokenizer` (Phi-4); this directory has no tokenizer.model",
                ));
            }
            return set_vocab_sentencepiece(w, class, dir, hp);
        }
        ConverterClass::Mamba => {
            let pad = hp.uint(&["pad_vocab_size_multiple"]).unwrap_or(8).max(1);
            vocab_size = vocab_size.div_ceil(pad) * pad;
        }
        _ => {}
    }
    if class == ConverterClass::Llama
        && let Some(b) = tc.get("add_prefix_space").and_then(Value::as_bool)
    {
        w.add("tokenizer.ggml.add_space_prefix", GgufValue::Bool(b));
    }
    add_vocab(w, dir, vocab_size as usize, tok)?;
    // LlamaModel.set_vocab: "granite small models" (vocabulary 49152, also SmolLM's)
    if class == ConverterClass::Llama && vocab_size == 49152 {
        w.add("tokenizer.ggml.add_bos_token", GgufValue::Bool(false));
    }
    Ok(())
}

/// `len(model.vocab) + len(added_tokens)` of tokenizer.json: Gemma 3's embedding rows kept.
fn gemma_vocab_rows(dir: &Path) -> Result<i64> {
    let path = dir.join("tokenizer.json");
    let tj = read_json(&path)?;
    let n = |p: &str| {
        let v = tj.pointer(p);
        v.and_then(Value::as_object)
            .map(|o| o.len())
            .or_else(|| v.and_then(Value::as_array).map(|a| a.len()))
            .unwrap_or(0)
    };
    Ok((n("/model/vocab") + n("/added_tokens")) as i64)
}

/// The converter class's `modify_tensors`: the tensor as llama.cpp stores it, or `None` when it
/// is left out.
///
/// `arith` is the kind the converter computes in: the checkpoint's when it is float16 (kept as
/// float16 by `prepare_tensors`), else float32.
fn modify_tensor(
    class: ConverterClass,
    hf: &str,
    t: Tensor,
    heads: (i64, i64),
    gemma_rows: i64,
    arith: Kind,
) -> Result<Tensor> {
    let ctx = |op: &str| format!("GGUF export of `{hf}`: {op}");
    let plus_one = |t: &Tensor| -> Result<Tensor> {
        t.f_to_kind(arith)
            .and_then(|x| x.f_add_scalar(1.0))
            .and_then(|x| x.f_to_kind(Kind::Float))
            .ctx(ctx("norm + 1"))
    };
    Ok(match class {
        ConverterClass::Llama => {
            if hf.ends_with("self_attn.q_proj.weight") || hf.ends_with("self_attn.q_proj.bias") {
                permute_rows(&t, heads.0)?
            } else if hf.ends_with("self_attn.k_proj.weight")
                || hf.ends_with("self_attn.k_proj.bias")
            {
                permute_rows(&t, heads.1)?
            } else {
                t
            }
        }
        ConverterClass::Gemma2 if hf.ends_with("norm.weight") => plus_one(&t)?,
        ConverterClass::Gemma3 => {
            let t = if hf.ends_with("embed_tokens.weight") && t.size()[0] > gemma_rows {
                t.f_narrow(0, 0, gemma_rows).ctx(ctx("narrow"))?
            } else {
                t
            };
            if hf.ends_with("norm.weight") {
                plus_one(&t)?
            } else {
                t
            }
        }
        ConverterClass::Mamba | ConverterClass::Jamba => {
            if hf.ends_with(".A_log") {
                t.f_to_kind(arith)
                    .and_then(|x| x.f_exp())
                    .and_then(|x| x.f_neg())
                    .and_then(|x| x.f_to_kind(Kind::Float))
                    .ctx(ctx("-exp(A_log)"))?
            } else if hf.ends_with("conv1d.weight") {
                t.f_squeeze().ctx(ctx("squeeze"))?
            } else {
                t
            }
        }
        ConverterClass::Qwen | ConverterClass::Phi3 | ConverterClass::Gemma2 => t,
    })
}

/// The GGUF file of the model in `model_dir`, with the PEFT adapter in `adapter` merged in when
/// given (the tokenizer then comes from the adapter directory when it has one).
pub fn build_gguf(
    model_dir: &Path,
    adapter: Option<&Path>,
    ty: GgufType,
) -> Result<(GgufWriter, Vec<String>)> {
    let (cfg_path, config) = read_config(model_dir)?;
    let arch_hf = config
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str)
        .unwrap_or("<missing>")
        .to_string();
    let Some(family) = GGUF_ARCHITECTURES.iter().find(|f| f.hf == arch_hf) else {
        let supported: Vec<&str> = GGUF_ARCHITECTURES.iter().map(|f| f.hf).collect();
        return Err(Error::Config {
            file: Some(cfg_path),
            key: "architectures".into(),
            msg: format!(
                "GGUF export does not support the architecture `{arch_hf}`; supported: {}",
                supported.join(", ")
            ),
        });
    };
    let hp = Hparams {
        v: &config,
        file: &cfg_path,
    };
    let mut w = GgufWriter::new(family.arch);
    w.add("general.type", GgufValue::Str("model".into()));
    add_sampling(&mut w, model_dir);
    if let Some(name) = model_dir.file_name() {
        w.add(
            "general.name",
            GgufValue::Str(name.to_string_lossy().into_owned()),
        );
    }
    let extra = architecture_parameters(&mut w, &hp, family, ty)?;
    w.add(
        "general.quantization_version",
        GgufValue::U32(QUANT_VERSION),
    );

    let tok_dir = match adapter {
        Some(a) if a.join("tokenizer.json").is_file() => a.to_path_buf(),
        _ => model_dir.to_path_buf(),
    };
    let tok = Tokenizer::from_dir(&tok_dir)?;
    set_vocab(&mut w, family.class, &tok_dir, &hp, &tok)?;

    let mut model = load_model(model_dir, &LoadOptions::new(Kind::Float, tch::Device::Cpu))?;
    if let Some(a) = adapter {
        load_peft_adapter(model.as_mut(), a)?;
        merge_adapters(model.as_mut())?;
    }
    let heads = match family.class {
        ConverterClass::Llama => {
            let n = hp.need(&["num_attention_heads"])? as i64;
            (n, hp.uint(&["num_key_value_heads"]).map_or(n, |x| x as i64))
        }
        _ => (1, 1),
    };
    let gemma_rows = match family.class {
        ConverterClass::Gemma3 => gemma_vocab_rows(&tok_dir)?,
        _ => i64::MAX,
    };
    let half = ["dtype", "torch_dtype"]
        .iter()
        .find_map(|k| config.get(*k).and_then(Value::as_str))
        == Some("float16");
    let arith = if half { Kind::Half } else { Kind::Float };
    let mut fallback = Vec::new();
    let mut params = 0u64;
    let mut token_embd: Option<Tensor> = None;
    let _g = tch::no_grad_guard();
    for (name, t) in extra.into_iter().chain(model.checkpoint_tensors()?) {
        let gname = if name.starts_with("rope_") {
            name.clone()
        } else {
            tensor_name(family.class, &name).ok_or_else(|| Error::Unsupported {
                what: "GGUF export".into(),
                msg: format!("no llama.cpp `{}` name for tensor `{name}`", family.arch),
            })?
        };
        // Gemma2Model.filter_tensors: llama.cpp does not use an lm_head
        if family.class == ConverterClass::Gemma2 && name == "lm_head.weight" {
            continue;
        }
        let t = modify_tensor(family.class, &name, t, heads, gemma_rows, arith)?;
        // MambaModel: an output head equal to the embedding is left out (llama.cpp ties it)
        if family.class == ConverterClass::Mamba {
            if gname == "token_embd.weight" {
                token_embd = Some(t.shallow_clone());
            } else if gname == "output.weight" && token_embd.as_ref().is_some_and(|e| e.equal(&t)) {
                continue;
            }
        }
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        params += shape.iter().product::<usize>() as u64;
        // prepare_tensors' type policy: 1-D tensors, norms, SSM convolutions and tensors whose
        // name does not end in `.weight` (biases, ssm_a, ssm_d) stay F32
        let keep_f32 = shape.len() <= 1
            || gname.ends_with("_norm.weight")
            || gname.contains(".ssm_conv1d.")
            || !gname.ends_with(".weight");
        let gty = if keep_f32 {
            GgmlType::F32
        } else {
            match ty {
                GgufType::F32 => GgmlType::F32,
                GgufType::F16 => GgmlType::F16,
                GgufType::Bf16 => GgmlType::Bf16,
                GgufType::Q8_0 if shape.last().is_some_and(|d| d % Q8_0_BLOCK == 0) => {
                    GgmlType::Q8_0
                }
                GgufType::Q8_0 => {
                    fallback.push(gname.clone());
                    GgmlType::F16
                }
            }
        };
        let data = encode(&t, gty)?;
        w.add_tensor(GgufTensor {
            name: gname,
            shape,
            ty: gty,
            data,
        })?;
    }
    if params > 0 {
        w.add("general.size_label", GgufValue::Str(size_label(params)));
    }
    Ok((w, fallback))
}

/// `volttrain export --format gguf`: builds the file (see [`build_gguf`]) and writes it
/// atomically to `out`.
pub fn export_gguf(
    model_dir: &Path,
    adapter: Option<&Path>,
    ty: GgufType,
    out: &Path,
) -> Result<GgufReport> {
    let (w, f16_fallback) = build_gguf(model_dir, adapter, ty)?;
    w.write(out)?;
    let bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    let architecture = match w.get("general.architecture") {
        Some(GgufValue::Str(s)) => s.clone(),
        _ => String::new(),
    };
    Ok(GgufReport {
        out: out.to_path_buf(),
        architecture,
        tensors: w.tensors().len(),
        bytes,
        f16_fallback,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_round_trips_within_half_a_step() {
        let v: Vec<f32> = (0..64).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        let q = quantize_q8_0(&v).unwrap();
        assert_eq!(q.len(), 2 * 34);
        let back = dequantize_q8_0(&q);
        for (blk, (a, b)) in v.chunks(32).zip(back.chunks(32)).enumerate() {
            let amax = a.iter().fold(0f32, |m, x| m.max(x.abs()));
            let step = amax / 127.0;
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= step * 0.51 + 1e-3,
                    "block {blk}: {x} vs {y}"
                );
            }
        }
        assert!(quantize_q8_0(&v[..33]).is_err());
    }

    #[test]
    fn header_layout() {
        let mut w = GgufWriter::new("llama");
        w.add("general.type", GgufValue::Str("model".into()));
        w.add_tensor(GgufTensor {
            name: "a".into(),
            shape: vec![2, 3],
            ty: GgmlType::F32,
            data: vec![0; 24],
        })
        .unwrap();
        let b = w.to_bytes();
        assert_eq!(&b[..4], b"GGUF");
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 3);
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 2);
        assert_eq!(b.len() % ALIGNMENT, 0);
    }
}
