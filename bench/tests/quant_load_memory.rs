//! Issue #6: quantizing while loading keeps peak anonymous memory at about the quantized size plus
//! the largest single tensor, not the full fp32 model. Each load runs in a child process (the
//! bench binary's `--child-load`) that samples its own `RssAnon`.

#![cfg(target_os = "linux")]

use std::path::Path;

use tch::Kind;
use volttrain_bench::load::{
    CheckpointShape, LoadMode, LoadRun, SLACK_BYTES, file_sizes, measure, write_checkpoint,
};

/// Small enough to be fast, shaped so that the fp32 model (about 60 MiB) is more than twice the
/// bound (9 to 16 MiB held + 1 MiB largest tensor + 2 to 6 MiB quantizer workspace + slack): a
/// loader that held the file's tensors in fp32, or converted the whole model before quantizing,
/// fails.
const SHAPE: CheckpointShape = CheckpointShape {
    hidden: 256,
    layers: 16,
    intermediate: 1024,
    heads: 4,
    kv_heads: 2,
    vocab: 512,
};

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_volttrain-bench"))
}

fn check(kind: Kind, format: &str) {
    let tmp = tempfile::tempdir().unwrap();
    write_checkpoint(tmp.path(), &SHAPE, kind).unwrap();
    let sizes = file_sizes(tmp.path()).unwrap();
    let run = |mode| LoadRun {
        mode,
        format: format.to_string(),
        loader_threads: 1,
    };
    let r = measure(exe(), tmp.path(), &run(LoadMode::QuantizeWhileLoading), 1).unwrap();
    let bound = r.bound(&sizes);
    // the bound only means something if it is well below the fp32 model
    assert!(
        2 * bound < sizes.fp32_bytes,
        "test shape too small: bound {bound} vs fp32 {}",
        sizes.fp32_bytes
    );
    // the model really was quantized: it holds less than a third of fp32 (int8/fp8: ~1/4,
    // nf4: ~1/8, on the quantized linears; the embedding stays fp32)
    assert!(
        3 * r.held < sizes.fp32_bytes,
        "{format}: held {} of fp32 {}",
        r.held,
        sizes.fp32_bytes
    );
    let peak = r.peak_above_baseline();
    assert!(
        peak <= bound,
        "{format} from {kind:?}: peak {peak} above baseline > held {} + largest {} ({}) + workspace {} + slack {SLACK_BYTES}",
        r.held,
        sizes.largest_fp32_bytes,
        sizes.largest_name,
        r.workspace
    );
    // the workspace term is the quantizer's, not a second model: a few times the largest tensor
    assert!(
        r.workspace <= 8 * sizes.largest_fp32_bytes,
        "{format}: quantizer workspace {} vs largest tensor {}",
        r.workspace,
        sizes.largest_fp32_bytes
    );
    // the measurement sees memory: the kept model is in the peak
    assert!(
        peak >= r.held,
        "{format}: peak {peak} < held {}: the sampler missed the load",
        r.held
    );
    // and it can fail: loading fp32 then quantizing exceeds the same bound
    let c = measure(exe(), tmp.path(), &run(LoadMode::Fp32ThenQuantize), 1).unwrap();
    assert!(
        c.peak_above_baseline() > bound,
        "{format}: fp32-then-quantize peak {} within bound {bound}",
        c.peak_above_baseline()
    );
    assert!(c.peak_above_baseline() >= sizes.fp32_bytes * 9 / 10);
}

#[test]
fn nf4_load_from_bf16_stays_within_quantized_plus_largest_tensor() {
    check(Kind::BFloat16, "nf4");
}

#[test]
fn nf4_load_from_fp32_stays_within_quantized_plus_largest_tensor() {
    check(Kind::Float, "nf4");
}

#[test]
fn int8_and_fp8_loads_stay_within_quantized_plus_largest_tensor() {
    check(Kind::BFloat16, "int8");
    check(Kind::BFloat16, "fp8_e4m3");
}

#[test]
fn child_load_argument_round_trips_and_rejects_bad_input() {
    let r = LoadRun {
        mode: LoadMode::Fp32ThenQuantize,
        format: "int8".into(),
        loader_threads: 3,
    };
    assert_eq!(LoadRun::parse(&r.to_arg()).unwrap(), r);
    for bad in [
        "",
        "quantize",
        "quantize,nf4",
        "quantize,nf9,1",
        "x,nf4,1",
        "quantize,nf4,0",
    ] {
        assert!(LoadRun::parse(bad).is_err(), "{bad} accepted");
    }
}
