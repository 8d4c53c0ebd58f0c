//! Issue #14, `model.dtype`: trainable weights stay fp32 over a half-precision base, and the
//! config refuses combinations that cannot run. The peak memory of the converting load (at most
//! the converted model + the largest tensor + slack, measured in a child process of the bench
//! binary) is checked by `bench/tests/model_dtype_memory.rs`.

mod common;

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use volttrain::adapter::{AdapterInjector, LoraConfig, LoraInjector, Targets};
use volttrain::amp::Precision;
use volttrain::config::SftConfig;
use volttrain::model::{LoadOptions, ModelDtype, load_model};
use volttrain::optim::Optimizer;
use volttrain::trainer::Trainer;

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
