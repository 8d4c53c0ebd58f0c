//! Loading Hugging Face model directories (`config.json` + `model.safetensors` or a sharded
//! `model.safetensors.index.json`) and saving them back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::CausalLm;
use super::config::DecoderConfig;
use super::llama::{DecoderLm, WeightSource, expected_tensors, linear_modules};
use super::mamba::{SsmConfig, SsmLm};
use super::safetensors::{SafetensorsFile, save_safetensors};
use crate::error::{Error, Result, write_atomic};
use crate::nn::{Linear, LinearWeight};
use crate::quant::{QuantizedTensor, Quantizer};

/// Which linear modules (by Hugging Face module name) a load-time quantizer converts.
pub type QuantizeFilter = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The default [`QuantizeFilter`]: every decoder-layer linear (`model.layers.*`, Mamba's
/// `backbone.layers.*`), never the embedding, the LM head or the norms.
pub fn default_quantize_filter(module: &str) -> bool {
    module.starts_with("model.layers.") || module.starts_with("backbone.layers.")
}

/// How to load a model.
#[derive(Clone)]
pub struct LoadOptions {
    /// Kind of the dense parameters (whatever the checkpoint stores).
    pub kind: Kind,
    /// Device the tensors are loaded onto.
    pub device: Device,
    /// Quantizes matching linear weights while loading, each tensor as soon as it is read, so
    /// that peak memory stays near the quantized size plus one full-precision tensor per
    /// loader thread ([`LoadOptions::threads`]).
    pub quantizer: Option<Arc<dyn Quantizer>>,
    /// Which linear modules the quantizer converts (default: [`default_quantize_filter`]).
    pub quantize_filter: QuantizeFilter,
    /// Tensors read (and quantized) in parallel; default `min(4, cores)` like transformers'
    /// loader. Each worker holds at most one full-precision tensor at a time.
    pub threads: usize,
}

impl std::fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions")
            .field("kind", &self.kind)
            .field("device", &self.device)
            .field("quantizer", &self.quantizer)
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

impl Default for LoadOptions {
    /// fp32 on the CPU, no quantization.
    fn default() -> Self {
        LoadOptions {
            kind: Kind::Float,
            device: Device::Cpu,
            quantizer: None,
            quantize_filter: Arc::new(default_quantize_filter),
            threads: std::thread::available_parallelism()
                .map(|n| n.get().min(4))
                .unwrap_or(1),
        }
    }
}

impl LoadOptions {
    /// `kind` on `device`, no quantization.
    pub fn new(kind: Kind, device: Device) -> Self {
        LoadOptions {
            kind,
            device,
            ..Default::default()
        }
    }

    /// Quantizes the linear modules the filter accepts with `quantizer`.
    pub fn with_quantizer(mut self, quantizer: Arc<dyn Quantizer>) -> Self {
        self.quantizer = Some(quantizer);
        self
    }

    /// Quantizes only the linear modules whose name matches the regular expression.
    pub fn with_quantize_regex(mut self, pattern: &str) -> Result<Self> {
        let re = regex::Regex::new(pattern).map_err(|e| {
            Error::config("quantize_filter", format!("invalid regex `{pattern}`: {e}"))
        })?;
        self.quantize_filter = Arc::new(move |m| re.is_match(m));
        Ok(self)
    }
}

/// The architectures [`load_model`] knows, with their configuration rules.
pub const SUPPORTED_ARCHITECTURES: [&str; 11] = [
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
    "SmolLM3ForCausalLM",
    "MambaForCausalLM",
    "FalconMambaForCausalLM",
    "JambaForCausalLM",
];

/// What to tell a user whose checkpoint holds only PyTorch pickles (`found`): VoltTrain reads
/// safetensors, and transformers converts in one line (its `save_pretrained` writes safetensors).
fn bin_only_message(dir: &Path, found: &str) -> String {
    let d = dir.display().to_string().replace('\'', "\\'");
    format!(
        "only PyTorch `.bin` weights here ({found}); VoltTrain reads safetensors (never pickles). \
         Convert once with transformers: python -c \"from transformers import AutoModelForCausalLM as M; \
         M.from_pretrained('{d}', dtype='auto').save_pretrained('{d}')\""
    )
}

/// The checkpoint's tensors: name to (file index), over one or more shard files.
struct Checkpoint {
    files: Vec<SafetensorsFile>,
    location: HashMap<String, usize>,
}

impl Checkpoint {
    fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if single.is_file() {
            vec!["model.safetensors".to_string()]
        } else if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
                path: index.clone(),
                source: e,
            })?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::checkpoint(&index, "no `weight_map` object"))?;
            let mut files = BTreeSet::new();
            for (k, f) in map {
                let f = f.as_str().ok_or_else(|| {
                    Error::checkpoint(&index, format!("weight_map[`{k}`] is not a file name"))
                })?;
                if f.contains('/') || f.contains('\\') || f == ".." {
                    return Err(Error::checkpoint(
                        &index,
                        format!("weight_map[`{k}`]: bad file name `{f}`"),
                    ));
                }
                files.insert(f.to_string());
            }
            files.into_iter().collect()
        } else if let Some(bin) = ["pytorch_model.bin", "pytorch_model.bin.index.json"]
            .iter()
            .find(|f| dir.join(f).is_file())
        {
            return Err(Error::checkpoint(dir, bin_only_message(dir, bin)));
        } else {
            return Err(Error::checkpoint(
                dir,
                "no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are supported)",
            ));
        };
        let mut files = Vec::new();
        let mut location = HashMap::new();
        for (i, name) in shard_names.iter().enumerate() {
            let f = SafetensorsFile::open(&dir.join(name))?;
            for t in f.names() {
                if let Some(prev) = location.insert(t.to_string(), i) {
                    return Err(Error::checkpoint(
                        dir,
                        format!("tensor `{t}` is in both {} and {name}", shard_names[prev]),
                    ));
                }
            }
            files.push(f);
        }
        Ok(Checkpoint { files, location })
    }

    /// Where a tensor lives, for messages.
    fn file_of(&self, name: &str) -> &Path {
        self.location
            .get(name)
            .and_then(|&i| self.files.get(i))
            .map(SafetensorsFile::path)
            .unwrap_or(Path::new("?"))
    }

    /// Checks names and shapes against what the architecture expects; one error lists every
    /// problem with the file of each tensor.
    fn validate(&self, dir: &Path, arch: &Layout) -> Result<()> {
        let expected: BTreeMap<String, Vec<i64>> = arch.expected.iter().cloned().collect();
        let mut problems = Vec::new();
        let missing: Vec<&str> = expected
            .keys()
            .filter(|k| !self.location.contains_key(*k))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            let searched: Vec<String> = self
                .files
                .iter()
                .map(|f| f.path().display().to_string())
                .collect();
            problems.push(format!(
                "missing tensors (not in {}): {}",
                searched.join(", "),
                missing.join(", ")
            ));
        }
        let mut unexpected: Vec<String> = self
            .location
            .keys()
            .filter(|k| !expected.contains_key(*k))
            // a tied head may still be stored; transformers ignores it too
            .filter(|k| !(arch.tied && k.as_str() == "lm_head.weight"))
            // old checkpoints carry the RoPE buffer
            .filter(|k| !k.ends_with("rotary_emb.inv_freq"))
            .map(|k| format!("{} (in {})", k, self.file_of(k).display()))
            .collect();
        unexpected.sort();
        if !unexpected.is_empty() {
            problems.push(format!("unexpected tensors: {}", unexpected.join(", ")));
        }
        for (name, shape) in &expected {
            if let Some(&i) = self.location.get(name)
                && let Some(found) = self.files[i].shape(name)
                && &found != shape
            {
                problems.push(format!(
                    "shape mismatch for `{name}` in {}: expected {shape:?}, found {found:?}",
                    self.files[i].path().display()
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::checkpoint(
                dir,
                format!(
                    "checkpoint does not match {}: {}",
                    arch.architecture,
                    problems.join("; ")
                ),
            ))
        }
    }
}

