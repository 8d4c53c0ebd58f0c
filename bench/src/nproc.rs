//! CPU data parallel on one machine: the bundled job (`config/sft.yaml`: LoRA on the bundled
//! tiny Llama and chat data) as `volttrain sft --nproc 2` against one process, in the same run,
//! with no `training.threads` and no `OMP_NUM_THREADS`, so each rank takes its default share of
//! the cores (`dist::rank_threads`: cores / local ranks) and the single process libtorch's
//! default (all cores). Rounds alternate the order.
//!
//! Both run in child processes of the bench binary (`--child-job`), the two ranks through
//! [`volttrain::dist::launch::spawn_workers`], as `volttrain sft --nproc 2` starts them. The figure
//! is rank 0's `tokens_per_sec` of the fit (tokens of all ranks over the run's time).

use std::path::Path;

use volttrain::config::SftConfig;
use volttrain::error::{Error, Result};
use volttrain::sft::{RunOptions, run_sft};

use crate::{Measurement, PerfOpts, Stats};

/// The child: runs the bundled job from `root` into `out` and, on rank 0, writes the summary
/// JSON to `summary`.
pub fn child(root: &Path, out: &Path, summary: &Path, quick: bool) -> Result<()> {
    let abs = |p: &str| root.join(p).display().to_string();
    let sets = vec![
        format!("model.path={}", abs("assets/tiny-llama")),
        format!("dataset.path={}", abs("assets/data/train.jsonl")),
        format!("dataset.eval_path={}", abs("assets/data/eval.jsonl")),
        format!("training.output_dir={}", out.display()),
        "model.device=cpu".to_string(),
    ];
    let mut cfg = SftConfig::load(&root.join("config/sft.yaml"), &sets)?;
    if quick {
        cfg.training.epochs = 1;
    }
    let s = run_sft(&cfg, RunOptions::default())?;
    let rank0 = volttrain::dist::DistEnv::from_env()?.is_none_or(|e| e.rank == 0);
    if rank0 {
        let text = serde_json::to_string(&s).map_err(|e| Error::invalid(e.to_string()))?;
        volttrain::error::write_atomic(summary, text.as_bytes())?;
    }
    Ok(())
}

fn one(opts: &PerfOpts, nproc: usize) -> Result<f64> {
    let exe = std::env::current_exe().map_err(|e| Error::invalid(format!("current_exe: {e}")))?;
    let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let summary = dir.path().join("summary.json");
    let mut args: Vec<std::ffi::OsString> = vec![
        "--child-job".into(),
        opts.root.clone().into(),
        "--child-model".into(),
        dir.path().join("out").into(),
        "--child-summary".into(),
        summary.clone().into(),
    ];
    if !opts.quick {
        args.push("--full".into());
    }
    if nproc > 1 {
        // `run` refused a set OMP_NUM_THREADS, so the ranks split the cores by default.
        volttrain::dist::launch::spawn_workers(nproc, &exe, &args, &[])?;
    } else {
        let st = std::process::Command::new(&exe)
            .args(&args)
            .env_remove("OMP_NUM_THREADS")
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .env_remove("LOCAL_WORLD_SIZE")
            .status()
            .map_err(|e| Error::io(&exe, e))?;
        if !st.success() {
            return Err(Error::invalid(format!("single-process job failed ({st})")));
        }
    }
    let text = std::fs::read_to_string(&summary).map_err(|e| Error::io(&summary, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::invalid(format!("summary: {e}")))?;
    v["tokens_per_sec"]
        .as_f64()
        .ok_or_else(|| Error::invalid("summary has no tokens_per_sec"))
}

/// The `nproc` workload.
pub fn run(opts: &PerfOpts) -> Result<Vec<Measurement>> {
    if std::env::var_os("OMP_NUM_THREADS").is_some() {
        return Err(Error::invalid(
            "OMP_NUM_THREADS is set; unset it, the row measures the default thread split",
        ));
    }
    let rounds = if opts.quick { 1 } else { 3 };
    let (mut two, mut one_p) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        if r % 2 == 0 {
            two.push(one(opts, 2)?);
            one_p.push(one(opts, 1)?);
        } else {
            one_p.push(one(opts, 1)?);
            two.push(one(opts, 2)?);
        }
    }
    let cores = volttrain::dist::available_cores();
    Ok(vec![Measurement {
        workload: "sft_nproc2_cpu".into(),
        metric: "tokens/s".into(),
        volttrain: Stats::from_samples(&two)?,
        reference: Some(Stats::from_samples(&one_p)?),
        reference_name: "the same job in one process".into(),
        higher_is_better: true,
        note: format!(
            "bundled job (config/sft.yaml{}), --nproc 2 on {cores} core(s) with the default \
             thread split ({} per rank) vs one process with libtorch's default threads; goal: \
             at least 1.0x; {rounds} round(s)",
            if opts.quick { ", 1 epoch" } else { "" },
            (cores / 2).max(1)
        ),
    }])
}
