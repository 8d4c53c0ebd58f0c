//! The Rust half of the GPU acceptance run (`./dev gpu-check`; `tools/gpu_check.py` drives
//! it through the `volttrain-gpu-check` binary, one process per measurement):
//!
//! - [`write_model`]: a random-weight Llama checkpoint of a [`Shape`] and its token batch;
//! - [`run_steps`]: training steps of one [`Mode`] (bf16 LoRA, NF4 QLoRA with bf16 compute,
//!   bf16 full fine-tuning; fp32 on the CPU for the smoke run) on that checkpoint, reporting
//!   each step's seconds and the peak memory of training;
//! - [`collectives`]: a world-size-1 process group on the rank's device (NCCL on a GPU) through
//!   every collective the trainer uses.
//!
//! Model FLOPs, MFU and the comparison with PyTorch + PEFT are computed by the driver from these
//! raw figures, with one formula for both sides.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use volttrain::adapter::{AdapterInjector, LoraConfig, LoraInjector, Targets};
use volttrain::amp::Precision;
use volttrain::data::Batch;
use volttrain::dist::{DistConfig, DistEnv, ProcessGroup, launch::free_port};
use volttrain::env_report;
use volttrain::error::{Error, Result, TchResultExt};
use volttrain::model::{CausalLm, LoadOptions, load_model};
use volttrain::optim::{AdamW, AdamWConfig, Optimizer, ParamGroup};
use volttrain::quant::{ComputeDtype, QuantConfig, QuantType};
use volttrain::trainer::{C10dCollective, Collective, Trainer};

use crate::qlora::Shape;
use crate::sft::{Clock, Repeat};

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// LoRA r16 (alpha 32) on all seven projections over a bf16 base (fp32 adapters, bf16
    /// autocast: PEFT's layout).
    Lora,
    /// The same LoRA over an NF4 base (block 64, double quantization), bf16 compute.
    Qlora,
    /// Every weight trained, in bf16.
    Full,
}

impl Mode {
    /// `lora`, `qlora`, `full`.
    pub fn parse(s: &str) -> Result<Mode> {
        match s {
            "lora" => Ok(Mode::Lora),
            "qlora" => Ok(Mode::Qlora),
            "full" => Ok(Mode::Full),
            _ => Err(Error::invalid(format!(
                "unknown mode `{s}`: expected lora, qlora or full"
            ))),
        }
    }
}

/// A tiny Llama (2 layers) for the CPU smoke run of the driver.
pub const TINY: Shape = Shape {
    name: "tiny",
    hidden: 64,
    layers: 2,
    heads: 4,
    kv_heads: 2,
    intermediate: 128,
    vocab: 512,
    batch: 2,
    seq: 32,
};

/// The shape named `name` (`llama-3.2-1b`, `tiny`) with the batch `batch x seq`.
pub fn shape(name: &str, batch: i64, seq: i64) -> Result<Shape> {
    let base = match name {
        "llama-3.2-1b" => crate::qlora::LLAMA_32_1B,
        "tiny" => TINY,
        _ => {
            return Err(Error::invalid(format!(
                "unknown shape `{name}`: expected llama-3.2-1b or tiny"
            )));
        }
    };
    if batch < 1 || seq < 2 {
        return Err(Error::invalid(format!(
            "batch {batch} x seq {seq}: need batch >= 1 and seq >= 2"
        )));
    }
    Ok(Shape { batch, seq, ..base })
}

/// Writes a random-weight fp32 checkpoint of `shape` and a random `[batch, seq]` batch to
/// `dir` (the weights PyTorch + PEFT load too).
pub fn write_model(dir: &Path, shape: &Shape) -> Result<()> {
    crate::qlora::write_model(dir, shape, shape.layers)
}

/// Whether peak CUDA memory can be read (the shim's allocator statistics are compiled in).
pub fn cuda_stats_available() -> bool {
    env_report::cuda_memory_stats_available()
}

fn reset_peak(device: Device) {
    if let Device::Cuda(i) = device {
        // a failure shows up as a missing peak
        env_report::reset_cuda_peak(i);
    }
}

/// Peak bytes of the caching allocator on `device` since the last reset (CUDA), or the process's
/// resident high-water mark (CPU); `None` when unavailable.
fn peak_bytes(device: Device) -> Option<u64> {
    match device {
        Device::Cuda(i) => env_report::cuda_peak_allocated(i),
        _ => crate::rss::peak_rss_bytes().ok(),
    }
}

