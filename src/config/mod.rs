//! The YAML configuration of a fine-tuning run (`config/sft.yaml`).
//!
//! Sections and key names follow the reference system (`model.path`, `model.train_4bit`,
//! `lora.rank`, `lora.alpha`, `lora.target_modules`, `dataset.path`, `dataset.type`,
//! `training.use_muon`, `training.lr`, `training.gradient_checkpointing`,
//! `training.gpu_devices`, ...). Unknown keys and bad values stop with the file, the key path
//! and the reason before any work starts. `--set key.path=value` overrides a value.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::adapter::Targets;
use crate::dist::DistConfig;
use crate::error::{Error, Result};
use crate::trainer::{NonFinitePolicy, Precision};

/// A named component with its options: `{ name: muon, momentum: 0.95 }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentSection {
    /// Registered name (`muon`, `cosine`, `lion`, a plugin's name).
    pub name: String,
    /// Everything else: the component's own options.
    #[serde(flatten)]
    pub options: serde_yaml::Mapping,
}

impl ComponentSection {
    /// The options as a YAML value (a mapping without `name`).
    pub fn options_value(&self) -> serde_yaml::Value {
        serde_yaml::Value::Mapping(self.options.clone())
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
    /// through bitsandbytes.
    #[serde(default)]
    pub train_4bit: bool,
    /// Store frozen base weights as row-wise int8.
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

/// `lora:` adapter settings (reference key names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    /// Set false to train all weights without an adapter.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// LoRA rank r.
    #[serde(default = "default_rank")]
    pub rank: i64,
    /// LoRA alpha; scaling is alpha / r (alpha / sqrt(r) with `use_rslora`).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    /// A preset (`llama`, `mlp_only`, `mamba_only`, `mlp_mamba`, `attn_mlp_ssm`), `all-linear`,
    /// a list of module names or suffixes, `{names: [...]}` or `{regex: ...}`.
    #[serde(default = "default_targets")]
    pub target_modules: Targets,
    #[serde(default)]
    pub use_rslora: bool,
    /// Modules trained in full and saved beside the adapter (PEFT `modules_to_save`).
    #[serde(default)]
    pub modules_to_save: Vec<String>,
    /// Start from the weights of this PEFT adapter directory (saved by VoltTrain or PEFT) with a
    /// fresh optimizer, schedule and step count, unlike `--resume`. Its `adapter_config.json`
    /// gives the adapter's shape (rank, alpha, targets, `modules_to_save`); `dropout` is this
    /// section's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<std::path::PathBuf>,
}

fn yes() -> bool {
    true
}
fn default_rank() -> i64 {
    16
}
fn default_alpha() -> f64 {
    32.0
}
fn default_targets() -> Targets {
    Targets::Preset("llama".into())
}

/// `training:` the loop and the reference optimizer set-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSection {
    /// Where epochs, `last/`, metrics and the resolved config go.
    #[serde(default = "default_output")]
    pub output_dir: PathBuf,
    #[serde(default = "one")]
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides `epochs`).
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Rows per micro-batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default)]
    pub eval_batch_size: Option<usize>,
    #[serde(default = "one")]
    pub gradient_accumulation: usize,
    /// Base learning rate (Muon's; AdamW embeddings 2x, LM head 0.1x).
    pub lr: f64,
    /// Muon for hidden matrices (the reference grouping); false puts everything on AdamW.
    #[serde(default = "yes")]
    pub use_muon: bool,
    #[serde(default)]
    pub weight_decay: f64,
    /// Linear warmup steps (or `warmup_ratio` of the total).
    #[serde(default)]
    pub warmup_steps: Option<u64>,
    #[serde(default)]
    pub warmup_ratio: f64,
    /// Cosine floor as a fraction of the peak lr.
    #[serde(default)]
    pub min_lr_ratio: f64,
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Clip gradients to this global L2 norm (null: no clipping).
    #[serde(default = "default_clip")]
    pub grad_clip: Option<f64>,
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
    #[serde(default)]
    pub precision: Precision,
    /// fp16's dynamic loss scaling (`torch.amp.GradScaler`'s defaults).
    #[serde(default)]
    pub loss_scaler: crate::amp::LossScalerConfig,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wandb_project: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wandb_entity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wandb_run_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wandb_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wandb_tags: Vec<String>,
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
    pub model: ModelSection,
    /// Absent or `enabled: false`: full fine-tuning.
    #[serde(default)]
    pub lora: Option<LoraSection>,
    /// The dataset section (see `data::DatasetConfig`).
    pub dataset: serde_yaml::Value,
    pub training: TrainingSection,
    /// Overrides the optimizer of the reference grouping (`{name: lion, ...}`); its options are
    /// passed to every group's optimizer.
    #[serde(default)]
    pub optimizer: Option<ComponentSection>,
    /// Learning-rate schedule; default warmup + cosine from the `training` keys.
    #[serde(default)]
    pub scheduler: Option<ComponentSection>,
    /// Quantization of the frozen base (see `quant`); `model.train_4bit`/`train_8bit` are
    /// shorthands.
    #[serde(default)]
    pub quantization: Option<serde_yaml::Value>,
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
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return bad(
                "training.lr",
                format!("must be a positive number, got {}", t.lr),
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
        if let Some(l) = &self.lora
            && l.enabled
        {
            if l.rank <= 0 {
                return bad("lora.rank", format!("must be >= 1, got {}", l.rank));
            }
            if l.alpha.is_nan() || l.alpha <= 0.0 {
                return bad("lora.alpha", format!("must be > 0, got {}", l.alpha));
            }
            if !(0.0..1.0).contains(&l.dropout) {
                return bad(
                    "lora.dropout",
                    format!("must be in [0, 1), got {}", l.dropout),
                );
            }
        }
        if let Some(d) = &self.model.device {
            parse_device(d).map_err(|m| cfg_err(file, "model.device", m))?;
        }
        // precision, model.dtype and the loss scaler (issue #14), with this file in the message
        let with_file = |e: Error| match e {
            Error::Config { key, msg, .. } => cfg_err(file, key, msg),
            other => other,
        };
        t.loss_scaler.validate().map_err(with_file)?;
        let frozen = self.lora.as_ref().is_some_and(|l| l.enabled);
        self.model
            .dtype
            .resolve(t.precision, self.device()?, frozen)
            .map_err(with_file)?;
        Ok(())
    }

    /// The resolved configuration as YAML (written into the output directory).
    pub fn to_yaml(&self) -> Result<String> {
        serde_yaml::to_string(self).map_err(|e| Error::invalid(format!("serialize config: {e}")))
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
        self.training
            .warmup_steps
            .unwrap_or_else(|| (self.training.warmup_ratio * total as f64).round() as u64)
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
        assert_eq!(c.training.lr, 2e-3);
        assert_eq!(c.lora.unwrap().rank, 4);
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
}
