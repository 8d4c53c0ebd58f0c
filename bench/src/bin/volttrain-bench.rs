//! `volttrain-bench`: the side-by-side performance harness.
//!
//! Runs every workload in VoltTrain and in its Python reference (PyTorch / transformers / peft /
//! datasets, from the provisioned venv) on the same machine, libtorch, thread count and inputs,
//! in one run, and prints a table of both figures and their ratio, plus a JSON file
//! (`bench/results/bench-results.json` unless `--json` says otherwise).
//!
//! `./dev bench [--quick|--full] [--threads N] [--only NAME,...] [--json PATH]`

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use volttrain_bench::{self as bench, Measurement, PerfOpts};

#[derive(Parser)]
#[command(
    name = "volttrain-bench",
    about = "VoltTrain vs PyTorch/transformers/peft, side by side"
)]
struct Args {
    /// Full mode: full-size inputs and more runs (the default is quick: a few minutes on 2 cores).
    #[arg(long)]
    full: bool,
    /// Quick mode (default).
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// Intra-op threads on both sides (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Only these workloads (comma-separated: matmul, optim, sft, dpo, quant, data, load,
    /// quant-load, trackers, families, generate, mamba, qlora, qlora-1b, nproc).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where to write the JSON results.
    #[arg(long, default_value_os_t = bench::default_results_path())]
    json: PathBuf,
    /// Use CUDA device 0 when present.
    #[arg(long)]
    cuda: bool,
    /// Internal: run one training-step configuration in this process (see bench::sft).
    #[arg(long, hide = true)]
    child_sft: Option<String>,
    #[arg(long, hide = true)]
    child_model: Option<PathBuf>,
    /// Internal: measure one load (MODE,FORMAT,THREADS) in this process (see bench::load).
    #[arg(long, hide = true)]
    child_load: Option<String>,
    /// Internal: one QLoRA memory/speed configuration in this process (see bench::qlora).
    #[arg(long, hide = true)]
    child_qlora: Option<String>,
    /// Internal: the bundled job from this repository root (see bench::nproc).
    #[arg(long, hide = true)]
    child_job: Option<PathBuf>,
    #[arg(long, hide = true)]
    child_summary: Option<PathBuf>,
}

type Workload = fn(&PerfOpts) -> volttrain::Result<Vec<Measurement>>;

fn matmul(opts: &PerfOpts) -> volttrain::Result<Vec<Measurement>> {
    let n = if opts.quick { 1024 } else { 2048 };
    let s = bench::matmul_flops(opts, n)?;
    Ok(vec![Measurement {
        workload: "matmul_fp32".into(),
        metric: "GFLOP/s".into(),
        volttrain: s.scaled(1e-9),
        reference: None,
        reference_name: "-".into(),
        higher_is_better: true,
        note: format!("{n}x{n} @ {n}x{n}: the machine's practical fp32 limit"),
    }])
}

fn workloads() -> Vec<(&'static str, Workload)> {
    vec![
        ("matmul", matmul as Workload),
        ("optim", bench::optim::run),
        ("sft", bench::sft::run),
        ("dpo", bench::dpo::run),
        ("quant", bench::quant::run),
        ("data", bench::data::run),
        ("load", bench::model::load_135m),
        ("quant-load", bench::load::run),
        ("trackers", bench::trackers::run),
        ("families", bench::families::run),
        ("generate", bench::generate::run),
        ("mamba", bench::mamba::run),
        ("qlora", bench::qlora::run),
        ("qlora-1b", bench::qlora::run_1b),
        ("nproc", bench::nproc::run),
    ]
}