fn read_batch(dir: &Path, shape: &Shape) -> Result<Batch> {
    let ids = Tensor::read_safetensors(dir.join("batch.safetensors"))
        .map_err(|e| Error::invalid(format!("{}: {e}", dir.join("batch.safetensors").display())))?
        .into_iter()
        .find(|(n, _)| n == "input_ids")
        .map(|(_, t)| t)
        .ok_or_else(|| Error::invalid("benchmark batch has no input_ids"))?;
    let (b, t) = (shape.batch, shape.seq);
    if ids.size() != [b, t] {
        return Err(Error::invalid(format!(
            "benchmark batch is {:?}, expected [{b}, {t}]; write the model again",
            ids.size()
        )));
    }
    Ok(Batch {
        attention_mask: Tensor::ones([b, t], (Kind::Int64, Device::Cpu)),
        labels: ids.shallow_clone(),
        input_ids: ids,
        position_ids: None,
        num_tokens: (b * t) as usize,
        num_label_tokens: (b * t) as usize,
    })
}

/// Trains `warmup + steps` steps of `mode` on the checkpoint in `dir` (from [`write_model`]) on
/// `device` and reports `{"step_seconds": [...measured steps], "peak_bytes", "tokens_per_step",
/// "trainable_params", "dtype"}`. On CUDA the base is bf16 with bf16 autocast; on the CPU
/// (smoke run) fp32. The peak covers training only: it is reset once the model is loaded, so
/// it holds the resident weights, adapters, optimizer state and every step's transients.
pub fn run_steps(
    dir: &Path,
    shape: &Shape,
    mode: Mode,
    device: Device,
    warmup: usize,
    steps: usize,
) -> Result<serde_json::Value> {
    let cuda = device.is_cuda();
    let kind = if cuda { Kind::BFloat16 } else { Kind::Float };
    let mut load = LoadOptions::new(kind, device);
    if mode == Mode::Qlora {
        let q = QuantConfig {
            double_quant: true,
            compute_dtype: cuda.then_some(ComputeDtype::Bfloat16),
            ..QuantConfig::new(QuantType::Nf4)
        };
        load = load.with_quantizer(q.quantizer()?);
    }
    let mut model: Box<dyn CausalLm> = load_model(dir, &load)?;
    if mode != Mode::Full {
        crate::inject_bench_lora(model.as_mut())?;
    }
    let params = crate::trainable_named(model.as_ref());
    let trainable: i64 = params.iter().map(|p| p.tensor.numel() as i64).sum();
    let lr = if mode == Mode::Full { 1e-5 } else { 1e-4 };
    let opt = AdamW::new(
        vec![ParamGroup::new("all", params, lr, 1.0, 0.0)],
        AdamWConfig::default(),
    )?;
    let batch = read_batch(dir, shape)?;
    let times = Arc::new(Mutex::new(Vec::new()));
    let out = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let mut trainer = Trainer::builder()
        .model(model)
        .train_data(Box::new(Repeat(batch)))
        .optimizer(Box::new(opt))
        .base_lr(lr)
        .device(device)
        .precision(if cuda {
            Precision::Bf16
        } else {
            Precision::Fp32
        })
        .max_steps(Some((warmup + steps) as u64))
        .output_dir(out.path())
        .checkpoint_every(Some(u64::MAX))
        .callback(Box::new(Clock(times.clone())))
        .build()?;
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    reset_peak(device);
    if let Ok(mut v) = times.lock() {
        v.push(Instant::now());
    }
    let summary = trainer.fit()?;
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    let peak = peak_bytes(device);
    let v = times
        .lock()
        .map_err(|_| Error::invalid("step clock poisoned"))?
        .clone();
    let secs: Vec<f64> = v
        .windows(2)
        .skip(warmup)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    if secs.len() != steps {
        return Err(Error::invalid(format!(
            "measured {} steps, expected {steps}",
            secs.len()
        )));
    }
    Ok(serde_json::json!({
        "step_seconds": secs,
        "peak_bytes": peak,
        "tokens_per_step": shape.batch * shape.seq,
        "trainable_params": trainable,
        "dtype": if cuda { "bf16" } else { "fp32" },
        "final_train_loss": summary.final_train_loss,
    }))
}

