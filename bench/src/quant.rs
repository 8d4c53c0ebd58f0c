//! Quantization workloads: bytes per parameter of a SmolLM2-135M-shaped model's linear weights
//! in each format (from the tensors held), and CPU dequantization throughput against a plain
//! memory copy of the same output size, with bitsandbytes / torch measured in the same run by
//! `reference/bench_quant.py`.
//!
//! The QLoRA step benchmark (tokens/s and peak memory against fp32 LoRA) needs the model and
//! LoRA modules; it lives with the trainer benchmarks.

use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use volttrain::error::{Error, Result, TchResultExt};
use volttrain::quant::{QuantConfig, QuantType, QuantizedTensor, Quantizer};

use crate::{Measurement, PerfOpts, Stats, run_reference, time_runs};

/// SmolLM2-135M (hidden 576, intermediate 1536, 9 heads / 3 KV heads of 64, 30 layers): the
/// `(module, out, in)` of one decoder layer's linear weights. The LM head is tied to the
/// embedding and not a quantized linear.
pub const SMOLLM2_135M_LAYER: [(&str, i64, i64); 7] = [
    ("q_proj", 576, 576),
    ("k_proj", 192, 576),
    ("v_proj", 192, 576),
    ("o_proj", 576, 576),
    ("gate_proj", 1536, 576),
    ("up_proj", 1536, 576),
    ("down_proj", 576, 1536),
];

/// Decoder layers of SmolLM2-135M.
pub const SMOLLM2_135M_LAYERS: usize = 30;

/// The formats measured, as config sections.
pub fn formats() -> Vec<(&'static str, QuantConfig)> {
    let mut nf4_dq = QuantConfig::new(QuantType::Nf4);
    nf4_dq.double_quant = true;
    let mut fp4_dq = QuantConfig::new(QuantType::Fp4);
    fp4_dq.double_quant = true;
    vec![
        ("nf4", QuantConfig::new(QuantType::Nf4)),
        ("nf4+dq", nf4_dq),
        ("fp4", QuantConfig::new(QuantType::Fp4)),
        ("fp4+dq", fp4_dq),
        ("int8", QuantConfig::new(QuantType::Int8)),
        ("fp8_e4m3", QuantConfig::new(QuantType::Fp8E4m3)),
        ("fp8_e5m2", QuantConfig::new(QuantType::Fp8E5m2)),
    ]
}

/// Quantizes `layers` decoder layers of random SmolLM2-135M-shaped weights one tensor at a time
/// (the dense tensor is dropped after each) and returns `(bytes held, parameters)`.
pub fn model_bytes(
    q: &Arc<dyn Quantizer>,
    layers: usize,
    device: Device,
) -> Result<(usize, usize)> {
    let _g = tch::no_grad_guard();
    let mut held: Vec<Box<dyn QuantizedTensor>> = Vec::new();
    let mut params = 0usize;
    for _ in 0..layers {
        for (_, out, inp) in SMOLLM2_135M_LAYER {
            let w = Tensor::f_randn([out, inp], (Kind::Float, device))
                .ctx("randn weight")?
                .f_mul_scalar(0.02)
                .ctx("scale")?;
            held.push(q.quantize(&w)?);
            params += (out * inp) as usize;
        }
    }
    Ok((held.iter().map(|t| t.storage_bytes()).sum(), params))
}

