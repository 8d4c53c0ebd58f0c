//! Getting a trained model out: a merged Hugging Face directory ([`merge_to_dir`], `volttrain
//! merge`) and a GGUF file for llama.cpp ([`gguf`], `volttrain export --format gguf`).
//!
//! Every output is written into a temporary sibling and renamed into place when complete, so a
//! directory or file under the requested name is always whole.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tch::{Kind, Tensor};

use crate::adapter::{load_peft_adapter, merge_adapters};
use crate::data::Tokenizer;
use crate::error::{Error, Result, TchResultExt, write_atomic};
use crate::model::safetensors::save_safetensors;
use crate::model::{CausalLm, LoadOptions, load_model};
use crate::nn::LinearWeight;
use crate::quant::Quantizer;

pub mod cli;
pub mod gguf;

/// transformers' default `max_shard_size` of `save_pretrained` (5 GB, decimal).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// The weight kinds a merged model can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    /// 32-bit floats.
    F32,
    /// bfloat16.
    Bf16,
    /// 16-bit floats (IEEE half).
    F16,
}

impl SaveDtype {
    /// The tch kind.
    pub fn kind(self) -> Kind {
        match self {
            SaveDtype::F32 => Kind::Float,
            SaveDtype::Bf16 => Kind::BFloat16,
            SaveDtype::F16 => Kind::Half,
        }
    }

    /// transformers' name (`float32`, `bfloat16`, `float16`).
    pub fn torch_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::Bf16 => "bfloat16",
            SaveDtype::F16 => "float16",
        }
    }
}

impl std::str::FromStr for SaveDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fp32" | "f32" | "float32" => Ok(SaveDtype::F32),
            "bf16" | "bfloat16" => Ok(SaveDtype::Bf16),
            "fp16" | "f16" | "float16" => Ok(SaveDtype::F16),
            other => Err(Error::config(
                "dtype",
                format!("`{other}` is not one of fp32, bf16, fp16"),
            )),
        }
    }
}

/// A directory written under a temporary name next to its destination and renamed into place by
/// [`StagedDir::commit`]; dropped without commit, it is removed.
pub struct StagedDir {
    tmp: Option<tempfile::TempDir>,
    dest: PathBuf,
}

impl StagedDir {
    /// Stages `dest`, which must not exist or be an empty directory.
    pub fn new(dest: &Path) -> Result<Self> {
        if dest.exists() {
            let empty = std::fs::read_dir(dest)
                .map_err(|e| Error::io(dest, e))?
                .next()
                .is_none();
            if !empty {
                return Err(Error::invalid(format!(
                    "{}: the output directory exists and is not empty; choose another --out or remove it",
                    dest.display()
                )));
            }
        }
        let parent = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}.partial-"))
            .tempdir_in(parent)
            .map_err(|e| Error::io(parent, e))?;
        Ok(StagedDir {
            tmp: Some(tmp),
            dest: dest.to_path_buf(),
        })
    }

    /// Where to write the files meanwhile.
    pub fn path(&self) -> &Path {
        self.tmp.as_ref().map_or(self.dest.as_path(), |t| t.path())
    }

    /// Renames the staged directory to its destination.
    pub fn commit(mut self) -> Result<PathBuf> {
        let tmp = self
            .tmp
            .take()
            .ok_or_else(|| Error::Internal("staged directory committed twice".into()))?;
        if self.dest.exists() {
            // checked empty in `new`; an empty directory is replaced
            std::fs::remove_dir(&self.dest).map_err(|e| Error::io(&self.dest, e))?;
        }
        let path = tmp.keep();
        std::fs::rename(&path, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        Ok(self.dest.clone())
    }
}

