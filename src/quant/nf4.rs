//! 4-bit blockwise quantization, NF4 and FP4, bit-exact with bitsandbytes 0.50.
//!
//! The format is the one `bitsandbytes.functional.quantize_4bit` produces on CPU (its default
//! torch kernel, `backends/default/ops.py`):
//!
//! * the weight is flattened row-major and cut into blocks of `block_size` values (64 by default);
//!   each block keeps its fp32 absolute maximum `absmax`;
//! * each value is scaled as `clamp(x * (1 / absmax), -1, 1)` and mapped to the nearest entry of a
//!   16-value code table; a value exactly half-way between two codes takes the lower one
//!   (`torch.bucketize(right=False)` over the midpoints of the sorted table);
//! * two codes share a byte, the element with the even index in the **high** nibble:
//!   `packed[i] = code[2i] << 4 | code[2i + 1]`, stored as `uint8` of shape `[numel / 2, 1]`;
//! * with double quantization (`compress_statistics=True`) the absmax vector is centred on its
//!   mean (`offset`), then quantized to 8 bits with bitsandbytes' signed dynamic code
//!   (`create_dynamic_map`) in blocks of 256, each with an fp32 absmax of its own, through the
//!   65536-entry lookup table of bitsandbytes' CPU kernel (`quantize_cpu_impl` in
//!   `csrc/cpu_ops.cpp`): the normalised value is first rounded onto a grid of 65536 points, so
//!   a value within half a grid step (1.5e-5) of a midpoint between two codes can take the
//!   farther one, exactly as bitsandbytes does.
//!
//! Dequantization is `code[nibble] * absmax[block]` in fp32, in the C++ shim
//! ([`super::qlinear`]): a vectorised kernel on the CPU (AVX2, checked at run time), libtorch
//! ops on other devices, the same bits either way. Products that need a gradient for their input
//! dequantize in forward and again in backward ([`super::qlinear`]), keeping no dense weight.

use tch::{Device, Kind, Tensor};

use super::{QuantParts, QuantizedTensor, Quantizer, check_weight, tensor_bytes};
use crate::error::{Error, Result, TchResultExt};

/// The 4-bit code tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FourBitType {
    /// NormalFloat4 (QLoRA, arXiv:2305.14314): quantiles of N(0, 1).
    Nf4,
    /// 4-bit float, 1 sign, 2 exponent, 1 mantissa bit, bitsandbytes' layout.
    Fp4,
}

/// NF4 table, bitsandbytes `get_4bit_type("nf4")`.
const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// FP4 table before normalisation, in bit-pattern order, bitsandbytes `get_4bit_type("fp4")`.
const FP4_RAW: [f32; 16] = [
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
];

/// Block sizes bitsandbytes accepts for 4-bit quantization.
pub const VALID_BLOCK_SIZES: [i64; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Values quantized per chunk (4 Mi): bounds the temporaries of quantizing one weight.
const CHUNK_VALUES: i64 = 1 << 22;

/// Dense values per tile in the gradient-free [`FourBitTensor`] product (1 Mi, 4 MiB in fp32).
pub const TILE_VALUES: i64 = 1 << 20;

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 { a.abs() } else { gcd(b, a % b) }
}

/// Block size of the nested (double) quantization of the absmax statistics.
pub const NESTED_BLOCK_SIZE: usize = 256;

impl FourBitType {
    /// `nf4` or `fp4`.
    pub fn name(self) -> &'static str {
        match self {
            FourBitType::Nf4 => "nf4",
            FourBitType::Fp4 => "fp4",
        }
    }

    /// The 16 code values indexed by the 4-bit code, normalised to `[-1, 1]` as bitsandbytes does
    /// (`data / data.abs().max()`).
    pub fn code(self) -> [f32; 16] {
        match self {
            FourBitType::Nf4 => NF4_CODE,
            FourBitType::Fp4 => FP4_RAW.map(|v| v / 12.0),
        }
    }
}

