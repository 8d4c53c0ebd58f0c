//! The YAML configuration of a fine-tuning run (`config/sft.yaml`).
//!
//! Sections and key names follow the reference system (`model.path`, `model.train_4bit`,
//! `lora.rank`, `lora.alpha`, `lora.target_modules`, `dataset.path`, `dataset.type`,
//! `training.use_muon`, `training.lr`, `training.gradient_checkpointing`,
//! `training.gpu_devices`, ...). Unknown keys and bad values stop with the file, the key path
//! and the reason before any work starts. `--set key.path=value` overrides a value.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::adapter::LoraConfig;
use crate::data::DatasetConfig;
use crate::dist::DistConfig;
use crate::error::{Error, Result};
use crate::optim::ReferenceGrouperConfig;
use crate::quant::{QuantConfig, QuantType};
use crate::trainer::{NonFinitePolicy, Precision};

/// A named component with its options: `{ name: muon, momentum: 0.95 }`.
///
/// `name:` selects the implementation in every section (`adapter`, `quantization`, `grouper`,
/// `optimizer`, `scheduler`, `callbacks`), resolved through the registry ([`crate::plugin`]), so
/// built-ins and plugins are chosen the same way. `type:` is accepted as an old spelling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentSection {
    /// Registered name (`muon`, `cosine`, `lion`, a plugin's name).
    #[serde(alias = "type")]
    pub name: String,
    /// Everything else: the component's own options.
    #[serde(flatten)]
    pub options: serde_yaml::Mapping,
}

impl ComponentSection {
    /// A section selecting `name` with `options`.
    pub fn new(name: impl Into<String>, options: serde_yaml::Mapping) -> Self {
        ComponentSection {
            name: name.into(),
            options,
        }
    }

    /// The section of a typed config: `name` and the fields of `config` (which must serialize
    /// to a mapping; a `name` or `type` key in it is dropped).
    pub fn from_config(name: impl Into<String>, config: &impl Serialize) -> Result<Self> {
        let name = name.into();
        match serde_yaml::to_value(config) {
            Ok(serde_yaml::Value::Mapping(mut options)) => {
                options.remove("name");
                options.remove("type");
                Ok(ComponentSection { name, options })
            }
            Ok(_) => Err(Error::config(
                name,
                "the component's config must serialize to a mapping of settings",
            )),
            Err(e) => Err(Error::Internal(format!(
                "serialize the config of `{name}`: {e}"
            ))),
        }
    }

    /// The options as a YAML value (a mapping without `name`).
    pub fn options_value(&self) -> serde_yaml::Value {
        serde_yaml::Value::Mapping(self.options.clone())
    }

    /// The options deserialized into `C`, errors naming `key.<field>` (`adapter.rank`).
    pub fn options_as<C: serde::de::DeserializeOwned>(&self, key: &str) -> Result<C> {
        serde_path_to_error::deserialize(self.options_value()).map_err(|e| {
            let path = e.path().to_string();
            let key = if path == "." {
                key.to_string()
            } else {
                format!("{key}.{path}")
            };
            Error::config(key, e.into_inner().to_string())
        })
    }
}

/// `quantization:` the storage of the frozen base: a built-in format with its typed settings
/// ([`QuantConfig`]: `{name: nf4, block_size: 64, double_quant: true}`), or a quantizer a host
/// or plugin registered, with its own options (`{name: my_int4, group: 32}`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum QuantizationSection {
    /// `nf4`, `fp4`, `int8`, `fp8_e4m3`, `fp8_e5m2`.
    BuiltIn(QuantConfig),
    /// Any other registered name.
    Registered(ComponentSection),
}

impl<'de> Deserialize<'de> for QuantizationSection {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let v = serde_yaml::Value::deserialize(d)?;
        let name = v.get("name").or_else(|| v.get("type")).cloned();
        let built_in = name.is_some_and(|n| serde_yaml::from_value::<QuantType>(n).is_ok());
        if built_in {
            serde_yaml::from_value(v)
                .map(QuantizationSection::BuiltIn)
                .map_err(D::Error::custom)
        } else {
            serde_yaml::from_value(v)
                .map(QuantizationSection::Registered)
                .map_err(D::Error::custom)
        }
    }
}

