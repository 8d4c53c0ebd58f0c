//! Model-load benchmark against transformers, run by hand (it makes a 135M checkpoint):
//! `cargo test --release -p volttrain-bench --test model_bench -- --ignored --nocapture`.
//! It prints the timings and the ratio; speed is not asserted here.

use volttrain_bench::{PerfOpts, model::load_135m};

#[test]
#[ignore = "benchmark: makes a 135M checkpoint and times loads (minutes)"]
fn bench_model_load_135m() {
    let opts = PerfOpts {
        quick: false,
        threads: std::env::var("VOLTTRAIN_BENCH_THREADS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2),
        device: tch::Device::cuda_if_available(),
        warmup: 1,
        runs: 5,
        python: std::env::var("VOLTTRAIN_PYTHON_REF")
            .unwrap_or_else(|_| "python3".into())
            .into(),
        root: volttrain_bench::repo_root(),
    };
    for m in load_135m(&opts).unwrap() {
        let r = m.reference.unwrap();
        println!(
            "{}: volttrain median {:.3} s (min {:.3}, max {:.3}), {} median {:.3} s (min {:.3}, max {:.3}); speed-up {:.2}x; {}",
            m.workload,
            m.volttrain.median,
            m.volttrain.min,
            m.volttrain.max,
            m.reference_name,
            r.median,
            r.min,
            r.max,
            m.speedup().unwrap_or(f64::NAN),
            m.note
        );
    }
}