/// Runs the quantization workloads.
pub fn run(opts: &PerfOpts) -> Result<Vec<Measurement>> {
    let mut out = Vec::new();
    let layers = if opts.quick { 2 } else { SMOLLM2_135M_LAYERS };
    let reps = if opts.quick { 4 } else { 16 };
    let reference = run_reference(
        opts,
        "bench_quant.py",
        &[
            "--warmup".into(),
            opts.warmup.to_string(),
            "--runs".into(),
            opts.runs.max(3).to_string(),
            "--reps".into(),
            reps.to_string(),
        ],
    )?;
    let ref_stats =
        |key: &str| -> Option<Stats> { serde_json::from_value(reference.get(key)?.clone()).ok() };

    // bytes per parameter, from the tensors held
    for (name, cfg) in formats() {
        let q = cfg.quantizer()?;
        let (bytes, params) = model_bytes(&q, layers, opts.device)?;
        let bpp = bytes as f64 / params as f64;
        let r = reference
            .get("bytes_per_param")
            .and_then(|v| v.get(name))
            .and_then(|v| v.as_f64());
        out.push(Measurement {
            workload: format!("quant_bytes_{name}"),
            metric: "bytes/param".into(),
            volttrain: Stats::single(bpp),
            reference: r.map(Stats::single),
            reference_name: if r.is_some() { "bitsandbytes / torch storage".into() } else { "-".into() },
            higher_is_better: false,
            note: format!(
                "SmolLM2-135M linear weights, {layers} of {SMOLLM2_135M_LAYERS} layers ({params} params), fp32 = 4"
            ),
        });
    }

    // dequantization throughput vs copy of the same output size (the bound); the copy and the
    // formats are timed in turn within each run so that they share the machine's load
    let (rows, cols) = (1536i64, 576i64);
    let w = Tensor::f_randn([rows, cols], (Kind::Float, opts.device)).ctx("randn")?;
    let out_bytes = (rows * cols * 4 * reps) as f64;
    let src = Tensor::f_randn([rows * reps, cols], (Kind::Float, opts.device)).ctx("randn")?;
    let mut dst = Tensor::f_empty([rows * reps, cols], (Kind::Float, opts.device)).ctx("empty")?;
    let fmts = formats();
    let mut held: Vec<Vec<Box<dyn QuantizedTensor>>> = Vec::new();
    for (_, cfg) in &fmts {
        let q = cfg.quantizer()?;
        held.push((0..reps).map(|_| q.quantize(&w)).collect::<Result<_>>()?);
    }
    let runs = opts.runs.max(3) * 3;
    let mut copy_t = Vec::new();
    let mut deq_t = vec![Vec::new(); fmts.len()];
    for _ in 0..runs + opts.warmup {
        copy_t.extend(time_runs(opts.device, 0, 1, || {
            dst.f_copy_(&src).ctx("copy")?;
            Ok(())
        })?);
        for (i, qts) in held.iter().enumerate() {
            deq_t[i].extend(time_runs(opts.device, 0, 1, || {
                for t in qts {
                    let _d = t.dequantize(Kind::Float)?;
                }
                Ok(())
            })?);
        }
    }
    let gb = out_bytes / 1e9;
    let copy = Stats::from_samples(&copy_t[opts.warmup..])?.inverse(gb);
    out.push(Measurement {
        workload: "quant_copy_bound".into(),
        metric: "GB/s".into(),
        volttrain: copy,
        reference: ref_stats("copy_gbps"),
        reference_name: "torch Tensor.copy_".into(),
        higher_is_better: true,
        note: format!("fp32 output {reps}x[{rows}, {cols}], {runs} interleaved runs"),
    });
    for (i, (name, cfg)) in fmts.iter().enumerate() {
        let s = Stats::from_samples(&deq_t[i][opts.warmup..])?.inverse(gb);
        let reference_name = match cfg.quant_type {
            QuantType::Nf4 | QuantType::Fp4 => "bitsandbytes dequantize_4bit (CPU)",
            QuantType::Int8 => "bitsandbytes int8_vectorwise_dequant",
            _ => "torch fp8 .to(float32) / scale",
        };
        out.push(Measurement {
            workload: format!("quant_dequant_{name}"),
            metric: "GB/s".into(),
            volttrain: s,
            reference: ref_stats(&format!("dequant_gbps_{name}")),
            reference_name: reference_name.into(),
            higher_is_better: true,
            note: format!(
                "{:.0}% of the copy bound (medians, same runs)",
                100.0 * s.median / copy.median
            ),
        });
    }
    if out.is_empty() {
        return Err(Error::invalid("quant bench produced nothing"));
    }
    Ok(out)
}
