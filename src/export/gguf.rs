//! GGUF v3 files for llama.cpp and Ollama (<https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>).
//!
//! The metadata keys, tensor names, q/k row permutation, tensor type policy and tokenizer
//! fields follow what llama.cpp's `convert_hf_to_gguf.py` writes for the `llama` architecture
//! (`LlamaModel`, read at commit 0024aa74 of ggml-org/llama.cpp) with the `gguf` Python
//! package's `SpecialVocab` (gguf 0.19.0): Hugging Face `LlamaForCausalLM` and
//! `MistralForCausalLM` checkpoints with a byte-level BPE tokenizer. Other architectures are an
//! error naming them.
//!
//! Tensor types: 1-D tensors and norms are always F32; the others are F32, F16, BF16 or Q8_0
//! (blocks of 32: an f16 scale `amax / 127` and 32 int8 `round(x / scale)`, ggml's
//! `quantize_row_q8_0_ref`; a row length that is not a multiple of 32 falls back to F16 as the
//! converter does).

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

/// Architectures [`export_gguf`] converts, and the GGUF architecture each becomes.
pub const GGUF_ARCHITECTURES: [(&str, &str); 2] = [
    ("LlamaForCausalLM", "llama"),
    ("MistralForCausalLM", "llama"),
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
}

