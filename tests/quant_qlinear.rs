//! The quantized linear's autograd function (src/quant/qlinear.rs, csrc/qlinear.cpp): its
//! product and input gradient equal those of the dense dequantized weight for every packed
//! format; the vectorised 4-bit CPU kernel gives the bits of the scalar loop and of
//! `code[nibble] * absmax` written with libtorch ops; QLoRA through the model (LoRA gradients
//! with and without gradient checkpointing). The CUDA tests skip themselves without a GPU.

use tch::{Device, Kind, Tensor};
use volttrain::quant::nf4::AbsMax;
use volttrain::quant::qlinear::{dequantize_4bit_kernel, fast_kernel};
use volttrain::quant::{
    FourBitQuantizer, FourBitTensor, FourBitType, Fp8Format, Fp8Quantizer, Fp8Scaling,
    Int8Quantizer, QuantizedTensor, Quantizer,
};

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    max_abs(&(a - b)) / max_abs(b)
}

fn quantizers() -> Vec<(&'static str, Box<dyn Quantizer>)> {
    vec![
        (
            "nf4",
            Box::new(FourBitQuantizer::new(FourBitType::Nf4, 64, false).unwrap()),
        ),
        (
            "nf4+dq",
            Box::new(FourBitQuantizer::new(FourBitType::Nf4, 64, true).unwrap()),
        ),
        (
            "fp4+dq",
            Box::new(FourBitQuantizer::new(FourBitType::Fp4, 128, true).unwrap()),
        ),
        ("int8", Box::new(Int8Quantizer)),
    ]
}

#[test]
fn quantized_linear_with_grad_equals_dense_dequantized() {
    tch::manual_seed(3);
    let opts = (Kind::Float, Device::Cpu);
    let w = Tensor::randn([96, 128], opts) * 0.05;
    let x = Tensor::randn([3, 5, 128], opts);
    let g = Tensor::randn([3, 5, 96], opts);
    for (name, q) in quantizers() {
        let qt = q.quantize(&w).unwrap();
        let wd = qt.dequantize(Kind::Float).unwrap();
        let xg = x.copy().set_requires_grad(true);
        let y = qt.linear(&xg).unwrap();
        assert!(y.requires_grad(), "{name}: no graph");
        let y_ref = x.linear::<&Tensor>(&wd, None);
        let e = rel(&y.detach(), &y_ref);
        assert!(e < 1e-6, "{name}: forward differs by {e}");
        (&y * &g).sum(Kind::Float).backward();
        let gx_ref = g.view([-1, 96]).matmul(&wd).view([3, 5, 128]);
        let e = rel(&xg.grad(), &gx_ref);
        assert!(e < 1e-6, "{name}: input gradient differs by {e}");
        // the same function without a graph (evaluation, the no-grad pass of checkpointing)
        let y_eval = {
            let _g = tch::no_grad_guard();
            qt.linear(&x).unwrap()
        };
        let e = rel(&y_eval, &y_ref);
        assert!(e < 1e-6, "{name}: no-grad forward differs by {e}");
    }
}

/// A linear whose input gradient feeds another trainable input (a chain of two quantized
/// layers under a trainable input): gradients reach the leaf through both backward passes.
#[test]
fn gradients_flow_through_chained_quantized_layers() {
    tch::manual_seed(4);
    let opts = (Kind::Float, Device::Cpu);
    let w1 = Tensor::randn([64, 32], opts) * 0.1;
    let w2 = Tensor::randn([16, 64], opts) * 0.1;
    let q = FourBitQuantizer::new(FourBitType::Nf4, 64, true).unwrap();
    let (q1, q2) = (q.quantize(&w1).unwrap(), q.quantize(&w2).unwrap());
    let (d1, d2) = (
        q1.dequantize(Kind::Float).unwrap(),
        q2.dequantize(Kind::Float).unwrap(),
    );
    let x = Tensor::randn([4, 32], opts).set_requires_grad(true);
    let y = q2.linear(&q1.linear(&x).unwrap().tanh()).unwrap();
    y.sum(Kind::Float).backward();
    let xr = x.detach().copy().set_requires_grad(true);
    xr.linear::<&Tensor>(&d1, None)
        .tanh()
        .linear::<&Tensor>(&d2, None)
        .sum(Kind::Float)
        .backward();
    let e = rel(&x.grad(), &xr.grad());
    assert!(e < 1e-6, "chained gradient differs by {e}");
}