/// Runs every collective the trainer uses on a world-size-1 group on `device` (NCCL on a GPU,
/// Gloo on the CPU, by [`volttrain::dist::backend_for`]) and checks each result; returns what
/// ran.
///
/// At world size 1 [`volttrain::dist::GradSync`] and [`volttrain::dist::broadcast_params`] skip
/// their collectives, so the bucket all-reduce (a flat bf16 and a flat fp32 bucket), the broadcast
/// and the barrier are called on the group directly; the scalar collectives (token counts,
/// loss and eval sums, the interrupt flag) go through [`C10dCollective`] as the trainer calls
/// them, and a short training run with the collective and an interrupt flag drives them from
/// the trainer itself.
pub fn collectives(device: Device, model_dir: Option<&Path>) -> Result<serde_json::Value> {
    let env = DistEnv::single(free_port()?);
    let cfg = DistConfig {
        timeout_secs: 120,
        ..DistConfig::default()
    };
    let pg = ProcessGroup::on_device(&env, &cfg, device)?;
    let backend = pg.backend();
    let staging = pg.device();
    let mut ran = Vec::new();
    let close = |got: &[f64], want: &[f64], what: &str| -> Result<()> {
        if got.len() != want.len() || got.iter().zip(want).any(|(a, b)| (a - b).abs() > 1e-6) {
            return Err(Error::Dist(format!("{what}: got {got:?}, want {want:?}")));
        }
        Ok(())
    };
    // Gradient buckets: flat tensors of each dtype on the gradients' device.
    for kind in [Kind::BFloat16, Kind::Float] {
        let x = Tensor::f_arange(1024, (Kind::Float, device))
            .and_then(|t| t.f_to_kind(kind))
            .ctx("bucket")?;
        let mut t = [x.copy()];
        pg.all_reduce_sum(&mut t)?;
        let diff = (&t[0] - &x)
            .f_abs()
            .and_then(|d| d.f_max())
            .and_then(|d| d.f_to_device(Device::Cpu))
            .ctx("bucket check")?
            .double_value(&[]);
        close(&[diff], &[0.0], &format!("{kind:?} bucket all-reduce"))?;
        ran.push(format!("all_reduce {kind:?} gradient bucket on {device:?}"));
    }
    let mut p = [Tensor::f_ones([64], (Kind::BFloat16, device)).ctx("param")?];
    pg.broadcast(&mut p, 0)?;
    ran.push(format!("broadcast parameters on {device:?}"));
    pg.barrier()?;
    ran.push("barrier".into());
    let mut coll = C10dCollective::new(pg, 25.0);
    // token counts, loss sums, eval sums, the interrupt flag: the trainer's f64 all-reduces
    for (what, v) in [
        ("token counts", vec![4096.0, 4000.0]),
        ("loss sum", vec![2.5]),
        ("eval sums", vec![10.0, 3.0, 1.0]),
        ("interrupt flag", vec![0.0]),
    ] {
        let got = coll.all_reduce_f64(&v)?;
        close(&got, &v, what)?;
        ran.push(format!("all_reduce_f64 {what} staged on {staging:?}"));
    }
    let mut trained = None;
    if let Some(dir) = model_dir {
        let shape = TINY;
        let mut model = load_model(dir, &LoadOptions::new(Kind::Float, device))?;
        model.freeze_base();
        LoraInjector::new(LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target: Targets::Preset("llama".into()),
            ..LoraConfig::default()
        })
        .inject(model.as_mut())?;
        let params = crate::trainable_named(model.as_ref());
        let opt = AdamW::new(
            vec![ParamGroup::new("all", params, 1e-3, 1.0, 0.0)],
            AdamWConfig::default(),
        )?;
        let out = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
        let mut trainer = Trainer::builder()
            .model(model)
            .train_data(Box::new(Repeat(read_batch(dir, &shape)?)))
            .optimizer(Box::new(opt))
            .base_lr(1e-3)
            .device(device)
            .precision(Precision::Fp32)
            .max_steps(Some(3))
            .output_dir(out.path())
            .checkpoint_every(Some(u64::MAX))
            .collective(Box::new(coll) as Box<dyn Collective>)
            .interrupt_flag(Arc::new(AtomicBool::new(false)))
            .build()?;
        let s = trainer.fit()?;
        ran.push(format!(
            "trainer fit, 3 steps with the collective ({} steps done)",
            s.steps
        ));
        trained = Some(s.steps);
    }
    Ok(serde_json::json!({
        "backend": backend.name(),
        "device": format!("{device:?}"),
        "staging_device": format!("{staging:?}"),
        "world_size": 1,
        "ran": ran,
        "trainer_steps": trained,
    }))
}
