//! Muon and AdamW step timings against the PyTorch references, side by side in one run.
//!
//! `cargo run --release -p volttrain-bench --example bench_optim [-- --full]
//! [--only muon|adamw] [--threads N] [--warmup N] [--runs N]`
//!
//! Quick mode (the default) times Muon over 3 layers of SmolLM2-135M matrices, `--full` over
//! all 30; AdamW always over 30. Needs the reference venv (`$VOLTTRAIN_PYTHON_REF`).

use std::path::PathBuf;

use volttrain_bench::{PerfOpts, optim};

fn arg_value(args: &[String], flag: &str) -> Result<Option<usize>, String> {
    match args.iter().position(|a| a == flag) {
        None => Ok(None),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .map(Some)
            .ok_or_else(|| format!("{flag} needs a number")),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = !args.iter().any(|a| a == "--full");
    let opts = PerfOpts {
        quick,
        threads: arg_value(&args, "--threads")?.unwrap_or(2),
        device: tch::Device::Cpu,
        warmup: arg_value(&args, "--warmup")?.unwrap_or(1),
        runs: arg_value(&args, "--runs")?.unwrap_or(if quick { 3 } else { 5 }),
        python: std::env::var_os("VOLTTRAIN_PYTHON_REF")
            .map(PathBuf::from)
            .unwrap_or_else(|| "python3".into()),
        root: volttrain_bench::repo_root(),
    };
    println!(
        "{:<12} {:>8} {:>12} {:>12} {:>8}  reference / note",
        "workload", "metric", "volttrain", "reference", "ratio"
    );
    let which: Vec<&str> = match args.iter().position(|a| a == "--only") {
        Some(i) => vec![
            args.get(i + 1)
                .map(String::as_str)
                .ok_or("--only needs muon or adamw")?,
        ],
        None => vec!["muon", "adamw"],
    };
    for m in optim::run_only(&opts, &which)? {
        let r = m.reference.map(|r| r.median).unwrap_or(f64::NAN);
        println!(
            "{:<12} {:>8} {:>12.4} {:>12.4} {:>7.2}x  {} / {}",
            m.workload,
            m.metric,
            m.volttrain.median,
            r,
            m.speedup().unwrap_or(f64::NAN),
            m.reference_name,
            m.note
        );
        println!(
            "{:<12} {:>8} min/max volttrain {:.4}/{:.4}, reference {}",
            "",
            "",
            m.volttrain.min,
            m.volttrain.max,
            m.reference
                .map(|r| format!("{:.4}/{:.4}", r.min, r.max))
                .unwrap_or_default()
        );
    }
    println!("ratio = reference median / volttrain median (> 1: VoltTrain faster)");
    Ok(())
}