/// bitsandbytes' signed 8-bit dynamic code (`create_dynamic_map(signed=True)`, 256 sorted values),
/// used for the nested absmax. Built with the same torch ops as the Python original so that every
/// value is the same float.
pub fn dynamic_map() -> Result<Vec<f32>> {
    // `10 ** (-(max_exponent_bits - 1) + i)` for i in 0..7, as correctly rounded literals.
    const POW10: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for (i, p) in POW10.iter().enumerate() {
        let items = (1i64 << i) + 1;
        let b =
            Tensor::f_linspace(0.1, 1.0, items, (Kind::Float, Device::Cpu)).ctx("dynamic map")?;
        let means = b
            .f_slice(0, 0, items - 1, 1)
            .and_then(|lo| lo.f_add(&b.f_slice(0, 1, items, 1)?))
            .and_then(|s| s.f_div_scalar(2.0))
            .ctx("dynamic map")?;
        let pos: Vec<f32> = means
            .f_mul_scalar(*p)
            .ctx("dynamic map")?
            .try_into()
            .ctx("dynamic map")?;
        let neg: Vec<f32> = means
            .f_mul_scalar(-*p)
            .ctx("dynamic map")?
            .try_into()
            .ctx("dynamic map")?;
        data.extend(pos);
        data.extend(neg);
    }
    data.push(0.0);
    data.push(1.0);
    if data.len() != 256 {
        return Err(Error::Internal(format!(
            "dynamic map has {} values, expected 256",
            data.len()
        )));
    }
    data.sort_by(f32::total_cmp);
    Ok(data)
}

/// Size of the lookup table bitsandbytes' CPU 8-bit quantizer maps normalised values through.
const LUT_SIZE: usize = 65536;

/// bitsandbytes' CPU `build_quantize_lut` (csrc/cpu_ops.cpp, 0.50): for each of 65536 evenly
/// spaced values in `[-1, 1]`, the index of the nearest code (ties to the lower one).
fn quantize_lut(code: &[f32]) -> Vec<u8> {
    let mids: Vec<f32> = code.windows(2).map(|w| 0.5f32 * (w[0] + w[1])).collect();
    let mut lut = Vec::with_capacity(LUT_SIZE);
    let mut idx = 0usize;
    for i in 0..LUT_SIZE {
        let val = -1.0f32 + (2.0f32 * i as f32) / (LUT_SIZE - 1) as f32;
        while idx < mids.len() && mids[idx] < val {
            idx += 1;
        }
        lut.push(idx as u8);
    }
    lut
}

/// Quantizes `values` blockwise to the 8-bit `code` (sorted, 256 values) exactly as bitsandbytes'
/// CPU `quantize_blockwise` (0.50, `quantize_cpu_impl`): per block `absmax = max |v|`;
/// `normed = clamp(v * (1 / absmax), -1, 1)` is rounded onto a 65536-point grid
/// (`(u16)(((normed + 1) * 0.5) * 65535 + 0.5)`) and mapped through [`quantize_lut`].
/// A block whose absmax is 0 stores code 0 (it decodes to 0 because its absmax is 0).
fn quantize_blockwise_8bit(values: &[f32], code: &[f32], block: usize) -> (Vec<u8>, Vec<f32>) {
    let lut = quantize_lut(code);
    let mut q = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(block));
    for chunk in values.chunks(block) {
        let mut am = 0.0f32;
        for v in chunk {
            // NaN never wins (bitsandbytes sanitises NaN lanes to 0)
            am = am.max(v.abs());
        }
        absmax.push(am);
        if am == 0.0 {
            q.extend(std::iter::repeat_n(0u8, chunk.len()));
            continue;
        }
        let inv = 1.0f32 / am;
        for v in chunk {
            let x = (*v * inv).clamp(-1.0, 1.0);
            let g = ((x + 1.0f32) * 0.5f32 * (LUT_SIZE - 1) as f32 + 0.5f32) as usize;
            q.push(lut[g.min(LUT_SIZE - 1)]);
        }
    }
    (q, absmax)
}