/// Writes `tensors` (converted to `kind`) as transformers' `save_pretrained` does: one
/// `model.safetensors` when they fit in `max_shard_bytes`, else `model-0000i-of-0000n.safetensors`
/// shards of at most that size (a tensor larger than the limit gets a shard of its own), and in
/// both cases `model.safetensors.index.json` (`save_pretrained` leaves it out for one file;
/// here it is always there, mapping every tensor to its file, so that tools that read the index
/// find one; transformers loads either). Returns the file names written.
pub fn write_safetensors_shards(
    dir: &Path,
    tensors: &[(String, Tensor)],
    kind: Kind,
    max_shard_bytes: u64,
) -> Result<Vec<String>> {
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut size = 0u64;
    let mut total = 0u64;
    for (name, t) in tensors {
        let t = t
            .f_detach()
            .ctx("detach")?
            .f_to_kind(kind)
            .ctx(format!("`{name}` to {kind:?}"))?
            .f_to_device(tch::Device::Cpu)
            .ctx(format!("`{name}` to the CPU"))?
            .f_contiguous()
            .ctx("contiguous")?;
        let bytes = (t.numel() * kind.elt_size_in_bytes()) as u64;
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        total += bytes;
        if let Some(s) = shards.last_mut() {
            s.push((name.clone(), t));
        }
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let n = shards.len();
    let mut names = Vec::new();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        save_safetensors(&dir.join(&file), shard, Some(meta.clone()))?;
        for (t, _) in shard {
            weight_map.insert(t.clone(), file.clone());
        }
        names.push(file);
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let path = dir.join("model.safetensors.index.json");
    let text = serde_json::to_string_pretty(&index).map_err(|e| Error::Json {
        path: path.clone(),
        source: e,
    })?;
    write_atomic(&path, text.as_bytes())?;
    names.push("model.safetensors.index.json".into());
    Ok(names)
}

/// What [`merge_to_dir`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeReport {
    /// The directory written.
    pub out: PathBuf,
    /// The weights' dtype as written in `config.json` (`float32`, `bfloat16`, `float16`).
    pub dtype: &'static str,
    /// Modules whose adapter was merged.
    pub merged_modules: usize,
    /// The quantized base formats that were dequantized before merging (empty when the base was
    /// dense).
    pub dequantized: Vec<String>,
    /// The files written, relative to `out`.
    pub files: Vec<String>,
}

/// How to merge.
#[derive(Clone)]
pub struct MergeOptions {
    /// Quantizes the base while loading, as the training run did (QLoRA): the merged weights
    /// are then `dequantize(W) + delta`, as PEFT's `merge_and_unload` computes them.
    pub quantizer: Option<std::sync::Arc<dyn Quantizer>>,
    /// Kind the merged weights are written in.
    pub dtype: SaveDtype,
    /// Largest safetensors shard in bytes (default [`DEFAULT_MAX_SHARD_BYTES`]); larger models are
    /// split with an index file.
    pub max_shard_bytes: u64,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            quantizer: None,
            dtype: SaveDtype::F32,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
        }
    }
}

/// The tokenizer to ship with a model: the adapter directory's when it has one (a VoltTrain
/// adapter carries the run's tokenizer and chat template), else the base model's.
pub fn tokenizer_for(base: &Path, adapter: Option<&Path>) -> Result<Tokenizer> {
    match adapter {
        Some(a) if a.join("tokenizer.json").is_file() => Tokenizer::from_dir(a),
        _ => Tokenizer::from_dir(base),
    }
}

/// Loads the base model in `base` (fp32 on the CPU, quantized while loading when
/// `opts.quantizer` says so) with the PEFT adapter in `adapter`, merges the adapter into the
/// weights (dequantizing quantized ones first) and writes a Hugging Face directory into `out`:
/// the weights in `opts.dtype` (sharded as `save_pretrained` does), `config.json` with that
/// dtype, `generation_config.json` and the tokenizer files with the chat template.
/// `tokenizer` defaults to [`tokenizer_for`].
pub fn merge_to_dir(
    base: &Path,
    adapter: &Path,
    out: &Path,
    opts: &MergeOptions,
    tokenizer: Option<&Tokenizer>,
) -> Result<MergeReport> {
    for f in [
        crate::adapter::peft::ADAPTER_CONFIG,
        crate::adapter::peft::ADAPTER_WEIGHTS,
    ] {
        let p = adapter.join(f);
        if !p.is_file() {
            return Err(Error::checkpoint(
                &p,
                "missing: --adapter must be a PEFT adapter directory (adapter_config.json and adapter_model.safetensors)",
            ));
        }
    }
    let mut load = LoadOptions::new(Kind::Float, tch::Device::Cpu);
    if let Some(q) = &opts.quantizer {
        load = load.with_quantizer(q.clone());
    }
    let mut model = load_model(base, &load)?;
    load_peft_adapter(model.as_mut(), adapter)?;
    let mut dequantized = Vec::new();
    let mut merged_modules = 0;
    for (name, lin) in model.linears_mut() {
        if lin.adapter.is_some() {
            merged_modules += 1;
        }
        if let LinearWeight::Quantized(q) = &lin.weight {
            let fmt = q.format().to_string();
            if !dequantized.contains(&fmt) {
                dequantized.push(fmt);
            }
            let w = q.dequantize(Kind::Float).map_err(|e| Error::Shape {
                op: format!("dequantizing `{name}`"),
                msg: e.to_string(),
            })?;
            lin.weight = LinearWeight::Dense(w);
        }
    }
    merge_adapters(model.as_mut())?;
    let own_tok;
    let tok = match tokenizer {
        Some(t) => t,
        None => {
            own_tok = tokenizer_for(base, Some(adapter))?;
            &own_tok
        }
    };
    let files = write_model_dir(model.as_ref(), base, tok, out, opts)?;
    Ok(MergeReport {
        out: out.to_path_buf(),
        dtype: opts.dtype.torch_name(),
        merged_modules,
        dequantized,
        files,
    })
}

