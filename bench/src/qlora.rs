//! QLoRA memory and speed: a LoRA step (r16 on all seven projections, AdamW, gradient
//! checkpointing on) over an NF4 base (double quantization, block 64: `model.train_4bit`)
//! against the same step over the fp32 base, in the same run, each configuration in its own
//! process (`volttrain-bench --child-qlora SPEC`), on random weights of two shapes:
//!
//! * `qlora` — SmolLM2-135M (hidden 576, 30 layers, 9/3 heads, intermediate 1536, vocab 49152,
//!   tied), batch 4x256;
//! * `qlora-1b` — Llama-3.2-1B (hidden 2048, 16 layers, 32/8 heads, intermediate 8192, vocab
//!   128256, tied), batch 1x512.
//!
//! Memory is the peak resident set during training above the process baseline: the child reads
//! `VmRSS` once libtorch is initialised (the baseline), loads the model, returns freed heap to the
//! system, resets the kernel's high-water mark (`5` into `/proc/self/clear_refs`), trains, and
//! reads `VmHWM`. The peak thus covers the model, LoRA, optimizer state and every step's
//! transient memory, not the loader's (measured by the `quant-load` workload) nor the mmapped
//! checkpoint.
//!
//! Both children train with `keep_freed_memory(false)`, the setting for runs where memory is the
//! point (the library's `src/malloc.rs`: freed activations go back to the kernel instead of
//! staying resident); `VOLTTRAIN_BENCH_KEEP_FREED_MEMORY=1` in the bench's environment runs both
//! with it on. Speed is tokens/s of the measured steps; the NF4 step dequantizes every base
//! weight twice per product under checkpointing' recompute (forward and backward), so its
//! ratio to the fp32 step is the speed cost of that.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use volttrain::data::Batch;
use volttrain::error::{Error, Result, TchResultExt};
use volttrain::model::{CausalLm, LoadOptions, load_model};
use volttrain::optim::{AdamW, AdamWConfig, Optimizer, ParamGroup};
use volttrain::quant::QuantConfig;
use volttrain::trainer::Trainer;

use crate::sft::{Clock, Repeat};
use crate::{Measurement, PerfOpts, Stats, rss, run_json};

/// Whether the children keep freed memory (`VOLTTRAIN_BENCH_KEEP_FREED_MEMORY=1`; off by default).
fn keep_freed() -> bool {
    std::env::var("VOLTTRAIN_BENCH_KEEP_FREED_MEMORY").as_deref() == Ok("1")
}

/// A Llama shape and its batch.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub name: &'static str,
    pub hidden: i64,
    pub layers: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub intermediate: i64,
    pub vocab: i64,
    pub batch: i64,
    pub seq: i64,
}

/// SmolLM2-135M, batch 4x256.
pub const SMOLLM2_135M: Shape = Shape {
    name: "smollm2-135m",
    hidden: 576,
    layers: 30,
    heads: 9,
    kv_heads: 3,
    intermediate: 1536,
    vocab: 49152,
    batch: 4,
    seq: 256,
};

/// Llama-3.2-1B, batch 1x512.
pub const LLAMA_32_1B: Shape = Shape {
    name: "llama-3.2-1b",
    hidden: 2048,
    layers: 16,
    heads: 32,
    kv_heads: 8,
    intermediate: 8192,
    vocab: 128256,
    batch: 1,
    seq: 512,
};

fn shape_by_name(name: &str) -> Result<Shape> {
    [SMOLLM2_135M, LLAMA_32_1B]
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| Error::invalid(format!("unknown qlora bench shape `{name}`")))
}

/// The `config.json` of `shape` with `layers` layers.
fn hf_config(shape: &Shape, layers: i64) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "num_hidden_layers": layers,
        "vocab_size": shape.vocab,
        "tie_word_embeddings": true,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 4096,
        "torch_dtype": "float32",
    })
}