impl QuantizationSection {
    /// The registered name (`nf4`, a plugin's name).
    pub fn name(&self) -> &str {
        match self {
            QuantizationSection::BuiltIn(q) => q.quant_type.name(),
            QuantizationSection::Registered(s) => &s.name,
        }
    }
}

/// `model:` where the weights come from and how they are held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face model directory (config.json, safetensors, tokenizer files). Relative
    /// paths are relative to the working directory.
    pub path: PathBuf,
    /// Store frozen base weights as NF4 with double quantization (QLoRA), as the reference did
    /// through bitsandbytes: a shorthand for `quantization: {name: nf4, double_quant: true}`.
    #[serde(default)]
    pub train_4bit: bool,
    /// Store frozen base weights as row-wise int8: a shorthand for
    /// `quantization: {name: int8}`.
    #[serde(default)]
    pub train_8bit: bool,
    /// `cpu`, `cuda` or `cuda:N`; default: CUDA when available, else CPU.
    #[serde(default)]
    pub device: Option<String>,
    /// Kind of the frozen base (`auto | fp32 | bf16 | fp16`, see `model::ModelDtype`),
    /// converted tensor by tensor while loading.
    #[serde(default)]
    pub dtype: crate::model::ModelDtype,
}

fn yes() -> bool {
    true
}

/// `training:` the loop and the reference optimizer set-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSection {
    /// Where epochs, `last/`, metrics and the resolved config go.
    #[serde(default = "default_output")]
    pub output_dir: PathBuf,
    /// Passes over the training data (default 1).
    #[serde(default = "one")]
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides `epochs`).
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Rows per micro-batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Rows per evaluation batch (default: `batch_size`).
    #[serde(default)]
    pub eval_batch_size: Option<usize>,
    /// Micro-batches per optimizer step (default 1).
    #[serde(default = "one")]
    pub gradient_accumulation: usize,
    /// Base learning rate (Muon's; AdamW embeddings 2x, LM head 0.1x). Required by the jobs that
    /// train (`volttrain sft`, `volttrain dpo`), see [`TrainingSection::required_lr`]; `volttrain eval`
    /// and `merge` do without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Muon for hidden matrices (the reference grouping); false puts everything on AdamW.
    #[serde(default = "yes")]
    pub use_muon: bool,
    /// Decoupled weight decay of AdamW and Muon, on the groups that decay (default 0).
    #[serde(default)]
    pub weight_decay: f64,
    /// Linear warmup steps (or `warmup_ratio` of the total).
    #[serde(default)]
    pub warmup_steps: Option<u64>,
    /// Warmup as a fraction of the total steps, used when `warmup_steps` is unset (default 0).
    #[serde(default)]
    pub warmup_ratio: f64,
    /// Cosine floor as a fraction of the peak lr.
    #[serde(default)]
    pub min_lr_ratio: f64,
    /// Recompute each layer's activations in the backward pass: less memory, about a third more
    /// compute (default false).
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Clip gradients to this global L2 norm (null: no clipping).
    #[serde(default = "default_clip")]
    pub grad_clip: Option<f64>,
    /// Seed of the shuffling, the adapter initialization and dropout (default 42).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Evaluate every N steps (always at each epoch end when there is eval data).
    #[serde(default)]
    pub eval_every: Option<u64>,
    /// Epoch directories to keep.
    #[serde(default = "default_keep")]
    pub keep_last: usize,
    /// Also write `last/` every N steps (it is always written at epoch ends).
    #[serde(default)]
    pub checkpoint_every: Option<u64>,
    /// One process per listed GPU (data parallel).
    #[serde(default)]
    pub gpu_devices: Vec<usize>,
    /// `auto` (default), `fp32`, `bf16` or `fp16`; see [`Precision`].
    #[serde(default)]
    pub precision: Precision,
    /// fp16's dynamic loss scaling (`torch.amp.GradScaler`'s defaults).
    #[serde(default)]
    pub loss_scaler: crate::amp::LossScalerConfig,
    /// `stop` (default) or `skip` a step whose loss or gradient norm is not finite.
    #[serde(default)]
    pub on_nonfinite: NonFinitePolicy,
    /// Plain log line every N steps when stderr is not a terminal.
    #[serde(default = "one_u64")]
    pub log_every: u64,
    /// Write TensorBoard event files under `<output_dir>/tensorboard`.
    #[serde(default = "yes")]
    pub tensorboard: bool,
    /// libtorch intra-op threads (0: libtorch's default).
    #[serde(default)]
    pub threads: usize,
    /// Keep freed memory in the process between steps (glibc `mallopt`; see
    /// `TrainerBuilder::keep_freed_memory`): about 9% faster LoRA steps on the CPU, but a higher
    /// peak RSS (measured +8-13% on an 8-layer SmolLM2-shaped step). Set `false` when memory is
    /// what matters (QLoRA). Default `true`.
    #[serde(default = "yes")]
    pub keep_freed_memory: bool,
    /// Train a new run (no `--resume`) into an `output_dir` that already holds checkpoints
    /// (`last/`, `epoch-N/`), removing the old `last/`. Default `false`: such a run is refused,
    /// as the Hugging Face Trainer's `overwrite_output_dir`.
    #[serde(default)]
    pub overwrite_output_dir: bool,
    /// The reference system's W&B keys, a shorthand for `callbacks: [{name: wandb, ...}]`
    /// (`wandb_project` -> `project`, `wandb_entity` -> `entity`, `wandb_run_name` ->
    /// `run_name`, `wandb_mode` -> `mode`, `wandb_tags` -> `tags`); on when `use_wandb`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub use_wandb: bool,
    /// `project` of the W&B shorthand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wandb_project: Option<String>,
    /// `entity` of the W&B shorthand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wandb_entity: Option<String>,
    /// `run_name` of the W&B shorthand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wandb_run_name: Option<String>,
    /// `mode` of the W&B shorthand (`online`, `offline`, `disabled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wandb_mode: Option<String>,
    /// `tags` of the W&B shorthand.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wandb_tags: Vec<String>,
}

