//! Resume under a changed config: which differences between the config saved in `last/` and the
//! new one are allowed.
//!
//! The rule: every key changes the math unless it is on [`HARMLESS_KEYS`], a short list of keys
//! that only change logging, saving, evaluation or speed (`training.log_every`, the TensorBoard
//! switch, `keep_last`, `checkpoint_every`, extra callbacks, thread count, ...). Anything else
//! (model, adapter, optimizer, schedule, batch size, epochs, seed, data, precision, ...) that
//! differs refuses the resume with every differing key named. The world size is checked by the
//! trainer against `trainer_state.json`, so listing other GPUs is allowed.

use std::collections::BTreeMap;
use std::path::Path;

use serde_yaml::Value;

use crate::error::{Error, Result};

/// File name of the resolved config inside a resume checkpoint.
pub const CHECKPOINT_CONFIG: &str = "volttrain_config.yaml";

/// Keys (and key prefixes, ending in `.`) a resumed run may change: they do not change what
/// is trained or how.
pub const HARMLESS_KEYS: &[&str] = &[
    "training.log_every",
    "training.tensorboard",
    "training.keep_last",
    "training.checkpoint_every",
    "training.eval_every",
    "training.eval_batch_size",
    "training.threads",
    "training.keep_freed_memory",
    "training.overwrite_output_dir",
    "training.output_dir",
    "training.gpu_devices",
    "training.on_nonfinite",
    "dataset.eval_path",
    "dataset.cache",
    "callbacks",
    "distributed.",
];

fn harmless(key: &str) -> bool {
    HARMLESS_KEYS.iter().any(|h| {
        if let Some(prefix) = h.strip_suffix('.') {
            key == prefix || key.starts_with(h)
        } else {
            key == *h || key.starts_with(&format!("{h}.")) || key.starts_with(&format!("{h}["))
        }
    })
}

/// Flattens a YAML document into `dotted.key[i]` -> scalar (as YAML text). A missing section
/// and an empty one flatten alike.
pub fn flatten(v: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(v, String::new(), &mut out);
    out
}

fn walk(v: &Value, key: String, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Mapping(m) => {
            for (k, child) in m {
                let name = match k {
                    Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other)
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                };
                let sub = if key.is_empty() {
                    name
                } else {
                    format!("{key}.{name}")
                };
                walk(child, sub, out);
            }
        }
        Value::Sequence(s) => {
            for (i, child) in s.iter().enumerate() {
                walk(child, format!("{key}[{i}]"), out);
            }
            if s.is_empty() {
                out.insert(key, "[]".into());
            }
        }
        Value::Tagged(t) => walk(&t.value, key, out),
        Value::Null => {}
        scalar => {
            let text = serde_yaml::to_string(scalar)
                .unwrap_or_default()
                .trim()
                .to_string();
            out.insert(key, text);
        }
    }
}

/// One key that differs: (key, saved value, new value); `None` where a side lacks the key.
pub type Difference = (String, Option<String>, Option<String>);

/// The keys whose values differ between two resolved configs, split into (math-changing,
/// harmless).
pub fn diff_configs(saved: &Value, new: &Value) -> (Vec<Difference>, Vec<Difference>) {
    let (a, b) = (flatten(saved), flatten(new));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut math = Vec::new();
    let mut ok = Vec::new();
    for k in keys {
        let (x, y) = (a.get(k), b.get(k));
        if x == y {
            continue;
        }
        let d = (k.clone(), x.cloned(), y.cloned());
        if harmless(k) {
            ok.push(d)
        } else {
            math.push(d)
        }
    }
    (math, ok)
}

/// Keys that set the run's length. Changing them on resume changes the math only through a
/// schedule that depends on the total number of steps (see [`length_free_schedule`]).
pub const LENGTH_KEYS: &[&str] = &["training.max_steps", "training.epochs"];

