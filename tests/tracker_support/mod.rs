//! What the tracker tests share: the bundled tiny job cut to a few steps, running the
//! `volttrain` command, and the points a tracker should hold, derived from `metrics.jsonl`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python of the reference stack (has `wandb`).
pub fn ref_python() -> String {
    std::env::var("VOLTTRAIN_PYTHON_REF").unwrap_or_else(|_| "python3".into())
}

/// The bundled model and a 12-example cut of the bundled data: 2 epochs of 3 steps, evals at
/// steps 0, 3 and 6. `callbacks` is the YAML of the `callbacks:` list, `training_extra` lines
/// added under `training:`.
pub fn job(dir: &Path, callbacks: &str, training_extra: &str) -> PathBuf {
    let take = |src: &str, n: usize, dst: &str| {
        let text = std::fs::read_to_string(root().join(src)).unwrap();
        let lines: Vec<&str> = text.lines().take(n).collect();
        std::fs::write(dir.join(dst), lines.join("\n") + "\n").unwrap();
    };
    take("assets/data/train.jsonl", 12, "train.jsonl");
    take("assets/data/eval.jsonl", 4, "eval.jsonl");
    let cfg = format!(
        r#"
model:
  path: {model}
  device: cpu
lora:
  rank: 8
  alpha: 16
dataset:
  path: {dir}/train.jsonl
  eval_path: {dir}/eval.jsonl
  max_seq_len: 128
  cache: false
training:
  output_dir: {dir}/out
  epochs: 2
  batch_size: 4
  lr: 0.02
  warmup_ratio: 0.1
  log_every: 1
  tensorboard: false
  seed: 7
{training_extra}
callbacks: {callbacks}
"#,
        model = root().join("assets/tiny-llama").display(),
        dir = dir.display(),
    );
    let p = dir.join("sft.yaml");
    std::fs::write(&p, cfg).unwrap();
    p
}

/// Runs `volttrain sft --config cfg` with extra environment variables.
pub fn run(cfg: &Path, env: &[(&str, &str)]) -> Output {
    run_args(cfg, &[], env)
}

/// [`run`] with extra command-line arguments (`--nproc 2`).
pub fn run_args(cfg: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_volttrain"))
        .args(["sft", "--config"])
        .arg(cfg)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// The run summary (the last stdout line), after checking the run succeeded.
pub fn summary(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "volttrain failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// Every point a tracker must hold, by step: each `metrics.jsonl` line's numbers under
/// `<kind>/<key>` (nested `lr` as `train/lr/<group>`), `step` and `kind` left out. Two lines at
/// one step (a train step and an eval) merge.
pub fn expected(out_dir: &Path) -> (BTreeMap<u64, BTreeMap<String, f64>>, usize) {
    let text = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    let mut by_step: BTreeMap<u64, BTreeMap<String, f64>> = BTreeMap::new();
    let mut lines = 0;
    for l in text.lines() {
        lines += 1;
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let kind = v["kind"].as_str().unwrap().to_string();
        let step = v["step"].as_u64().unwrap();
        let row = by_step.entry(step).or_default();
        for (k, x) in v.as_object().unwrap() {
            match (k.as_str(), x) {
                ("step" | "kind", _) => {}
                ("lr", serde_json::Value::Object(groups)) => {
                    for (g, lr) in groups {
                        row.insert(format!("{kind}/lr/{g}"), lr.as_f64().unwrap());
                    }
                }
                (_, serde_json::Value::Number(n)) => {
                    row.insert(format!("{kind}/{k}"), n.as_f64().unwrap());
                }
                (_, other) => panic!("unexpected metrics.jsonl value {k}: {other}"),
            }
        }
    }
    (by_step, lines)
}

/// An executable shell script in `dir` (a stand-in for the Python interpreter).
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}
