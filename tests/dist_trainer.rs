//! Data parallel end to end: the real `volttrain sft --nproc 2` (two Gloo processes on the CPU)
//! against one process on the same global batch, and resume with the same world size.
//!
//! Why the runs must agree: the DistributedSampler-style shard gives rank `r` the items
//! `r, r + 2, ...` of the epoch order, so with batch `b` per rank the two micro-batches of a step
//! hold exactly the items of the 1-process batch `2b` (in another row order). The trainer scales
//! each rank's summed loss by `world / global label tokens` and averages gradients, so the update
//! equals the 1-process one up to the order of float sums (1e-5). Each rank writes its own
//! trainable parameters through a callback of the `volttrain-test-rank-params` fixture plugin
//! (loaded from the YAML `plugins:` list by every rank), to show both ranks ended identical.

mod plugin_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use tch::Tensor;

const BIN: &str = env!("CARGO_BIN_EXE_volttrain");

fn asset(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets").join(p)
}

/// A small LoRA job on the bundled model and data: dropout 0, one thread, fixed seed.
/// `constant_lr` makes the schedule independent of `max_steps` (for the resume test).
fn write_config(
    dir: &Path,
    out: &Path,
    batch: usize,
    max_steps: u64,
    constant_lr: bool,
) -> PathBuf {
    let min_lr_ratio = if constant_lr { 1.0 } else { 0.0 };
    let yaml = format!(
        "model:\n  path: {model}\n  device: cpu\n\
         lora:\n  rank: 4\n  alpha: 8\n  dropout: 0.0\n  target_modules: llama\n\
         dataset:\n  path: {train}\n  eval_path: {eval}\n  max_seq_len: 128\n\
         training:\n  output_dir: {out}\n  epochs: 1\n  max_steps: {max_steps}\n  \
         batch_size: {batch}\n  lr: 0.01\n  seed: 7\n  threads: 1\n  log_every: 1\n  \
         warmup_ratio: 0.0\n  min_lr_ratio: {min_lr_ratio}\n  checkpoint_every: 2\n  \
         tensorboard: false\n",
        model = asset("tiny-llama").display(),
        train = asset("data/train.jsonl").display(),
        eval = asset("data/eval.jsonl").display(),
        out = out.display(),
    );
    let name = out.file_name().map(|n| n.to_string_lossy().to_string());
    let path = dir.join(format!("{}-{max_steps}.yaml", name.unwrap_or_default()));
    std::fs::write(&path, yaml).expect("write the test config");
    path
}

struct Run {
    /// The summary JSON lines printed on stdout (one per process that printed).
    summaries: Vec<serde_json::Value>,
}

fn sft(config: &Path, extra: &[&str], rank_params: Option<&Path>) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.arg("sft").arg("--config").arg(config).args(extra);
    // The test itself may run under a launcher: the child must decide from its own flags.
    for k in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    ] {
        cmd.env_remove(k);
    }
    if let Some(d) = rank_params {
        // every rank writes `<d>/rank-<r>.safetensors` when fit ends
        let lib = plugin_support::plugin_library("volttrain-test-rank-params");
        cmd.arg("--set")
            .arg(format!("plugins=[\"{}\"]", lib.display()))
            .arg("--set")
            .arg(format!(
                "callbacks=[{{name: fixture_rank_params, dir: \"{}\"}}]",
                d.display()
            ));
    }
    let out = cmd.output().expect("start volttrain");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "volttrain sft {extra:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let summaries = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("summary JSON"))
        .collect();
    Run { summaries }
}