/// Writes a random-weight fp32 checkpoint of `shape` (`layers` layers) to `dir`, one tensor at
/// a time (memory: the largest tensor), and a random `[batch, seq]` token batch.
pub fn write_model(dir: &Path, shape: &Shape, layers: i64) -> Result<()> {
    let cfg_json = hf_config(shape, layers);
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, cfg_json.to_string()).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg = volttrain::model::llama::config(&cfg_path, &cfg_json)?;
    let tensors = volttrain::model::llama::expected_tensors(&cfg);
    // safetensors: u64 header length, JSON header, then the data in header order
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in &tensors {
        let bytes = 4 * shape.iter().product::<i64>() as usize;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut head = serde_json::Value::Object(header).to_string().into_bytes();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let path = dir.join("model.safetensors");
    let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
    let mut w = std::io::BufWriter::new(file);
    let io = |e| Error::io(&path, e);
    w.write_all(&(head.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&head).map_err(io)?;
    tch::manual_seed(0);
    for (name, shape) in &tensors {
        let t = if shape.len() == 1 {
            Tensor::f_ones(shape.as_slice(), (Kind::Float, Device::Cpu))
        } else {
            Tensor::f_randn(shape.as_slice(), (Kind::Float, Device::Cpu))
                .and_then(|t| t.f_mul_scalar(0.02))
        }
        .ctx(format!("random {name}"))?;
        let v: Vec<f32> = t
            .f_view([-1])
            .and_then(Vec::<f32>::try_from)
            .ctx("to vec")?;
        drop(t);
        let mut buf = Vec::with_capacity(v.len() * 4);
        for x in &v {
            buf.extend_from_slice(&x.to_le_bytes());
        }
        drop(v);
        w.write_all(&buf).map_err(io)?;
    }
    w.flush().map_err(io)?;
    tch::manual_seed(1);
    let ids = Tensor::f_randint(
        shape.vocab,
        [shape.batch, shape.seq],
        (Kind::Int64, Device::Cpu),
    )
    .ctx("random tokens")?;
    let bpath = dir.join("batch.safetensors");
    Tensor::write_safetensors(&[("input_ids", ids)], &bpath)
        .map_err(|e| Error::invalid(format!("{}: {e}", bpath.display())))
}

/// The child spec: `SHAPE,MODE,LAYERS,WARMUP,RUNS` with MODE `lora` (fp32 base) or `nf4`.
struct Spec {
    shape: Shape,
    nf4: bool,
    warmup: usize,
    runs: usize,
}

fn parse_spec(spec: &str) -> Result<Spec> {
    let bad = || {
        Error::invalid(format!(
            "qlora child spec `{spec}`: expected SHAPE,lora|nf4,WARMUP,RUNS"
        ))
    };
    let p: Vec<&str> = spec.split(',').collect();
    if p.len() != 4 {
        return Err(bad());
    }
    Ok(Spec {
        shape: shape_by_name(p[0])?,
        nf4: match p[1] {
            "nf4" => true,
            "lora" => false,
            _ => return Err(bad()),
        },
        warmup: p[2].parse().map_err(|_| bad())?,
        runs: p[3].parse().map_err(|_| bad())?,
    })
}

/// One configuration in this process (a fresh one: the bench's `--child-qlora`); prints step
/// seconds, the baseline and the training peak as JSON.
pub fn child(spec: &str, model_dir: &Path, opts: &PerfOpts) -> Result<serde_json::Value> {
    let spec = parse_spec(spec)?;
    // initialise libtorch (allocator, intra-op pool) before the baseline
    {
        let a = Tensor::f_randn([256, 256], (Kind::Float, opts.device)).ctx("warm-up")?;
        let _ = a.f_matmul(&a).ctx("warm-up")?;
    }
    let baseline = rss::rss_bytes()?;
    let mut load = LoadOptions::new(Kind::Float, opts.device);
    if spec.nf4 {
        let q = QuantConfig::from_legacy(true, false)?
            .ok_or_else(|| Error::invalid("train_4bit gave no quantization"))?;
        load = load.with_quantizer(q.quantizer()?);
    }
    let mut model: Box<dyn CausalLm> = load_model(model_dir, &load)?;
    crate::inject_bench_lora(model.as_mut())?;
    let params = crate::trainable_named(model.as_ref());
    let group = ParamGroup::new("all", params, 1e-4, 1.0, 0.01);
    let opt = AdamW::new(vec![group], AdamWConfig::default())?;
    let ids = Tensor::read_safetensors(model_dir.join("batch.safetensors"))
        .map_err(|e| Error::invalid(format!("benchmark batch: {e}")))?
        .into_iter()
        .find(|(n, _)| n == "input_ids")
        .map(|(_, t)| t)
        .ok_or_else(|| Error::invalid("benchmark batch has no input_ids"))?;
    let (b, t) = (spec.shape.batch, spec.shape.seq);
    let batch = Batch {
        attention_mask: Tensor::ones([b, t], (Kind::Int64, Device::Cpu)),
        labels: ids.shallow_clone(),
        input_ids: ids,
        position_ids: None,
        num_tokens: (b * t) as usize,
        num_label_tokens: (b * t) as usize,
    };
    let times = Arc::new(Mutex::new(Vec::new()));
    let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let mut trainer = Trainer::builder()
        .model(model)
        .train_data(Box::new(Repeat(batch)))
        .optimizer(Box::new(opt))
        .base_lr(1e-4)
        .device(opts.device)
        .max_steps(Some((spec.warmup + spec.runs) as u64))
        .gradient_checkpointing(true)
        .keep_freed_memory(keep_freed())
        .output_dir(dir.path())
        .checkpoint_every(Some(u64::MAX))
        .callback(Box::new(Clock(times.clone())))
        .build()?;
    // the peak of training alone: the loader's transient memory is returned and the kernel's
    // high-water mark restarts from what is resident now (model, LoRA, trainer)
    rss::release_freed_memory();
    rss::reset_peak()?;
    let start_rss = rss::rss_bytes()?;
    if let Ok(mut v) = times.lock() {
        v.push(Instant::now());
    }
    trainer.fit()?;
    let peak = rss::peak_rss_bytes()?;
    let v = times
        .lock()
        .map_err(|_| Error::invalid("clock poisoned"))?
        .clone();
    let secs: Vec<f64> = v
        .windows(2)
        .skip(spec.warmup)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    Ok(serde_json::json!({
        "step_seconds": secs,
        "baseline_bytes": baseline,
        "start_bytes": start_rss,
        "peak_bytes": peak,
    }))
}

/// What one child measured.
struct ChildResult {
    tokens_per_s: Stats,
    /// Training peak above the baseline, MiB.
    peak_mib: f64,
    /// Resident at the start of training above the baseline, MiB.
    start_mib: f64,
}

fn spawn(spec: &str, dir: &Path, opts: &PerfOpts, tokens: f64) -> Result<ChildResult> {
    let exe = std::env::current_exe().map_err(|e| Error::invalid(format!("current_exe: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.args(["--child-qlora", spec, "--child-model"])
        .arg(dir)
        .args(["--threads", &opts.threads.to_string()]);
    if opts.device.is_cuda() {
        cmd.arg("--cuda");
    }
    let v = run_json(&mut cmd, &format!("qlora child {spec}"))?;
    let secs: Vec<f64> = v["step_seconds"]
        .as_array()
        .ok_or_else(|| Error::invalid(format!("qlora child {spec}: no step_seconds")))?
        .iter()
        .filter_map(|x| x.as_f64())
        .collect();
    let get = |k: &str| {
        v[k].as_f64()
            .ok_or_else(|| Error::invalid(format!("qlora child {spec}: no {k}")))
    };
    let (base, start, peak) = (
        get("baseline_bytes")?,
        get("start_bytes")?,
        get("peak_bytes")?,
    );
    const MIB: f64 = 1024.0 * 1024.0;
    Ok(ChildResult {
        tokens_per_s: Stats::from_samples(&secs)?.inverse(tokens),
        peak_mib: (peak - base) / MIB,
        start_mib: (start - base) / MIB,
    })
}

fn rows_for(shape: &Shape, layers: i64, goal: f64, opts: &PerfOpts) -> Result<Vec<Measurement>> {
    let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    write_model(dir.path(), shape, layers)?;
    let (warmup, runs) = if shape.hidden >= 2048 {
        (1, if opts.quick { 1 } else { 2 })
    } else {
        (opts.warmup, opts.runs)
    };
    let tokens = (shape.batch * shape.seq) as f64;
    let spec = |mode: &str| format!("{},{mode},{warmup},{runs}", shape.name);
    let lora = spawn(&spec("lora"), dir.path(), opts, tokens)?;
    let nf4 = spawn(&spec("nf4"), dir.path(), opts, tokens)?;
    let what = format!(
        "{} shape ({layers} of {} layers, random weights), batch {}x{}, LoRA r16 on 7 projections, AdamW, gradient checkpointing, keep_freed_memory {}",
        shape.name,
        shape.layers,
        shape.batch,
        shape.seq,
        if keep_freed() { "on" } else { "off" }
    );
    let ratio = nf4.peak_mib / lora.peak_mib;
    Ok(vec![
        Measurement {
            workload: format!("qlora_peak_rss_{}", shape.name),
            metric: "MiB peak RSS above baseline".into(),
            volttrain: Stats::single(nf4.peak_mib),
            reference: Some(Stats::single(lora.peak_mib)),
            reference_name: "VoltTrain fp32-base LoRA".into(),
            higher_is_better: false,
            note: format!(
                "{what}; NF4+double quant / fp32 = {ratio:.3} (goal <= {goal}); resident at the start of training: nf4 {:.0} MiB, fp32 {:.0} MiB",
                nf4.start_mib, lora.start_mib
            ),
        },
        Measurement {
            workload: format!("qlora_step_{}", shape.name),
            metric: "tokens/s".into(),
            volttrain: nf4.tokens_per_s,
            reference: Some(lora.tokens_per_s),
            reference_name: "VoltTrain fp32-base LoRA".into(),
            higher_is_better: true,
            note: format!(
                "{what}; the cost of dequantizing every NF4 weight in forward, recompute and backward ({warmup} warm-up, {runs} measured steps)"
            ),
        },
    ])
}

/// The SmolLM2-135M rows (8 layers in quick mode).
pub fn run(opts: &PerfOpts) -> Result<Vec<Measurement>> {
    let layers = if opts.quick { 8 } else { SMOLLM2_135M.layers };
    rows_for(&SMOLLM2_135M, layers, 0.6, opts)
}

/// The Llama-3.2-1B rows (2 layers in quick mode; the goal is for the full 16).
pub fn run_1b(opts: &PerfOpts) -> Result<Vec<Measurement>> {
    let layers = if opts.quick { 2 } else { LLAMA_32_1B.layers };
    rows_for(&LLAMA_32_1B, layers, 0.45, opts)
}
