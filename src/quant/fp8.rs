//! FP8 weights (`float8_e4m3fn`, `float8_e5m2`) with dynamic per-tensor or per-row scaling.
//!
//! The scaling rule is torchao's Float8Linear (`torchao.float8.float8_utils.amax_to_scale` and
//! `hp_tensor_to_float8_dynamic`): `scale = finfo(fp8).max / max(amax, 1e-12)` computed in fp64
//! and rounded to fp32, `bits = clamp(x * scale, -max, max)` cast to FP8 (round to nearest even),
//! and `x ≈ bits / scale`. `amax` is the whole tensor's (`per_tensor`) or each row's (`per_row`).
//!
//! # One FP8 linear
//!
//! [`QuantizedTensor::linear`] of an [`Fp8Tensor`] computes one function, whatever autograd
//! records: training forward, evaluation and the recompute of gradient checkpointing all give
//! `y = (Q(x) Q(W)^T) * (1 / s_x) * (1 / s_W)` rounded to the product dtype, where `Q(x)` is the
//! input cast to e4m3 with its own dynamic scale `s_x` (same granularity as the weight's: per
//! tensor, or per token row), `Q(W)` the stored FP8 weight. The product dtype is the input's
//! for per-tensor scaling and bf16 for per-row scaling (what `_scaled_mm` returns for each), on
//! every device. The input gradient treats the input's quantization as the identity
//! (straight-through): `dL/dx = g (Q(W) / s_W)`; the weight is frozen.
//!
//! Where it runs ([`fp8_backend_for`]): libtorch's `_scaled_mm` on CUDA devices with FP8 tensor
//! cores (compute capability 8.9 or newer) for weights whose dimensions are multiples of 16, e4m3
//! and e5m2 alike (activations are e4m3; each weight format and scaling is probed once per
//! device with a tiny `_scaled_mm`, [`fp8_scaled_mm_supported`]); elsewhere on those devices and on the CPU
//! the emulation: the very same FP8 values (libtorch's float8 casts, which round like PyTorch's
//! `.to(torch.float8_e4m3fn)` because they are the same code) widened to fp32, multiplied and
//! scaled in fp32. Other devices (CUDA without FP8, MPS, ...) are refused with an error. The
//! product runs in the C++ shim as one autograd function ([`super::qlinear`]).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use tch::{Device, Kind, Tensor};

use super::{QuantParts, QuantizedTensor, Quantizer, check_weight, tensor_bytes};
use crate::error::{Error, Result, TchResultExt};

/// torchao's `EPS` for `amax_to_scale`.
const AMAX_EPS: f64 = 1e-12;

/// The two FP8 formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Fp8Format {
    /// 4 exponent bits, 3 mantissa bits, no infinities, max 448 (weights and activations).
    #[serde(rename = "e4m3")]
    E4m3,
    /// 5 exponent bits, 2 mantissa bits, max 57344 (gradients).
    #[serde(rename = "e5m2")]
    E5m2,
}

impl Fp8Format {
    /// The libtorch dtype.
    pub fn kind(self) -> Kind {
        match self {
            Fp8Format::E4m3 => Kind::Float8e4m3fn,
            Fp8Format::E5m2 => Kind::Float8e5m2,
        }
    }

    /// `torch.finfo(dtype).max`.
    pub fn max(self) -> f64 {
        match self {
            Fp8Format::E4m3 => 448.0,
            Fp8Format::E5m2 => 57344.0,
        }
    }

    /// `fp8_e4m3` or `fp8_e5m2`.
    pub fn name(self) -> &'static str {
        match self {
            Fp8Format::E4m3 => "fp8_e4m3",
            Fp8Format::E5m2 => "fp8_e5m2",
        }
    }
}

/// Granularity of the dynamic FP8 scale.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Fp8Scaling {
    /// One scale for the whole tensor (torchao's default "tensorwise" recipe).
    #[default]
    PerTensor,
    /// One scale per row (output channel for weights, token for activations).
    PerRow,
}