fn sft_fails(config: &Path, extra: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("sft")
        .arg("--config")
        .arg(config)
        .args(extra)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .output()
        .expect("start volttrain");
    assert!(!out.status.success(), "volttrain sft {extra:?} should fail");
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn read(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// Largest absolute difference over all tensors; both files must hold the same names.
fn max_diff(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> f64 {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "different tensor names"
    );
    assert!(!a.is_empty(), "no tensors");
    a.iter()
        .map(|(n, t)| {
            let u = &b[n];
            assert_eq!(t.size(), u.size(), "{n}: shapes differ");
            (t - u).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

/// Largest absolute value of the LoRA `B` matrices: zero at init, so > 0 shows training moved them.
fn max_lora_b(a: &BTreeMap<String, Tensor>) -> f64 {
    let v: Vec<f64> = a
        .iter()
        .filter(|(n, _)| n.contains("lora_B"))
        .map(|(_, t)| t.abs().max().double_value(&[]))
        .collect();
    assert!(!v.is_empty(), "no lora_B tensors in {:?}", a.keys());
    v.into_iter().fold(0.0, f64::max)
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics.jsonl");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("metrics line"))
        .collect()
}

fn train_losses(m: &[serde_json::Value]) -> Vec<(u64, f64, u64)> {
    m.iter()
        .filter(|v| v["kind"] == "train")
        .map(|v| {
            (
                v["step"].as_u64().expect("step"),
                v["loss"].as_f64().expect("loss"),
                v["tokens"].as_u64().expect("tokens"),
            )
        })
        .collect()
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                v.push(p.strip_prefix(dir).expect("prefix").display().to_string());
            }
        }
    }
    v.sort();
    v
}

#[test]
fn nproc2_matches_one_process_on_the_same_global_batch() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let steps = 4;
    let out2 = tmp.path().join("dp2");
    let out1 = tmp.path().join("dp1");
    let ranks = tmp.path().join("ranks");
    let c2 = write_config(tmp.path(), &out2, 2, steps, false);
    let c1 = write_config(tmp.path(), &out1, 4, steps, false);

    let r2 = sft(&c2, &["--nproc", "2"], Some(&ranks));
    let r1 = sft(&c1, &[], None);

    // Only rank 0 prints the summary and writes logs.
    assert_eq!(r2.summaries.len(), 1, "summaries: {:?}", r2.summaries);
    assert_eq!(r1.summaries.len(), 1);
    let (s2, s1) = (&r2.summaries[0], &r1.summaries[0]);
    assert_eq!(s2["steps"], steps);
    assert_eq!(s1["steps"], steps);
    // Label and input tokens are summed over ranks: the same global batch.
    assert_eq!(s2["tokens"], s1["tokens"]);
    assert_eq!(s2["input_tokens"].as_u64(), s1["input_tokens"].as_u64());
    let l2 = s2["final_train_loss"].as_f64().expect("loss");
    let l1 = s1["final_train_loss"].as_f64().expect("loss");
    assert!((l2 - l1).abs() < 1e-5, "final loss {l2} vs {l1}");
    // Eval loss is reduced over the eval shards of both ranks (60 items, no padding).
    let e2 = s2["final_eval_loss"].as_f64().expect("eval loss");
    let e1 = s1["final_eval_loss"].as_f64().expect("eval loss");
    assert!((e2 - e1).abs() < 1e-5, "eval loss {e2} vs {e1}");

    // Per-step logged loss and token count (rank 0's log, values reduced over ranks).
    let m2 = train_losses(&metrics(&out2));
    let m1 = train_losses(&metrics(&out1));
    assert_eq!(m2.len(), steps as usize, "one log line per step: {m2:?}");
    assert_eq!(m1.len(), m2.len());
    for ((s, a, ta), (_, b, tb)) in m2.iter().zip(&m1) {
        assert_eq!(ta, tb, "step {s}: label tokens");
        assert!((a - b).abs() < 1e-5, "step {s}: loss {a} vs {b}");
    }

    // The saved weights agree with the 1-process run, and training moved them.
    let w2 = read(&out2.join("last/trainable.safetensors"));
    let w1 = read(&out1.join("last/trainable.safetensors"));
    let d = max_diff(&w2, &w1);
    eprintln!("nproc 2 vs 1 process: max |dW| = {d:.3e}");
    assert!(d < 1e-5, "2-process weights differ from 1-process by {d}");
    let moved = max_lora_b(&w1);
    assert!(
        moved > 1e-4,
        "LoRA B barely moved ({moved}): the test would not see a bad sync"
    );

    // Both ranks ended with the same parameters, equal to what rank 0 saved.
    let p0 = read(&ranks.join("rank-0.safetensors"));
    let p1 = read(&ranks.join("rank-1.safetensors"));
    let dr = max_diff(&p0, &p1);
    eprintln!("rank 0 vs rank 1: max |dW| = {dr:.3e}");
    assert_eq!(dr, 0.0, "ranks diverged by {dr}");
    assert_eq!(max_diff(&p0, &w2), 0.0);

    // The output directory holds one run's files (rank 1 wrote nothing of its own).
    let f2 = files_under(&out2);
    let f1 = files_under(&out1);
    assert_eq!(
        f2, f1,
        "2-process output differs in files from 1-process output"
    );
}

#[test]
fn nproc2_resume_with_the_same_world_size() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out_a = tmp.path().join("resumed");
    let out_b = tmp.path().join("straight");
    // Constant LR: changing max_steps from 2 to 4 leaves the schedule as it was.
    let first = write_config(tmp.path(), &out_a, 2, 2, true);
    let second = write_config(tmp.path(), &out_a, 2, 4, true);
    let straight = write_config(tmp.path(), &out_b, 2, 4, true);

    let r = sft(&first, &["--nproc", "2"], None);
    assert_eq!(r.summaries[0]["steps"], 2);
    let at2 = read(&out_a.join("last/trainable.safetensors"));

    // A 1-process resume of a 2-process checkpoint is refused with the reason.
    let err = sft_fails(&first, &["--resume"]);
    assert!(err.contains("world size 2"), "unexpected error: {err}");

    let r = sft(&second, &["--nproc", "2", "--resume"], None);
    assert_eq!(r.summaries.len(), 1);
    assert_eq!(r.summaries[0]["steps"], 4);
    let r = sft(&straight, &["--nproc", "2"], None);
    assert_eq!(r.summaries[0]["steps"], 4);

    let resumed = read(&out_a.join("last/trainable.safetensors"));
    let direct = read(&out_b.join("last/trainable.safetensors"));
    let d = max_diff(&resumed, &direct);
    eprintln!("resumed vs straight 4 steps (2 processes): max |dW| = {d:.3e}");
    assert!(d < 1e-6, "resumed run differs from the straight run by {d}");
    // Steps 3 and 4 did change the weights, so the comparison says something.
    let moved = max_diff(&at2, &resumed);
    assert!(moved > 1e-4, "steps 3-4 moved the weights by only {moved}");

    // The metrics log continues from step 3 after the resume.
    let steps: Vec<u64> = train_losses(&metrics(&out_a)).iter().map(|x| x.0).collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
}

