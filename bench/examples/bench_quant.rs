//! Quantization benchmark: bytes per parameter of SmolLM2-135M's linear weights in each format
//! and CPU dequantization GB/s against a memory copy, next to bitsandbytes / torch in the same
//! run.
//!
//! `cargo run --release -p volttrain-bench --example bench_quant [-- --full] [--threads N]`

use volttrain_bench::{PerfOpts, quant};

fn main() -> volttrain::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--full");
    let threads = args
        .iter()
        .position(|a| a == "--threads")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
    tch::set_num_threads(threads as i32);
    let opts = PerfOpts {
        quick: !full,
        threads,
        device: tch::Device::Cpu,
        warmup: 1,
        runs: if full { 7 } else { 3 },
        python: std::env::var("VOLTTRAIN_PYTHON_REF")
            .unwrap_or_else(|_| "python3".into())
            .into(),
        root: volttrain_bench::repo_root(),
    };
    let rows = quant::run(&opts)?;
    println!(
        "| workload | metric | VoltTrain median [min, max] | reference | reference median | VoltTrain / reference |"
    );
    println!("|---|---|---|---|---|---|");
    for m in &rows {
        let r = m
            .reference
            .map(|r| format!("{:.4}", r.median))
            .unwrap_or_else(|| "-".into());
        let ratio = m
            .reference
            .map(|r| format!("{:.2}", m.volttrain.median / r.median))
            .unwrap_or_else(|| "-".into());
        println!(
            "| {} | {} | {:.4} [{:.4}, {:.4}] | {} | {} | {} |",
            m.workload,
            m.metric,
            m.volttrain.median,
            m.volttrain.min,
            m.volttrain.max,
            m.reference_name,
            r,
            ratio
        );
    }
    for m in &rows {
        if !m.note.is_empty() {
            println!("  {}: {}", m.workload, m.note);
        }
    }
    Ok(())
}