#[test]
fn four_bit_kernel_vector_loop_equals_scalar_loop_and_the_formula() {
    if !fast_kernel() {
        eprintln!("skipped: this CPU lacks AVX2/FMA, the kernel's vector loop cannot run");
        return;
    }
    tch::manual_seed(9);
    for bs in [32i64, 64, 128, 4096] {
        let nb = 37i64;
        // every byte value, then random bytes
        let mut bytes: Vec<u8> = (0..=255u8).collect();
        let extra = Tensor::randint(256, [nb * bs / 2 - 256], (Kind::Int64, Device::Cpu));
        let extra: Vec<i64> = extra.try_into().unwrap();
        bytes.extend(extra.iter().map(|&b| b as u8));
        bytes.truncate((nb * bs / 2) as usize);
        let packed = Tensor::from_slice(&bytes);
        let absmax = Tensor::rand([nb], (Kind::Float, Device::Cpu)) * 3.0;
        let _ = absmax.narrow(0, 1, 1).fill_(0.0);
        for ty in [FourBitType::Nf4, FourBitType::Fp4] {
            let code = Tensor::from_slice(&ty.code());
            let v = dequantize_4bit_kernel(&packed, &absmax, &code, bs, true).unwrap();
            let s = dequantize_4bit_kernel(&packed, &absmax, &code, bs, false).unwrap();
            assert!(
                v.equal(&s),
                "{ty:?} bs {bs}: vector and scalar loops differ"
            );
            // code[nibble] * absmax[block] in libtorch ops, high nibble first
            let p = packed.to_kind(Kind::Int64);
            let idx =
                Tensor::stack(&[p.divide_scalar_mode(16, "floor"), p.remainder(16)], 1).view([-1]);
            let want = code.index_select(0, &idx).view([nb, bs]) * absmax.view([nb, 1]);
            assert!(
                v.equal(&want.view([-1])),
                "{ty:?} bs {bs}: kernel differs from code[nibble] * absmax"
            );
        }
    }
}

/// The whole dequantization (the kernel plus the double-quantized absmax decoded in the
/// shim's loop) gives the bits of `code[nibble] * absmax` with the absmax decoded by libtorch
/// ops (`FourBitTensor::absmax`, checked against bitsandbytes in tests/quant_bnb.rs).
#[test]
fn four_bit_dequantize_equals_the_formula_bit_for_bit() {
    tch::manual_seed(13);
    let w = Tensor::randn([80, 192], (Kind::Float, Device::Cpu)) * 0.3;
    for (ty, bs) in [(FourBitType::Nf4, 64i64), (FourBitType::Fp4, 32)] {
        for dq in [false, true] {
            let qt = FourBitQuantizer::new(ty, bs, dq)
                .unwrap()
                .quantize(&w)
                .unwrap();
            let parts: std::collections::HashMap<String, Tensor> =
                qt.named_tensors().into_iter().collect();
            let stats = if dq {
                AbsMax::Nested {
                    codes: parts["absmax"].shallow_clone(),
                    absmax2: parts["nested_absmax"].shallow_clone(),
                    code: parts["nested_quant_map"].shallow_clone(),
                    offset: parts["nested_offset"].double_value(&[0]) as f32,
                }
            } else {
                AbsMax::Full(parts["absmax"].shallow_clone())
            };
            let t = FourBitTensor::new(ty, (80, 192), bs, parts["packed"].shallow_clone(), stats)
                .unwrap();
            let p = t.packed().view([-1]).to_kind(Kind::Int64);
            let idx =
                Tensor::stack(&[p.divide_scalar_mode(16, "floor"), p.remainder(16)], 1).view([-1]);
            let code = Tensor::from_slice(&ty.code());
            let want = (code.index_select(0, &idx).view([-1, bs])
                * t.absmax().unwrap().view([-1, 1]))
            .view([80, 192]);
            let got = t.dequantize(Kind::Float).unwrap();
            assert!(
                got.equal(&want),
                "{ty:?} bs {bs} dq {dq}: dequantization differs"
            );
            // rows in tiles equal the whole
            let top = t.dequantize_rows(0, 20, Kind::Float).unwrap();
            let bottom = t.dequantize_rows(20, 80, Kind::Float).unwrap();
            assert!(Tensor::cat(&[top, bottom], 0).equal(&got), "{ty:?} tiles");
        }
    }
}

