//! Training-step workloads: LoRA SFT and full fine-tuning steps of a SmolLM2-135M-shaped Llama
//! (hidden 576, 9 heads / 3 kv heads, intermediate 1536, vocab 49152, tied embeddings), batch
//! 4 x 256, fp32, AdamW, against transformers (+ peft) on the very same weights and tokens
//! (`reference/bench_sft.py`), plus QLoRA (NF4) and gradient checkpointing, whose peak memory
//! is measured in child processes (peak RSS, `VmHWM`).
//!
//! Each VoltTrain configuration runs in its own process (`volttrain-bench --child-sft MODE`), so
//! peak memory is that configuration's alone.
//!
//! The children train with `keep_freed_memory(true)`, as the CLI does (a library host's trainer
//! leaves malloc alone unless asked); setting
//! `VOLTTRAIN_BENCH_KEEP_FREED_MEMORY=0` in the bench's environment runs them with it off, to
//! measure what that setting costs in peak memory and buys in speed.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use volttrain::callback::{Callback, Control, StepMetrics};
use volttrain::data::Batch;
use volttrain::error::{Error, Result};
use volttrain::model::{CausalLm, LoadOptions, load_model};
use volttrain::optim::{AdamW, AdamWConfig, Optimizer, ParamGroup};
use volttrain::quant::{QuantConfig, QuantType};
use volttrain::trainer::{BatchSource, Trainer};

use crate::{Measurement, PerfOpts, Stats, run_json, run_reference};

const BATCH: i64 = 4;
const SEQ: i64 = 256;
const VOCAB: i64 = 49152;

/// Layers of the benchmark model: 30 (the real shape) in full mode, 8 in quick mode.
pub fn layers(quick: bool) -> usize {
    if quick { 8 } else { 30 }
}

/// Matmul FLOPs per token of one training step: weight matrices of the decoder plus the LM
/// head, 2 FLOPs per multiply-add; forward 2N, input gradients 2N, weight gradients 2N (full
/// fine-tuning only). Attention score products are left out (a lower bound).
pub fn flop_per_token(layers: usize, full: bool) -> f64 {
    let (h, kv, i) = (576.0, 192.0, 1536.0);
    let per_layer = h * h + 2.0 * h * kv + h * h + 3.0 * h * i;
    let n = layers as f64 * per_layer + VOCAB as f64 * h;
    if full { 6.0 * n } else { 4.0 * n }
}

/// The same tokens as `bench_sft.py`'s `torch.randint(0, vocab, (b, t),
/// generator=torch.Generator().manual_seed(1))`: read back from the reference's file.
/// One batch served forever (the bench workloads train on it, `dpo` and `qlora` too).
pub(crate) struct Repeat(pub(crate) Batch);
impl BatchSource for Repeat {
    fn num_batches(&self, _: usize) -> usize {
        usize::MAX / 2
    }
    fn batch(&mut self, _: usize, _: usize) -> Result<Batch> {
        Ok(Batch {
            input_ids: self.0.input_ids.shallow_clone(),
            attention_mask: self.0.attention_mask.shallow_clone(),
            position_ids: None,
            labels: self.0.labels.shallow_clone(),
            num_tokens: self.0.num_tokens,
            num_label_tokens: self.0.num_label_tokens,
        })
    }
}

/// Records the time of each step end (the bench workloads' step timer).
pub(crate) struct Clock(pub(crate) Arc<Mutex<Vec<Instant>>>);
impl Callback for Clock {
    fn on_step_end(&mut self, _: &mut Control<'_>, _: &StepMetrics) -> Result<()> {
        if let Ok(mut v) = self.0.lock() {
            v.push(Instant::now());
        }
        Ok(())
    }
}

/// Peak resident set of this process in MiB (the key says MB; NaN when unreadable).
fn peak_rss_mb() -> f64 {
    crate::rss::peak_rss_bytes().map_or(f64::NAN, |b| b as f64 / (1024.0 * 1024.0))
}