/// What a checkpoint of one architecture holds: its tensors with shapes, its linear modules.
struct Layout {
    architecture: String,
    expected: Vec<(String, Vec<i64>)>,
    linears: Vec<String>,
    /// The LM head is tied (a stored `lm_head.weight` is ignored).
    tied: bool,
}

impl Layout {
    fn decoder(cfg: &DecoderConfig) -> Self {
        Layout {
            architecture: cfg.architecture.clone(),
            expected: expected_tensors(cfg),
            linears: linear_modules(cfg),
            tied: cfg.tie_word_embeddings,
        }
    }

    fn ssm(cfg: &SsmConfig) -> Self {
        Layout {
            architecture: cfg.architecture.clone(),
            expected: super::mamba::expected_tensors(cfg),
            linears: super::mamba::linear_modules(cfg),
            tied: cfg.tie_word_embeddings,
        }
    }
}

/// A tensor read from the checkpoint: dense in the target kind, or already quantized.
enum Loaded {
    Dense(Tensor),
    Quantized(Box<dyn QuantizedTensor>),
}

/// Reads every expected tensor with `opts.threads` workers (as transformers' loader does with its
/// thread pool), quantizing the selected linear weights inside the workers. Peak memory is the
/// kept result plus one full-precision tensor per worker.
fn read_all(
    ckpt: &Checkpoint,
    arch: &Layout,
    opts: &LoadOptions,
) -> Result<HashMap<String, Loaded>> {
    let linears: BTreeSet<&str> = arch.linears.iter().map(String::as_str).collect();
    let jobs: Vec<(String, bool)> = arch
        .expected
        .iter()
        .map(|(name, _)| {
            let name = name.clone();
            let quantize = opts.quantizer.is_some()
                && name
                    .strip_suffix(".weight")
                    .is_some_and(|m| linears.contains(m) && (opts.quantize_filter)(m));
            (name, quantize)
        })
        .collect();
    let next = AtomicUsize::new(0);
    let out = Mutex::new(HashMap::with_capacity(jobs.len()));
    let one = |name: &str, quantize: bool| -> Result<Loaded> {
        let i = *ckpt.location.get(name).ok_or_else(|| {
            Error::Internal(format!(
                "checkpoint loader: tensor `{name}` missing after validation"
            ))
        })?;
        let t = ckpt.files[i].tensor(name, Some(opts.kind), opts.device)?;
        match (&opts.quantizer, quantize) {
            (Some(q), true) => {
                let qt = q.quantize(&t).map_err(|e| {
                    Error::checkpoint(
                        ckpt.files[i].path(),
                        format!("quantizing `{name}` with {}: {e}", q.name()),
                    )
                })?;
                Ok(Loaded::Quantized(qt))
            }
            _ => Ok(Loaded::Dense(t)),
        }
    };
    let worker = || -> Result<()> {
        loop {
            let k = next.fetch_add(1, Ordering::Relaxed);
            let Some((name, quantize)) = jobs.get(k) else {
                return Ok(());
            };
            let loaded = one(name, *quantize)?;
            if *quantize {
                // the full-precision tensor and the quantizer's temporaries were just freed
                crate::malloc::release_freed_memory();
            }
            out.lock()
                .map_err(|_| Error::Internal("checkpoint loader: a worker panicked".into()))?
                .insert(name.clone(), loaded);
        }
    };
    let threads = opts.threads.clamp(1, jobs.len().max(1));
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(worker)).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::Internal(
                        "checkpoint loader: a worker panicked".into(),
                    ))
                })
            })
            .collect()
    });
    for r in results {
        r?;
    }
    out.into_inner()
        .map_err(|_| Error::Internal("checkpoint loader: a worker panicked".into()))
}

