//! Criterion benches of quantize / dequantize for each format on a SmolLM2-135M MLP weight
//! `[1536, 576]`, with a plain `copy_` of the same fp32 output size as the bound.
//!
//! `cargo bench -p volttrain-bench --bench quant`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tch::{Device, Kind, Tensor};
use volttrain_bench::quant::formats;

fn bench(c: &mut Criterion) {
    let (rows, cols) = (1536i64, 576i64);
    tch::manual_seed(0);
    let w = Tensor::randn([rows, cols], (Kind::Float, Device::Cpu)) * 0.02;
    let out_bytes = (rows * cols * 4) as u64;

    let mut g = c.benchmark_group("dequantize");
    g.throughput(Throughput::Bytes(out_bytes));
    let src = Tensor::randn([rows, cols], (Kind::Float, Device::Cpu));
    let mut dst = Tensor::empty([rows, cols], (Kind::Float, Device::Cpu));
    g.bench_function("copy_bound", |b| {
        b.iter(|| dst.f_copy_(black_box(&src)).is_ok())
    });
    for (name, cfg) in formats() {
        let Ok(q) = cfg.quantizer() else { continue };
        let Ok(t) = q.quantize(&w) else { continue };
        g.bench_function(name, |b| {
            b.iter(|| black_box(t.dequantize(Kind::Float).ok()))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("quantize");
    g.throughput(Throughput::Bytes(out_bytes));
    for (name, cfg) in formats() {
        let Ok(q) = cfg.quantizer() else { continue };
        g.bench_function(name, |b| b.iter(|| black_box(q.quantize(&w).ok())));
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