/// Whether the learning-rate schedule of a resolved config is the same at every step whatever
/// the run's length: a `constant` or `constant_with_warmup` scheduler (warmup in steps), or,
/// for the reference schedule (no `scheduler:` section: warmup + cosine), no decay
/// (`min_lr_ratio: 1`) and a warmup given in steps or none (`warmup_ratio` scales with the
/// total).
pub fn length_free_schedule(cfg: &Value) -> bool {
    let num = |v: Option<&Value>| v.and_then(Value::as_f64);
    match cfg.get("scheduler") {
        Some(s) if !s.is_null() => {
            let name = s.get("name").and_then(Value::as_str);
            return matches!(name, Some("constant" | "constant_with_warmup"));
        }
        _ => {}
    }
    let Some(t) = cfg.get("training") else {
        return false;
    };
    let warmup_in_steps = t.get("warmup_steps").is_some_and(|v| !v.is_null());
    num(t.get("min_lr_ratio")) == Some(1.0)
        && (warmup_in_steps || num(t.get("warmup_ratio")).unwrap_or(0.0) == 0.0)
}

fn show(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "(unset)".into())
}

/// Checks the config of a resumed run against the one saved in the checkpoint `ckpt_dir`
/// (`last/volttrain_config.yaml`). Refuses math-changing differences, naming each key with both
/// values; logs the harmless ones. A checkpoint without a saved config (written before this
/// check existed) is let through with a warning.
pub fn check_resume_config(ckpt_dir: &Path, new_yaml: &str) -> Result<()> {
    let path = ckpt_dir.join(CHECKPOINT_CONFIG);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(
                "{} has no {CHECKPOINT_CONFIG}: cannot check that the resumed config trains the same way",
                ckpt_dir.display()
            );
            return Ok(());
        }
        Err(e) => return Err(Error::io(&path, e)),
    };
    let saved: Value = serde_yaml::from_str(&text)
        .map_err(|e| Error::checkpoint(&path, format!("not valid YAML: {e}")))?;
    // Read the saved config through today's types, so that keys a newer version resolves
    // (new defaults, renamed spellings) do not count as changes; as written if it no longer
    // parses (then the raw comparison names what differs).
    let saved = crate::config::SftConfig::from_yaml_str(&text, Some(&path), &[])
        .and_then(|c| c.to_yaml())
        .ok()
        .and_then(|y| serde_yaml::from_str(&y).ok())
        .unwrap_or(saved);
    let new: Value = serde_yaml::from_str(new_yaml).map_err(|e| Error::Config {
        file: None,
        key: ".".into(),
        msg: format!("resolved config is not valid YAML: {e}"),
    })?;
    let (mut math, mut ok) = diff_configs(&saved, &new);
    // The run's length may change (train longer or shorter) when the learning-rate schedule
    // does not depend on it: the steps already taken are then the same steps.
    if math
        .iter()
        .any(|(k, _, _)| LENGTH_KEYS.contains(&k.as_str()))
        && length_free_schedule(&saved)
        && length_free_schedule(&new)
    {
        let (len, rest): (Vec<Difference>, Vec<Difference>) = math
            .into_iter()
            .partition(|(k, _, _)| LENGTH_KEYS.contains(&k.as_str()));
        ok.extend(len);
        math = rest;
    }
    for (k, a, b) in &ok {
        tracing::info!("resume: `{k}` changed from {} to {}", show(a), show(b));
    }
    if math.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = math
        .iter()
        .map(|(k, a, b)| format!("`{k}`: {} -> {}", show(a), show(b)))
        .collect();
    Err(Error::checkpoint(
        &path,
        format!(
            "cannot resume: the config changes what is trained ({}); restore these values, or \
             start a new run in another training.output_dir (only logging, saving and eval keys \
             may change on resume: {})",
            list.join("; "),
            HARMLESS_KEYS.join(", ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn y(s: &str) -> Value {
        serde_yaml::from_str(s).unwrap()
    }

    #[test]
    fn harmless_and_math_keys_are_told_apart() {
        let a = y(
            "training: {lr: 0.01, log_every: 1, batch_size: 4}\nlora: {rank: 8}\ncallbacks: []\n",
        );
        let b = y(
            "training: {lr: 0.02, log_every: 5, batch_size: 4}\nlora: {rank: 16}\ncallbacks: [{name: x}]\n",
        );
        let (math, ok) = diff_configs(&a, &b);
        let mk: Vec<&str> = math.iter().map(|d| d.0.as_str()).collect();
        assert_eq!(mk, vec!["lora.rank", "training.lr"]);
        let ok: Vec<&str> = ok.iter().map(|d| d.0.as_str()).collect();
        assert_eq!(
            ok,
            vec!["callbacks", "callbacks[0].name", "training.log_every"]
        );
    }

    #[test]
    fn refusal_names_keys_and_values() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CHECKPOINT_CONFIG),
            "training: {lr: 0.01, seed: 7}\n",
        )
        .unwrap();
        let e = check_resume_config(dir.path(), "training: {lr: 0.01, seed: 8}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`training.seed`: 7 -> 8"), "{e}");
        assert!(e.contains(CHECKPOINT_CONFIG), "{e}");
        check_resume_config(dir.path(), "training: {lr: 0.01, seed: 7, log_every: 9}\n").unwrap();
    }

    #[test]
    fn a_config_saved_by_an_older_version_is_read_with_todays_defaults() {
        // A checkpoint's config written before a key existed (here: only the required keys and
        // the old `lora.r` spelling) resumes under the same settings, and a real change is still
        // named.
        let dir = tempfile::tempdir().unwrap();
        let old =
            "model: {path: m}\ndataset: {path: d.jsonl}\ntraining: {lr: 0.01}\nlora: {r: 8}\n";
        std::fs::write(dir.path().join(CHECKPOINT_CONFIG), old).unwrap();
        let now = crate::config::SftConfig::from_yaml_str(old, None, &[]).unwrap();
        check_resume_config(dir.path(), &now.to_yaml().unwrap()).unwrap();
        let changed =
            crate::config::SftConfig::from_yaml_str(old, None, &["lora.r=4".into()]).unwrap();
        let e = check_resume_config(dir.path(), &changed.to_yaml().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`lora.rank`: 8 -> 4"), "{e}");
    }

    #[test]
    fn run_length_may_change_only_under_a_length_free_schedule() {
        let dir = tempfile::tempdir().unwrap();
        let saved = "training: {lr: 0.01, max_steps: 2, warmup_ratio: 0.0, min_lr_ratio: 1.0}\n";
        std::fs::write(dir.path().join(CHECKPOINT_CONFIG), saved).unwrap();
        // Constant rate (cosine to the same rate, no warmup): training longer is the same run.
        check_resume_config(
            dir.path(),
            "training: {lr: 0.01, max_steps: 4, warmup_ratio: 0.0, min_lr_ratio: 1.0}\n",
        )
        .unwrap();
        // A length change beside a math change: only the math change is named.
        let e = check_resume_config(
            dir.path(),
            "training: {lr: 0.02, max_steps: 4, warmup_ratio: 0.0, min_lr_ratio: 1.0}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`training.lr`"), "{e}");
        assert!(!e.contains("`training.max_steps`"), "{e}");

        // Cosine decay over the total: a new length moves every step's rate.
        let decaying = "training: {lr: 0.01, max_steps: 2, warmup_ratio: 0.0, min_lr_ratio: 0.1}\n";
        std::fs::write(dir.path().join(CHECKPOINT_CONFIG), decaying).unwrap();
        let e = check_resume_config(
            dir.path(),
            "training: {lr: 0.01, max_steps: 4, warmup_ratio: 0.0, min_lr_ratio: 0.1}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`training.max_steps`: 2 -> 4"), "{e}");
        // A warmup given as a ratio of the total scales with the length too.
        assert!(!length_free_schedule(&y(
            "training: {warmup_ratio: 0.1, min_lr_ratio: 1.0}"
        )));
        assert!(length_free_schedule(&y(
            "training: {warmup_steps: 5, warmup_ratio: 0.1, min_lr_ratio: 1.0}"
        )));
        assert!(length_free_schedule(&y(
            "scheduler: {name: constant_with_warmup, warmup_steps: 3}"
        )));
        assert!(!length_free_schedule(&y("scheduler: {name: cosine}")));
    }
}
