//! The `volttrain` command as a user runs it: training from YAML on the bundled assets, epoch
//! saves that Python `peft` loads with the same eval loss, Ctrl-C and `--resume`, bad config.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> String {
    std::env::var("VOLTTRAIN_PYTHON_REF").unwrap_or_else(|_| "python3".into())
}

/// A small copy of the bundled data (so a run takes seconds) and a config pointing at it.
fn setup(dir: &Path, train_n: usize, epochs: usize) -> PathBuf {
    let take = |src: &str, n: usize, dst: &str| {
        let text = std::fs::read_to_string(root().join(src)).unwrap();
        let lines: Vec<&str> = text.lines().take(n).collect();
        std::fs::write(dir.join(dst), lines.join("\n") + "\n").unwrap();
    };
    take("assets/data/train.jsonl", train_n, "train.jsonl");
    take("assets/data/eval.jsonl", 8, "eval.jsonl");
    let cfg = format!(
        r#"
model:
  path: {model}
  device: cpu
lora:
  rank: 8
  alpha: 16
  dropout: 0.1
  target_modules: llama
dataset:
  path: {dir}/train.jsonl
  eval_path: {dir}/eval.jsonl
  max_seq_len: 128
  cache: false
training:
  output_dir: {dir}/out
  epochs: {epochs}
  batch_size: 4
  lr: 0.02
  warmup_ratio: 0.1
  keep_last: 2
  log_every: 1
  seed: 7
"#,
        model = root().join("assets/tiny-llama").display(),
        dir = dir.display(),
    );
    let p = dir.join("sft.yaml");
    std::fs::write(&p, cfg).unwrap();
    p
}

fn volttrain() -> Command {
    Command::new(env!("CARGO_BIN_EXE_volttrain"))
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn trains_saves_epochs_and_the_adapter_loads_in_peft() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), 16, 3);
    let out = volttrain()
        .args(["sft", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["steps"], 12, "16 examples / batch 4 x 3 epochs");

    let o = dir.path().join("out");
    // keep_last 2: epochs 2 and 3, each a complete PEFT adapter plus tokenizer
    assert!(!o.join("epoch-1").exists());
    for e in ["epoch-2", "epoch-3"] {
        for f in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert!(o.join(e).join(f).exists(), "{e}/{f}");
        }
    }
    assert!(o.join("config.resolved.yaml").exists());
    assert!(o.join("last/trainer_state.json").exists());
    assert!(std::fs::read_dir(o.join("tensorboard")).unwrap().count() >= 1);
    let m = metrics(&o);
    let evals: Vec<f64> = m
        .iter()
        .filter(|v| v["kind"] == "eval")
        .map(|v| v["eval_loss"].as_f64().unwrap())
        .collect();
    assert_eq!(evals.len(), 4, "before training and after each epoch");
    assert!(evals[3] < evals[0] - 0.5, "eval loss falls: {evals:?}");

    // volttrain eval --adapter == peft on the same base, adapter and eval file
    let ev = volttrain()
        .args(["eval", "--config"])
        .arg(&cfg)
        .arg("--adapter")
        .arg(o.join("epoch-3"))
        .output()
        .unwrap();
    assert!(
        ev.status.success(),
        "{}",
        String::from_utf8_lossy(&ev.stderr)
    );
    let ours: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&ev.stdout).lines().last().unwrap()).unwrap();
    let py = Command::new(python())
        .arg(root().join("reference/peft_eval.py"))
        .arg(root().join("assets/tiny-llama"))
        .arg(o.join("epoch-3"))
        .arg(dir.path().join("eval.jsonl"))
        .arg("128")
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let theirs: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&py.stdout).lines().last().unwrap()).unwrap();
    let (a, b) = (
        ours["eval_loss"].as_f64().unwrap(),
        theirs["eval_loss"].as_f64().unwrap(),
    );
    println!(
        "eval loss: volttrain {a} peft {b} (rel {:.2e})",
        (a - b).abs() / b
    );
    assert_eq!(ours["tokens"], theirs["tokens"]);
    assert!((a - b).abs() <= 1e-4 * b, "volttrain {a} vs peft {b}");
    // the final epoch's eval loss is what `volttrain eval` reports for it
    assert!((a - evals[3]).abs() <= 1e-6 * a, "{a} vs {}", evals[3]);
}

#[test]
fn ctrl_c_writes_a_resume_checkpoint_and_resume_continues_exactly() {
    // uninterrupted reference
    let d1 = tempfile::tempdir().unwrap();
    let c1 = setup(d1.path(), 24, 2);
    let full = volttrain()
        .args(["sft", "--config"])
        .arg(&c1)
        .output()
        .unwrap();
    assert!(
        full.status.success(),
        "{}",
        String::from_utf8_lossy(&full.stderr)
    );
    let want: Vec<(u64, f64)> = metrics(&d1.path().join("out"))
        .iter()
        .filter(|v| v["kind"] == "train")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect();
    assert_eq!(want.len(), 12);

    // interrupted at the second step by SIGINT, then resumed
    let d2 = tempfile::tempdir().unwrap();
    let c2 = setup(d2.path(), 24, 2);
    let mut child = volttrain()
        .args(["sft", "--config"])
        .arg(&c2)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut err_lines = Vec::new();
    let reader = BufReader::new(child.stderr.take().unwrap());
    let mut sent = false;
    for line in reader.lines() {
        let line = line.unwrap();
        if !sent && line.contains("step 2/12") {
            let st = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(st.success());
            sent = true;
        }
        err_lines.push(line);
    }
    let status = child.wait().unwrap();
    let stderr = err_lines.join("\n");
    assert!(sent, "never saw step 2: {stderr}");
    assert!(!status.success(), "an interrupted run exits non-zero");
    assert!(
        stderr.contains("resume with: volttrain sft --config"),
        "{stderr}"
    );
    let o = d2.path().join("out");
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(o.join("last/trainer_state.json")).unwrap())
            .unwrap();
    let stopped = st["step"].as_u64().unwrap();
    assert!((2..12).contains(&stopped), "stopped at {stopped}");

    let res = volttrain()
        .args(["sft", "--config"])
        .arg(&c2)
        .arg("--resume")
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let got: Vec<(u64, f64)> = metrics(&o)
        .iter()
        .filter(|v| v["kind"] == "train")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect();
    assert_eq!(
        got.len(),
        12,
        "steps before and after the interruption: {got:?}"
    );
    for ((s0, l0), (s1, l1)) in want.iter().zip(&got) {
        assert_eq!(s0, s1);
        assert!(
            (l0 - l1).abs() <= 1e-6 * l0.abs(),
            "step {s0}: {l0} vs {l1}"
        );
    }
}

#[test]
fn bad_config_names_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), 4, 1);
    let out = volttrain()
        .args(["sft", "--config"])
        .arg(&cfg)
        .args(["--set", "training.lrate=1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("sft.yaml") && e.contains("training") && e.contains("lrate"),
        "{e}"
    );

    let out = volttrain()
        .args(["sft", "--config"])
        .arg(&cfg)
        .args(["--set", "dataset.path=/nonexistent/train.jsonl"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("/nonexistent/train.jsonl"), "{e}");
}
