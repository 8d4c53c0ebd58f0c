//! int8 and FP8 against their references (bitsandbytes' int8_vectorwise_quant, torchao's FP8
//! scaling rule written out in torch), live through reference/quant_ref.py; the FP8 training
//! linear against the same emulation in Python; bytes per parameter from `storage_bytes()`.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use tch::{Device, Kind, Tensor};
use volttrain::quant::fp8::{fake_quantize_fp8, fp8_kernels_available};
use volttrain::quant::fp8_linear::fp8_backend_for;
use volttrain::quant::{
    Fp8Backend, Fp8Format, Fp8Linear, Fp8Quantizer, Fp8Scaling, Fp8Tensor, Int8Quantizer,
    Int8Tensor, QuantizedTensor, Quantizer,
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

#[test]
fn fp8_linear_forward_and_gradients_match_emulated_recipe() {
    tch::manual_seed(5);
    let opts = (Kind::Float, Device::Cpu);
    let x = Tensor::randn([3, 7, 64], opts);
    let w = Tensor::randn([48, 64], opts) * 0.1;
    let gy = Tensor::randn([3, 7, 48], opts) * 1e-3;
    let reference = run_reference(
        "fp8linear",
        &[
            ("x", x.shallow_clone()),
            ("w", w.shallow_clone()),
            ("gy", gy.shallow_clone()),
        ],
    );
    let lin = Fp8Linear::new(
        w.copy().set_requires_grad(true),
        None,
        Fp8Scaling::PerTensor,
    )
    .unwrap();
    assert_eq!(lin.backend(), Fp8Backend::Emulated);
    let xg = x.copy().set_requires_grad(true);
    let y = lin.forward(&xg).unwrap();
    let rel = |a: &Tensor, b: &Tensor| max_abs(&(a - b)) / max_abs(b);
    let e = rel(&y, &reference["y"]);
    assert!(e < 1e-6, "forward differs by {e}");
    // the forward really is FP8's: it differs from the fp32 product by FP8-sized amounts
    let dense = x.linear::<&Tensor>(&w, None);
    let fp8_effect = rel(&y, &dense);
    assert!(
        fp8_effect > 1e-3 && fp8_effect < 0.1,
        "fp8 vs fp32 forward: {fp8_effect}"
    );

    // autograd through the straight-through graph: g W_q and g^T x_q with g unquantized
    (&y * &gy).sum(Kind::Float).backward();
    let xq = fake_quantize_fp8(&x.view([-1, 64]), Fp8Format::E4m3, Fp8Scaling::PerTensor).unwrap();
    let wq = fake_quantize_fp8(&w, Fp8Format::E4m3, Fp8Scaling::PerTensor).unwrap();
    let g2 = gy.view([-1, 48]);
    let e = rel(&xg.grad(), &g2.matmul(&wq).view([3, 7, 64]));
    assert!(e < 1e-6, "autograd grad input differs by {e}");
    let e = rel(&lin.weight.grad(), &g2.tr().matmul(&xq));
    assert!(e < 1e-6, "autograd grad weight differs by {e}");

    // the recipe's gradients with g in e5m2
    let (gx, gw) = lin.backward_fp8(&x, &gy).unwrap();
    let e = rel(&gx, &reference["gx"]);
    assert!(e < 1e-6, "e5m2 grad input differs by {e}");
    let e = rel(&gw, &reference["gw"]);
    assert!(e < 1e-6, "e5m2 grad weight differs by {e}");
    // and e5m2 changes them by e5m2-sized amounts
    let e5 = rel(&gx, &xg.grad());
    assert!(
        e5 > 1e-4 && e5 < 0.25,
        "e5m2 vs full-precision gradient: {e5}"
    );
}

#[test]
fn fp8_on_cpu_has_no_kernels_and_emulates() {
    assert!(!fp8_kernels_available(Device::Cpu));
    // frozen FP8 weight: CPU linear equals dense of the dequantized weight
    tch::manual_seed(2);
    let w = Tensor::randn([32, 48], (Kind::Float, Device::Cpu));
    let x = Tensor::randn([5, 48], (Kind::Float, Device::Cpu));
    let q = Fp8Quantizer {
        format: Fp8Format::E4m3,
        scaling: Fp8Scaling::PerRow,
    }
    .quantize(&w)
    .unwrap();
    let y = q.linear(&x).unwrap();
    let e = max_abs(&(&y - x.linear::<&Tensor>(&q.dequantize(Kind::Float).unwrap(), None)));
    assert!(e < 1e-5, "{e}");
}

#[test]
fn fp8_training_on_a_device_without_fp8_is_an_error() {
    assert_eq!(fp8_backend_for(Device::Cpu).unwrap(), Fp8Backend::Emulated);
    let e = fp8_backend_for(Device::Mps).unwrap_err();
    assert!(e.to_string().contains("no FP8 kernels"), "{e}");
    if !tch::Cuda::is_available() {
        // no CUDA device here: the probe fails, so an FP8 request for cuda:0 is refused
        let e = fp8_backend_for(Device::Cuda(0)).unwrap_err();
        assert!(e.to_string().contains("compute capability 8.9"), "{e}");
    }
    let e = Fp8Linear::new(
        Tensor::zeros([2, 3, 4], (Kind::Float, Device::Cpu)),
        None,
        Fp8Scaling::PerTensor,
    )
    .unwrap_err();
    assert!(e.to_string().contains("2-D"), "{e}");
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
