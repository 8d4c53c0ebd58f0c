//! Issue #14, `model.dtype`: the frozen base is converted tensor by tensor while loading, so the
//! peak memory of the load is at most the converted model + the largest tensor + slack. Each
//! load runs in a child process (the bench binary's `--child-load`), like
//! `quant_load_memory.rs`; the training side of `model.dtype` is tested by the library's
//! `tests/model_dtype.rs`.

use std::path::Path;

use tch::Kind;
use volttrain_bench::load::{
    CheckpointShape, LoadMode, LoadRun, SLACK_BYTES, file_sizes, measure, write_checkpoint,
};

/// Same shape as quant_load_memory.rs: the fp32 model (about 60 MiB) is well above the
/// bf16 bound (about 30 MiB held + 1 MiB largest tensor + 8 MiB slack).
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

#[cfg(target_os = "linux")]
#[test]
fn bf16_base_loads_within_converted_size_plus_largest_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    write_checkpoint(tmp.path(), &SHAPE, Kind::Float).unwrap();
    let sizes = file_sizes(tmp.path()).unwrap();
    let run = |mode| LoadRun {
        mode,
        format: "bf16".into(),
        loader_threads: 1,
    };
    let r = measure(exe(), tmp.path(), &run(LoadMode::Convert), 1).unwrap();
    // the model really is bf16: half the fp32 bytes (every tensor converted)
    assert_eq!(
        2 * r.held,
        sizes.fp32_bytes,
        "held {} vs fp32 {}",
        r.held,
        sizes.fp32_bytes
    );
    let bound = r.held + sizes.largest_fp32_bytes + SLACK_BYTES;
    assert!(
        2 * bound < 3 * sizes.fp32_bytes / 2,
        "shape too small for the bound to mean anything"
    );
    let peak = r.peak_above_baseline();
    eprintln!(
        "bf16 load: peak {:.1} MiB above baseline, bound {:.1} MiB (held {:.1} + largest {:.1} ({}) + slack {:.0}); fp32 model {:.1} MiB",
        peak as f64 / 1048576.0,
        bound as f64 / 1048576.0,
        r.held as f64 / 1048576.0,
        sizes.largest_fp32_bytes as f64 / 1048576.0,
        sizes.largest_name,
        SLACK_BYTES as f64 / 1048576.0,
        sizes.fp32_bytes as f64 / 1048576.0,
    );
    assert!(
        peak >= r.held,
        "the sampler missed the load: {peak} < {}",
        r.held
    );
    assert!(peak <= bound, "peak {peak} > bound {bound}");
    // and the bound can fail: loading fp32 and converting afterwards exceeds it
    let c = measure(exe(), tmp.path(), &run(LoadMode::Fp32ThenConvert), 1).unwrap();
    assert_eq!(c.held, r.held);
    assert!(
        c.peak_above_baseline() > bound,
        "fp32-then-convert peak {} within bound {bound}",
        c.peak_above_baseline()
    );
    assert!(c.peak_above_baseline() >= sizes.fp32_bytes * 9 / 10);
}

#[test]
fn convert_mode_argument_round_trips() {
    let r = LoadRun {
        mode: LoadMode::Convert,
        format: "fp16".into(),
        loader_threads: 2,
    };
    assert_eq!(LoadRun::parse(&r.to_arg()).unwrap(), r);
    assert!(LoadRun::parse("convert,nf4,1").is_err());
    assert!(LoadRun::parse("fp32-then-convert,bf16,1").is_ok());
}