/// Writes `model` as a Hugging Face directory `out` (staged, renamed when complete): weights,
/// `config.json` (dtype set, quantization settings removed), `generation_config.json` (the
/// base's, else made from the config's special ids) and the tokenizer files.
pub fn write_model_dir(
    model: &dyn CausalLm,
    base: &Path,
    tok: &Tokenizer,
    out: &Path,
    opts: &MergeOptions,
) -> Result<Vec<String>> {
    let staged = StagedDir::new(out)?;
    let dir = staged.path();
    let tensors = model.checkpoint_tensors()?;
    let mut files =
        write_safetensors_shards(dir, &tensors, opts.dtype.kind(), opts.max_shard_bytes)?;
    let mut config = model.hf_config().clone();
    if let Some(obj) = config.as_object_mut() {
        obj.insert("dtype".into(), Value::from(opts.dtype.torch_name()));
        if obj.contains_key("torch_dtype") {
            obj.insert("torch_dtype".into(), Value::from(opts.dtype.torch_name()));
        }
        // the weights are dense now
        obj.remove("quantization_config");
    }
    let write_json = |name: &str, v: &Value| -> Result<()> {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(v).map_err(|e| Error::Json {
            path: path.clone(),
            source: e,
        })?;
        write_atomic(&path, text.as_bytes())
    };
    write_json("config.json", &config)?;
    files.push("config.json".into());
    let gen_path = base.join("generation_config.json");
    let generation = match std::fs::read_to_string(&gen_path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| Error::Json {
            path: gen_path.clone(),
            source: e,
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // transformers' `GenerationConfig.from_model_config`
            let mut g = serde_json::Map::new();
            g.insert("_from_model_config".into(), Value::Bool(true));
            for k in ["bos_token_id", "eos_token_id", "pad_token_id"] {
                if let Some(v) = config.get(k).filter(|v| !v.is_null()) {
                    g.insert(k.into(), v.clone());
                }
            }
            Value::Object(g)
        }
        Err(e) => return Err(Error::io(&gen_path, e)),
    };
    write_json("generation_config.json", &generation)?;
    files.push("generation_config.json".into());
    tok.save_to(dir)?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ] {
        if dir.join(f).is_file() {
            files.push(f.into());
        }
    }
    staged.commit()?;
    Ok(files)
}

/// `volttrain merge`: the base model, quantization and tokenizer of a training config (the
/// dataset's chat template included), merged with `adapter` into `out`.
pub fn merge_from_config(
    cfg: &crate::config::SftConfig,
    adapter: &Path,
    out: &Path,
    dtype: SaveDtype,
    max_shard_bytes: u64,
) -> Result<MergeReport> {
    let quantizer = cfg.quantizer()?;
    let tok = if adapter.join("tokenizer.json").is_file() {
        // a VoltTrain adapter carries the run's tokenizer and chat template
        Tokenizer::from_dir(adapter)?
    } else {
        let mut t = Tokenizer::from_dir(&cfg.model.path)?;
        cfg.dataset.apply_chat_template(&mut t)?;
        t
    };
    let opts = MergeOptions {
        quantizer,
        dtype,
        max_shard_bytes,
    };
    merge_to_dir(&cfg.model.path, adapter, out, &opts, Some(&tok))
}
