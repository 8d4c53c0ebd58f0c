//! VoltTrain's benchmark harness (`volttrain-bench`, a workspace member beside the library, never
//! published): side-by-side performance measurement against the Python references.
//!
//! Each workload module measures VoltTrain and runs its Python reference (in the repository's
//! `reference/`, with the provisioned torch venv) on the same inputs and thread count, in the
//! same run, and returns [`Measurement`]s. The `volttrain-bench` binary drives them, prints the
//! table and writes `bench/results/bench-results.json`; `volttrain-gpu-check` runs the
//! measurements of the GPU acceptance run ([`gpu`], driven by `tools/gpu_check.py`). Everything
//! that spawns Python or samples the process's memory lives here, not in the library.

pub mod data;
pub mod dpo;
pub mod families;
pub mod generate;
pub mod gpu;
pub mod load;
pub mod mamba;
pub mod model;
pub mod nproc;
pub mod optim;
pub mod qlora;
pub mod quant;
pub mod rss;
pub mod sft;
pub mod trackers;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use volttrain::error::{Error, Result};

/// The repository root (where `reference/`, `assets/` and `config/` are): the parent of this
/// crate's directory.
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// Where `volttrain-bench` writes its JSON by default: `bench/results/bench-results.json`.
pub fn default_results_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("results/bench-results.json")
}

/// Options shared by all workloads.
#[derive(Debug, Clone)]
pub struct PerfOpts {
    /// Quick mode: smaller inputs and fewer runs (a few minutes on 2 cores).
    pub quick: bool,
    /// Intra-op threads for libtorch on both sides.
    pub threads: usize,
    pub device: tch::Device,
    /// Warm-up runs (excluded) and measured runs.
    pub warmup: usize,
    pub runs: usize,
    /// Python of the reference venv.
    pub python: PathBuf,
    /// Repository root (where `reference/` is).
    pub root: PathBuf,
}

/// Summary of repeated timings or rates.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stats {
    /// Median, min and max of `samples` (empty gives an error).
    pub fn from_samples(samples: &[f64]) -> Result<Stats> {
        if samples.is_empty() {
            return Err(Error::invalid("no samples to summarise"));
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            0.5 * (v[n / 2 - 1] + v[n / 2])
        };
        Ok(Stats {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }

    /// The same statistics of `factor * x` (unit change).
    /// One value measured once (sizes, peak memory).
    pub fn single(x: f64) -> Stats {
        Stats {
            median: x,
            min: x,
            max: x,
            n: 1,
        }
    }

    pub fn scaled(&self, factor: f64) -> Stats {
        Stats {
            median: self.median * factor,
            min: self.min * factor,
            max: self.max * factor,
            n: self.n,
        }
    }

    /// The same statistics of `scale / x` (seconds to rate).
    pub fn inverse(&self, scale: f64) -> Stats {
        Stats {
            median: scale / self.median,
            min: scale / self.max,
            max: scale / self.min,
            n: self.n,
        }
    }
}

/// One row of the results table.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Measurement {
    /// Workload name (`muon_step`, `lora_sft_step`, ...).
    pub workload: String,
    /// What is measured and its unit (`s/step`, `tokens/s`, `GB/s`, `bytes/param`).
    pub metric: String,
    pub volttrain: Stats,
    /// The reference figure in the same unit, when there is one.
    pub reference: Option<Stats>,
    /// Name of the reference (`torch.optim.AdamW (foreach)`).
    pub reference_name: String,
    /// Whether larger is better (rates) or smaller (times).
    pub higher_is_better: bool,
    /// Free-form detail (shapes, sizes).
    pub note: String,
}

impl Measurement {
    /// Speed-up of VoltTrain over the reference (> 1 means VoltTrain is better), by medians.
    pub fn speedup(&self) -> Option<f64> {
        self.reference.map(|r| {
            if self.higher_is_better {
                self.volttrain.median / r.median
            } else {
                r.median / self.volttrain.median
            }
        })
    }
}

/// Wall-clock seconds of `runs` calls of `f` after `warmup` calls. Synchronizes CUDA before
/// reading the clock when `device` is CUDA.
pub fn time_runs<F: FnMut() -> Result<()>>(
    device: tch::Device,
    warmup: usize,
    runs: usize,
    f: F,
) -> Result<Vec<f64>> {
    time_runs_then_drop(device, warmup, runs, f)
}

/// [`time_runs`] of an `f` that returns what it made (a loaded model), dropped after the clock
/// is read: the time of making it, not of freeing it, as the Python references time
/// `from_pretrained` and `del` the model outside the timed region.
pub fn time_runs_then_drop<T, F: FnMut() -> Result<T>>(
    device: tch::Device,
    warmup: usize,
    runs: usize,
    mut f: F,
) -> Result<Vec<f64>> {
    let sync = || {
        if let tch::Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    for _ in 0..warmup {
        f()?;
    }
    sync();
    let mut out = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let made = f()?;
        sync();
        out.push(t.elapsed().as_secs_f64());
        drop(made);
    }
    Ok(out)
}