/// The absmax statistics of a [`FourBitTensor`].
#[derive(Debug)]
pub enum AbsMax {
    /// One fp32 absmax per block.
    Full(Tensor),
    /// Double quantization: 8-bit codes of `absmax - offset` in blocks of 256 with their own fp32
    /// absmax, and the 256-value dynamic code.
    Nested {
        /// `uint8`, one code per block absmax: the index into `code` of `absmax - offset`.
        codes: Tensor,
        /// fp32, one absmax per 256 codes.
        absmax2: Tensor,
        /// The 256 fp32 values of the signed dynamic map the codes index.
        code: Tensor,
        /// The mean of the block absmaxes, added back after dequantizing.
        offset: f32,
    },
}

/// Produces [`FourBitTensor`]s (NF4 or FP4).
#[derive(Debug, Clone)]
pub struct FourBitQuantizer {
    /// NF4 or FP4.
    pub ty: FourBitType,
    /// Values per absmax block; one of [`VALID_BLOCK_SIZES`], dividing the weight's numel.
    pub block_size: i64,
    /// Quantize the absmax statistics to 8 bits (bitsandbytes `compress_statistics`).
    pub double_quant: bool,
}

impl FourBitQuantizer {
    /// A quantizer; errors when `block_size` is not one bitsandbytes accepts.
    pub fn new(ty: FourBitType, block_size: i64, double_quant: bool) -> Result<Self> {
        if !VALID_BLOCK_SIZES.contains(&block_size) {
            return Err(Error::invalid(format!(
                "{} block size must be one of {VALID_BLOCK_SIZES:?}, got {block_size}",
                ty.name()
            )));
        }
        Ok(FourBitQuantizer {
            ty,
            block_size,
            double_quant,
        })
    }

    /// NF4, block size 64, double quantization: the usual QLoRA setting.
    pub fn nf4_qlora() -> Self {
        FourBitQuantizer {
            ty: FourBitType::Nf4,
            block_size: 64,
            double_quant: true,
        }
    }

    /// Quantizes `[nblocks, block_size]` fp32 values: their absmax and packed codes (1-D).
    fn quantize_blocks(
        &self,
        blocks: &Tensor,
        bounds: &Tensor,
        order: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let ctx = |what: &str| format!("{} blocks: {what}", self.ty.name());
        let absmax = blocks
            .f_abs()
            .ctx(ctx("abs"))?
            .f_amax([1], false)
            .ctx(ctx("absmax"))?;
        let inv = absmax
            .f_clamp_min(1e-38)
            .ctx(ctx("absmax"))?
            .f_reciprocal()
            .ctx(ctx("absmax"))?
            .f_view([-1, 1])
            .ctx(ctx("absmax"))?;
        let scaled = blocks
            .f_mul(&inv)
            .ctx(ctx("scale"))?
            .f_clamp(-1.0, 1.0)
            .ctx(ctx("scale"))?
            .f_reshape([-1])
            .ctx(ctx("scale"))?;
        let mut q = scaled
            .f_bucketize(bounds, false, false)
            .ctx(ctx("bucketize"))?;
        if self.ty != FourBitType::Nf4 {
            q = order.f_index_select(0, &q).ctx(ctx("code order"))?;
        }
        let q = q.f_view([-1, 2]).ctx(ctx("pack"))?;
        let hi = q.f_select(1, 0).ctx(ctx("pack"))?;
        let lo = q.f_select(1, 1).ctx(ctx("pack"))?;
        let packed = hi
            .f_mul_scalar(16)
            .ctx(ctx("pack"))?
            .f_add(&lo)
            .ctx(ctx("pack"))?
            .f_to_kind(Kind::Uint8)
            .ctx(ctx("pack"))?;
        Ok((absmax, packed))
    }

    fn quantize_4bit(&self, weight: &Tensor) -> Result<FourBitTensor> {
        self.quantize_chunked(weight, CHUNK_VALUES)
    }