impl TrainingSection {
    /// Warmup steps for `total` optimizer steps: `warmup_steps`, or `warmup_ratio` of the total.
    pub fn warmup_for(&self, total: u64) -> u64 {
        self.warmup_steps
            .unwrap_or_else(|| (self.warmup_ratio * total as f64).round() as u64)
    }

    /// The reference schedule over `total` optimizer steps (used without a `scheduler:`
    /// section): linear warmup ([`warmup_for`](Self::warmup_for)), then one half cosine down to
    /// `min_lr_ratio` of the peak (transformers' `get_cosine_with_min_lr_schedule_with_warmup`).
    pub fn reference_schedule(&self, total: u64) -> crate::sched::SchedulerConfig {
        crate::sched::SchedulerConfig::Cosine {
            warmup_steps: self.warmup_for(total),
            total_steps: total,
            min_lr_ratio: self.min_lr_ratio,
            num_cycles: 0.5,
        }
    }

    /// `training.lr`, or an error naming the key when the file has none.
    pub fn required_lr(&self) -> Result<f64> {
        self.lr.ok_or_else(|| {
            Error::config(
                "training.lr",
                "is required to train: set the base learning rate (e.g. `lr: 0.02`)",
            )
        })
    }
}

fn default_output() -> PathBuf {
    PathBuf::from("runs/sft")
}
fn one() -> usize {
    1
}
fn one_u64() -> u64 {
    1
}
fn default_batch() -> usize {
    8
}
fn default_clip() -> Option<f64> {
    Some(1.0)
}
fn default_seed() -> u64 {
    42
}
fn default_keep() -> usize {
    2
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    /// The model section (`model.path` is required).
    pub model: ModelSection,
    /// LoRA (reference key names: `rank`, `alpha`, `dropout`, `target_modules`, ...): a shorthand
    /// for `adapter: {name: lora, ...}`. Absent or `enabled: false` (and no `adapter`): full
    /// fine-tuning.
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    /// The adapter by registered name (`{name: lora, rank: 8}`, a plugin's adapter with its
    /// options); `lora:` is the shorthand for the built-in one. Give one of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<ComponentSection>,
    /// The dataset section.
    pub dataset: DatasetConfig,
    /// The training loop and the reference optimizer set-up.
    pub training: TrainingSection,
    /// The parameter grouper by registered name; default `{name: reference}` (the reference
    /// grouping, with `use_muon` from `training.use_muon`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grouper: Option<ComponentSection>,
    /// Overrides the optimizer of the reference grouping (`{name: lion, ...}`); its options are
    /// passed to every group's optimizer.
    #[serde(default)]
    pub optimizer: Option<ComponentSection>,
    /// Learning-rate schedule; default warmup + cosine from the `training` keys.
    #[serde(default)]
    pub scheduler: Option<ComponentSection>,
    /// Quantization of the frozen base by registered name (`{name: nf4, ...}`, see
    /// [`QuantizationSection`]); `model.train_4bit`/`train_8bit` are shorthands.
    #[serde(default)]
    pub quantization: Option<QuantizationSection>,
    /// Extra callbacks by registered name.
    #[serde(default)]
    pub callbacks: Vec<ComponentSection>,
    /// Dylib plugins to load before anything is built (relative to the config file).
    #[serde(default)]
    pub plugins: Vec<PathBuf>,
    /// Data-parallel settings (backend, rendezvous, timeout, bucket size).
    #[serde(default)]
    pub distributed: Option<DistConfig>,
    /// Preference tuning (`volttrain dpo`): loss type, beta, label smoothing, reference
    /// precomputation (see `trainer::PreferenceConfig`).
    #[serde(default)]
    pub preference: Option<crate::trainer::PreferenceConfig>,
}

