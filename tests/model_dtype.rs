//! Issue #14, `model.dtype`: the frozen base is converted tensor by tensor while loading (peak
//! memory at most the converted model + the largest tensor + slack, measured in a child process
//! like tests/quant_load_memory.rs), trainable weights stay fp32 over a half-precision base, and
//! the config refuses combinations that cannot run.

mod common;

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use volttrain::adapter::{AdapterInjector, LoraConfig, LoraInjector, Targets};
use volttrain::amp::Precision;
use volttrain::config::SftConfig;
use volttrain::model::{LoadOptions, ModelDtype, load_model};
use volttrain::optim::Optimizer;
use volttrain::perf::load::{
    CheckpointShape, LoadMode, LoadRun, SLACK_BYTES, file_sizes, measure, write_checkpoint,
};
use volttrain::trainer::Trainer;

/// Same shape as tests/quant_load_memory.rs: the fp32 model (about 60 MiB) is well above the
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

fn tiny_llama() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-llama")
}

/// A bf16 base with LoRA and a `modules_to_save` norm: the base stays bf16 and frozen, the
/// adapter and the saved module are fp32 and get fp32 gradients from a bf16 autocast step, and
/// the base does not move.
fn half_base_trains_fp32_adapter(device: Device, kind: Kind, precision: Precision) {
    let _rng = common::GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let mut m = load_model(tiny_llama(), &LoadOptions::new(kind, device)).unwrap();
    assert_eq!(m.kind(), kind);
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target: Targets::Preset("llama".into()),
        modules_to_save: vec!["model.norm".into()],
        ..Default::default()
    };
    let trainable = LoraInjector::new(cfg).inject(m.as_mut()).unwrap();
    assert!(trainable.iter().any(|(n, _)| n == "model.norm.weight"));
    for (n, t) in &trainable {
        assert_eq!(t.kind(), Kind::Float, "{n} is trainable and must be fp32");
        assert_eq!(t.device(), device);
    }
    let frozen_before: Vec<(String, Tensor)> = m
        .named_parameters()
        .into_iter()
        .filter(|(_, t)| !t.requires_grad())
        .map(|(n, t)| (n, t.detach().copy()))
        .collect();
    assert!(frozen_before.iter().all(|(_, t)| t.kind() == kind));
    let opt = Box::new(
        common::Sgd::new(
            common::one_group(m.as_ref(), 0.05),
            common::SgdConfig { momentum: 0.0 },
        )
        .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::builder()
        .model(m)
        .train_data(Box::new(common::VecSource::random(2, 2, 16, 815, 1)))
        .optimizer(opt)
        .base_lr(0.05)
        .device(device)
        .precision(precision)
        .epochs(1)
        .output_dir(dir.path())
        .build()
        .unwrap();
    let s = t.fit().unwrap();
    assert!(s.final_train_loss.unwrap().is_finite());
    let after: std::collections::HashMap<String, Tensor> =
        t.model().named_parameters().into_iter().collect();
    for (n, b) in &frozen_before {
        assert!(after[n].equal(b), "frozen {n} changed");
    }
    for (n, p) in &trainable {
        assert_eq!(after[n].kind(), Kind::Float, "{n}");
        let _ = p;
    }
}

#[test]
fn bf16_base_on_cpu_trains_fp32_adapter() {
    half_base_trains_fp32_adapter(Device::Cpu, Kind::BFloat16, Precision::Bf16);
}

fn config(extra: &str) -> volttrain::Result<SftConfig> {
    let text = format!(
        "model: {{path: assets/tiny-llama, device: cpu, dtype: bf16}}\n\
         dataset: {{path: assets/data/train.jsonl}}\n\
         training: {{lr: 0.01{extra}}}\n"
    );
    SftConfig::from_yaml_str(&text, Some(Path::new("job.yaml")), &[])
}

#[test]
fn config_rejects_half_base_without_autocast_or_with_full_fine_tuning() {
    // LoRA (the default section is absent: full fine-tuning) -> refused
    let e = config(", precision: bf16").unwrap_err().to_string();
    assert!(
        e.contains("model.dtype") && e.contains("full fine-tuning"),
        "{e}"
    );
    let with_lora = |extra: &str| {
        let text = format!(
            "model: {{path: assets/tiny-llama, device: cpu, dtype: bf16}}\n\
             lora: {{rank: 4}}\n\
             dataset: {{path: assets/data/train.jsonl}}\n\
             training: {{lr: 0.01{extra}}}\n"
        );
        SftConfig::from_yaml_str(&text, Some(Path::new("job.yaml")), &[])
    };
    // precision auto on the CPU is fp32: a bf16 base has no autocast to run in
    let e = with_lora("").unwrap_err().to_string();
    assert!(
        e.contains("job.yaml") && e.contains("model.dtype") && e.contains("precision"),
        "{e}"
    );
    assert!(with_lora(", precision: bf16").is_ok());
    assert!(with_lora(", precision: fp16").is_ok());
    let e = with_lora(", precision: fp16, loss_scaler: {backoff_factor: 2.0}")
        .unwrap_err()
        .to_string();
    assert!(e.contains("training.loss_scaler.backoff_factor"), "{e}");
    assert_eq!(
        ModelDtype::Auto
            .resolve(Precision::Bf16, Device::Cpu, true)
            .unwrap(),
        Kind::Float,
        "auto keeps fp32 on the CPU"
    );
}

#[test]
fn cuda_half_base_trains_fp32_adapter() {
    if !tch::Cuda::is_available() {
        eprintln!("cuda_half_base_trains_fp32_adapter: skipped, no CUDA device");
        return;
    }
    assert_eq!(
        ModelDtype::Auto
            .resolve(Precision::Bf16, Device::Cuda(0), true)
            .unwrap(),
        Kind::BFloat16,
        "auto: bf16 on CUDA"
    );
    half_base_trains_fp32_adapter(Device::Cuda(0), Kind::BFloat16, Precision::Bf16);
    half_base_trains_fp32_adapter(Device::Cuda(0), Kind::Half, Precision::Fp16);
}