    fn quantize_chunked(&self, weight: &Tensor, chunk_values: i64) -> Result<FourBitTensor> {
        let name = self.ty.name();
        let (rows, cols) = check_weight(name, weight)?;
        if !VALID_BLOCK_SIZES.contains(&self.block_size) {
            return Err(Error::invalid(format!(
                "{name} block size must be one of {VALID_BLOCK_SIZES:?}, got {}",
                self.block_size
            )));
        }
        let n = rows * cols;
        let bs = self.block_size;
        if n == 0 || n % bs != 0 {
            return Err(Error::Shape {
                op: format!("{name} quantization"),
                msg: format!(
                    "block size {bs} does not divide the {n} values of weight [{rows}, {cols}]; \
                     choose a block size that divides it"
                ),
            });
        }
        let ctx = |what: &str| format!("{name} quantize [{rows}, {cols}]: {what}");
        let _g = tch::no_grad_guard();
        let device = weight.device();
        let code_vals = self.ty.code();
        let code = Tensor::from_slice(&code_vals).to_device(device);
        let order = code
            .f_argsort_stable(true, 0, false)
            .ctx(ctx("sort code"))?;
        let sorted = code.f_index_select(0, &order).ctx(ctx("sort code"))?;
        let bounds = sorted
            .f_slice(0, 0, 15, 1)
            .and_then(|lo| lo.f_add(&sorted.f_slice(0, 1, 16, 1)?))
            .and_then(|s| s.f_div_scalar(2.0))
            .ctx(ctx("bounds"))?;

        // In chunks of whole blocks (blocks are independent, so the result is the same), to
        // keep the temporaries of quantizing a large weight near CHUNK_VALUES * 20 bytes.
        let flat = weight.f_reshape([-1]).ctx(ctx("flatten"))?;
        let chunk = (chunk_values / bs).max(1) * bs;
        let mut absmax_parts = Vec::new();
        let mut packed_parts = Vec::new();
        let mut start = 0;
        while start < n {
            let end = (start + chunk).min(n);
            let blocks = flat
                .f_slice(0, start, end, 1)
                .ctx(ctx("chunk"))?
                .f_to_kind(Kind::Float)
                .ctx(ctx("to fp32"))?
                .f_reshape([-1, bs])
                .ctx(ctx("reshape"))?;
            let (a, p) = self
                .quantize_blocks(&blocks, &bounds, &order)
                .map_err(|e| in_context(e, &ctx("quantize")))?;
            absmax_parts.push(a);
            packed_parts.push(p);
            start = end;
        }
        let absmax = Tensor::f_cat(&absmax_parts, 0).ctx(ctx("absmax"))?;
        super::check_finite(name, (rows, cols), &absmax)?;
        let packed = Tensor::f_cat(&packed_parts, 0)
            .ctx(ctx("pack"))?
            .f_view([-1, 1])
            .ctx(ctx("pack"))?;
        drop((absmax_parts, packed_parts));

        let absmax = if self.double_quant {
            nested_absmax(&absmax).map_err(|e| in_context(e, &ctx("double quant")))?
        } else {
            AbsMax::Full(absmax)
        };
        FourBitTensor::new(self.ty, (rows, cols), bs, packed, absmax)
    }
}

/// Double quantization of the fp32 absmax vector, bitsandbytes' `compress_statistics=True`.
/// Adds `context` to a libtorch error from a quantization step; other errors pass unchanged.
fn in_context(e: Error, context: &str) -> Error {
    match e {
        Error::Torch { context: c, source } => Error::Torch {
            context: format!("{context}: {c}"),
            source,
        },
        other => other,
    }
}

fn nested_absmax(absmax: &Tensor) -> Result<AbsMax> {
    let device = absmax.device();
    let offset_t = absmax.f_mean(Kind::Float).ctx("absmax mean")?;
    let centered: Vec<f32> = absmax
        .f_sub(&offset_t)
        .ctx("centre absmax")?
        .f_to_device(Device::Cpu)
        .ctx("absmax to cpu")?
        .try_into()
        .ctx("absmax to vec")?;
    let offset = offset_t.f_double_value(&[]).ctx("absmax mean")? as f32;
    let code = dynamic_map()?;
    let (q, a2) = quantize_blockwise_8bit(&centered, &code, NESTED_BLOCK_SIZE);
    Ok(AbsMax::Nested {
        codes: Tensor::from_slice(&q).to_device(device),
        absmax2: Tensor::from_slice(&a2).to_device(device),
        code: Tensor::from_slice(&code).to_device(device),
        offset,
    })
}

