//! Each plugin of `plugins/`, built, loaded from the `plugins:` list of a YAML run on the bundled
//! tiny Llama and chat data, and checked by its effect on that run:
//!
//! - `lion` (optimizer), through the `volttrain` binary as a user runs it: after 3 steps at a
//!   constant lr without weight decay every LoRA `B` entry (zeros at start) is an odd multiple of
//!   the lr, `±lr` or `±3·lr`, because each Lion update is `lr·sign(c)`. The same run with the
//!   default optimizer (Muon + AdamW) is not on that lattice, so the check tells them apart.
//! - `loss_spike` (callback), through `run_sft` in process: a run without it gives the gradient
//!   norm of each step; with `max_grad_norm` set between two of them the monitor stops the run at
//!   the first step above it, fewer than `max_steps`, and `loss_spike.json` describes that step.
//! - `inverse_sqrt` (scheduler), through the binary: the lr of every step in `metrics.jsonl`
//!   equals transformers' `get_inverse_sqrt_schedule` run live for the same steps.

mod plugin_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use volttrain::config::SftConfig;
use volttrain::sft::{RunOptions, run_sft};

/// The repository root (for the bundled assets).
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A small, fast job on the bundled assets: LoRA r=8, batch 4, no eval set, output in `dir/out`.
/// `extra` is appended at top level (plugins, optimizer, scheduler, callbacks).
fn write_config(dir: &Path, lr: f64, max_steps: u64, extra: &str) -> PathBuf {
    let root = root();
    let yaml = format!(
        "model:\n\
         \x20 path: {model}\n\
         \x20 device: cpu\n\
         lora:\n\
         \x20 rank: 8\n\
         \x20 alpha: 16\n\
         \x20 target_modules: llama\n\
         dataset:\n\
         \x20 path: {data}\n\
         \x20 type: jsonl\n\
         \x20 max_seq_len: 256\n\
         training:\n\
         \x20 output_dir: {out}\n\
         \x20 epochs: 1\n\
         \x20 max_steps: {max_steps}\n\
         \x20 batch_size: 4\n\
         \x20 lr: {lr:e}\n\
         \x20 weight_decay: 0.0\n\
         \x20 warmup_steps: 0\n\
         \x20 seed: 11\n\
         \x20 log_every: 1\n\
         \x20 checkpoint_every: {max_steps}\n\
         {extra}\n",
        model = root.join("assets/tiny-llama").display(),
        data = root.join("assets/data/train.jsonl").display(),
        out = dir.join("out").display(),
    );
    let path = dir.join("job.yaml");
    std::fs::write(&path, yaml).expect("write the job config");
    path
}

/// `plugins: [<abs path>]`, for the plugin package `package` (built first).
fn plugins_line(package: &str) -> String {
    let lib = plugin_support::plugin_library(package);
    format!("plugins: [\"{}\"]", lib.display())
}