/// Quantizes `x` (any rank; rows are the last dimension) to FP8. Returns the FP8 bits and the
/// fp32 scale (`[]` per tensor, `[..., 1]` per row); `x ≈ bits / scale`.
pub fn quantize_fp8(
    x: &Tensor,
    format: Fp8Format,
    scaling: Fp8Scaling,
) -> Result<(Tensor, Tensor)> {
    let ctx = |what: &str| format!("{} quantize {:?}: {what}", format.name(), x.size());
    let xf = if x.kind() == Kind::Float {
        x.shallow_clone()
    } else {
        x.f_to_kind(Kind::Float).ctx(ctx("to fp32"))?
    };
    let abs = xf.f_abs().ctx(ctx("abs"))?;
    let amax = match scaling {
        Fp8Scaling::PerTensor => abs.f_amax(Vec::<i64>::new(), false).ctx(ctx("amax"))?,
        Fp8Scaling::PerRow => abs.f_amax([-1], true).ctx(ctx("amax"))?,
    };
    // torchao: finfo.max / clamp(amax.to(float64), min=EPS), then .to(float32); Python's
    // `scalar / tensor` is `reciprocal(tensor) * scalar`
    let scale = amax
        .f_to_kind(Kind::Double)
        .ctx(ctx("scale"))?
        .f_clamp_min(AMAX_EPS)
        .ctx(ctx("scale"))?
        .f_reciprocal()
        .ctx(ctx("scale"))?
        .f_mul_scalar(format.max())
        .ctx(ctx("scale"))?
        .f_to_kind(Kind::Float)
        .ctx(ctx("scale"))?;
    let bits = xf
        .f_mul(&scale)
        .ctx(ctx("scale"))?
        .f_clamp(-format.max(), format.max())
        .ctx(ctx("saturate"))?
        .f_to_kind(format.kind())
        .ctx(ctx("cast"))?;
    Ok((bits, scale))
}

/// Quantize-dequantize (`bits / scale` in fp32, then back to `x`'s kind): the value an FP8
/// kernel sees, for CPU emulation.
pub fn fake_quantize_fp8(x: &Tensor, format: Fp8Format, scaling: Fp8Scaling) -> Result<Tensor> {
    let (bits, scale) = quantize_fp8(x, format, scaling)?;
    let ctx = || format!("{} dequantize {:?}", format.name(), x.size());
    let out = bits
        .f_to_kind(Kind::Float)
        .ctx(ctx())?
        .f_div(&scale)
        .ctx(ctx())?;
    if x.kind() == Kind::Float {
        Ok(out)
    } else {
        out.f_to_kind(x.kind()).ctx(ctx())
    }
}

/// Whether `device` runs libtorch's FP8 `_scaled_mm` (CUDA with compute capability >= 8.9):
/// [`fp8_scaled_mm_supported`] for e4m3 weights with per-tensor scaling.
pub fn fp8_kernels_available(device: Device) -> bool {
    fp8_scaled_mm_supported(device, Fp8Format::E4m3, Fp8Scaling::PerTensor)
}