impl Quantizer for FourBitQuantizer {
    fn name(&self) -> &str {
        self.ty.name()
    }

    fn quantize(&self, weight: &Tensor) -> Result<Box<dyn QuantizedTensor>> {
        Ok(Box::new(self.quantize_4bit(weight)?))
    }

    /// [`FourBitTensor::from_parts`] of this quantizer's type; the block size and double
    /// quantization follow the parts, not `self`.
    fn load(
        &self,
        shape: (i64, i64),
        parts: Vec<(String, Tensor)>,
    ) -> Result<Box<dyn QuantizedTensor>> {
        let parts = QuantParts::new(self.ty.name(), shape, parts);
        Ok(Box::new(FourBitTensor::from_parts(self.ty, shape, parts)?))
    }
}

/// A weight in NF4 or FP4 with its block statistics.
#[derive(Debug)]
pub struct FourBitTensor {
    ty: FourBitType,
    shape: (i64, i64),
    block_size: i64,
    /// `uint8 [numel / 2, 1]`, high nibble first.
    packed: Tensor,
    absmax: AbsMax,
    /// The 16-value fp32 code table on the packed codes' device (counted in storage).
    code: Tensor,
}

impl FourBitTensor {
    /// Rebuilds a tensor from what [`QuantizedTensor::named_tensors`] returned: `packed`,
    /// `quant_map` (must be the code table of `ty`), `absmax` (fp32 per block, or `uint8` codes
    /// with `nested_absmax`, `nested_quant_map` and `nested_offset` under double quantization);
    /// the block size is the values per absmax entry.
    pub fn from_parts(ty: FourBitType, shape: (i64, i64), mut parts: QuantParts) -> Result<Self> {
        let format = ty.name();
        let packed = parts.take("packed")?;
        let quant_map = parts.take("quant_map")?;
        let expected = Tensor::from_slice(&ty.code());
        if quant_map.kind() != Kind::Float || !quant_map.to_device(Device::Cpu).equal(&expected) {
            return Err(parts.error(format!("`quant_map` is not the {format} code table")));
        }
        let absmax = parts.take("absmax")?;
        let nblocks = absmax.numel() as i64;
        let n = shape.0 * shape.1;
        if nblocks == 0 || n % nblocks != 0 {
            return Err(parts.error(format!("{nblocks} absmax values do not divide {n} values")));
        }
        let block_size = n / nblocks;
        let stats = if absmax.kind() == Kind::Uint8 {
            let offset = parts
                .take("nested_offset")?
                .f_double_value(&[0])
                .ctx(format!("{format} nested_offset"))? as f32;
            AbsMax::Nested {
                codes: absmax,
                absmax2: parts.take("nested_absmax")?,
                code: parts.take("nested_quant_map")?,
                offset,
            }
        } else {
            AbsMax::Full(absmax)
        };
        FourBitTensor::new(ty, shape, block_size, packed, stats)
    }

