//! Same-run overhead of the experiment trackers: the bundled job (`config/sft.yaml`: LoRA on the
//! bundled tiny Llama and chat data, with its evals and epoch saves) with no tracker, with
//! `wandb` (offline mode, through the sidecar in the reference Python) and with `mlflow` (a
//! local `mlflow server` on SQLite, started here from `VOLTTRAIN_MLFLOW_PYTHON`), run in turn
//! in this process, the order rotated each round and reversed every other round, so drift on a
//! shared machine, and what one run leaves winding down, spread evenly.
//!
//! The figure is the run's own `tokens_per_sec`, what the job reports: input tokens over its
//! training time (`FitSummary::train_secs`: start of `fit` through the final eval and save,
//! the tracker's start included, its closing of the run at fit end not, as transformers'
//! `train_runtime`). The note adds the whole `fit` (closing included), the mean per-step
//! tokens/s and the dropped points (must be 0).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use volttrain::config::{ComponentSection, SftConfig};
use volttrain::error::{Error, Result};
use volttrain::sft::{RunOptions, run_sft};

use crate::{Measurement, PerfOpts, Stats};

/// `mlflow server` in its own process group, ended (the whole group) when dropped.
struct MlflowServer {
    child: Child,
    uri: String,
}

impl MlflowServer {
    fn start(python: &Path, dir: &Path) -> Result<MlflowServer> {
        use std::os::unix::process::CommandExt;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| Error::invalid(format!("no free port: {e}")))?
            .port();
        let err_log = dir.join("mlflow-server.log");
        let log = std::fs::File::create(&err_log).map_err(|e| Error::io(&err_log, e))?;
        let child = Command::new(python)
            .args(["-m", "mlflow", "server", "--backend-store-uri"])
            .arg(format!("sqlite:///{}", dir.join("mlflow.db").display()))
            .arg("--artifacts-destination")
            .arg(dir.join("artifacts"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--workers", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| Error::io(python, e))?;
        let s = MlflowServer {
            child,
            uri: format!("http://127.0.0.1:{port}"),
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(240) {
            if agent.get(format!("{}/health", s.uri)).call().is_ok() {
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Err(Error::invalid(format!(
            "mlflow server did not come up in 240 s; see {}",
            err_log.display()
        )))
    }
}

impl Drop for MlflowServer {
    fn drop(&mut self) {
        let pgid = self.child.id() as i32;
        // SAFETY: kill(2) on the process group this function started; no memory involved.
        unsafe {
            libc::kill(-pgid, libc::SIGTERM);
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // SAFETY: as above.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

fn section(name: &str, yaml: &str) -> Result<ComponentSection> {
    let options: serde_yaml::Mapping =
        serde_yaml::from_str(yaml).map_err(|e| Error::invalid(e.to_string()))?;
    Ok(ComponentSection {
        name: name.into(),
        options,
    })
}

struct Sample {
    run_tok_s: f64,
    whole_tok_s: f64,
    step_tok_s: f64,
    dropped: u64,
}

fn one_run(
    root: &Path,
    opts: &PerfOpts,
    out: &Path,
    tracker: Option<ComponentSection>,
) -> Result<Sample> {
    let abs = |p: &str| root.join(p).display().to_string();
    let sets = vec![
        format!("model.path={}", abs("assets/tiny-llama")),
        format!("dataset.path={}", abs("assets/data/train.jsonl")),
        format!("dataset.eval_path={}", abs("assets/data/eval.jsonl")),
        format!("training.output_dir={}", out.display()),
        format!("training.threads={}", opts.threads),
        "model.device=cpu".to_string(),
    ];
    let mut cfg = SftConfig::load(&root.join("config/sft.yaml"), &sets)?;
    if opts.quick {
        cfg.training.epochs = 1;
    }
    let name = tracker.as_ref().map(|t| t.name.clone());
    cfg.callbacks.extend(tracker);
    let s = run_sft(&cfg, RunOptions::default())?;
    let text = std::fs::read_to_string(out.join("metrics.jsonl"))
        .map_err(|e| Error::io(out.join("metrics.jsonl"), e))?;
    let steps: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "train")
        .filter_map(|v| v["tokens_per_sec"].as_f64())
        .collect();
    let dropped = name
        .and_then(|n| s.callbacks.get(&n).and_then(|r| r["dropped"].as_u64()))
        .unwrap_or(0);
    Ok(Sample {
        run_tok_s: s.tokens_per_sec,
        whole_tok_s: s.input_tokens as f64 / s.elapsed_secs.max(1e-9),
        step_tok_s: steps.iter().sum::<f64>() / steps.len().max(1) as f64,
        dropped,
    })
}

/// Tokens/s of the bundled job with each tracker on, against the same job without one.
pub fn run(opts: &PerfOpts) -> Result<Vec<Measurement>> {
    let mlflow_py = std::env::var_os("VOLTTRAIN_MLFLOW_PYTHON")
        .map(PathBuf::from)
        .ok_or_else(|| {
            Error::invalid(
                "VOLTTRAIN_MLFLOW_PYTHON is not set; run through `./dev bench` (tools/provision.sh \
                 --reference makes the MLflow venv)",
            )
        })?;
    let tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let server = MlflowServer::start(&mlflow_py, tmp.path())?;
    let variants: Vec<(&str, Option<ComponentSection>)> = vec![
        ("off", None),
        (
            "wandb",
            Some(section(
                "wandb",
                &format!(
                    "{{mode: offline, project: volttrain-bench, python: '{}', dir: '{}'}}",
                    opts.python.display(),
                    tmp.path().join("wandb").display()
                ),
            )?),
        ),
        (
            "mlflow",
            Some(section(
                "mlflow",
                &format!(
                    "{{tracking_uri: '{}', experiment: volttrain-bench}}",
                    server.uri
                ),
            )?),
        ),
    ];
    // the runs without a tracker spread by ~10% on a shared machine: enough rounds for a median
    let rounds = if opts.quick { 7 } else { 9 };
    let mut samples: Vec<Vec<Sample>> = variants.iter().map(|_| Vec::new()).collect();
    // one untimed run: file caches, dataset cache, the allocator
    one_run(&opts.root, opts, &tmp.path().join("warmup"), None)?;
    for round in 0..rounds {
        for k in 0..variants.len() {
            // rotated each round, and reversed every other round: each variant follows each of
            // the others equally often (what a W&B run leaves winding down at nice 19 falls on
            // every variant, not always on the one after it)
            let k = if round % 2 == 1 {
                variants.len() - 1 - k
            } else {
                k
            };
            let i = (k + round) % variants.len();
            let out = tmp.path().join(format!("run-{round}-{}", variants[i].0));
            samples[i].push(one_run(&opts.root, opts, &out, variants[i].1.clone())?);
        }
    }
    drop(server);
    let stats = |v: &[Sample], f: fn(&Sample) -> f64| {
        Stats::from_samples(&v.iter().map(f).collect::<Vec<_>>())
    };
    let off = stats(&samples[0], |s| s.run_tok_s)?;
    let off_step = stats(&samples[0], |s| s.step_tok_s)?;
    let off_whole = stats(&samples[0], |s| s.whole_tok_s)?;
    let job = if opts.quick {
        "bundled job (config/sft.yaml, 1 epoch)"
    } else {
        "bundled job (config/sft.yaml, 3 epochs)"
    };
    let mut rows = Vec::new();
    for (i, (name, _)) in variants.iter().enumerate().skip(1) {
        let on = stats(&samples[i], |s| s.run_tok_s)?;
        let on_step = stats(&samples[i], |s| s.step_tok_s)?;
        let on_whole = stats(&samples[i], |s| s.whole_tok_s)?;
        let dropped: u64 = samples[i].iter().map(|s| s.dropped).sum();
        rows.push(Measurement {
            workload: format!("tracker_{name}_overhead"),
            metric: "tokens/s".into(),
            volttrain: on,
            reference: Some(off),
            reference_name: "the same job without a tracker".into(),
            higher_is_better: true,
            note: format!(
                "{job}, the job's tokens/s (training time, tracker start included), {rounds} \
                 rounds in rotated order; whole fit incl. closing the tracker run {:.0} vs {:.0} \
                 ({:.3}x); per-step tokens/s {:.0} vs {:.0} ({:.3}x); points dropped: {dropped}",
                on_whole.median,
                off_whole.median,
                on_whole.median / off_whole.median,
                on_step.median,
                off_step.median,
                on_step.median / off_step.median
            ),
        });
    }
    Ok(rows)
}
