//! int8 and FP8 against their references (bitsandbytes' int8_vectorwise_quant, torchao's FP8
//! scaling rule written out in torch), live through reference/quant_ref.py; the FP8 linear (one
//! function in training, evaluation and recompute) against the same rule in Python, and its
//! casts against PyTorch's float8 casts bit for bit; bytes per parameter from `storage_bytes()`;
//! a format registered by this test crate round-trips like the built-in ones.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use tch::{Device, Kind, Tensor};
use volttrain::quant::fp8::{fp8_kernels_available, quantize_fp8};
use volttrain::quant::{
    Fp8Backend, Fp8Format, Fp8Quantizer, Fp8Scaling, Fp8Tensor, Int8Quantizer, Int8Tensor,
    QuantParts, QuantizedTensor, Quantizer, fp8_backend_for, from_named_tensors,
};

fn run_reference(mode: &str, inputs: &[(&str, Tensor)]) -> HashMap<String, Tensor> {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.safetensors");
    let out = dir.path().join("out.safetensors");
    Tensor::write_safetensors(inputs, &inp).unwrap();
    let python = std::env::var("VOLTTRAIN_PYTHON_REF").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("reference/quant_ref.py");
    let res = Command::new(&python)
        .arg(&script)
        .arg(mode)
        .arg(&inp)
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        res.status.success(),
        "reference failed: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    Tensor::read_safetensors(&out)
        .unwrap()
        .into_iter()
        .collect()
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

fn weights() -> Vec<(&'static str, Tensor)> {
    tch::manual_seed(11);
    let opts = (Kind::Float, Device::Cpu);
    let with_zero_row = Tensor::randn([16, 40], opts);
    let _ = with_zero_row.narrow(0, 5, 1).zero_();
    vec![
        ("small", Tensor::randn([48, 64], opts) * 0.02),
        ("wide", Tensor::randn([24, 300], opts).pow_tensor_scalar(3)),
        ("zero_row", with_zero_row),
        // values beyond e4m3's range before scaling, and tiny ones
        ("large", Tensor::randn([32, 32], opts) * 1e4),
        ("tiny", Tensor::randn([32, 32], opts) * 1e-6),
    ]
}

#[test]
fn int8_matches_bitsandbytes_and_error_is_within_half_a_step() {
    let ws = weights();
    let reference = run_reference("int8", &ws);
    for (name, w) in &ws {
        let q = Int8Tensor::quantize(w).unwrap();
        let codes: Vec<i8> = q.codes().view([-1]).try_into().unwrap();
        let ref_codes: Vec<i8> = reference[&format!("{name}.int8.codes")]
            .view([-1])
            .try_into()
            .unwrap();
        let diff = codes.iter().zip(&ref_codes).filter(|(a, b)| a != b).count();
        if *name == "zero_row" {
            // bitsandbytes divides 0 by 0 on the zero row (NaN cast to int8); compare the others
            let row = 40usize;
            let bad: Vec<usize> = codes
                .iter()
                .zip(&ref_codes)
                .enumerate()
                .filter(|(i, (a, b))| a != b && i / row != 5)
                .map(|(i, _)| i)
                .collect();
            assert!(bad.is_empty(), "{name}: codes differ at {bad:?}");
            let zero_row: Vec<i8> = q.codes().get(5).try_into().unwrap();
            assert!(zero_row.iter().all(|c| *c == 0));
        } else {
            assert_eq!(diff, 0, "{name}: {diff} codes differ from bitsandbytes");
            let deq = q.dequantize(Kind::Float).unwrap();
            let err = max_abs(&(&deq - &reference[&format!("{name}.int8.deq")]));
            assert_eq!(
                err, 0.0,
                "{name}: dequantized differs from bitsandbytes by {err}"
            );
        }
        let stats_err = max_abs(&(q.stats() - &reference[&format!("{name}.int8.stats")]));
        assert_eq!(stats_err, 0.0, "{name}: row absmax");

        // |W - deq| <= scale / 2 per element, scale = absmax_row / 127 (+ fp32 rounding)
        let deq = q.dequantize(Kind::Float).unwrap();
        let step = q.stats().view([-1, 1]) / 127.0;
        let excess = ((w - &deq).abs() - &step * 0.5 - &step * 1e-5)
            .max()
            .double_value(&[]);
        assert!(
            excess <= 0.0,
            "{name}: round-trip error exceeds half a step by {excess}"
        );
        let rel = max_abs(&(w - &deq)) / max_abs(w).max(f64::MIN_POSITIVE);
        println!(
            "int8 {name} {:?}: max |W - deq| / max |W| = {rel:.3e}",
            w.size()
        );
    }
}

#[test]
fn fp8_matches_torch_scaling_rule() {
    let ws = weights();
    let reference = run_reference("fp8", &ws);
    for (name, w) in &ws {
        for (fmt, format) in [("e4m3", Fp8Format::E4m3), ("e5m2", Fp8Format::E5m2)] {
            for (sc, scaling) in [
                ("per_tensor", Fp8Scaling::PerTensor),
                ("per_row", Fp8Scaling::PerRow),
            ] {
                let key = format!("{name}.{fmt}.{sc}");
                let q = Fp8Tensor::quantize(w, format, scaling).unwrap();
                assert_eq!(q.bits().kind(), format.kind());
                let bits: Vec<u8> = q
                    .bits()
                    .view_dtype(Kind::Uint8)
                    .view([-1])
                    .try_into()
                    .unwrap();
                let ref_bits: Vec<u8> = reference[&format!("{key}.bits")]
                    .view([-1])
                    .try_into()
                    .unwrap();
                let diff = bits.iter().zip(&ref_bits).filter(|(a, b)| a != b).count();
                assert_eq!(diff, 0, "{key}: {diff} fp8 bytes differ");
                let scale: Vec<f32> = q.scale().view([-1]).try_into().unwrap();
                let ref_scale: Vec<f32> = reference[&format!("{key}.scale")]
                    .view([-1])
                    .try_into()
                    .unwrap();
                assert_eq!(scale, ref_scale, "{key}: scale");
                let deq = q.dequantize(Kind::Float).unwrap();
                let r = &reference[&format!("{key}.deq")];
                let err = max_abs(&(&deq - r)) / max_abs(r).max(f64::MIN_POSITIVE);
                assert!(
                    err <= 1e-6,
                    "{key}: dequantized differs by {err} (relative)"
                );
                // relative round-trip error of the largest values: e4m3 has 3 mantissa bits
                // (half ulp 2^-4), e5m2 has 2 (2^-3)
                let bound = if format == Fp8Format::E4m3 {
                    0.0625
                } else {
                    0.125
                };
                let big = w.abs().ge_tensor(&(w.abs().max() * 0.5));
                let rel = ((w - &deq).abs() / w.abs().clamp_min(1e-30))
                    .masked_select(&big)
                    .max()
                    .double_value(&[]);
                assert!(rel <= bound, "{key}: relative error {rel} of large values");
            }
        }
    }
}

/// The frozen FP8 weight's linear: the same function with and without a gradient to record
/// (training, evaluation and checkpoint recompute), equal to `fq(x) fq(W)^T` computed in torch
/// (rounded to bf16 for per-row scaling, as `_scaled_mm` returns it), and the straight-through
/// input gradient `g fq(W)`.
#[test]
fn fp8_linear_is_one_function_and_matches_torch() {
    tch::manual_seed(5);
    let opts = (Kind::Float, Device::Cpu);
    let x = Tensor::randn([3, 7, 64], opts);
    let w = Tensor::randn([48, 64], opts) * 0.1;
    let gy = Tensor::randn([3, 7, 48], opts) * 1e-3;
    let reference = run_reference(
        "fp8qlinear",
        &[
            ("x", x.shallow_clone()),
            ("w", w.shallow_clone()),
            ("gy", gy.shallow_clone()),
        ],
    );
    let rel = |a: &Tensor, b: &Tensor| max_abs(&(a - b)) / max_abs(b);
    for (fname, format) in [("e4m3", Fp8Format::E4m3), ("e5m2", Fp8Format::E5m2)] {
        for (sname, scaling) in [
            ("per_tensor", Fp8Scaling::PerTensor),
            ("per_row", Fp8Scaling::PerRow),
        ] {
            let key = format!("{fname}.{sname}");
            let q = Fp8Quantizer { format, scaling }.quantize(&w).unwrap();
            // evaluation / the no-grad pass of checkpointing
            let y_eval = {
                let _g = tch::no_grad_guard();
                q.linear(&x).unwrap()
            };
            // training forward / recompute
            let xg = x.copy().set_requires_grad(true);
            let y = q.linear(&xg).unwrap();
            assert!(y.requires_grad(), "{key}: no graph for the input gradient");
            assert!(
                y.detach().equal(&y_eval),
                "{key}: training and evaluation compute different functions"
            );
            // per tensor: fp32 products of the same FP8 values, differing only in summation
            // order and where the scales are applied; per row: one bf16 rounding of those
            let tol = if scaling == Fp8Scaling::PerRow {
                8e-3
            } else {
                1e-6
            };
            let e = rel(&y_eval, &reference[&format!("{key}.y")]);
            assert!(e < tol, "{key}: forward differs from torch by {e}");
            // the FP8 rounding of x is really there: it differs from x fq(W)^T
            let wq = q.dequantize(Kind::Float).unwrap();
            let xw = x.linear::<&Tensor>(&wq, None);
            let fx = rel(&y_eval, &xw);
            assert!(fx > 1e-3 && fx < 0.1, "{key}: fp8 x vs fp32 x: {fx}");
            (&y * &gy).sum(Kind::Float).backward();
            let e = rel(&xg.grad(), &reference[&format!("{key}.gx")]);
            assert!(e < 1e-6, "{key}: input gradient differs from torch by {e}");
        }
    }
}

/// The emulation's casts are PyTorch's: every midpoint between neighbouring FP8 values (ties go
/// to even), the floats just either side of each, subnormals, values that underflow and the
/// largest finite values, through `quantize_fp8` with an amax that makes the scale exactly 1,
/// give the same bytes as `x.to(torch.float8_*)`.
#[test]
fn fp8_casts_equal_torch_bit_for_bit() {
    let mut inputs = Vec::new();
    for format in [Fp8Format::E4m3, Fp8Format::E5m2] {
        let all: Vec<f32> = Tensor::arange(256, (Kind::Int, Device::Cpu))
            .to_kind(Kind::Uint8)
            .view_dtype(format.kind())
            .to_kind(Kind::Float)
            .try_into()
            .unwrap();
        let mut vals: Vec<f32> = all.into_iter().filter(|v| v.is_finite()).collect();
        vals.sort_by(f32::total_cmp);
        vals.dedup();
        let mut xs = vec![format.max() as f32, 0.0, -0.0, 1e-30, -1e-30];
        for pair in vals.windows(2) {
            let mid = ((f64::from(pair[0]) + f64::from(pair[1])) / 2.0) as f32;
            xs.extend([
                mid,
                f32::from_bits(mid.to_bits() + 1),
                f32::from_bits(mid.to_bits() - 1),
                pair[0],
            ]);
        }
        xs.retain(|v| v.abs() <= format.max() as f32 && v.is_finite());
        inputs.push((format, Tensor::from_slice(&xs)));
    }
    let named: Vec<(&str, Tensor)> = vec![
        ("e4m3", inputs[0].1.shallow_clone()),
        ("e5m2", inputs[1].1.shallow_clone()),
    ];
    let reference = run_reference("fp8cast", &named);
    for ((format, x), (name, _)) in inputs.iter().zip(&named) {
        let (bits, scale) = quantize_fp8(x, *format, Fp8Scaling::PerTensor).unwrap();
        assert_eq!(scale.double_value(&[]), 1.0, "{name}: scale");
        let ours = bits.view_dtype(Kind::Uint8);
        let theirs = &reference[&format!("{name}.{name}")];
        let differ = ours.ne_tensor(theirs).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(
            differ,
            0,
            "{name}: {differ} of {} casts differ from torch",
            x.numel()
        );
    }
}

#[test]
fn fp8_on_cpu_has_no_kernels_and_emulates() {
    assert!(!fp8_kernels_available(Device::Cpu));
    assert_eq!(fp8_backend_for(Device::Cpu).unwrap(), Fp8Backend::Emulated);
}

#[test]
fn fp8_training_on_a_device_without_fp8_is_an_error() {
    let e = fp8_backend_for(Device::Mps).unwrap_err();
    assert!(e.to_string().contains("no FP8 kernels"), "{e}");
    if !tch::Cuda::is_available() {
        // no CUDA device here: the probe fails, so an FP8 request for cuda:0 is refused
        let e = fp8_backend_for(Device::Cuda(0)).unwrap_err();
        assert!(e.to_string().contains("compute capability 8.9"), "{e}");
    }
}

#[test]
fn quantizers_reject_bad_input() {
    let t3 = Tensor::zeros([2, 3, 4], (Kind::Float, Device::Cpu));
    for q in [
        Box::new(Int8Quantizer) as Box<dyn Quantizer>,
        Box::new(Fp8Quantizer {
            format: Fp8Format::E5m2,
            scaling: Fp8Scaling::PerTensor,
        }),
    ] {
        let e = q.quantize(&t3).unwrap_err();
        assert!(e.to_string().contains("2-D"), "{}: {e}", q.name());
        let e = q
            .quantize(&Tensor::zeros([4, 4], (Kind::Int, Device::Cpu)))
            .unwrap_err();
        assert!(
            e.to_string().contains("floating-point"),
            "{}: {e}",
            q.name()
        );
    }
}

#[test]
fn bytes_per_parameter_from_storage() {
    tch::manual_seed(4);
    let (r, c) = (576i64, 1536i64);
    let w = Tensor::randn([r, c], (Kind::Float, Device::Cpu));
    let n = (r * c) as f64;
    let int8 = Int8Quantizer.quantize(&w).unwrap().storage_bytes() as f64 / n;
    // 1 byte per parameter + 4 bytes per row
    assert!((int8 - (1.0 + 4.0 / c as f64)).abs() < 1e-12, "int8 {int8}");
    for scaling in [Fp8Scaling::PerTensor, Fp8Scaling::PerRow] {
        let fp8 = Fp8Quantizer {
            format: Fp8Format::E4m3,
            scaling,
        }
        .quantize(&w)
        .unwrap()
        .storage_bytes() as f64
            / n;
        let scales = if scaling == Fp8Scaling::PerRow { r } else { 1 } as f64;
        assert!(
            (fp8 - (1.0 + 4.0 * scales / n)).abs() < 1e-12,
            "fp8 {scaling:?} {fp8}"
        );
    }
}

// --- a plugin format: per-tensor symmetric int8, registered by this test crate -----------------

#[derive(Debug)]
struct PerTensorInt8 {
    codes: Tensor,
    scale: Tensor,
}

impl QuantizedTensor for PerTensorInt8 {
    fn format(&self) -> &str {
        "test_q8t"
    }
    fn shape(&self) -> (i64, i64) {
        let s = self.codes.size();
        (s[0], s[1])
    }
    fn dequantize(&self, kind: Kind) -> volttrain::Result<Tensor> {
        Ok((self.codes.to_kind(Kind::Float) * &self.scale).to_kind(kind))
    }
    fn storage_bytes(&self) -> usize {
        self.codes.numel() + 4
    }
    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            ("codes".into(), self.codes.shallow_clone()),
            ("scale".into(), self.scale.shallow_clone()),
        ]
    }
}

