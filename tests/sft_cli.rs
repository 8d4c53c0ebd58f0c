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

/// `volttrain eval --config cfg [--adapter dir]`: must succeed; its printed JSON summary.
fn eval_json(cfg: &Path, adapter: Option<&Path>) -> serde_json::Value {
    let mut cmd = volttrain();
    cmd.args(["eval", "--config"]).arg(cfg);
    if let Some(a) = adapter {
        cmd.arg("--adapter").arg(a);
    }
    let ev = cmd.output().unwrap();
    assert!(
        ev.status.success(),
        "{}",
        String::from_utf8_lossy(&ev.stderr)
    );
    serde_json::from_str(String::from_utf8_lossy(&ev.stdout).lines().last().unwrap()).unwrap()
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
    let ours = eval_json(&cfg, Some(&o.join("epoch-3")));
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

#[test]
fn eval_needs_no_lr_and_training_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), 4, 1);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("  lr: 0.02\n", "")).unwrap();
    // config/sft.yaml marks only model.path and dataset.path required: eval runs without lr
    let m = eval_json(&cfg, None);
    assert!(m["eval_loss"].as_f64().unwrap() > 0.0, "{m}");
    // training does need it, and says which key
    let out = volttrain()
        .args(["sft", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("`training.lr`") && e.contains("required"), "{e}");
}

/// Starts `volttrain sft` on `cfg` (plus `extra`), waits until `metrics.jsonl` shows `after`
/// training steps, then sends `signals` to it and waits for it. Each signal after the first is
/// sent once the process has said it got the one before (two pending signals of one kind would
/// merge into one). Returns the exit status and stderr.
#[cfg(unix)]
fn signal_run(
    cfg: &Path,
    extra: &[&str],
    after: usize,
    signals: &[i32],
) -> (std::process::ExitStatus, String) {
    use std::time::{Duration, Instant};
    let out = cfg.parent().unwrap().join("out");
    let mut child = volttrain()
        .args(["sft", "--config"])
        .arg(cfg)
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = seen.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
        sink.lock().unwrap().clone()
    });
    let t0 = Instant::now();
    loop {
        let steps = std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| {
            t.lines()
                .filter(|l| l.contains("\"kind\":\"train\""))
                .count()
        });
        if steps >= after {
            break;
        }
        if child.try_wait().unwrap().is_some() {
            let status = child.wait().unwrap();
            panic!(
                "the run ended ({status}) before step {after}:\n{}",
                reader.join().unwrap()
            );
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    for (i, sig) in signals.iter().enumerate() {
        while i > 0 && !seen.lock().unwrap().contains("finishing the current step") {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "signal not acknowledged"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // SAFETY: plain integers; the child is not reaped yet, so its pid is still its own.
        let r = unsafe { libc::kill(child.id() as libc::pid_t, *sig) };
        assert_eq!(r, 0, "kill failed");
    }
    let status = child.wait().unwrap();
    (status, reader.join().unwrap())
}

fn train_losses(out: &Path) -> Vec<(u64, f64)> {
    metrics(out)
        .iter()
        .filter(|v| v["kind"] == "train")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

fn read_tensors(path: &Path) -> Vec<(String, tch::Tensor)> {
    let mut t = tch::Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// Bit-for-bit equality of two safetensors files' tensors (names, shapes, values).
fn assert_same_tensors(a: &Path, b: &Path) {
    let (x, y) = (read_tensors(a), read_tensors(b));
    assert_eq!(x.len(), y.len());
    assert!(!x.is_empty());
    for ((n0, t0), (n1, t1)) in x.iter().zip(&y) {
        assert_eq!(n0, n1);
        assert!(t0.equal(t1), "{n0} differs between {a:?} and {b:?}");
    }
}

/// SIGTERM and SIGUSR1 (what Slurm, Kubernetes and spot instances send before they kill) are
/// handled like Ctrl-C, but end with exit status 0 and "preempted at step N; resume with
/// --resume". The resumed run equals an uninterrupted one bit for bit: every step's loss and the
/// final weights.
#[cfg(unix)]
#[test]
fn sigterm_and_sigusr1_preempt_and_resume_bit_exactly() {
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
    let want = train_losses(&d1.path().join("out"));
    assert_eq!(want.len(), 12);

    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGUSR1, "SIGUSR1")] {
        let d2 = tempfile::tempdir().unwrap();
        let c2 = setup(d2.path(), 24, 2);
        let o = d2.path().join("out");
        let (status, stderr) = signal_run(&c2, &[], 2, &[sig]);
        assert_eq!(status.code(), Some(0), "{name}: exit status 0\n{stderr}");
        let st: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(o.join("last/trainer_state.json")).unwrap(),
        )
        .unwrap();
        let stopped = st["step"].as_u64().unwrap();
        assert!((2..12).contains(&stopped), "{name}: stopped at {stopped}");
        assert!(
            stderr.contains(&format!(
                "preempted at step {stopped}; resume with --resume"
            )),
            "{name}:\n{stderr}"
        );
        assert_eq!(
            train_losses(&o).len() as u64,
            stopped,
            "{name}: no step lost, none logged twice"
        );

        let res = volttrain()
            .args(["sft", "--config"])
            .arg(&c2)
            .arg("--resume")
            .output()
            .unwrap();
        assert!(
            res.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        let got = train_losses(&o);
        assert_eq!(got.len(), 12, "{name}: {got:?}");
        for ((s0, l0), (s1, l1)) in want.iter().zip(&got) {
            assert_eq!(s0, s1);
            assert_eq!(
                l0.to_bits(),
                l1.to_bits(),
                "{name}: step {s0}: {l0} vs {l1}"
            );
        }
        assert_same_tensors(
            &d1.path().join("out/last/trainable.safetensors"),
            &o.join("last/trainable.safetensors"),
        );
        assert_same_tensors(
            &d1.path().join("out/epoch-2/adapter_model.safetensors"),
            &o.join("epoch-2/adapter_model.safetensors"),
        );
        eprintln!("{name} after step {stopped}: resumed run equals the straight run bit for bit");
    }
}

/// Every checkpoint-looking directory is complete: `last/` (and `.last.old/`) has its trainer
/// state and weights, each `epoch-N/` its adapter and config.
fn assert_checkpoints_complete(out: &Path) {
    for e in std::fs::read_dir(out).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        if name == "last" || name == ".last.old" {
            for f in [
                "trainer_state.json",
                "trainable.safetensors",
                "optimizer.json",
            ] {
                assert!(e.path().join(f).exists(), "{name}/{f} missing");
            }
            read_tensors(&e.path().join("trainable.safetensors"));
        } else if name.starts_with("epoch-") {
            for f in [
                "adapter_config.json",
                "adapter_model.safetensors",
                "tokenizer.json",
            ] {
                assert!(e.path().join(f).exists(), "{name}/{f} missing");
            }
            read_tensors(&e.path().join("adapter_model.safetensors"));
        }
    }
}