struct Source {
    loaded: HashMap<String, Loaded>,
}

impl Source {
    fn take(&mut self, name: &str) -> Result<Loaded> {
        self.loaded.remove(name).ok_or_else(|| {
            Error::Internal(format!(
                "checkpoint loader: tensor `{name}` was not read from the checkpoint"
            ))
        })
    }
}

impl WeightSource for Source {
    fn tensor(&mut self, name: &str) -> Result<Tensor> {
        match self.take(name)? {
            Loaded::Dense(t) => Ok(t),
            Loaded::Quantized(_) => Err(Error::Internal(format!(
                "checkpoint loader: tensor `{name}` was quantized but is needed dense"
            ))),
        }
    }

    fn linear(&mut self, module: &str, bias: bool) -> Result<Linear> {
        let bias = if bias {
            Some(self.tensor(&format!("{module}.bias"))?)
        } else {
            None
        };
        let weight = match self.take(&format!("{module}.weight"))? {
            Loaded::Dense(t) => LinearWeight::Dense(t),
            Loaded::Quantized(q) => LinearWeight::Quantized(q),
        };
        Ok(Linear {
            weight,
            bias,
            adapter: None,
            merged: false,
        })
    }
}

/// Reads `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<(PathBuf, Value)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.clone(),
        source: e,
    })?;
    Ok((path, v))
}

/// The architecture's parsed configuration, dispatching on `architectures[0]`.
pub fn decoder_config(path: &Path, v: &Value) -> Result<DecoderConfig> {
    let arch = v
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str)
        .ok_or_else(|| Error::Config {
            file: Some(path.to_path_buf()),
            key: "architectures".into(),
            msg: format!("missing; supported: {}", SUPPORTED_ARCHITECTURES.join(", ")),
        })?;
    match arch {
        "LlamaForCausalLM" => super::llama::config(path, v),
        "MistralForCausalLM" => super::mistral::config(path, v),
        "Qwen2ForCausalLM" => super::qwen2::config(path, v),
        "Qwen3ForCausalLM" => super::qwen3::config(path, v),
        "Gemma2ForCausalLM" => super::gemma::config2(path, v),
        "Gemma3ForCausalLM" => super::gemma::config3(path, v),
        "Phi3ForCausalLM" => super::phi3::config(path, v),
        "SmolLM3ForCausalLM" => super::smollm3::config(path, v),
        ssm if super::mamba::is_ssm_architecture(ssm) => Err(Error::Config {
            file: Some(path.to_path_buf()),
            key: "architectures".into(),
            msg: format!(
                "`{ssm}` is a state-space model, not a transformer decoder; load it with \
                 `load_model` or `load_ssm` (its configuration is `mamba::ssm_config`)"
            ),
        }),
        other => Err(Error::Config {
            file: Some(path.to_path_buf()),
            key: "architectures".into(),
            msg: format!(
                "unsupported architecture `{other}`; supported: {}",
                SUPPORTED_ARCHITECTURES.join(", ")
            ),
        }),
    }
}