/// Runs `volttrain sft --config <config>` as a user would and fails the test with its output.
fn run_binary(config: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_volttrain"))
        .args(["sft", "--config"])
        .arg(config)
        .output()
        .expect("run the volttrain binary");
    assert!(
        out.status.success(),
        "volttrain sft --config {} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        config.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `kind: train` lines of `<out>/metrics.jsonl`.
fn train_metrics(out: &Path) -> Vec<serde_json::Value> {
    let path = out.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).expect("metrics.jsonl");
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .filter(|v| v["kind"] == "train")
        .collect()
}

/// The single lr of a step's metrics (every LoRA matrix is in one group).
fn step_lr(m: &serde_json::Value) -> f64 {
    let lrs = m["lr"].as_object().expect("lr by group");
    assert_eq!(lrs.len(), 1, "expected one parameter group, got {lrs:?}");
    lrs.values().next().and_then(|v| v.as_f64()).expect("lr")
}

/// Every `lora_B` tensor of the resume checkpoint `<out>/last/`, flattened.
fn lora_b_values(out: &Path) -> Vec<f64> {
    let path = out.join("last").join("trainable.safetensors");
    let tensors = tch::Tensor::read_safetensors(&path).expect("read trainable.safetensors");
    let mut values = Vec::new();
    let mut n_tensors = 0;
    for (name, t) in tensors {
        if name.contains("lora_B") {
            n_tensors += 1;
            let flat = t.to_kind(tch::Kind::Double).flatten(0, -1);
            values.extend(Vec::<f64>::try_from(&flat).expect("f64 values"));
        }
    }
    // 4 layers x 7 projections (q, k, v, o, gate, up, down) with the `llama` preset.
    assert_eq!(n_tensors, 28, "lora_B tensors in {}", path.display());
    values
}

/// Whether `v` is `k·lr` for an odd `k` with `|k| <= 3`, to fp32 rounding.
fn on_sign_lattice(v: f64, lr: f64) -> bool {
    [-3.0, -1.0, 1.0, 3.0]
        .iter()
        .any(|k| (v - k * lr).abs() <= 1e-4 * lr)
}

#[test]
fn lion_plugin_from_yaml_makes_sign_updates() {
    const LR: f64 = 1e-3;
    const STEPS: u64 = 3;
    let plugins = plugins_line("volttrain-lion");

    let dir = tempfile::tempdir().expect("temp dir");
    let extra = format!(
        "{plugins}\noptimizer: {{ name: lion, betas: [0.9, 0.99] }}\nscheduler: {{ name: constant }}"
    );
    let config = write_config(dir.path(), LR, STEPS, &extra);
    run_binary(&config);
    let out = dir.path().join("out");
    let metrics = train_metrics(&out);
    assert_eq!(metrics.len(), STEPS as usize);
    for m in &metrics {
        assert_eq!(step_lr(m), LR, "constant schedule: {m}");
    }
    let resolved = std::fs::read_to_string(out.join("config.resolved.yaml")).expect("config");
    assert!(
        resolved.contains("lion"),
        "resolved config names lion:\n{resolved}"
    );
    let b = lora_b_values(&out);
    let off: Vec<f64> = b
        .iter()
        .copied()
        .filter(|v| !on_sign_lattice(*v, LR))
        .collect();
    assert!(
        off.is_empty(),
        "{} of {} lora_B entries are not ±lr or ±3·lr after {STEPS} Lion steps, e.g. {:?}",
        off.len(),
        b.len(),
        &off[..off.len().min(5)]
    );
    let three = b.iter().filter(|v| v.abs() > 2.0 * LR).count();
    eprintln!(
        "lion run: {} lora_B entries, all ±lr or ±3lr ({three} at ±3lr)",
        b.len()
    );

    // The same job with the default optimizer: its B entries are not on the lattice.
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), LR, STEPS, "scheduler: { name: constant }");
    run_binary(&config);
    let b = lora_b_values(&dir.path().join("out"));
    let on = b.iter().filter(|v| on_sign_lattice(**v, LR)).count();
    eprintln!(
        "default optimizer run: {on} of {} lora_B entries on the lattice",
        b.len()
    );
    assert!(
        (on as f64) < 0.5 * b.len() as f64,
        "the default optimizer should not give sign updates ({on} of {} on the lattice)",
        b.len()
    );
}

/// Runs the job of `config` in process (plugins resolved against its directory).
fn run_in_process(config: &Path) -> volttrain::trainer::FitSummary {
    let cfg = SftConfig::load(config, &[]).expect("load the job config");
    run_sft(
        &cfg,
        RunOptions {
            base_dir: config.parent().map(Path::to_path_buf),
            ..RunOptions::default()
        },
    )
    .expect("run the job")
}

fn column(metrics: &[serde_json::Value], key: &str) -> Vec<f64> {
    metrics
        .iter()
        .map(|m| m[key].as_f64().expect("a number"))
        .collect()
}