/// Whether libtorch's `_scaled_mm` on `device` multiplies e4m3 activations by `weight`-format
/// weights with `scaling` (per-tensor: scalar multipliers; per-row: `[m, 1]` and `[1, n]`),
/// the product [`Fp8Tensor::linear`] computes. Probed once per device and combination with a
/// 16x16 product (cuBLASLt has e4m3 x e4m3 and e4m3 x e5m2, never e5m2 x e5m2, which is why
/// activations are always e4m3); CPU and other devices answer false.
pub fn fp8_scaled_mm_supported(device: Device, weight: Fp8Format, scaling: Fp8Scaling) -> bool {
    let Device::Cuda(index) = device else {
        return false;
    };
    type Key = (usize, Fp8Format, Fp8Scaling);
    static CACHE: OnceLock<Mutex<HashMap<Key, bool>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let key = (index, weight, scaling);
    if let Ok(map) = cache.lock()
        && let Some(v) = map.get(&key)
    {
        return *v;
    }
    let probe = || -> std::result::Result<Tensor, tch::TchError> {
        let _g = tch::no_grad_guard();
        let f = (Kind::Float, device);
        let a = Tensor::f_ones([16, 16], f)?.f_to_kind(Kind::Float8e4m3fn)?;
        let b = Tensor::f_ones([16, 16], f)?.f_to_kind(weight.kind())?;
        let (sa, sb) = match scaling {
            Fp8Scaling::PerTensor => (Tensor::f_ones([], f)?, Tensor::f_ones([], f)?),
            Fp8Scaling::PerRow => (Tensor::f_ones([16, 1], f)?, Tensor::f_ones([1, 16], f)?),
        };
        let out = fp8_product_kind(Kind::BFloat16, scaling);
        a.f_internal_scaled_mm::<&Tensor>(&b.f_tr()?, &sa, &sb, None, None, out, false)
    };
    let ok = probe().is_ok();
    if let Ok(mut map) = cache.lock() {
        map.insert(key, ok);
    }
    ok
}

/// Where the FP8 products of a device run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Backend {
    /// The emulation: FP8 values widened to fp32, fp32 products and scales.
    Emulated,
    /// libtorch `_scaled_mm` on a CUDA device with FP8 tensor cores.
    CudaScaledMm,
}

/// The FP8 path for `device`: emulation on CPU, `_scaled_mm` on CUDA devices with FP8 kernels,
/// and an error everywhere else.
pub fn fp8_backend_for(device: Device) -> Result<Fp8Backend> {
    match device {
        Device::Cpu => Ok(Fp8Backend::Emulated),
        Device::Cuda(_) if fp8_kernels_available(device) => Ok(Fp8Backend::CudaScaledMm),
        other => Err(Error::Unsupported {
            what: "FP8 training".into(),
            msg: format!(
                "FP8 training requested on {other:?}, which has no FP8 kernels (libtorch \
                 `_scaled_mm` needs a CUDA GPU with compute capability 8.9 or newer, e.g. \
                 Ada or Hopper); train in bf16/fp32 there, or use the CPU emulation"
            ),
        }),
    }
}

/// The dtype of the FP8 product for input kind `x` and `scaling` (what `_scaled_mm` returns):
/// the input's float kind per tensor, bf16 per row.
pub fn fp8_product_kind(x: Kind, scaling: Fp8Scaling) -> Kind {
    match (scaling, x) {
        (Fp8Scaling::PerTensor, k @ (Kind::BFloat16 | Kind::Half | Kind::Float)) => k,
        _ => Kind::BFloat16,
    }
}

/// The byte-pair table of exact fp32 values of `format` (see [`super::byte_pair_table`]).
fn fp8_pair_table(format: Fp8Format, device: Device) -> Result<Tensor> {
    static VALUES: [OnceLock<Vec<f32>>; 2] = [OnceLock::new(), OnceLock::new()];
    let slot = &VALUES[format as usize];
    let values = match slot.get() {
        Some(v) => v,
        None => {
            let v: Vec<f32> = Tensor::f_arange(256, (Kind::Int, Device::Cpu))
                .and_then(|t| t.f_to_kind(Kind::Uint8))
                .and_then(|t| t.f_view_dtype(format.kind()))
                .and_then(|t| t.f_to_kind(Kind::Float))
                .and_then(|t| t.try_into())
                .ctx(format!("{} value table", format.name()))?;
            slot.get_or_init(|| v)
        }
    };
    Ok(super::byte_pair_table(
        format.name(),
        device,
        2,
        |b, out| out.push(values[b]),
    ))
}

/// Produces [`Fp8Tensor`]s.
#[derive(Debug, Clone, Copy)]
pub struct Fp8Quantizer {
    /// E4M3 or E5M2.
    pub format: Fp8Format,
    /// One scale per tensor or per row.
    pub scaling: Fp8Scaling,
}