/// How a stop signal reaches a `--nproc 2` job.
#[cfg(unix)]
enum Delivery {
    /// To every process of the job's process group, as Ctrl-C in a terminal (or Slurm).
    Group,
    /// To the launcher only, as Kubernetes does; the launcher forwards it to the ranks.
    LauncherOnly,
}

/// Stops a `--nproc 2` run with `signal` after its third step, checks that the ranks agreed on
/// the step to stop after and rank 0 wrote `last/`, then that `--resume` ends where an
/// uninterrupted run ends. Returns the job's exit status and stderr.
#[cfg(unix)]
fn nproc2_stop_then_resume(signal: &str, delivery: Delivery) -> (std::process::ExitStatus, String) {
    use std::os::unix::process::CommandExt;
    use std::time::{Duration, Instant};

    let tmp = tempfile::tempdir().expect("tempdir");
    let out_a = tmp.path().join("interrupted");
    let out_b = tmp.path().join("straight");
    let steps = 60;
    let cfg_a = write_config(tmp.path(), &out_a, 2, steps, true);
    let cfg_b = write_config(tmp.path(), &out_b, 2, steps, true);

    let mut child = Command::new(BIN)
        .arg("sft")
        .arg("--config")
        .arg(&cfg_a)
        .args(["--nproc", "2"])
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start volttrain");
    let t0 = Instant::now();
    let log = out_a.join("metrics.jsonl");
    loop {
        // training steps logged so far (the eval lines do not count)
        let lines = std::fs::read_to_string(&log).map_or(0, |t| {
            t.lines()
                .filter(|l| l.contains("\"kind\":\"train\""))
                .count()
        });
        if lines >= 3 {
            break;
        }
        if child.try_wait().expect("try_wait").is_some() {
            let out = child.wait_with_output().expect("wait for volttrain");
            panic!(
                "the run ended ({}) before it could be interrupted:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no training progress"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let target = match delivery {
        Delivery::Group => format!("-{}", child.id()),
        Delivery::LauncherOnly => child.id().to_string(),
    };
    let st = Command::new("kill")
        .args([&format!("-{signal}"), "--", &target])
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{signal} failed");
    let out = child.wait_with_output().expect("wait for volttrain");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        stderr.contains("--nproc 2 --resume"),
        "no resume hint:\n{stderr}"
    );

    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_a.join("last/trainer_state.json")).expect("trainer_state"),
    )
    .expect("trainer_state JSON");
    let stopped = state["step"].as_u64().expect("step");
    eprintln!("{signal}: stopped after step {stopped} of {steps}");
    assert!(stopped >= 3 && stopped < steps, "stopped at {stopped}");
    assert_eq!(state["world_size"], 2);
    assert_eq!(
        train_losses(&metrics(&out_a)).len() as u64,
        stopped,
        "one log line per finished step"
    );

    let r = sft(&cfg_a, &["--nproc", "2", "--resume"], None);
    assert_eq!(r.summaries[0]["steps"], steps);
    let r = sft(&cfg_b, &["--nproc", "2"], None);
    assert_eq!(r.summaries[0]["steps"], steps);
    let d = max_diff(
        &read(&out_a.join("last/trainable.safetensors")),
        &read(&out_b.join("last/trainable.safetensors")),
    );
    eprintln!("{signal}: interrupted + resumed vs straight: max |dW| = {d:.3e}");
    assert!(d < 1e-6, "interrupted + resumed run differs by {d}");
    (out.status, stderr)
}