/// A second SIGTERM exits at once (status 128 + 15) without waiting for the step; what it
/// leaves is complete checkpoints only.
#[cfg(unix)]
#[test]
fn second_sigterm_exits_at_once_leaving_complete_checkpoints() {
    let d = tempfile::tempdir().unwrap();
    let c = setup(d.path(), 16, 2);
    let (status, stderr) = signal_run(
        &c,
        &["--set", "training.checkpoint_every=1"],
        2,
        &[libc::SIGTERM, libc::SIGTERM],
    );
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(stderr.contains("exiting at once"), "{stderr}");
    assert_checkpoints_complete(&d.path().join("out"));
}

/// One writer per output directory: a second run into a busy directory fails at once naming the
/// holder; after the holder is killed (-9) its lock file never blocks. A new run into a directory
/// with checkpoints is refused without --resume unless `training.overwrite_output_dir`; a resume
/// that changes the math is refused with the keys named, one that changes only logging is not.
#[cfg(unix)]
#[test]
fn one_writer_no_silent_overwrite_and_resume_config_check() {
    use std::time::Duration;
    let d = tempfile::tempdir().unwrap();
    let c = setup(d.path(), 16, 2);
    let o = d.path().join("out");
    let mut first = volttrain()
        .args(["sft", "--config"])
        .arg(&c)
        .args(["--set", "training.checkpoint_every=1"])
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !o.join("last/trainer_state.json").exists() {
        assert!(first.try_wait().unwrap().is_none(), "first run ended early");
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(5));
    }
    let second = volttrain()
        .args(["sft", "--config"])
        .arg(&c)
        .arg("--resume")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success());
    assert!(
        e.contains("in use by another run") && e.contains(&format!("pid {}", first.id())),
        "{e}"
    );
    assert!(e.contains(".volttrain.lock"), "{e}");

    // kill -9: the lock file stays, the lock does not
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(o.join(".volttrain.lock").exists());

    // a new run over the checkpoints: refused
    let fresh = volttrain()
        .args(["sft", "--config"])
        .arg(&c)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&fresh.stderr);
    assert!(!fresh.status.success());
    assert!(
        e.contains("training.overwrite_output_dir") && e.contains("last"),
        "{e}"
    );

    // a resume that changes the math: refused, keys named
    let changed = volttrain()
        .args(["sft", "--config"])
        .arg(&c)
        .args([
            "--resume",
            "--set",
            "training.lr=0.05",
            "--set",
            "lora.rank=4",
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&changed.stderr);
    assert!(!changed.status.success());
    assert!(
        e.contains("`training.lr`: 0.02 -> 0.05") && e.contains("`lora.rank`: 8 -> 4"),
        "{e}"
    );

    // a resume that changes logging only: allowed, and it finishes the run
    let res = volttrain()
        .args(["sft", "--config"])
        .arg(&c)
        .args(["--resume", "--set", "training.log_every=5"])
        .args([
            "--set",
            "training.keep_last=1",
            "--set",
            "training.tensorboard=false",
        ])
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&res.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(summary["steps"], 8);

    // training over them when asked to
    let over = volttrain()
        .args(["sft", "--config"])
        .arg(&c)
        .args(["--set", "training.overwrite_output_dir=true"])
        .args(["--set", "training.max_steps=1"])
        .output()
        .unwrap();
    assert!(
        over.status.success(),
        "{}",
        String::from_utf8_lossy(&over.stderr)
    );
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(o.join("last/trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(
        st["step"], 1,
        "the new run's checkpoint replaced the old one"
    );
}

/// `volttrain sft` with a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored): a write past
/// `limit` bytes fails with EFBIG as on a full disk.
#[cfg(unix)]
fn sft_with_file_limit(cfg: &Path, extra: &[&str], limit: u64) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = volttrain();
    cmd.args(["sft", "--config"]).arg(cfg).args(extra);
    // SAFETY: between fork and exec only async-signal-safe calls (signal, setrlimit).
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

fn tmp_leftovers(out: &Path) -> Vec<String> {
    std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains(".tmp"))
        .collect()
}

