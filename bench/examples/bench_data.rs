//! Dataset preparation throughput, VoltTrain against `datasets.map` (same tokenizer, template,
//! data and thread budget), measured in one run.
//!
//! ```text
//! cargo run --release -p volttrain-bench --example bench_data -- [--quick] [--threads N] \
//!     [--runs N]
//! ```

use std::path::PathBuf;

use volttrain_bench::{PerfOpts, data};

fn main() -> volttrain::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str, default: usize| -> usize {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let opts = PerfOpts {
        quick: args.iter().any(|a| a == "--quick"),
        threads: value("--threads", 2),
        device: tch::Device::Cpu,
        warmup: 1,
        runs: value("--runs", 3),
        python: std::env::var_os("VOLTTRAIN_PYTHON_REF")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("python3")),
        root: volttrain_bench::repo_root(),
    };
    for m in data::run(&opts)? {
        let r = m.reference.map(|r| r.median).unwrap_or(f64::NAN);
        println!(
            "{:<16} {:<11} volttrain {:>12.3} (min {:.3}, max {:.3})  {} {:>12.3}  speedup {:.2}x  [{}]",
            m.workload,
            m.metric,
            m.volttrain.median,
            m.volttrain.min,
            m.volttrain.max,
            m.reference_name,
            r,
            m.speedup().unwrap_or(f64::NAN),
            m.note
        );
    }
    Ok(())
}