fn cfg_err(file: Option<&Path>, key: impl Into<String>, msg: impl Into<String>) -> Error {
    Error::Config {
        file: file.map(Path::to_path_buf),
        key: key.into(),
        msg: msg.into(),
    }
}

/// Applies `key.path=value` overrides to a YAML document. The value is parsed as YAML
/// (`1e-3`, `true`, `[0, 1]`, `text`).
pub fn apply_overrides(doc: &mut serde_yaml::Value, sets: &[String]) -> Result<()> {
    for s in sets {
        let (key, raw) = s.split_once('=').ok_or_else(|| {
            cfg_err(
                None,
                s.clone(),
                "an override is `key.path=value` (no `=` found)",
            )
        })?;
        let value: serde_yaml::Value = serde_yaml::from_str(raw)
            .map_err(|e| cfg_err(None, key, format!("value `{raw}` is not valid YAML: {e}")))?;
        let mut node = &mut *doc;
        let parts: Vec<&str> = key.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            if part.is_empty() {
                return Err(cfg_err(None, key, "empty component in key path"));
            }
            if !node.is_mapping() {
                if node.is_null() {
                    *node = serde_yaml::Value::Mapping(Default::default());
                } else {
                    return Err(cfg_err(
                        None,
                        parts[..i].join("."),
                        "is not a mapping, cannot set a key below it",
                    ));
                }
            }
            let map = node
                .as_mapping_mut()
                .ok_or_else(|| cfg_err(None, key, "not a mapping"))?;
            let k = serde_yaml::Value::String(part.to_string());
            if i + 1 == parts.len() {
                map.insert(k, value.clone());
                break;
            }
            node = map.entry(k).or_insert(serde_yaml::Value::Null);
        }
    }
    Ok(())
}