impl Quantizer for Fp8Quantizer {
    fn name(&self) -> &str {
        self.format.name()
    }

    fn quantize(&self, weight: &Tensor) -> Result<Box<dyn QuantizedTensor>> {
        Ok(Box::new(Fp8Tensor::quantize(
            weight,
            self.format,
            self.scaling,
        )?))
    }

    /// Parts `bits` and `scale` ([`Fp8Tensor::from_parts`]; the scaling follows the scale's
    /// size, not `self.scaling`).
    fn load(
        &self,
        shape: (i64, i64),
        parts: Vec<(String, Tensor)>,
    ) -> Result<Box<dyn QuantizedTensor>> {
        let mut p = QuantParts::new(self.name(), shape, parts);
        Ok(Box::new(Fp8Tensor::from_parts(
            self.format,
            p.take("bits")?,
            p.take("scale")?,
        )?))
    }
}

/// A weight stored in FP8 with its fp32 scale(s).
#[derive(Debug)]
pub struct Fp8Tensor {
    format: Fp8Format,
    scaling: Fp8Scaling,
    bits: Tensor,
    scale: Tensor,
}

impl Fp8Tensor {
    /// Quantizes a 2-D weight.
    pub fn quantize(weight: &Tensor, format: Fp8Format, scaling: Fp8Scaling) -> Result<Self> {
        let shape = check_weight(format.name(), weight)?;
        let _g = tch::no_grad_guard();
        let (bits, scale) = quantize_fp8(weight, format, scaling)?;
        // an infinite amax gives scale 0, a NaN one scale NaN: both fail `scale > 0`
        let positive = scale
            .f_gt(0.0)
            .and_then(|t| t.f_all())
            .and_then(|t| t.f_int64_value(&[]))
            .ctx(format!("{} quantize {shape:?}", format.name()))?;
        if positive != 1 {
            return Err(Error::invalid(format!(
                "{} quantization of weight {shape:?}: the weight holds NaN or infinite values",
                format.name()
            )));
        }
        Ok(Fp8Tensor {
            format,
            scaling,
            bits,
            scale,
        })
    }

    /// Rebuilds a tensor from its parts: `bits` in the FP8 dtype of `format` or as `uint8`,
    /// `scale` with one value (per tensor) or one per row.
    pub fn from_parts(format: Fp8Format, bits: Tensor, scale: Tensor) -> Result<Self> {
        let bad = |msg: String| {
            Err(Error::Shape {
                op: format!("{} tensor", format.name()),
                msg,
            })
        };
        if bits.dim() != 2 {
            return bad(format!("bits must be 2-D, got {:?}", bits.size()));
        }
        let bits = match bits.kind() {
            Kind::Uint8 => bits
                .f_view_dtype(format.kind())
                .ctx("fp8 bits from uint8")?,
            k if k == format.kind() => bits,
            k => {
                return bad(format!(
                    "bits must be uint8 or {:?}, got {k:?}",
                    format.kind()
                ));
            }
        };
        let rows = bits.size()[0];
        let (scale, scaling) = match scale.numel() as i64 {
            1 => (
                scale.f_reshape(Vec::<i64>::new()).ctx("fp8 scale")?,
                Fp8Scaling::PerTensor,
            ),
            n if n == rows => (
                scale.f_reshape([rows, 1]).ctx("fp8 scale")?,
                Fp8Scaling::PerRow,
            ),
            n => return bad(format!("scale must have 1 or {rows} values, got {n}")),
        };
        if scale.kind() != Kind::Float {
            return bad(format!("scale must be fp32, got {:?}", scale.kind()));
        }
        Ok(Fp8Tensor {
            format,
            scaling,
            bits,
            scale,
        })
    }

    /// E4M3 or E5M2.
    pub fn fp8_format(&self) -> Fp8Format {
        self.format
    }