#[derive(Debug)]
struct PerTensorInt8Quantizer;

impl Quantizer for PerTensorInt8Quantizer {
    fn name(&self) -> &str {
        "test_q8t"
    }
    fn quantize(&self, weight: &Tensor) -> volttrain::Result<Box<dyn QuantizedTensor>> {
        let scale = weight.abs().max().clamp_min(1e-12) / 127.0;
        let codes = (weight / &scale).round().to_kind(Kind::Int8);
        Ok(Box::new(PerTensorInt8 {
            codes,
            scale: scale.view([1]),
        }))
    }
    fn load(
        &self,
        shape: (i64, i64),
        parts: Vec<(String, Tensor)>,
    ) -> volttrain::Result<Box<dyn QuantizedTensor>> {
        let mut p = QuantParts::new(self.name(), shape, parts);
        let (codes, scale) = (p.take("codes")?, p.take("scale")?);
        if codes.kind() != Kind::Int8 || scale.numel() != 1 {
            return Err(p.error("codes must be int8 and scale one value"));
        }
        Ok(Box::new(PerTensorInt8 { codes, scale }))
    }
}

fn per_tensor_int8(_: &serde_yaml::Value) -> volttrain::Result<std::sync::Arc<dyn Quantizer>> {
    Ok(std::sync::Arc::new(PerTensorInt8Quantizer))
}