/// One configuration, in this process: prints step seconds and peak RSS as JSON.
/// `mode`: `lora`, `full`, `qlora_nf4`, `lora_ckpt`, `qlora_nf4_ckpt`.
pub fn child(mode: &str, model_dir: &Path, opts: &PerfOpts) -> Result<serde_json::Value> {
    let quant = mode.starts_with("qlora");
    let mut load = LoadOptions::new(Kind::Float, opts.device);
    if quant {
        let q = QuantConfig {
            double_quant: true,
            ..QuantConfig::new(QuantType::Nf4)
        };
        load = load.with_quantizer(q.quantizer()?);
    }
    let mut model: Box<dyn CausalLm> = load_model(model_dir, &load)?;
    if mode != "full" {
        crate::inject_bench_lora(model.as_mut())?;
    }
    let params = crate::trainable_named(model.as_ref());
    let group = ParamGroup::new("all", params, 1e-4, 1.0, 0.01);
    let opt = AdamW::new(vec![group], AdamWConfig::default())?;
    let toks = Tensor::read_safetensors(model_dir.join("batch.safetensors"))
        .map_err(|e| Error::invalid(format!("benchmark batch: {e}")))?;
    let ids = toks
        .into_iter()
        .find(|(n, _)| n == "input_ids")
        .map(|(_, t)| t)
        .ok_or_else(|| Error::invalid("benchmark batch has no input_ids"))?;
    // the reference's batch shape (BATCH x SEQ here; the family benchmark writes its own)
    let (b, t) = match ids.size().as_slice() {
        [b, t] => (*b, *t),
        s => {
            return Err(Error::invalid(format!(
                "benchmark batch: input_ids is {s:?}"
            )));
        }
    };
    let batch = Batch {
        attention_mask: Tensor::ones([b, t], (Kind::Int64, Device::Cpu)),
        labels: ids.shallow_clone(),
        input_ids: ids,
        position_ids: None,
        num_tokens: (b * t) as usize,
        num_label_tokens: (b * t) as usize,
    };
    let times = Arc::new(Mutex::new(vec![Instant::now()]));
    let steps = (opts.warmup + opts.runs) as u64;
    let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let mut t = Trainer::builder()
        .model(model)
        .train_data(Box::new(Repeat(batch)))
        .optimizer(Box::new(opt))
        .base_lr(1e-4)
        .device(opts.device)
        .max_steps(Some(steps))
        .gradient_checkpointing(mode.ends_with("ckpt"))
        .keep_freed_memory(std::env::var("VOLTTRAIN_BENCH_KEEP_FREED_MEMORY").as_deref() != Ok("0"))
        .output_dir(dir.path())
        .checkpoint_every(Some(u64::MAX))
        .callback(Box::new(Clock(times.clone())))
        .build()?;
    t.fit()?;
    let v = times
        .lock()
        .map_err(|_| Error::invalid("clock poisoned"))?
        .clone();
    let secs: Vec<f64> = v
        .windows(2)
        .skip(opts.warmup)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    Ok(serde_json::json!({"step_seconds": secs, "peak_rss_mb": peak_rss_mb()}))
}

fn spawn_child(mode: &str, dir: &Path, opts: &PerfOpts) -> Result<(Stats, f64)> {
    spawn_child_env(mode, dir, opts, &[])
}

/// [`spawn_child`] with extra environment variables for the child.
fn spawn_child_env(
    mode: &str,
    dir: &Path,
    opts: &PerfOpts,
    env: &[(&str, &str)],
) -> Result<(Stats, f64)> {
    parse(&child_report(mode, dir, opts, env)?)
}

/// Runs one child configuration on `dir`'s model and batch and returns its raw report
/// (`step_seconds`, `peak_rss_mb`).
pub(crate) fn spawn_child_json(
    mode: &str,
    dir: &Path,
    opts: &PerfOpts,
) -> Result<serde_json::Value> {
    child_report(mode, dir, opts, &[])
}