/// Runs `reference/<script>` with `args` under the reference python and parses the last line of
/// its standard output as JSON.
pub fn run_reference(opts: &PerfOpts, script: &str, args: &[String]) -> Result<serde_json::Value> {
    run_reference_env(opts, script, args, &[])
}

/// [`run_reference`] with extra environment variables for the script.
pub fn run_reference_env(
    opts: &PerfOpts,
    script: &str,
    args: &[String],
    env: &[(&str, String)],
) -> Result<serde_json::Value> {
    let path = opts.root.join("reference").join(script);
    let mut cmd = Command::new(&opts.python);
    cmd.arg(&path)
        .args(args)
        .env("OMP_NUM_THREADS", opts.threads.to_string())
        .env("MKL_NUM_THREADS", opts.threads.to_string())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    run_json(&mut cmd, &format!("reference {}", path.display()))
}

/// Runs `cmd` (a reference script or a bench child process) to completion and parses the last
/// non-empty line of its standard output as JSON; `what` names it in errors.
pub(crate) fn run_json(cmd: &mut Command, what: &str) -> Result<serde_json::Value> {
    let out = cmd.output().map_err(|e| Error::io(cmd.get_program(), e))?;
    if !out.status.success() {
        return Err(Error::invalid(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .ok_or_else(|| Error::invalid(format!("{what} printed nothing")))?;
    serde_json::from_str(last)
        .map_err(|e| Error::invalid(format!("{what} printed `{last}`, not a JSON report: {e}")))
}

/// Achieved fp32 matmul FLOP/s of a square `n x n` product on `opts.device` (the practical
/// compute limit of the machine, measured in the same run as the workloads).
/// Freezes the base of `model` and injects the LoRA every LoRA workload measures (and its
/// Python reference uses): r 16, alpha 32, no dropout, on the seven Llama projections.
pub(crate) fn inject_bench_lora(model: &mut dyn volttrain::model::CausalLm) -> Result<()> {
    use volttrain::adapter::{AdapterInjector, LoraConfig, LoraInjector, Targets};
    model.freeze_base();
    let cfg = LoraConfig {
        r: 16,
        alpha: 32.0,
        dropout: 0.0,
        target: Targets::Preset("llama".into()),
        ..LoraConfig::default()
    };
    LoraInjector::new(cfg).inject(model)?;
    Ok(())
}

/// The trainable parameters of `model`, named, in the model's order.
pub(crate) fn trainable_named(
    model: &dyn volttrain::model::CausalLm,
) -> Vec<volttrain::optim::NamedParam> {
    volttrain::optim::trainable_parameters(model)
        .into_iter()
        .map(|(n, t)| volttrain::optim::NamedParam::new(n, &t))
        .collect()
}

pub fn matmul_flops(opts: &PerfOpts, n: i64) -> Result<Stats> {
    use volttrain::error::TchResultExt;
    let a = tch::Tensor::f_randn([n, n], (tch::Kind::Float, opts.device)).ctx("randn")?;
    let b = tch::Tensor::f_randn([n, n], (tch::Kind::Float, opts.device)).ctx("randn")?;
    let times = time_runs(opts.device, opts.warmup.max(1), opts.runs.max(3), || {
        let _c = a.f_matmul(&b).ctx("matmul")?;
        Ok(())
    })?;
    let flops = 2.0 * (n as f64).powi(3);
    Ok(Stats::from_samples(&times)?.inverse(flops))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_median_odd_and_even() {
        let s = Stats::from_samples(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Stats::from_samples(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(Stats::from_samples(&[]).is_err());
    }

    #[test]
    fn speedup_direction() {
        let st = Stats::single;
        let mut m = Measurement {
            workload: "w".into(),
            metric: "s/step".into(),
            volttrain: st(1.0),
            reference: Some(st(2.0)),
            reference_name: "ref".into(),
            higher_is_better: false,
            note: String::new(),
        };
        assert_eq!(m.speedup(), Some(2.0));
        m.higher_is_better = true;
        assert_eq!(m.speedup(), Some(0.5));
    }

    /// What `f` makes is freed after the clock is read: a value whose drop takes 400 ms leaves
    /// every sample far below that, and every value is dropped (warm-up and timed runs).
    #[test]
    fn time_runs_then_drop_frees_outside_the_timed_region() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static DROPPED: AtomicUsize = AtomicUsize::new(0);
        struct SlowDrop;
        impl Drop for SlowDrop {
            fn drop(&mut self) {
                std::thread::sleep(std::time::Duration::from_millis(400));
                DROPPED.fetch_add(1, Ordering::SeqCst);
            }
        }
        let samples = time_runs_then_drop(tch::Device::Cpu, 1, 2, || Ok(SlowDrop)).unwrap();
        assert_eq!(samples.len(), 2);
        assert_eq!(DROPPED.load(Ordering::SeqCst), 3);
        for s in samples {
            assert!(s < 0.2, "a sample of {s} s includes the drop");
        }
    }
}