volttrain::register_quantizer!("test_q8t", per_tensor_int8);

#[test]
fn a_registered_plugin_format_round_trips_through_safetensors() {
    tch::manual_seed(21);
    let w = Tensor::randn([24, 40], (Kind::Float, Device::Cpu));
    // built by name, as a YAML `quantization` section would build it
    let q = volttrain::plugin::build_quantizer("test_q8t", &serde_yaml::Value::Null)
        .unwrap()
        .quantize(&w)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.safetensors");
    Tensor::write_safetensors(&q.named_tensors(), &path).unwrap();
    let back = from_named_tensors(
        q.format(),
        q.shape(),
        Tensor::read_safetensors(&path).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (back.format(), back.shape(), back.storage_bytes()),
        ("test_q8t", (24, 40), q.storage_bytes())
    );
    assert!(
        back.dequantize(Kind::Float)
            .unwrap()
            .equal(&q.dequantize(Kind::Float).unwrap())
    );
    // the plugin's errors name the missing part; a wrong shape is caught for every format
    let mut parts = q.named_tensors();
    parts.retain(|(n, _)| n != "scale");
    let e = from_named_tensors("test_q8t", (24, 40), parts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("test_q8t") && e.contains("`scale`"), "{e}");
    let e = from_named_tensors("test_q8t", (40, 24), q.named_tensors())
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected (40, 24)"), "{e}");
    // an unknown format lists the registered ones, built-in and plugin
    let e = from_named_tensors("int3", (2, 2), vec![])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unknown quantized format `int3`")
            && e.contains("nf4")
            && e.contains("test_q8t"),
        "{e}"
    );
}
