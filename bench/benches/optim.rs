//! Criterion benches of one optimizer step on small SmolLM2-shaped matrices (one layer).
//!
//! For the side-by-side ratios against PyTorch use
//! `cargo run --release -p volttrain-bench --example bench_optim` (`volttrain_bench::optim`),
//! which runs the reference in the same run.

use criterion::{Criterion, criterion_group, criterion_main};
use volttrain::optim::{AdamW, AdamWConfig, Muon, MuonConfig, NsMethod, Optimizer, ParamGroup};
use volttrain_bench::optim::make_params;

fn bench_steps(c: &mut Criterion) {
    tch::set_num_threads(2);
    let device = tch::Device::Cpu;
    let mut group = c.benchmark_group("optim_step_one_layer");
    group.sample_size(10);
    for (name, method) in [
        ("muon", NsMethod::Auto),
        ("muon_iterative", NsMethod::Iterative),
    ] {
        let params = match make_params(1, device, 0) {
            Ok(p) => p,
            Err(e) => panic!("bench setup: {e}"),
        };
        let cfg = MuonConfig {
            ns_method: method,
            ..Default::default()
        };
        let mut muon = match Muon::new(vec![ParamGroup::new("muon", params, 0.02, 1.0, 0.1)], cfg) {
            Ok(m) => m,
            Err(e) => panic!("bench setup: {e}"),
        };
        group.bench_function(name, |b| b.iter(|| muon.step()));
    }
    let params = match make_params(1, device, 0) {
        Ok(p) => p,
        Err(e) => panic!("bench setup: {e}"),
    };
    let mut adamw = match AdamW::new(
        vec![ParamGroup::new("adamw", params, 1e-3, 1.0, 0.01)],
        AdamWConfig::default(),
    ) {
        Ok(a) => a,
        Err(e) => panic!("bench setup: {e}"),
    };
    group.bench_function("adamw", |b| b.iter(|| adamw.step()));
    group.finish();
}

criterion_group!(benches, bench_steps);
criterion_main!(benches);