/// `volttrain-bench --child-sft MODE --child-model DIR` with `env` added, and its JSON report.
fn child_report(
    mode: &str,
    dir: &Path,
    opts: &PerfOpts,
    env: &[(&str, &str)],
) -> Result<serde_json::Value> {
    let exe = std::env::current_exe().map_err(|e| Error::invalid(format!("current_exe: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.envs(env.iter().copied());
    cmd.args(["--child-sft", mode, "--child-model"])
        .arg(dir)
        .args(["--threads", &opts.threads.to_string()]);
    if !opts.quick {
        cmd.arg("--full");
    }
    if opts.device.is_cuda() {
        cmd.arg("--cuda");
    }
    run_json(&mut cmd, &format!("sft child {mode} on {}", dir.display()))
}

fn parse(v: &serde_json::Value) -> Result<(Stats, f64)> {
    let secs: Vec<f64> = v["step_seconds"]
        .as_array()
        .ok_or_else(|| Error::invalid("no step_seconds"))?
        .iter()
        .filter_map(|x| x.as_f64())
        .collect();
    let tokens = (BATCH * SEQ) as f64;
    Ok((
        Stats::from_samples(&secs)?.inverse(tokens),
        v["peak_rss_mb"].as_f64().unwrap_or(f64::NAN),
    ))
}

/// LoRA and full fine-tuning steps against transformers (+ peft); QLoRA and gradient
/// checkpointing against VoltTrain's own fp32 LoRA step.
pub fn run(opts: &PerfOpts) -> Result<Vec<Measurement>> {
    let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let l = layers(opts.quick);
    let common = |mode: &str, write: bool| {
        let mut a = vec![
            "--mode".to_string(),
            mode.to_string(),
            "--model-dir".into(),
            dir.path().display().to_string(),
            "--layers".into(),
            l.to_string(),
            "--warmup".into(),
            opts.warmup.to_string(),
            "--runs".into(),
            opts.runs.to_string(),
            "--threads".into(),
            opts.threads.to_string(),
        ];
        if write {
            a.push("--write-model".into());
        }
        a
    };
    let ref_lora = parse(&run_reference(opts, "bench_sft.py", &common("lora", true))?)?;
    let ours_lora = spawn_child("lora", dir.path(), opts)?;
    let ref_full = parse(&run_reference(
        opts,
        "bench_sft.py",
        &common("full", false),
    )?)?;
    let ours_full = spawn_child("full", dir.path(), opts)?;
    // the same LoRA step with the fused CPU ops off: what they buy, measured in the same run
    let composite = spawn_child_env(
        "lora",
        dir.path(),
        opts,
        &[("VOLTTRAIN_FUSED_KERNELS", "0")],
    )?;
    let qlora = spawn_child("qlora_nf4", dir.path(), opts)?;
    let ckpt = spawn_child("lora_ckpt", dir.path(), opts)?;
    let qlora_ckpt = spawn_child("qlora_nf4_ckpt", dir.path(), opts)?;
    let shape = format!("SmolLM2-135M shape with {l} layers, batch {BATCH}x{SEQ}, fp32, AdamW");
    let mem = Stats::single;
    let mut rows = vec![
        Measurement {
            workload: "lora_sft_step".into(),
            metric: "tokens/s".into(),
            volttrain: ours_lora.0,
            reference: Some(ref_lora.0),
            reference_name: "transformers + peft".into(),
            higher_is_better: true,
            note: format!(
                "{shape}, LoRA r16 on 7 projections; flop_per_token={} peak RSS MB: volttrain {:.0} reference {:.0}",
                flop_per_token(l, false),
                ours_lora.1,
                ref_lora.1
            ),
        },
        Measurement {
            workload: "full_ft_step".into(),
            metric: "tokens/s".into(),
            volttrain: ours_full.0,
            reference: Some(ref_full.0),
            reference_name: "transformers".into(),
            higher_is_better: true,
            note: format!(
                "{shape}; flop_per_token={} peak RSS MB: volttrain {:.0} reference {:.0}",
                flop_per_token(l, true),
                ours_full.1,
                ref_full.1
            ),
        },
        Measurement {
            workload: "lora_step_fused_ops".into(),
            metric: "tokens/s".into(),
            volttrain: ours_lora.0,
            reference: Some(composite.0),
            reference_name: "VoltTrain LoRA, VOLTTRAIN_FUSED_KERNELS=0".into(),
            higher_is_better: true,
            note: format!(
                "fused RMSNorm/SwiGLU/RoPE/LM head + cross-entropy vs the composite libtorch ops; peak RSS MB: fused {:.0} vs composite {:.0}",
                ours_lora.1, composite.1
            ),
        },
        Measurement {
            workload: "qlora_nf4_step".into(),
            metric: "tokens/s".into(),
            volttrain: qlora.0,
            reference: Some(ours_lora.0),
            reference_name: "VoltTrain fp32 LoRA".into(),
            higher_is_better: true,
            note: format!(
                "NF4 + double quant base; peak RSS MB: nf4 {:.0} vs fp32 LoRA {:.0}; with gradient checkpointing {:.0}",
                qlora.1, ours_lora.1, qlora_ckpt.1
            ),
        },
        Measurement {
            workload: "lora_step_grad_ckpt".into(),
            metric: "tokens/s".into(),
            volttrain: ckpt.0,
            reference: Some(ours_lora.0),
            reference_name: "VoltTrain LoRA without checkpointing".into(),
            higher_is_better: true,
            note: format!(
                "peak RSS MB: with checkpointing {:.0} vs without {:.0}",
                ckpt.1, ours_lora.1
            ),
        },
    ];
    rows.push(Measurement {
        workload: "peak_rss_lora_vs_ckpt".into(),
        metric: "MB peak RSS".into(),
        volttrain: mem(ckpt.1),
        reference: Some(mem(ours_lora.1)),
        reference_name: "LoRA without checkpointing".into(),
        higher_is_better: false,
        note: "gradient checkpointing: peak resident memory of the whole process".into(),
    });
    rows.push(Measurement {
        workload: "peak_rss_qlora_vs_lora".into(),
        metric: "MB peak RSS".into(),
        volttrain: mem(qlora_ckpt.1),
        reference: Some(mem(ours_lora.1)),
        reference_name: "fp32 LoRA (no checkpointing)".into(),
        higher_is_better: false,
        note: "NF4 base with gradient checkpointing vs fp32 base".into(),
    });
    Ok(rows)
}