impl GgufValue {
    fn type_id(&self) -> u32 {
        match self {
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::Str(_) => 8,
            GgufValue::StrArray(_) | GgufValue::I32Array(_) => 9,
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

/// The GGUF name of a Hugging Face tensor of the llama architecture (`gguf.TensorNameMap`).
fn llama_tensor_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let m = match module {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.bias" => "attn_output.bias",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "mlp.gate_proj.bias" => "ffn_gate.bias",
        "mlp.up_proj.bias" => "ffn_up.bias",
        "mlp.down_proj.bias" => "ffn_down.bias",
        _ => return None,
    };
    Some(format!("blk.{layer}.{m}"))
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
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let tj: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.clone(),
        source: e,
    })?;
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
    // special ids: tokenizer_config.json's tokens (by added-token content), then config.json's
    // `<type>_token_id`, in SpecialVocab's order
    let tc_path = dir.join("tokenizer_config.json");
    let tc: Value = match std::fs::read_to_string(&tc_path) {
        Ok(t) => serde_json::from_str(&t).map_err(|e| Error::Json {
            path: tc_path.clone(),
            source: e,
        })?,
        Err(_) => Value::Null,
    };
    let added_json: Vec<(String, u64)> = tj
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
    let cfg = read_config(dir).map(|(_, v)| v).unwrap_or(Value::Null);
    let key_of = |typ: &str| -> &'static str {
        match typ {
            "bos" => "tokenizer.ggml.bos_token_id",
            "eos" => "tokenizer.ggml.eos_token_id",
            "unk" => "tokenizer.ggml.unknown_token_id",
            "sep" => "tokenizer.ggml.seperator_token_id",
            "pad" => "tokenizer.ggml.padding_token_id",
            "cls" => "tokenizer.ggml.cls_token_id",
            _ => "tokenizer.ggml.mask_token_id",
        }
    };
    let types_order = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];
    let mut add_bos_eos: Vec<(&str, bool)> = Vec::new();
    let mut ids: Vec<(&str, u64)> = Vec::new();
    for typ in types_order {
        if let Some(b) = tc.get(format!("add_{typ}_token")).and_then(Value::as_bool) {
            add_bos_eos.push((typ, b));
        }
        let content = match tc.get(format!("{typ}_token")) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(String::from),
            _ => None,
        };
        if let Some(c) = content
            && let Some((_, id)) = added_json.iter().find(|(t, _)| *t == c)
        {
            ids.push((typ, *id));
        }
    }
    for typ in types_order {
        if ids.iter().any(|(t, _)| *t == typ) {
            continue;
        }
        if let Some(id) = cfg.get(format!("{typ}_token_id")).and_then(Value::as_u64) {
            ids.push((typ, id));
        }
    }
    for (typ, id) in ids {
        w.add(key_of(typ), GgufValue::U32(id as u32));
    }
    for (typ, b) in add_bos_eos {
        w.add(
            &format!("tokenizer.ggml.add_{typ}_token"),
            GgufValue::Bool(b),
        );
    }
    // the chat template: tokenizer_config.json's, else chat_template.jinja
    let template = match tc.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
    };
    if let Some(t) = template {
        w.add("tokenizer.chat_template", GgufValue::Str(t));
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

/// The GGUF file of the model in `model_dir`, with the PEFT adapter in `adapter` merged in when
/// given (the tokenizer then comes from the adapter directory when it has one).
pub fn build_gguf(
    model_dir: &Path,
    adapter: Option<&Path>,
    ty: GgufType,
) -> Result<(GgufWriter, Vec<String>)> {
    let (cfg_path, hp) = read_config(model_dir)?;
    let arch_hf = hp
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str)
        .unwrap_or("<missing>")
        .to_string();
    let supported: Vec<&str> = GGUF_ARCHITECTURES.iter().map(|(a, _)| *a).collect();
    let Some((_, arch)) = GGUF_ARCHITECTURES.iter().find(|(a, _)| *a == arch_hf) else {
        return Err(Error::Config {
            file: Some(cfg_path),
            key: "architectures".into(),
            msg: format!(
                "GGUF export does not support the architecture `{arch_hf}`; supported: {}",
                supported.join(", ")
            ),
        });
    };
    let rope = hp
        .get("rope_parameters")
        .or_else(|| hp.get("rope_scaling"))
        .filter(|v| !v.is_null());
    let rope_type = rope
        .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    if !["default", "linear"].contains(&rope_type) {
        return Err(Error::Config {
            file: Some(cfg_path),
            key: "rope_parameters.rope_type".into(),
            msg: format!("GGUF export supports the default and linear RoPE, not `{rope_type}`"),
        });
    }
    let mut model = load_model(model_dir, &LoadOptions::new(Kind::Float, tch::Device::Cpu))?;
    if let Some(a) = adapter {
        load_peft_adapter(model.as_mut(), a)?;
        merge_adapters(model.as_mut())?;
    }
    let get_u = |k: &str| hp.get(k).and_then(Value::as_u64);
    let need = |k: &str| {
        get_u(k).ok_or_else(|| Error::Config {
            file: Some(model_dir.join("config.json")),
            key: k.into(),
            msg: "missing or not an integer".into(),
        })
    };
    let n_head = need("num_attention_heads")? as i64;
    let n_kv = get_u("num_key_value_heads").map_or(n_head, |x| x as i64);
    let hidden = need("hidden_size")?;
    let vocab = need("vocab_size")? as usize;

    let mut w = GgufWriter::new(arch);
    w.add("general.type", GgufValue::Str("model".into()));
    if let Some(name) = model_dir.file_name() {
        w.add(
            "general.name",
            GgufValue::Str(name.to_string_lossy().into_owned()),
        );
    }
    // TextModel.set_gguf_parameters, then LlamaModel's
    let p = |k: &str| format!("{arch}.{k}");
    w.add(
        &p("block_count"),
        GgufValue::U32(need("num_hidden_layers")? as u32),
    );
    if let Some(n) = get_u("max_position_embeddings") {
        w.add(&p("context_length"), GgufValue::U32(n as u32));
    }
    w.add(&p("embedding_length"), GgufValue::U32(hidden as u32));
    if let Some(n) = get_u("intermediate_size") {
        w.add(&p("feed_forward_length"), GgufValue::U32(n as u32));
    }
    w.add(&p("attention.head_count"), GgufValue::U32(n_head as u32));
    w.add(&p("attention.head_count_kv"), GgufValue::U32(n_kv as u32));
    let theta = rope
        .and_then(|r| r.get("rope_theta"))
        .or_else(|| hp.get("rope_theta"))
        .and_then(Value::as_f64);
    if let Some(t) = theta {
        w.add(&p("rope.freq_base"), GgufValue::F32(t as f32));
    }
    if let Some(e) = hp.get("rms_norm_eps").and_then(Value::as_f64) {
        w.add(
            &p("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(e as f32),
        );
    }
    let head_dim = hp.get("head_dim").and_then(Value::as_u64);
    if let Some(hd) = head_dim {
        w.add(&p("attention.key_length"), GgufValue::U32(hd as u32));
        w.add(&p("attention.value_length"), GgufValue::U32(hd as u32));
    }
    w.add("general.file_type", GgufValue::U32(ty.file_type()));
    w.add(&p("vocab_size"), GgufValue::U32(vocab as u32));
    let rope_dim = head_dim.unwrap_or(hidden / n_head as u64);
    w.add(&p("rope.dimension_count"), GgufValue::U32(rope_dim as u32));
    if rope_type == "linear" {
        let factor = rope
            .and_then(|r| r.get("factor"))
            .and_then(Value::as_f64)
            .unwrap_or(1.0);
        w.add(&p("rope.scaling.type"), GgufValue::Str("linear".into()));
        w.add(&p("rope.scaling.factor"), GgufValue::F32(factor as f32));
    }

    let tok_dir = match adapter {
        Some(a) if a.join("tokenizer.json").is_file() => a.to_path_buf(),
        _ => model_dir.to_path_buf(),
    };
    let tok = Tokenizer::from_dir(&tok_dir)?;
    add_vocab(&mut w, &tok_dir, vocab, &tok)?;

    let mut fallback = Vec::new();
    let _g = tch::no_grad_guard();
    for (name, t) in model.checkpoint_tensors()? {
        let gname = llama_tensor_name(&name).ok_or_else(|| Error::Unsupported {
            what: "GGUF export".into(),
            msg: format!("no llama.cpp name for tensor `{name}`"),
        })?;
        let t = if name.ends_with("self_attn.q_proj.weight") {
            permute_rows(&t, n_head)?
        } else if name.ends_with("self_attn.k_proj.weight") {
            permute_rows(&t, n_kv)?
        } else {
            t
        };
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let gty = if shape.len() <= 1 || gname.ends_with("_norm.weight") {
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
    w.add(
        "general.quantization_version",
        GgufValue::U32(QUANT_VERSION),
    );
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