/// CUDA: the same autograd function on the GPU (device-generic dequantization through libtorch
/// ops) gives the CPU's dense weight bit for bit, and the product and input gradient within
/// fp32 tolerance; FP8 (e4m3 and e5m2 weights, per tensor and per row) through `_scaled_mm`
/// where the GPU has it, against the CPU emulation.
#[test]
fn cuda_quantized_linear_matches_cpu() {
    if !tch::Cuda::is_available() {
        eprintln!(
            "skipped: no CUDA device (the CUDA path of the quantized linear is untested here)"
        );
        return;
    }
    let dev = Device::Cuda(0);
    tch::manual_seed(21);
    let opts = (Kind::Float, Device::Cpu);
    let w = Tensor::randn([256, 512], opts) * 0.05;
    let x = Tensor::randn([4, 8, 512], opts);
    let g = Tensor::randn([4, 8, 256], opts);
    let mut all = quantizers();
    for (name, format, scaling) in [
        ("fp8_e4m3", Fp8Format::E4m3, Fp8Scaling::PerTensor),
        ("fp8_e5m2", Fp8Format::E5m2, Fp8Scaling::PerTensor),
        ("fp8_e4m3_per_row", Fp8Format::E4m3, Fp8Scaling::PerRow),
        ("fp8_e5m2_per_row", Fp8Format::E5m2, Fp8Scaling::PerRow),
    ] {
        eprintln!(
            "{name}: `_scaled_mm` on this GPU: {}",
            volttrain::quant::fp8::fp8_scaled_mm_supported(dev, format, scaling)
        );
        all.push((name, Box::new(Fp8Quantizer { format, scaling })));
    }
    for (name, q) in all {
        let cpu = q.quantize(&w).unwrap();
        let gpu = q.quantize(&w.to_device(dev)).unwrap();
        let dc = cpu.dequantize(Kind::Float).unwrap();
        let dg = gpu.dequantize(Kind::Float).unwrap().to_device(Device::Cpu);
        assert!(
            dc.equal(&dg),
            "{name}: CUDA dequantization differs from the CPU's"
        );
        let run = |qt: &dyn QuantizedTensor, d: Device| {
            let xg = x.to_device(d).set_requires_grad(true);
            let y = qt.linear(&xg).unwrap();
            (&y * g.to_device(d)).sum(Kind::Float).backward();
            (
                y.detach().to_device(Device::Cpu),
                xg.grad().to_device(Device::Cpu),
            )
        };
        let (yc, gc) = run(cpu.as_ref(), Device::Cpu);
        let (yg, gg) = run(gpu.as_ref(), dev);
        // FP8 products: fp32 accumulation in another order (tensor cores); per-row products
        // are rounded to bf16 on both sides, so one bf16 rounding step apart at most
        let tol = if name.ends_with("per_row") {
            1e-2
        } else if name.starts_with("fp8") {
            1e-3
        } else {
            1e-4
        };
        let e = rel(&yg, &yc);
        eprintln!("{name}: CUDA vs CPU forward rel {e:.2e}");
        assert!(e < tol, "{name}: CUDA forward differs by {e}");
        let e = rel(&gg, &gc);
        assert!(e < tol, "{name}: CUDA input gradient differs by {e}");
    }
}