/// Loads a Hugging Face model directory into `opts.kind` on `opts.device`.
///
/// Parameters keep their Hugging Face names and are trainable (`requires_grad`) until
/// [`CausalLm::freeze_base`].
pub fn load_model(dir: impl AsRef<Path>, opts: &LoadOptions) -> Result<Box<dyn CausalLm>> {
    let dir = dir.as_ref();
    let (path, v) = read_config(dir)?;
    let arch = v
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str)
        .unwrap_or_default();
    if super::mamba::is_ssm_architecture(arch) {
        let arch = arch.to_string();
        return Ok(Box::new(load_ssm_with(dir, path, v, &arch, opts)?));
    }
    Ok(Box::new(load_decoder(dir, opts)?))
}

/// [`load_model`] with the concrete type.
pub fn load_decoder(dir: &Path, opts: &LoadOptions) -> Result<DecoderLm> {
    let (path, v) = read_config(dir)?;
    let cfg = decoder_config(&path, &v)?;
    let layout = Layout::decoder(&cfg);
    let ckpt = Checkpoint::open(dir)?;
    ckpt.validate(dir, &layout)?;
    let mut src = Source {
        loaded: read_all(&ckpt, &layout, opts)?,
    };
    DecoderLm::build(cfg, v, &mut src, opts.kind, opts.device)
}

/// Loads a Mamba, Falcon-Mamba or Jamba directory ([`SsmLm`]).
pub fn load_ssm(dir: &Path, opts: &LoadOptions) -> Result<SsmLm> {
    let (path, v) = read_config(dir)?;
    let arch = v
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if !super::mamba::is_ssm_architecture(&arch) {
        return Err(Error::Config {
            file: Some(path),
            key: "architectures".into(),
            msg: format!(
                "`{arch}` is not a state-space architecture ({})",
                super::mamba::SSM_ARCHITECTURES.join(", ")
            ),
        });
    }
    load_ssm_with(dir, path, v, &arch, opts)
}

fn load_ssm_with(
    dir: &Path,
    path: PathBuf,
    v: Value,
    arch: &str,
    opts: &LoadOptions,
) -> Result<SsmLm> {
    let cfg = super::mamba::ssm_config(&path, &v, arch)?;
    let layout = Layout::ssm(&cfg);
    let ckpt = Checkpoint::open(dir)?;
    ckpt.validate(dir, &layout)?;
    let mut src = Source {
        loaded: read_all(&ckpt, &layout, opts)?,
    };
    SsmLm::build(cfg, v, &mut src, opts.kind, opts.device)
}

/// The name transformers uses for a floating-point kind (`float32`, `bfloat16`, ...).
fn torch_dtype_name(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Float => "float32",
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        Kind::Double => "float64",
        _ => return None,
    })
}

/// Writes `config.json` and `model.safetensors` (both atomically) with Hugging Face names, so
/// transformers' `from_pretrained` and [`load_model`] read the directory. Quantized weights are
/// written dequantized; adapters are not written (see the PEFT adapter format for those).
pub fn save_model(model: &dyn CausalLm, dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors = model.checkpoint_tensors()?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    save_safetensors(&dir.join("model.safetensors"), &tensors, Some(meta))?;
    let cfg_path = dir.join("config.json");
    // the weights are written in the model's kind; say so, or transformers' `dtype="auto"`
    // would cast them back to what the source checkpoint held
    let mut config = model.hf_config().clone();
    if let (Some(obj), Some(name)) = (config.as_object_mut(), torch_dtype_name(model.kind())) {
        obj.insert("dtype".to_string(), Value::from(name));
        if obj.contains_key("torch_dtype") {
            obj.insert("torch_dtype".to_string(), Value::from(name));
        }
    }
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Json {
        path: cfg_path.clone(),
        source: e,
    })?;
    write_atomic(&cfg_path, text.as_bytes())
}