#[test]
fn loss_spike_plugin_from_yaml_stops_the_run() {
    const MAX_STEPS: u64 = 8;
    let plugins = plugins_line("volttrain-loss-spike");

    // A run without the monitor gives the gradient norms of each step (the job is
    // deterministic: same seed, same data order, no dropout).
    let control_dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(control_dir.path(), 1e-3, MAX_STEPS, "");
    let control = run_in_process(&config);
    assert_eq!(control.steps, MAX_STEPS);
    let control_metrics = train_metrics(&control_dir.path().join("out"));
    let norms = column(&control_metrics, "grad_norm");
    eprintln!("loss_spike control run: gradient norms {norms:?}");

    // A threshold the norm first crosses at a step in [3, MAX_STEPS - 1]: halfway between the
    // largest norm so far and the first larger one.
    let (stop_index, threshold) = (2..norms.len() - 1)
        .find_map(|j| {
            let before = norms[..j].iter().copied().fold(f64::MIN, f64::max);
            (norms[j] > before).then(|| (j, 0.5 * (before + norms[j])))
        })
        .expect("a gradient norm above all earlier ones within the run");
    let expected = stop_index as u64 + 1;

    let dir = tempfile::tempdir().expect("temp dir");
    let extra = format!(
        "{plugins}\n\
         callbacks:\n\
         \x20 - {{ name: loss_spike, window: 2, factor: 100.0, max_grad_norm: {threshold:e}, patience: 1 }}"
    );
    let config = write_config(dir.path(), 1e-3, MAX_STEPS, &extra);
    let summary = run_in_process(&config);
    let out = dir.path().join("out");
    let metrics = train_metrics(&out);
    eprintln!(
        "loss_spike run: max_grad_norm {threshold:e}, stopped after {} of {MAX_STEPS} steps: {:?}",
        summary.steps, summary.stopped_by
    );

    assert_eq!(
        summary.steps, expected,
        "stopped at the first norm above the threshold"
    );
    assert_eq!(metrics.len() as u64, expected, "steps in metrics.jsonl");
    for (got, want) in column(&metrics, "grad_norm").iter().zip(&norms) {
        assert!(
            (got - want).abs() <= 1e-5 * want,
            "same run as the control: {got} vs {want}"
        );
    }
    let reason = summary.stopped_by.expect("stopped_by is set");
    assert!(
        reason.starts_with(&format!("loss_spike: step {expected}: gradient norm")),
        "{reason}"
    );

    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("loss_spike.json")).expect("loss_spike.json exists"),
    )
    .expect("loss_spike.json is JSON");
    let losses = column(&metrics, "loss");
    let i = stop_index;
    assert_eq!(report["step"].as_u64(), Some(expected));
    assert_eq!(report["loss"].as_f64(), Some(losses[i]));
    assert_eq!(report["grad_norm"], metrics[i]["grad_norm"]);
    let baseline = report["baseline"]
        .as_f64()
        .expect("baseline: the window is full");
    assert!((baseline - 0.5 * (losses[i - 2] + losses[i - 1])).abs() <= 1e-12);
    assert_eq!(report["reason"].as_str(), Some(reason.as_str()));
}

/// transformers' lrs for `steps` updates of `get_inverse_sqrt_schedule` at base lr `lr`: the lr
/// each update uses, read before `scheduler.step()`.
fn transformers_inverse_sqrt(lr: f64, warmup: u64, timescale: u64, steps: u64) -> Vec<f64> {
    let code = format!(
        "import json, torch\n\
         from transformers import get_inverse_sqrt_schedule\n\
         p = torch.nn.Parameter(torch.zeros(1))\n\
         opt = torch.optim.SGD([p], lr={lr:e})\n\
         s = get_inverse_sqrt_schedule(opt, num_warmup_steps={warmup}, timescale={timescale})\n\
         out = []\n\
         for _ in range({steps}):\n\
         \x20   out.append(opt.param_groups[0]['lr'])\n\
         \x20   opt.step()\n\
         \x20   s.step()\n\
         print(json.dumps(out))\n"
    );
    let out = Command::new(plugin_support::python())
        .args(["-c", &code])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "transformers reference failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON list of lrs")
}

#[test]
fn inverse_sqrt_plugin_from_yaml_sets_the_lr() {
    const LR: f64 = 2e-3;
    const STEPS: u64 = 6;
    let plugins = plugins_line("volttrain-inverse-sqrt");

    let dir = tempfile::tempdir().expect("temp dir");
    let extra =
        format!("{plugins}\nscheduler: {{ name: inverse_sqrt, warmup_steps: 2, timescale: 3 }}");
    let config = write_config(dir.path(), LR, STEPS, &extra);
    run_binary(&config);
    let metrics = train_metrics(&dir.path().join("out"));
    assert_eq!(metrics.len(), STEPS as usize);
    let reference = transformers_inverse_sqrt(LR, 2, 3, STEPS);
    let mut worst: f64 = 0.0;
    for (m, want) in metrics.iter().zip(&reference) {
        // The default grouping gives LoRA matrices lr_mult 1: the group lr is the schedule's.
        let lrs = m["lr"].as_object().expect("lr by group");
        for (group, got) in lrs {
            let got = got.as_f64().expect("lr");
            worst = worst.max((got - want).abs());
            assert!(
                (got - want).abs() <= 1e-12 * LR,
                "step {}: group {group} lr {got}, transformers {want}",
                m["step"]
            );
        }
    }
    eprintln!("inverse_sqrt run: lrs {reference:?}, max |diff| {worst:e}");
}