    /// Whether [`Fp8Tensor::scale`] holds one value or one per row.
    pub fn scaling(&self) -> Fp8Scaling {
        self.scaling
    }

    /// The FP8 values `[rows, cols]`.
    pub fn bits(&self) -> &Tensor {
        &self.bits
    }

    /// The fp32 scale: `[]` per tensor, `[rows, 1]` per row (`W ≈ bits / scale`).
    pub fn scale(&self) -> &Tensor {
        &self.scale
    }
}

impl QuantizedTensor for Fp8Tensor {
    fn format(&self) -> &str {
        self.format.name()
    }

    fn shape(&self) -> (i64, i64) {
        let s = self.bits.size();
        (s[0], s[1])
    }

    fn dequantize(&self, kind: Kind) -> Result<Tensor> {
        let _g = tch::no_grad_guard();
        let ctx = || format!("{} dequantize {:?}", self.format.name(), self.shape());
        let (rows, cols) = self.shape();
        let out = if (rows * cols) % 2 == 0 {
            // exact fp8 -> fp32 values from a byte-pair table (libtorch's e4m3 cast is scalar
            // code on CPU), then the same division as `bits.to(float32) / scale`
            let table = fp8_pair_table(self.format, self.bits.device())?;
            let bytes = self
                .bits
                .f_view_dtype(Kind::Uint8)
                .ctx(ctx())?
                .f_view([-1])
                .ctx(ctx())?;
            let mut v = super::gather_byte_pairs(&table, &bytes)?
                .f_view([rows, cols])
                .ctx(ctx())?;
            let _ = v.f_div_(&self.scale).ctx(ctx())?;
            v
        } else {
            self.bits
                .f_to_kind(Kind::Float)
                .ctx(ctx())?
                .f_div(&self.scale)
                .ctx(ctx())?
        };
        if kind == Kind::Float {
            Ok(out)
        } else {
            out.f_to_kind(kind).ctx(ctx())
        }
    }

    fn storage_bytes(&self) -> usize {
        tensor_bytes(&self.bits) + tensor_bytes(&self.scale)
    }

    /// The one FP8 linear of the module docs, the same function with or without a gradient.
    fn linear(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, cols) = self.shape();
        let backend = fp8_backend_for(x.device())?;
        let ctx = || {
            format!(
                "{} linear {:?} x {:?}",
                self.format.name(),
                x.size(),
                (rows, cols)
            )
        };
        let (bits, scale) = {
            let _g = tch::no_grad_guard();
            let x2 = x.detach().f_reshape([-1, cols]).ctx(ctx())?;
            quantize_fp8(&x2, Fp8Format::E4m3, self.scaling)?
        };
        let scaled_mm = backend == Fp8Backend::CudaScaledMm
            && rows % 16 == 0
            && cols % 16 == 0
            && fp8_scaled_mm_supported(x.device(), self.format, self.scaling);
        let input = super::qlinear::Fp8Input {
            bits,
            scale,
            scaled_mm,
            out_kind: fp8_product_kind(x.kind(), self.scaling),
        };
        let parts = super::qlinear::Parts {
            format: super::qlinear::Format::Fp8,
            tensors: vec![&self.bits, &self.scale],
            rows,
            cols,
            block_size: 0,
            offset: 0.0,
        };
        super::qlinear::linear(&parts, x, Some(&input))
    }

    /// `bits`: the FP8 bytes viewed as `uint8` (tch's safetensors writer has no FP8 dtype);
    /// `scale`: the fp32 quantization multiplier (`W ≈ bits / scale`), `[]` or `[rows, 1]`.
    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let bits = self
            .bits
            .f_view_dtype(Kind::Uint8)
            .unwrap_or_else(|_| self.bits.shallow_clone());
        vec![
            ("bits".to_string(), bits),
            ("scale".to_string(), self.scale.shallow_clone()),
        ]
    }
}