    /// Assembles a tensor from its parts (checked for consistent sizes).
    pub fn new(
        ty: FourBitType,
        shape: (i64, i64),
        block_size: i64,
        packed: Tensor,
        absmax: AbsMax,
    ) -> Result<Self> {
        let n = shape.0 * shape.1;
        let nblocks = n / block_size.max(1);
        let bad = |msg: String| {
            Err(Error::Shape {
                op: format!("{} tensor {shape:?}", ty.name()),
                msg,
            })
        };
        if shape.0 <= 0 || shape.1 <= 0 || block_size <= 0 || n % block_size != 0 || n % 2 != 0 {
            return bad(format!(
                "block size {block_size} does not divide {n} values"
            ));
        }
        if packed.kind() != Kind::Uint8 || packed.numel() as i64 != n / 2 {
            return bad(format!(
                "packed codes must be uint8 with {} bytes, got {:?} with {}",
                n / 2,
                packed.kind(),
                packed.numel()
            ));
        }
        let stat_len = match &absmax {
            AbsMax::Full(a) => {
                if a.kind() != Kind::Float {
                    return bad(format!("absmax must be fp32, got {:?}", a.kind()));
                }
                a.numel()
            }
            AbsMax::Nested {
                codes,
                absmax2,
                code,
                ..
            } => {
                let nb2 = codes.numel().div_ceil(NESTED_BLOCK_SIZE);
                if codes.kind() != Kind::Uint8
                    || absmax2.kind() != Kind::Float
                    || absmax2.numel() != nb2
                    || code.kind() != Kind::Float
                    || code.numel() != 256
                {
                    return bad(format!(
                        "nested statistics must be uint8 codes, {nb2} fp32 absmax and a 256-value \
                         fp32 code; got {:?} {:?}, {:?} {:?}, {:?} {:?}",
                        codes.kind(),
                        codes.size(),
                        absmax2.kind(),
                        absmax2.size(),
                        code.kind(),
                        code.size()
                    ));
                }
                codes.numel()
            }
        };
        if stat_len as i64 != nblocks {
            return bad(format!("expected {nblocks} absmax values, got {stat_len}"));
        }
        let code = Tensor::from_slice(&ty.code()).to_device(packed.device());
        Ok(FourBitTensor {
            ty,
            shape,
            block_size,
            packed,
            absmax,
            code,
        })
    }

    /// NF4 or FP4.
    pub fn quant_type(&self) -> FourBitType {
        self.ty
    }

    /// Values per absmax block (64 for bitsandbytes' default).
    pub fn block_size(&self) -> i64 {
        self.block_size
    }

    /// The packed codes, `uint8 [numel / 2, 1]` as bitsandbytes returns them.
    pub fn packed(&self) -> &Tensor {
        &self.packed
    }

    /// The statistics as stored.
    pub fn absmax_stats(&self) -> &AbsMax {
        &self.absmax
    }

    /// The fp32 absmax per block (decoding the nested statistics when double-quantized).
    pub fn absmax(&self) -> Result<Tensor> {
        match &self.absmax {
            AbsMax::Full(a) => Ok(a.shallow_clone()),
            AbsMax::Nested {
                codes,
                absmax2,
                code,
                offset,
            } => {
                let n = codes.numel() as i64;
                let nb2 = absmax2.numel() as i64;
                let bs2 = NESTED_BLOCK_SIZE as i64;
                let idx = codes.f_to_kind(Kind::Int).ctx("nested absmax")?;
                let vals = code.f_index_select(0, &idx).ctx("nested absmax")?;
                let vals = vals
                    .f_constant_pad_nd([0, nb2 * bs2 - n])
                    .ctx("nested absmax")?
                    .f_view([nb2, bs2])
                    .ctx("nested absmax")?
                    .f_mul(&absmax2.f_view([nb2, 1]).ctx("nested absmax")?)
                    .ctx("nested absmax")?
                    .f_reshape([-1])
                    .ctx("nested absmax")?
                    .f_slice(0, 0, n, 1)
                    .ctx("nested absmax")?;
                vals.f_add_scalar(*offset as f64).ctx("nested absmax")
            }
        }
    }

    /// Dequantizes the rows `[start, end)` (their values must be whole blocks).
    pub fn dequantize_rows(&self, start: i64, end: i64, kind: Kind) -> Result<Tensor> {
        let (rows, cols) = self.shape;
        let (s, e) = (start * cols, end * cols);
        if !(0 <= start && start < end && end <= rows)
            || s % self.block_size != 0
            || e % self.block_size != 0
        {
            return Err(Error::Shape {
                op: format!(
                    "{} dequantize rows {start}..{end} of {:?}",
                    self.ty.name(),
                    self.shape
                ),
                msg: format!("out of range or not whole blocks of {}", self.block_size),
            });
        }
        super::qlinear::dequantize_rows(&self.parts(), start, end, kind)
    }