fn fmt_stat(m: f64) -> String {
    if m == 0.0 {
        "0".into()
    } else if m.abs() >= 1e4 || m.abs() < 1e-2 {
        format!("{m:.3e}")
    } else {
        format!("{m:.3}")
    }
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let (Some(root), Some(out), Some(summary)) =
        (&args.child_job, &args.child_model, &args.child_summary)
    {
        // Before any thread setting: the job's ranks choose their own (bench::nproc).
        return match bench::nproc::child(root, out, summary, !args.full) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("child job: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    tch::set_num_threads(threads as i32);
    let quick = !args.full;
    let device = if args.cuda && tch::Cuda::is_available() {
        tch::Device::Cuda(0)
    } else {
        tch::Device::Cpu
    };
    let python = std::env::var("VOLTTRAIN_PYTHON_REF").unwrap_or_else(|_| "python3".into());
    let opts = PerfOpts {
        quick,
        threads,
        device,
        warmup: 1,
        runs: if quick { 3 } else { 7 },
        python: python.into(),
        root: bench::repo_root(),
    };
    if let (Some(spec), Some(dir)) = (&args.child_load, &args.child_model) {
        let report =
            bench::load::LoadRun::parse(spec).and_then(|run| bench::load::child(&run, dir));
        return match report.and_then(|r| {
            serde_json::to_string(&r).map_err(|e| volttrain::Error::invalid(e.to_string()))
        }) {
            Ok(line) => {
                println!("{line}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("child load {spec}: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if let (Some(spec), Some(dir)) = (&args.child_qlora, &args.child_model) {
        return match bench::qlora::child(spec, dir, &opts) {
            Ok(v) => {
                println!("{v}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("child qlora {spec}: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if let (Some(mode), Some(dir)) = (&args.child_sft, &args.child_model) {
        return match bench::sft::child(mode, dir, &opts) {
            Ok(v) => {
                println!("{v}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("child {mode}: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let t0 = Instant::now();
    let mut rows: Vec<Measurement> = Vec::new();
    let mut failed = Vec::new();
    for (name, f) in workloads() {
        if !args.only.is_empty() && !args.only.iter().any(|o| o == name) {
            continue;
        }
        eprintln!("bench: {name} ...");
        match f(&opts) {
            Ok(mut m) => rows.append(&mut m),
            Err(e) => {
                eprintln!("bench: {name} failed: {e}");
                failed.push(name);
            }
        }
    }
    // FLOP fraction of the training steps, against the matmul measured in this run.
    let peak = rows
        .iter()
        .find(|m| m.workload == "matmul_fp32")
        .map(|m| m.volttrain.median * 1e9);
    println!(
        "\nVoltTrain vs reference ({} mode, {threads} threads, {:?}, {:.0} s)\n",
        if quick { "quick" } else { "full" },
        device,
        t0.elapsed().as_secs_f64()
    );
    println!(
        "| workload | metric | VoltTrain (median [min, max]) | reference | reference (median [min, max]) | speed-up |"
    );
    println!("|---|---|---|---|---|---|");
    for m in &rows {
        let r = m
            .reference
            .map(|r| {
                format!(
                    "{} [{}, {}]",
                    fmt_stat(r.median),
                    fmt_stat(r.min),
                    fmt_stat(r.max)
                )
            })
            .unwrap_or_else(|| "-".into());
        let sp = m
            .speedup()
            .map(|s| format!("{s:.2}x"))
            .unwrap_or_else(|| "-".into());
        println!(
            "| {} | {} | {} [{}, {}] | {} | {} | {} |",
            m.workload,
            m.metric,
            fmt_stat(m.volttrain.median),
            fmt_stat(m.volttrain.min),
            fmt_stat(m.volttrain.max),
            m.reference_name,
            r,
            sp
        );
    }
    if let Some(peak) = peak {
        for m in rows.iter().filter(|m| m.note.contains("flop_per_token=")) {
            let fpt: f64 = m
                .note
                .split("flop_per_token=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0.0);
            let frac = |tps: f64| tps * fpt / peak;
            let reference = m
                .reference
                .map(|r| format!("{:.0}%", 100.0 * frac(r.median)))
                .unwrap_or_else(|| "-".into());
            println!(
                "{}: {:.0}% of the measured fp32 matmul rate (reference {})",
                m.workload,
                100.0 * frac(m.volttrain.median),
                reference
            );
        }
    }
    for m in &rows {
        if !m.note.is_empty() {
            println!("  {}: {}", m.workload, m.note);
        }
    }
    let doc = serde_json::json!({
        "mode": if quick { "quick" } else { "full" },
        "threads": threads,
        "device": format!("{device:?}"),
        "seconds": t0.elapsed().as_secs_f64(),
        "results": rows,
        "failed": failed,
    });
    match serde_json::to_vec_pretty(&doc) {
        Ok(bytes) => {
            if let Err(e) = volttrain::error::write_atomic(&args.json, &bytes) {
                eprintln!("bench: {e}");
                return std::process::ExitCode::FAILURE;
            }
            println!("\nwrote {}", args.json.display());
        }
        Err(e) => eprintln!("bench: {e}"),
    }
    if failed.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
