//! The PEFT adapter format, both ways: `adapter_config.json` and `adapter_model.safetensors`
//! with PEFT's key names (`base_model.model.<module>.lora_A.weight`; `modules_to_save` modules
//! under `base_model.model.<module>.<param>`, as peft 0.21.2 `get_peft_model_state_dict` writes
//! them, with the adapter name `default` stripped).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use serde_json::{Value, json};
use tch::Tensor;

use super::AdapterInjector;
use super::lora::{LoraConfig, LoraInjector, Targets, is_lora, name_matches};
use super::state::copy_checked;
use crate::error::{Error, Result, write_atomic};
use crate::model::CausalLm;
use crate::model::safetensors::{SafetensorsFile, save_safetensors};

/// PEFT's prefix of every saved key.
pub const PEFT_PREFIX: &str = "base_model.model.";
/// The adapter config file PEFT writes and reads.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The adapter weights file PEFT writes and reads.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// `target_modules` as PEFT reads it: the regex for a regex target, otherwise the suffixes that
/// cover exactly the adapted modules (a last name component when every linear of that name is
/// adapted, the full module name otherwise).
fn peft_target_modules(cfg: &LoraConfig, all: &[String], adapted: &[String]) -> Value {
    if let Targets::Regex(r) = &cfg.target {
        return json!(r);
    }
    let last = |n: &str| n.rsplit('.').next().unwrap_or(n).to_string();
    let adapted_set: BTreeSet<&str> = adapted.iter().map(String::as_str).collect();
    let mut out = BTreeSet::new();
    for a in adapted {
        let suffix = last(a);
        let every = all
            .iter()
            .filter(|n| last(n) == suffix)
            .all(|n| adapted_set.contains(n.as_str()));
        out.insert(if every { suffix } else { a.clone() });
    }
    json!(out.into_iter().collect::<Vec<_>>())
}

/// Writes the model's LoRA adapters (and `modules_to_save` parameters) in PEFT's format into
/// `dir` (atomically, file by file).
pub fn save_peft_adapter(
    model: &dyn CausalLm,
    cfg: &LoraConfig,
    dir: impl AsRef<Path>,
) -> Result<()> {
    let dir = dir.as_ref();
    let all: Vec<String> = model.linears().into_iter().map(|(n, _)| n).collect();
    let mut tensors = Vec::new();
    let mut adapted = Vec::new();
    for (name, lin) in model.linears().into_iter().filter(|(_, l)| is_lora(l)) {
        if lin.merged {
            return Err(Error::invalid(format!(
                "`{name}`: the adapter is merged into the base weight; unmerge before saving it"
            )));
        }
        if let Some(a) = &lin.adapter {
            for (n, t) in a.named_parameters() {
                tensors.push((format!("{PEFT_PREFIX}{name}.{n}"), t));
            }
        }
        adapted.push(name);
    }
    if adapted.is_empty() {
        return Err(Error::invalid("the model has no LoRA adapter to save"));
    }
    for (n, t) in model.named_parameters() {
        let module = n.rsplit_once('.').map(|(m, _)| m).unwrap_or(&n);
        if !n.contains(".lora_") && cfg.modules_to_save.iter().any(|m| name_matches(module, m)) {
            tensors.push((format!("{PEFT_PREFIX}{n}"), t));
        }
    }
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "target_modules": peft_target_modules(cfg, &all, &adapted),
        "modules_to_save": if cfg.modules_to_save.is_empty() { Value::Null } else { json!(cfg.modules_to_save) },
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_dora": false,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    save_safetensors(&dir.join(ADAPTER_WEIGHTS), &tensors, Some(meta))?;
    let path = dir.join(ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Json {
        path: path.clone(),
        source: e,
    })?;
    write_atomic(&path, text.as_bytes())
}