/// Ctrl-C during `--nproc 2`: every process of the job gets SIGINT (same process group, as from
/// a terminal); the ranks agree on the step to stop after, rank 0 writes `last/` and `--resume`
/// ends where an uninterrupted run ends.
#[cfg(unix)]
#[test]
fn nproc2_ctrl_c_then_resume() {
    let (status, _) = nproc2_stop_then_resume("INT", Delivery::Group);
    assert!(!status.success(), "an interrupted run exits with an error");
}

/// SIGTERM to the launcher only (Kubernetes signals the container's first process): the
/// launcher forwards it, both ranks stop after the same step, the job exits 0 with the
/// preemption message, and `--resume` ends where an uninterrupted run ends.
#[cfg(unix)]
#[test]
fn nproc2_sigterm_to_the_launcher_preempts_all_ranks() {
    let (status, stderr) = nproc2_stop_then_resume("TERM", Delivery::LauncherOnly);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("preempted at step"), "{stderr}");
}

/// Full fine-tuning (tied embeddings, Muon + AdamW), 2 micro-batches per step (hooks off for the
/// first, DDP's `no_sync`) and gradient checkpointing (buckets reduced after backward): still
/// equal to one process. The lr is 1e-3: AdamW/Muon normalize the update, so float-order noise in
/// a near-zero gradient becomes an update difference proportional to the lr (measured: 1.1e-5 at
/// lr 1e-2, 1.1e-6 at 1e-3).
#[test]
fn nproc2_full_finetune_accumulation_checkpointing_matches_one_process() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out2 = tmp.path().join("full2");
    let out1 = tmp.path().join("full1");
    let ranks = tmp.path().join("ranks");
    let c2 = write_config(tmp.path(), &out2, 2, 4, false);
    let c1 = write_config(tmp.path(), &out1, 4, 4, false);
    let sets = [
        "--set",
        "lora.enabled=false",
        "--set",
        "training.gradient_accumulation=2",
        "--set",
        "training.gradient_checkpointing=true",
        "--set",
        "training.lr=0.001",
        "--set",
        "training.checkpoint_every=4",
    ];
    let mut a2 = vec!["--nproc", "2"];
    a2.extend(sets);
    let r2 = sft(&c2, &a2, Some(&ranks));
    let r1 = sft(&c1, &sets, None);
    assert_eq!(r2.summaries.len(), 1);
    assert_eq!(r2.summaries[0]["steps"], 4);
    assert_eq!(r2.summaries[0]["tokens"], r1.summaries[0]["tokens"]);

    let w2 = read(&out2.join("last/trainable.safetensors"));
    let w1 = read(&out1.join("last/trainable.safetensors"));
    assert!(
        w1.keys().any(|n| n.contains("embed_tokens")),
        "full fine-tuning trains the embeddings: {:?}",
        w1.keys()
    );
    let d = max_diff(&w2, &w1);
    eprintln!("full FT, accumulation 2, checkpointing: nproc 2 vs 1 max |dW| = {d:.3e}");
    assert!(d < 1e-5, "2-process weights differ from 1-process by {d}");
    let base = read(&asset("tiny-llama/model.safetensors"));
    let moved = w1
        .iter()
        .filter_map(|(n, t)| base.get(n).map(|b| (t - b).abs().max().double_value(&[])))
        .fold(0.0, f64::max);
    assert!(moved > 1e-3, "training barely moved the weights ({moved})");
    let dr = max_diff(
        &read(&ranks.join("rank-0.safetensors")),
        &read(&ranks.join("rank-1.safetensors")),
    );
    assert_eq!(dr, 0.0, "ranks diverged by {dr}");
}