    /// The packed weight as the shim takes it.
    fn parts(&self) -> super::qlinear::Parts<'_> {
        let mut tensors = vec![&self.packed, &self.code];
        let offset = match &self.absmax {
            AbsMax::Full(a) => {
                tensors.push(a);
                0.0
            }
            AbsMax::Nested {
                codes,
                absmax2,
                code,
                offset,
            } => {
                tensors.extend([codes, absmax2, code]);
                f64::from(*offset)
            }
        };
        super::qlinear::Parts {
            format: super::qlinear::Format::FourBit,
            tensors,
            rows: self.shape.0,
            cols: self.shape.1,
            block_size: self.block_size,
            offset,
        }
    }
}

impl QuantizedTensor for FourBitTensor {
    fn format(&self) -> &str {
        self.ty.name()
    }

    fn shape(&self) -> (i64, i64) {
        self.shape
    }

    fn dequantize(&self, kind: Kind) -> Result<Tensor> {
        self.dequantize_rows(0, self.shape.0, kind)
    }

    /// `x W^T`. Without a gradient to record (inference, the no-grad pass of gradient
    /// checkpointing, or a frozen layer below every adapter) the weight is dequantized in tiles
    /// of about [`TILE_VALUES`] values, so a product never holds more than one tile of the dense
    /// weight; with one, the shim's autograd function dequantizes the whole weight for the
    /// product and again in backward, keeping none of it in between ([`super::qlinear`]).
    fn linear(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, cols) = self.shape;
        let ctx = || {
            format!(
                "{} linear {:?} x {:?}",
                self.ty.name(),
                x.size(),
                self.shape
            )
        };
        if x.requires_grad() {
            return super::qlinear::linear(&self.parts(), x, None);
        }
        if rows * cols <= TILE_VALUES {
            let w = self.dequantize(x.kind())?;
            return x.f_linear::<&Tensor>(&w, None).ctx(ctx());
        }
        // tiles of whole blocks: a multiple of `step` rows
        let step = self.block_size / gcd(cols, self.block_size);
        let tile_rows = ((TILE_VALUES / cols) / step).max(1) * step;
        let mut parts = Vec::new();
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + tile_rows).min(rows);
            let w = self.dequantize_rows(r0, r1, x.kind())?;
            parts.push(x.f_linear::<&Tensor>(&w, None).ctx(ctx())?);
            r0 = r1;
        }
        Tensor::f_cat(&parts, -1).ctx(ctx())
    }

    fn storage_bytes(&self) -> usize {
        let stats = match &self.absmax {
            AbsMax::Full(a) => tensor_bytes(a),
            AbsMax::Nested {
                codes,
                absmax2,
                code,
                ..
            } => tensor_bytes(codes) + tensor_bytes(absmax2) + tensor_bytes(code) + 4,
        };
        // the packed codes, the statistics and the 16-value code table
        tensor_bytes(&self.packed) + stats + 16 * 4
    }

    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![
            ("packed".to_string(), self.packed.shallow_clone()),
            ("quant_map".to_string(), Tensor::from_slice(&self.ty.code())),
        ];
        match &self.absmax {
            AbsMax::Full(a) => out.push(("absmax".to_string(), a.shallow_clone())),
            AbsMax::Nested {
                codes,
                absmax2,
                code,
                offset,
            } => {
                out.push(("absmax".to_string(), codes.shallow_clone()));
                out.push(("nested_absmax".to_string(), absmax2.shallow_clone()));
                out.push(("nested_quant_map".to_string(), code.shallow_clone()));
                out.push(("nested_offset".to_string(), Tensor::from_slice(&[*offset])));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_quantization_equals_whole() {
        tch::manual_seed(0);
        let w = Tensor::randn([96, 160], (Kind::Float, Device::Cpu));
        for ty in [FourBitType::Nf4, FourBitType::Fp4] {
            let q = FourBitQuantizer::new(ty, 64, true).unwrap();
            let whole = q.quantize_chunked(&w, 1 << 30).unwrap();
            let chunked = q.quantize_chunked(&w, 640).unwrap();
            assert!(whole.packed().equal(chunked.packed()));
            assert!(whole.absmax().unwrap().equal(&chunked.absmax().unwrap()));
        }
    }
}