/// Reads `adapter_config.json` into a [`LoraConfig`]; options VoltTrain does not implement
/// (DoRA, LoRA biases, per-module ranks, layer selection, fan-in-fan-out) are errors.
pub fn read_peft_config(dir: impl AsRef<Path>) -> Result<LoraConfig> {
    let path = dir.as_ref().join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.clone(),
        source: e,
    })?;
    let err = |key: &str, msg: String| Error::Config {
        file: Some(path.clone()),
        key: key.to_string(),
        msg,
    };
    let get = |k: &str| v.get(k).filter(|x| !x.is_null());
    match get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => {
            return Err(err(
                "peft_type",
                format!("expected \"LORA\", found {other:?}"),
            ));
        }
    }
    let unsupported_true = ["use_dora", "fan_in_fan_out", "use_qalora", "lora_bias"];
    for k in unsupported_true {
        if get(k).and_then(Value::as_bool).unwrap_or(false) {
            return Err(err(k, "is not supported by VoltTrain".into()));
        }
    }
    if let Some(b) = get("bias").and_then(Value::as_str)
        && b != "none"
    {
        return Err(err(
            "bias",
            format!("`{b}` is not supported (only \"none\")"),
        ));
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if get(k)
            .and_then(Value::as_object)
            .is_some_and(|o| !o.is_empty())
        {
            return Err(err(k, "per-module ranks/alphas are not supported".into()));
        }
    }
    for k in [
        "layers_to_transform",
        "target_parameters",
        "trainable_token_indices",
        "layer_replication",
    ] {
        if get(k).is_some_and(|x| !(x.as_array().is_some_and(|a| a.is_empty()))) {
            return Err(err(k, "is not supported by VoltTrain".into()));
        }
    }
    let r = get("r")
        .and_then(Value::as_i64)
        .ok_or_else(|| err("r", "missing or not an integer".into()))?;
    let alpha = get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| err("lora_alpha", "missing or not a number".into()))?;
    let target = match get("target_modules") {
        Some(Value::String(s)) if s.eq_ignore_ascii_case("all-linear") => Targets::AllLinear,
        Some(Value::String(s)) => Targets::Regex(s.clone()),
        Some(Value::Array(a)) => Targets::Names(
            a.iter()
                .map(|x| x.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| err("target_modules", "expected a list of strings".into()))?,
        ),
        other => {
            return Err(err(
                "target_modules",
                format!("expected a string or a list, found {other:?}"),
            ));
        }
    };
    let modules_to_save = match get("modules_to_save") {
        None => Vec::new(),
        Some(x) => serde_json::from_value(x.clone()).map_err(|e| {
            err(
                "modules_to_save",
                format!("expected a list of strings: {e}"),
            )
        })?,
    };
    let cfg = LoraConfig {
        r,
        alpha,
        dropout: get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        use_rslora: get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
        target,
        modules_to_save,
        init_lora_weights: true,
        base_model_name_or_path: get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(String::from),
        ..LoraConfig::default()
    };
    cfg.validate()
        .map_err(|e| err("adapter_config", e.to_string()))?;
    Ok(cfg)
}

/// Injects the adapter described by `dir/adapter_config.json` into `model` and loads its weights
/// from `dir/adapter_model.safetensors`. Returns the config and the trainable parameters.
/// Every adapter parameter must be in the file, and every tensor in the file must be used.
pub fn load_peft_adapter(
    model: &mut dyn CausalLm,
    dir: impl AsRef<Path>,
) -> Result<(LoraConfig, Vec<(String, Tensor)>)> {
    let dir = dir.as_ref();
    let cfg = read_peft_config(dir)?;
    load_peft_adapter_as(model, dir, cfg)
}

/// [`load_peft_adapter`] with the adapter config given (read by [`read_peft_config`] and
/// changed where the shape is kept, e.g. another dropout for further training).
pub fn load_peft_adapter_as(
    model: &mut dyn CausalLm,
    dir: impl AsRef<Path>,
    cfg: LoraConfig,
) -> Result<(LoraConfig, Vec<(String, Tensor)>)> {
    let dir = dir.as_ref();
    let params = LoraInjector::new(cfg.clone()).inject(model)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    let file = SafetensorsFile::open(&path)?;
    let wanted: BTreeMap<&str, &Tensor> = params.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut unexpected = Vec::new();
    let mut loaded = BTreeSet::new();
    let _g = tch::no_grad_guard();
    let mut names: Vec<&str> = file.names().collect();
    names.sort();
    for key in names {
        let name = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
        // older PEFT versions kept the adapter name in the key
        let name_owned = name
            .replace(".lora_A.default.", ".lora_A.")
            .replace(".lora_B.default.", ".lora_B.");
        let Some(dst) = wanted.get(name_owned.as_str()) else {
            unexpected.push(key.to_string());
            continue;
        };
        copy_checked(&file, key, dst)?;
        loaded.insert(name_owned);
    }
    if !unexpected.is_empty() {
        return Err(Error::checkpoint(
            &path,
            format!(
                "tensors that match no adapter or modules_to_save parameter: {}",
                unexpected.join(", ")
            ),
        ));
    }
    let missing: Vec<&str> = wanted
        .keys()
        .filter(|n| n.contains(".lora_") && !loaded.contains(**n))
        .copied()
        .collect();
    if !missing.is_empty() {
        return Err(Error::checkpoint(
            &path,
            format!(
                "missing adapter tensors (with prefix `{PEFT_PREFIX}`): {}",
                missing.join(", ")
            ),
        ));
    }
    Ok((cfg, params))
}
