//! The user's loop through the `volttrain` command: train with a `sample_generations` callback,
//! `merge` the adapter, `generate` from the merged model, `export` it to GGUF, and train again
//! from the adapter with `lora.init_from`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> String {
    std::env::var("VOLTTRAIN_PYTHON_REF").unwrap_or_else(|_| "python3".into())
}

fn volttrain() -> Command {
    Command::new(env!("CARGO_BIN_EXE_volttrain"))
}

/// 16 training chats, 8 eval chats, one epoch of batch 4; `extra` is appended to the YAML.
fn setup(dir: &Path, out: &str, extra: &str) -> PathBuf {
    let take = |src: &str, n: usize, dst: &str| {
        let text = std::fs::read_to_string(root().join(src)).unwrap();
        let lines: Vec<&str> = text.lines().take(n).collect();
        std::fs::write(dir.join(dst), lines.join("\n") + "\n").unwrap();
    };
    take("assets/data/train.jsonl", 16, "train.jsonl");
    take("assets/data/eval.jsonl", 8, "eval.jsonl");
    let cfg = format!(
        r#"
model:
  path: {model}
  device: cpu
lora:
  rank: 8
  alpha: 16
  target_modules: llama
dataset:
  path: {dir}/train.jsonl
  eval_path: {dir}/eval.jsonl
  max_seq_len: 128
  cache: false
training:
  output_dir: {dir}/{out}
  epochs: 1
  batch_size: 4
  lr: 0.02
  log_every: 1
  seed: 7
{extra}
"#,
        model = root().join("assets/tiny-llama").display(),
        dir = dir.display(),
    );
    let p = dir.join(format!("{out}.yaml"));
    std::fs::write(&p, cfg).unwrap();
    p
}

fn run(cmd: &mut Command) -> (String, String) {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{cmd:?}\n{stderr}");
    (stdout, stderr)
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn train_sample_merge_generate_export_and_continue() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = setup(
        d,
        "first",
        "callbacks:\n  - {name: sample_generations, prompts: [\"What is 2+3?\", \"Reverse: a b\"], max_new_tokens: 6}\n",
    );
    run(volttrain().args(["sft", "--config"]).arg(&cfg));
    let out = d.join("first");
    let m = metrics(&out);
    let samples: Vec<&serde_json::Value> = m.iter().filter(|l| l["kind"] == "samples").collect();
    let evals = m.iter().filter(|l| l["kind"] == "eval").count();
    assert!(evals >= 1);
    assert_eq!(samples.len(), evals, "one samples line per evaluation");
    let s = &samples[0]["samples"];
    assert_eq!(s.as_array().unwrap().len(), 2);
    assert_eq!(s[0]["prompt"], "What is 2+3?");
    assert!(s[0]["completion"].is_string());
    // TensorBoard has the completions as text
    let script = r#"
import sys, json
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1], size_guidance={"tensors": 0}); ea.Reload()
out = {t: [e.tensor_proto.string_val[0].decode() for e in ea.Tensors(t)] for t in ea.Tags()["tensors"]}
print(json.dumps(out))
"#;
    let (tb, _) = run(Command::new(python())
        .args(["-c", script])
        .arg(out.join("tensorboard")));
    let tb: serde_json::Value = serde_json::from_str(tb.lines().last().unwrap()).unwrap();
    let text = tb["samples/0"][0].as_str().unwrap();
    assert!(text.contains("What is 2+3?"), "{text}");
    assert!(
        text.contains(s[0]["completion"].as_str().unwrap()),
        "{text}"
    );

    // merge the epoch's adapter; generate from the merged model = generate from base + adapter
    let adapter = out.join("epoch-1");
    let merged = d.join("merged");
    let (report, _) = run(volttrain()
        .args(["merge", "--config"])
        .arg(&cfg)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--out")
        .arg(&merged));
    assert!(report.contains("\"merged_modules\":28"), "{report}");
    let generate = |model: &Path, adapter: Option<&Path>| {
        let mut c = volttrain();
        c.args([
            "generate",
            "--chat",
            "--prompt",
            "What is 2+3?",
            "--max-new-tokens",
            "8",
            "--model",
        ])
        .arg(model);
        if let Some(a) = adapter {
            c.arg("--adapter").arg(a);
        }
        run(&mut c)
    };
    let (a, stats) = generate(&merged, None);
    let (b, _) = generate(&root().join("assets/tiny-llama"), Some(&adapter));
    assert_eq!(a, b);
    let stats: serde_json::Value = serde_json::from_str(stats.lines().last().unwrap()).unwrap();
    assert!(stats["new_tokens"].as_u64().unwrap() >= 1, "{stats}");

    // GGUF from the merged model
    let gguf = d.join("model.gguf");
    let (r, _) = run(volttrain()
        .args(["export", "--type", "q8_0", "--model"])
        .arg(&merged)
        .arg("--out")
        .arg(&gguf));
    assert!(r.contains("\"architecture\":\"llama\""), "{r}");
    assert!(std::fs::read(&gguf).unwrap().starts_with(b"GGUF"));

    // continue from the adapter: a fresh run whose first loss is the trained adapter's
    let again = setup(d, "second", "");
    let text = std::fs::read_to_string(&again).unwrap().replace(
        "  target_modules: llama",
        &format!(
            "  target_modules: llama\n  init_from: {}",
            adapter.display()
        ),
    );
    std::fs::write(&again, text).unwrap();
    run(volttrain().args(["sft", "--config"]).arg(&again));
    let first = metrics(&out);
    let second = metrics(&d.join("second"));
    let loss = |m: &[serde_json::Value]| {
        m.iter()
            .find(|l| l["kind"] == "train")
            .and_then(|l| l["loss"].as_f64())
            .unwrap()
    };
    let eval_first = first
        .iter()
        .rev()
        .find(|l| l["kind"] == "eval")
        .and_then(|l| l["eval_loss"].as_f64())
        .unwrap();
    println!(
        "first run: step-1 loss {:.4}, final eval {:.4}; init_from run: step-1 loss {:.4}",
        loss(&first),
        eval_first,
        loss(&second)
    );
    assert!(
        loss(&second) < loss(&first),
        "the run from the trained adapter starts lower"
    );
    // a fresh optimizer and step count: the second run counts from step 1
    let steps: Vec<u64> = second
        .iter()
        .filter(|l| l["kind"] == "train")
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps.first(), Some(&1));
}
