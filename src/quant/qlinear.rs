//! The product of an input with a frozen quantized weight, through the C++ shim
//! (`csrc/qlinear.cpp`, kernels in `csrc/dequant.c`).
//!
//! # Why a shim function
//!
//! `x.linear(dequantize(W))` under autograd keeps the dense `W` until backward (it is what the
//! input gradient `g W` needs): a QLoRA step then holds a dense copy of every base weight, more
//! than the fp32 model itself. `linear` is one libtorch autograd function instead: forward
//! dequantizes, multiplies and drops the dense weight; backward dequantizes again for the input
//! gradient. Autograd keeps only the packed parts (which the model holds anyway). Under gradient
//! checkpointing the no-grad first pass takes the tiled product of each format (no graph) and
//! the recompute this function, so no dense weight outlives its product there either. The
//! weight is frozen: it gets no gradient.
//!
//! Dequantization is the same function everywhere: device-generic libtorch ops, and on the CPU
//! for 4-bit formats a vectorised kernel (AVX2, checked at run time) that gives the same bits.
//!
//! FP8 weights multiply FP8 copies (see [`super::fp8`]): the input is quantized to e4m3 with
//! the weight's scaling rule and the product is libtorch's `_scaled_mm` on CUDA devices that
//! have it, the emulation elsewhere (the same FP8 values widened to fp32, the same scales); the
//! input gradient treats the input's quantization as the identity (`g * dequantize(W)`).

use std::ffi::c_int;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::ffi::kernels::{vt_dequant_4bit_raw, vt_qweight_dequant, vt_qweight_linear};
use crate::ffi::{self, CTensor, ptr};

/// The packed formats the shim knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// NF4 / FP4: `packed`, `code` (16), then `absmax` or `codes, absmax2, code256`.
    FourBit = 0,
    /// `codes` int8 `[rows, cols]`, `stats` fp32 `[rows]`.
    Int8 = 1,
    /// `bits` FP8 `[rows, cols]`, `scale` fp32 `[]` or `[rows, 1]`.
    Fp8 = 2,
}

/// A quantized weight as the shim sees it (borrowed parts).
#[derive(Debug)]
pub(crate) struct Parts<'a> {
    pub format: Format,
    pub tensors: Vec<&'a Tensor>,
    pub rows: i64,
    pub cols: i64,
    /// Block size (4-bit only).
    pub block_size: i64,
    /// Offset of double-quantized absmax (4-bit only).
    pub offset: f64,
}

/// The input of an FP8 product: `x` as `[m, cols]` in e4m3, its scale, whether to run
/// `_scaled_mm`, and the product's dtype.
pub(crate) struct Fp8Input {
    pub bits: Tensor,
    pub scale: Tensor,
    pub scaled_mm: bool,
    pub out_kind: Kind,
}

/// Whether the vectorised CPU dequantization kernel can run here (AVX2 and FMA on x86-64).
pub fn fast_kernel() -> bool {
    crate::fused::cpu_supported()
}

fn dtype_code(kind: Kind) -> Result<c_int> {
    match kind {
        Kind::Float => Ok(0),
        Kind::BFloat16 => Ok(1),
        Kind::Half => Ok(2),
        Kind::Double => Ok(3),
        k => Err(Error::Shape {
            op: "quantized linear".into(),
            msg: format!("quantized weights dequantize to fp32, bf16, fp16 or fp64, not {k:?}"),
        }),
    }
}

impl Parts<'_> {
    fn ptrs(&self) -> Vec<CTensor> {
        ffi::tensor_ptrs(&self.tensors)
    }

    fn fast(&self) -> c_int {
        c_int::from(self.format == Format::FourBit && fast_kernel())
    }
}

/// Rows `[r0, r1)` of the dense weight in `kind` (no gradient recorded).
pub(crate) fn dequantize_rows(p: &Parts<'_>, r0: i64, r1: i64, kind: Kind) -> Result<Tensor> {
    let ptrs = p.ptrs();
    let dtype = dtype_code(kind)?;
    let what = format!("dequantize rows {r0}..{r1} of [{}, {}]", p.rows, p.cols);
    // SAFETY: every tensor behind `ptrs` is borrowed for the call; the shim returns a new one.
    ffi::new_tensor(&what, |out, err| unsafe {
        vt_qweight_dequant(
            p.format as i64,
            ptrs.as_ptr(),
            ptrs.len() as i64,
            p.rows,
            p.cols,
            p.block_size,
            p.offset,
            p.fast(),
            r0,
            r1,
            dtype,
            out,
            err,
        )
    })
}

/// `x W^T` through the shim's autograd function (see the module docs); `fp8` is required for
/// [`Format::Fp8`] and ignored otherwise.
pub(crate) fn linear(p: &Parts<'_>, x: &Tensor, fp8: Option<&Fp8Input>) -> Result<Tensor> {
    let ptrs = p.ptrs();
    let what = format!("quantized linear {:?} x [{}, {}]", x.size(), p.rows, p.cols);
    let (xb, xs, mm, odt) = match (p.format, fp8) {
        (Format::Fp8, Some(f)) => (ptr(&f.bits), ptr(&f.scale), f.scaled_mm, f.out_kind),
        (Format::Fp8, None) => {
            return Err(Error::Shape {
                op: what.to_string(),
                msg: "FP8 product without an FP8 input".into(),
            });
        }
        _ => (
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            false,
            Kind::Float,
        ),
    };
    let odt = dtype_code(odt)?;
    // SAFETY: `x`, the parts and the FP8 input are borrowed for the call; the shim returns a
    // new tensor and keeps (refcounted) references to the parts in the autograd graph.
    ffi::new_tensor(&what, |out, err| unsafe {
        vt_qweight_linear(
            ptr(x),
            p.format as i64,
            ptrs.as_ptr(),
            ptrs.len() as i64,
            p.rows,
            p.cols,
            p.block_size,
            p.offset,
            p.fast(),
            xb,
            xs,
            c_int::from(mm),
            odt,
            out,
            err,
        )
    })
}

/// The 4-bit CPU kernel on whole buffers: `packed` uint8 (`nblocks * bs / 2`), `absmax` fp32
/// (`nblocks`), `code` fp32 (16); `vector` picks the AVX2 loop, otherwise the scalar loop.
/// For the parity test of the two loops; errors when the CPU lacks AVX2/FMA.
#[doc(hidden)]
pub fn dequantize_4bit_kernel(
    packed: &Tensor,
    absmax: &Tensor,
    code: &Tensor,
    block_size: i64,
    vector: bool,
) -> Result<Tensor> {
    if !fast_kernel() {
        return Err(Error::Kernel {
            op: "four-bit dequantize kernel".into(),
            msg: "needs AVX2 and FMA, which this CPU lacks".into(),
        });
    }
    let out = Tensor::zeros(
        [absmax.numel() as i64 * block_size],
        (Kind::Float, Device::Cpu),
    );
    // SAFETY: the tensors are live for the call; the shim checks sizes before writing `out`.
    ffi::kernel("four-bit dequantize kernel", |err| unsafe {
        vt_dequant_4bit_raw(
            ptr(packed),
            ptr(absmax),
            ptr(code),
            ptr(&out),
            block_size,
            c_int::from(vector),
            err,
        )
    })?;
    Ok(out)
}