/// A full disk during each kind of save (resume checkpoint, epoch adapter, metrics line): the
/// error names the file, the previous `last/` stays as it was and loadable, no partial directory
/// looks complete, no half line is left in `metrics.jsonl`, and the run resumes once there is
/// room again.
#[cfg(unix)]
#[test]
fn disk_full_during_saves_keeps_the_previous_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let c = setup(d.path(), 24, 2);
    let o = d.path().join("out");
    // a resume checkpoint inside epoch 1 (6 steps an epoch)
    let (status, stderr) = signal_run(&c, &[], 1, &[libc::SIGTERM]);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let state_before = std::fs::read(o.join("last/trainer_state.json")).unwrap();
    let weights_before = std::fs::read(o.join("last/trainable.safetensors")).unwrap();
    let st: serde_json::Value = serde_json::from_slice(&state_before).unwrap();
    let k = st["step"].as_u64().unwrap();
    assert!(k < 6, "stopped at {k}, not inside epoch 1");
    let last_intact = || {
        assert_eq!(
            std::fs::read(o.join("last/trainer_state.json")).unwrap(),
            state_before
        );
        assert_eq!(
            std::fs::read(o.join("last/trainable.safetensors")).unwrap(),
            weights_before
        );
        assert_checkpoints_complete(&o);
        assert!(tmp_leftovers(&o).is_empty(), "{:?}", tmp_leftovers(&o));
    };
    const LIMIT: u64 = 16 * 1024;

    // 1. the resume checkpoint (written every step here) does not fit
    let r = sft_with_file_limit(
        &c,
        &["--resume", "--set", "training.checkpoint_every=1"],
        LIMIT,
    );
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    assert!(
        e.contains(".safetensors") && e.contains("File too large"),
        "names the file: {e}"
    );
    last_intact();

    // 2. the epoch adapter does not fit
    let r = sft_with_file_limit(&c, &["--resume"], LIMIT);
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    assert!(
        e.contains("epoch_saver")
            && e.contains("adapter_model.safetensors")
            && e.contains("File too large"),
        "names the file: {e}"
    );
    assert!(!o.join("epoch-1").exists());
    last_intact();

    // 3. a metrics line does not fit: the error names metrics.jsonl and no half line is left
    let m = o.join("metrics.jsonl");
    let size = std::fs::metadata(&m).unwrap().len();
    let r = sft_with_file_limit(&c, &["--resume"], size + 10);
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    assert!(
        e.contains("metrics.jsonl") && e.contains("File too large"),
        "names the file: {e}"
    );
    assert_eq!(std::fs::metadata(&m).unwrap().len(), size);
    metrics(&o); // every line parses
    last_intact();

    // room again: the run resumes from the untouched checkpoint and finishes
    let r = volttrain()
        .args(["sft", "--config"])
        .arg(&c)
        .arg("--resume")
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&r.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(summary["steps"], 12);
    assert_checkpoints_complete(&o);
}