impl SftConfig {
    /// Reads `path`, applies `overrides`, deserializes and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<SftConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_yaml_str(&text, Some(path), overrides)
    }

    /// Parses a YAML document (with the file name for messages).
    pub fn from_yaml_str(text: &str, file: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let cfg: SftConfig = if overrides.is_empty() {
            let de = serde_yaml::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let key = e.path().to_string();
                let inner = e.into_inner();
                cfg_err(file, key, inner.to_string())
            })?
        } else {
            let mut doc: serde_yaml::Value = serde_yaml::from_str(text)
                .map_err(|e| cfg_err(file, ".", format!("not valid YAML: {e}")))?;
            apply_overrides(&mut doc, overrides).map_err(|e| match e {
                Error::Config { key, msg, .. } => cfg_err(file, key, msg),
                e => e,
            })?;
            serde_path_to_error::deserialize(doc).map_err(|e| {
                let key = e.path().to_string();
                cfg_err(file, key, e.into_inner().to_string())
            })?
        };
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Value checks that serde cannot express.
    pub fn validate(&self, file: Option<&Path>) -> Result<()> {
        let t = &self.training;
        let bad = |k: &str, m: String| Err(cfg_err(file, k, m));
        if let Some(p) = &self.preference {
            p.validate().map_err(|e| match e {
                Error::Config { key, msg, .. } => cfg_err(file, key, msg),
                e => e,
            })?;
        }
        if let Some(lr) = t.lr
            && !(lr.is_finite() && lr > 0.0)
        {
            return bad(
                "training.lr",
                format!("must be a positive number, got {lr}"),
            );
        }
        if t.batch_size == 0 {
            return bad("training.batch_size", "must be >= 1".into());
        }
        if t.gradient_accumulation == 0 {
            return bad("training.gradient_accumulation", "must be >= 1".into());
        }
        if t.epochs == 0 && t.max_steps.is_none() {
            return bad(
                "training.epochs",
                "must be >= 1 (or set training.max_steps)".into(),
            );
        }
        if !(0.0..1.0).contains(&t.warmup_ratio) {
            return bad(
                "training.warmup_ratio",
                format!("must be in [0, 1), got {}", t.warmup_ratio),
            );
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return bad(
                "training.min_lr_ratio",
                format!("must be in [0, 1], got {}", t.min_lr_ratio),
            );
        }
        if t.weight_decay < 0.0 {
            return bad(
                "training.weight_decay",
                format!("must be >= 0, got {}", t.weight_decay),
            );
        }
        if let Some(c) = t.grad_clip
            && (c.is_nan() || c <= 0.0)
        {
            return bad(
                "training.grad_clip",
                format!("must be > 0 or null, got {c}"),
            );
        }
        if self.model.train_4bit && self.model.train_8bit {
            return bad(
                "model.train_8bit",
                "train_4bit and train_8bit are exclusive; choose one".into(),
            );
        }
        if (self.model.train_4bit || self.model.train_8bit) && self.quantization.is_some() {
            return bad(
                "quantization",
                "give either model.train_4bit/train_8bit or a quantization section, not both"
                    .into(),
            );
        }
        // the typed sections, with this file in the message
        let with_file = |e: Error| match e {
            Error::Config { key, msg, .. } => cfg_err(file, key, msg),
            other => other,
        };
        if let Some(l) = &self.lora
            && l.enabled
        {
            l.validate().map_err(with_file)?;
        }
        if self.adapter.is_some() && self.lora.as_ref().is_some_and(|l| l.enabled) {
            return bad(
                "adapter",
                "give either a `lora` section (the shorthand) or an `adapter` section, not both"
                    .into(),
            );
        }
        if let Some(a) = &self.adapter
            && a.name == "lora"
        {
            let l: LoraConfig = a.options_as("adapter").map_err(with_file)?;
            l.validate_as("adapter").map_err(with_file)?;
        }
        if let Some(g) = &self.grouper
            && g.name == "reference"
        {
            g.options_as::<ReferenceGrouperConfig>("grouper")
                .map_err(with_file)?;
        }
        if let Some(QuantizationSection::BuiltIn(q)) = &self.quantization {
            q.validate().map_err(with_file)?;
        }
        self.dataset.validate().map_err(with_file)?;
        if let Some(d) = &self.model.device {
            parse_device(d).map_err(|m| cfg_err(file, "model.device", m))?;
        }
        // precision, model.dtype and the loss scaler (issue #14)
        t.loss_scaler.validate().map_err(with_file)?;
        let frozen = self.has_adapter();
        self.model
            .dtype
            .resolve(t.precision, self.device()?, frozen)
            .map_err(with_file)?;
        Ok(())
    }

    /// Whether the run trains an adapter on a frozen base (`lora:` enabled, or `adapter:`).
    pub fn has_adapter(&self) -> bool {
        self.adapter.is_some() || self.lora.as_ref().is_some_and(|l| l.enabled)
    }

    /// The adapter to build through the registry: the `adapter:` section, or the `lora:`
    /// shorthand as `{name: lora, ...}`; `None` for full fine-tuning.
    pub fn adapter_section(&self) -> Result<Option<ComponentSection>> {
        match (&self.adapter, self.lora.as_ref().filter(|l| l.enabled)) {
            (Some(a), _) => Ok(Some(a.clone())),
            (None, Some(l)) => ComponentSection::from_config("lora", l).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// The LoRA config of the run when its adapter is the built-in `lora` (from either section),
    /// with `base_model_name_or_path` set to `model.path` unless given.
    pub fn lora_config(&self) -> Result<Option<LoraConfig>> {
        let mut l: LoraConfig = match (&self.adapter, &self.lora) {
            (Some(a), _) if a.name == "lora" => a.options_as("adapter")?,
            (None, Some(l)) if l.enabled => l.clone(),
            _ => return Ok(None),
        };
        if l.base_model_name_or_path.is_none() {
            l.base_model_name_or_path = Some(self.model.path.display().to_string());
        }
        Ok(Some(l))
    }

    /// The quantizer to build through the registry: the `quantization:` section, or the
    /// `model.train_4bit` / `model.train_8bit` shorthand (see [`QuantConfig::from_legacy`]);
    /// `None` for a dense base.
    pub fn quantizer_section(&self) -> Result<Option<ComponentSection>> {
        let (train_4bit, train_8bit) = (self.model.train_4bit, self.model.train_8bit);
        match &self.quantization {
            Some(QuantizationSection::Registered(s)) => {
                QuantConfig::from_legacy(train_4bit, train_8bit)?;
                if train_4bit || train_8bit {
                    return Err(Error::config(
                        "quantization",
                        "give either model.train_4bit/train_8bit or a quantization section, not \
                         both",
                    ));
                }
                Ok(Some(s.clone()))
            }
            Some(QuantizationSection::BuiltIn(q)) => {
                QuantConfig::resolve(Some(q.clone()), train_4bit, train_8bit)?
                    .map(|q| ComponentSection::from_config(q.quant_type.name(), &q))
                    .transpose()
            }
            None => QuantConfig::resolve(None, train_4bit, train_8bit)?
                .map(|q| ComponentSection::from_config(q.quant_type.name(), &q))
                .transpose(),
        }
    }

    /// The quantizer of the frozen base, built through the registry, if any.
    pub fn quantizer(&self) -> Result<Option<std::sync::Arc<dyn crate::quant::Quantizer>>> {
        self.quantizer_section()?
            .map(|s| crate::plugin::build_quantizer(&s.name, &s.options_value()))
            .transpose()
    }

    /// The parameter grouper's section: `grouper:`, or `{name: reference}`. The reference
    /// grouper gets `use_muon` from `training.use_muon` unless the section sets it, and never
    /// with an `optimizer:` other than `reference` (that optimizer steps every group).
    pub fn grouper_section(&self) -> ComponentSection {
        let mut g = self
            .grouper
            .clone()
            .unwrap_or_else(|| ComponentSection::new("reference", Default::default()));
        let custom_optimizer = self
            .optimizer
            .as_ref()
            .is_some_and(|o| o.name != "reference");
        if g.name == "reference" {
            let use_muon = g
                .options
                .get("use_muon")
                .and_then(serde_yaml::Value::as_bool)
                .unwrap_or(self.training.use_muon);
            g.options
                .insert("use_muon".into(), (use_muon && !custom_optimizer).into());
        }
        g
    }

    /// The resolved configuration as YAML (written into the output directory).
    pub fn to_yaml(&self) -> Result<String> {
        serde_yaml::to_string(self).map_err(|e| Error::Internal(format!("serialize config: {e}")))
    }

    /// The device to train on.
    pub fn device(&self) -> Result<tch::Device> {
        match &self.model.device {
            Some(d) => parse_device(d).map_err(|m| cfg_err(None, "model.device", m)),
            None => Ok(tch::Device::cuda_if_available()),
        }
    }

    /// Warmup steps for `total` optimizer steps.
    pub fn warmup_steps(&self, total: u64) -> u64 {
        self.training.warmup_for(total)
    }
}

/// `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(s: &str) -> std::result::Result<tch::Device, String> {
    match s {
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => Ok(tch::Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(tch::Device::Cuda)
            .ok_or_else(|| format!("`{s}` is not a device; use cpu, cuda or cuda:N")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "model:\n  path: m\ndataset:\n  path: d.jsonl\ntraining:\n  lr: 0.01\n";

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = SftConfig::from_yaml_str(MIN, None, &[]).unwrap();
        assert_eq!(c.training.epochs, 1);
        assert!(c.training.use_muon);
        assert_eq!(c.training.grad_clip, Some(1.0));
        assert!(c.training.keep_freed_memory);
        assert!(c.lora.is_none());
        let c = SftConfig::from_yaml_str(MIN, None, &["training.keep_freed_memory=false".into()])
            .unwrap();
        assert!(!c.training.keep_freed_memory);
    }

    #[test]
    fn unknown_key_names_its_path_and_file() {
        let text = format!("{MIN}  lrr: 3\n");
        let e = SftConfig::from_yaml_str(&text, Some(Path::new("x.yaml")), &[]).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("x.yaml") && s.contains("training") && s.contains("lrr"),
            "{s}"
        );
    }

    #[test]
    fn bad_value_names_the_key() {
        let e = SftConfig::from_yaml_str(MIN, None, &["training.lr=-1".into()]).unwrap_err();
        assert!(e.to_string().contains("`training.lr`"), "{e}");
        let e =
            SftConfig::from_yaml_str(MIN, None, &["training.batch_size=many".into()]).unwrap_err();
        assert!(e.to_string().contains("training.batch_size"), "{e}");
    }

    #[test]
    fn overrides_set_nested_values() {
        let c = SftConfig::from_yaml_str(
            MIN,
            None,
            &[
                "training.lr=2e-3".into(),
                "lora.rank=4".into(),
                "training.gpu_devices=[0, 1]".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.training.lr, Some(2e-3));
        assert_eq!(c.lora.unwrap().r, 4);
        assert_eq!(c.training.gpu_devices, vec![0, 1]);
    }

    #[test]
    fn exclusive_quantization_flags() {
        let e = SftConfig::from_yaml_str(
            MIN,
            None,
            &[
                "model.train_4bit=true".into(),
                "model.train_8bit=true".into(),
            ],
        )
        .unwrap_err();
        assert!(e.to_string().contains("model.train_8bit"), "{e}");
    }

    #[test]
    fn lr_is_required_only_to_train() {
        let no_lr = "model:\n  path: m\ndataset:\n  path: d.jsonl\ntraining:\n  epochs: 1\n";
        // `volttrain eval` / `merge` load it
        let c = SftConfig::from_yaml_str(no_lr, None, &[]).unwrap();
        assert_eq!(c.training.lr, None);
        let e = c.training.required_lr().unwrap_err();
        assert!(
            matches!(&e, Error::Config { key, .. } if key == "training.lr"),
            "{e}"
        );
        assert_eq!(
            SftConfig::from_yaml_str(MIN, None, &[])
                .unwrap()
                .training
                .required_lr()
                .unwrap(),
            0.01
        );
    }

    #[test]
    fn lora_shorthand_is_the_lora_adapter() {
        let c = SftConfig::from_yaml_str(
            MIN,
            None,
            &["lora.rank=4".into(), "lora.target_modules=[q_proj]".into()],
        )
        .unwrap();
        let a = c.adapter_section().unwrap().unwrap();
        assert_eq!(a.name, "lora");
        let l = c.lora_config().unwrap().unwrap();
        assert_eq!((l.r, l.alpha, l.dropout), (4, 32.0, 0.0));
        assert_eq!(l.base_model_name_or_path.as_deref(), Some("m"));
        // the same through `adapter:`
        let c2 = SftConfig::from_yaml_str(
            MIN,
            None,
            &["adapter={name: lora, r: 4, target: [q_proj]}".into()],
        )
        .unwrap();
        assert_eq!(c2.lora_config().unwrap(), Some(l));
        // off: full fine-tuning
        let off = SftConfig::from_yaml_str(MIN, None, &["lora.enabled=false".into()]).unwrap();
        assert!(off.adapter_section().unwrap().is_none() && !off.has_adapter());
        // both sections, bad values: errors name the key
        let e = SftConfig::from_yaml_str(
            MIN,
            None,
            &["lora.rank=4".into(), "adapter={name: lora}".into()],
        )
        .unwrap_err();
        assert!(e.to_string().contains("`adapter`"), "{e}");
        let e = SftConfig::from_yaml_str(MIN, None, &["lora.rank=0".into()]).unwrap_err();
        assert!(e.to_string().contains("`lora.rank`"), "{e}");
        let e = SftConfig::from_yaml_str(MIN, None, &["adapter={name: lora, alpha: -1}".into()])
            .unwrap_err();
        assert!(e.to_string().contains("`adapter.alpha`"), "{e}");
        let e = SftConfig::from_yaml_str(MIN, None, &["lora.rnak=4".into()]).unwrap_err();
        assert!(e.to_string().contains("rnak"), "{e}");
        // a plugin's adapter passes its options through
        let p = SftConfig::from_yaml_str(MIN, None, &["adapter={name: ia3, k: 1}".into()]).unwrap();
        let a = p.adapter_section().unwrap().unwrap();
        assert_eq!((a.name.as_str(), a.options.len()), ("ia3", 1));
        assert!(p.lora_config().unwrap().is_none() && p.has_adapter());
    }

    #[test]
    fn quantization_is_typed_and_selected_by_name() {
        let c = SftConfig::from_yaml_str(
            MIN,
            None,
            &["quantization={name: nf4, double_quant: true}".into()],
        )
        .unwrap();
        assert!(matches!(
            &c.quantization,
            Some(QuantizationSection::BuiltIn(q)) if q.quant_type == QuantType::Nf4 && q.double_quant
        ));
        let s = c.quantizer_section().unwrap().unwrap();
        assert_eq!(s.name, "nf4");
        // `type:` is the old spelling; the shorthand is the same section
        let old =
            SftConfig::from_yaml_str(MIN, None, &["quantization={type: int8}".into()]).unwrap();
        assert_eq!(old.quantization.as_ref().unwrap().name(), "int8");
        let short = SftConfig::from_yaml_str(MIN, None, &["model.train_4bit=true".into()]).unwrap();
        assert_eq!(short.quantizer_section().unwrap(), Some(s));
        // typed: bad keys and values of a built-in name their key
        let e = SftConfig::from_yaml_str(
            MIN,
            None,
            &["quantization={name: nf4, blocksize: 3}".into()],
        )
        .unwrap_err();
        assert!(e.to_string().contains("blocksize"), "{e}");
        let e = SftConfig::from_yaml_str(
            MIN,
            None,
            &["quantization={name: int8, double_quant: true}".into()],
        )
        .unwrap_err();
        assert!(e.to_string().contains("quantization.double_quant"), "{e}");
        // another name is a registered quantizer with its own options
        let p =
            SftConfig::from_yaml_str(MIN, None, &["quantization={name: my_q4, group: 32}".into()])
                .unwrap();
        let s = p.quantizer_section().unwrap().unwrap();
        assert_eq!((s.name.as_str(), s.options.len()), ("my_q4", 1));
        // round trip through the resolved YAML
        let back = SftConfig::from_yaml_str(&c.to_yaml().unwrap(), None, &[]).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn every_section_selects_by_name_with_type_as_alias() {
        let c = SftConfig::from_yaml_str(
            MIN,
            None,
            &["scheduler={type: cosine, warmup_steps: 2}".into()],
        )
        .unwrap();
        assert_eq!(c.scheduler.as_ref().unwrap().name, "cosine");
        // the reference grouper follows training.use_muon, and steps aside for a custom optimizer
        let g = c.grouper_section();
        assert_eq!(g.name, "reference");
        assert_eq!(g.options.get("use_muon"), Some(&true.into()));
        let lion = SftConfig::from_yaml_str(MIN, None, &["optimizer={name: lion}".into()]).unwrap();
        assert_eq!(
            lion.grouper_section().options.get("use_muon"),
            Some(&false.into())
        );
        let e =
            SftConfig::from_yaml_str(MIN, None, &["grouper={name: reference, head_lr: 1}".into()])
                .unwrap_err();
        assert!(e.to_string().contains("head_lr"), "{e}");
    }

    #[test]
    fn dataset_is_typed() {
        let e = SftConfig::from_yaml_str(MIN, None, &["dataset.max_seq_len=1".into()]).unwrap_err();
        assert!(e.to_string().contains("dataset.max_seq_len"), "{e}");
        let e = SftConfig::from_yaml_str(MIN, None, &["dataset.pakcing=true".into()]).unwrap_err();
        assert!(e.to_string().contains("pakcing"), "{e}");
        let c = SftConfig::from_yaml_str(MIN, None, &[]).unwrap();
        assert_eq!(c.dataset.max_seq_len, 1024);
    }
}
