//! A linear layer trained with FP8 numerics, after torchao's `Float8Linear` (tensorwise recipe):
//! the forward multiplies e4m3 copies of the input and the weight, each with a dynamic
//! per-tensor (or per-row) scale; the recipe's backward multiplies with the output gradient cast
//! to e5m2.
//!
//! # What the gradient path does
//!
//! tch cannot register a custom autograd `Function`, so the layer cannot run its own backward.
//! [`Fp8Linear::forward`] therefore builds its graph with the straight-through estimator:
//! `x_q = fq(x).detach() + (x - x.detach())` (value exactly `fq(x)`, gradient the identity), the
//! same for the weight, then `y = x_q W_q^T + b`. Autograd then gives
//! `dL/dx = g W_q` and `dL/dW = g^T x_q`, with the output gradient `g` in **full precision**:
//! the forward values are exactly FP8's, the gradients are those of torchao's recipe except that
//! `g` is not rounded to e5m2. [`Fp8Linear::backward_fp8`] computes the recipe's gradients with
//! `g` in e5m2, for callers that drive the backward themselves and for checking the numerics.
//!
//! # Devices
//!
//! * CPU: emulation (quantize-dequantize in fp32), the path the tests check.
//! * CUDA with FP8 tensor cores (compute capability >= 8.9, probed with a tiny `_scaled_mm`):
//!   when neither the input nor the weight requires a gradient the forward runs `_scaled_mm` in
//!   FP8; while training it uses the same emulation as on CPU (so the numerics are FP8's but the
//!   speed is bf16's). Untested here: the build machine has no GPU.
//! * Anything else (CUDA without FP8, MPS, ...): [`Fp8Linear::new`] returns an error.

use tch::{Device, Tensor};

use super::fp8::{
    Fp8Format, Fp8Scaling, fake_quantize_fp8, fp8_kernels_available, quantize_fp8, scaled_mm_linear,
};
use crate::error::{Error, Result, TchResultExt};

/// Where the FP8 products run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Backend {
    /// Quantize-dequantize emulation in fp32.
    Emulated,
    /// libtorch `_scaled_mm` on a CUDA device with FP8 tensor cores (inference products only).
    CudaScaledMm,
}

/// The FP8 path for `device`: emulation on CPU, `_scaled_mm` on CUDA devices with FP8 kernels,
/// and an error everywhere else.
pub fn fp8_backend_for(device: Device) -> Result<Fp8Backend> {
    match device {
        Device::Cpu => Ok(Fp8Backend::Emulated),
        Device::Cuda(_) if fp8_kernels_available(device) => Ok(Fp8Backend::CudaScaledMm),
        other => Err(Error::invalid(format!(
            "FP8 training requested on {other:?}, which has no FP8 kernels (libtorch \
             `_scaled_mm` needs a CUDA GPU with compute capability 8.9 or newer, e.g. \
             Ada or Hopper); train in bf16/fp32 there, or use the CPU emulation"
        ))),
    }
}

/// Linear layer with FP8 training numerics. The weight stays in high precision (the master
/// copy the optimizer updates); FP8 copies are made on the fly in every forward.
#[derive(Debug)]
pub struct Fp8Linear {
    /// `[out, in]`, trainable.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Scaling granularity of the forward casts (`x` per token row, `W` per output row).
    pub scaling: Fp8Scaling,
    backend: Fp8Backend,
}

impl Fp8Linear {
    /// Wraps a weight `[out, in]` and optional bias; errors when the weight's device can neither
    /// emulate (CPU) nor run FP8 kernels (CUDA with compute capability >= 8.9).
    pub fn new(weight: Tensor, bias: Option<Tensor>, scaling: Fp8Scaling) -> Result<Self> {
        if weight.dim() != 2 {
            return Err(Error::invalid(format!(
                "FP8 linear needs a 2-D weight [out, in], got shape {:?}",
                weight.size()
            )));
        }
        let backend = fp8_backend_for(weight.device())?;
        Ok(Fp8Linear {
            weight,
            bias,
            scaling,
            backend,
        })
    }

    pub fn backend(&self) -> Fp8Backend {
        self.backend
    }

    /// `y = fq_e4m3(x) fq_e4m3(W)^T + b` for `x: [..., in]`; see the module docs for the gradient.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.backend == Fp8Backend::CudaScaledMm
            && !x.requires_grad()
            && !self.weight.requires_grad()
        {
            let _g = tch::no_grad_guard();
            let (wb, ws) = quantize_fp8(&self.weight, Fp8Format::E4m3, self.scaling)?;
            let y = scaled_mm_linear(x, &wb, &ws, self.scaling)?;
            return match &self.bias {
                Some(b) => y.f_add(b).ctx("fp8 linear bias"),
                None => Ok(y),
            };
        }
        let xq = ste(x, Fp8Format::E4m3, self.scaling)?;
        let wq = ste(&self.weight, Fp8Format::E4m3, self.scaling)?;
        xq.f_linear(&wq, self.bias.as_ref())
            .ctx("fp8 linear forward")
    }

    /// The recipe's gradients for `y = forward(x)` given `grad_out = dL/dy`, with `grad_out`
    /// cast to e5m2 (per tensor) and the e4m3 copies of `x` and `W`:
    /// `(dL/dx, dL/dW) = (Q5(g) Q4(W), Q5(g)^T Q4(x))`, both in fp32 (bias gradient: `sum g`).
    pub fn backward_fp8(&self, x: &Tensor, grad_out: &Tensor) -> Result<(Tensor, Tensor)> {
        let _g = tch::no_grad_guard();
        let k = self.weight.size()[1];
        let n = self.weight.size()[0];
        let ctx = |w: &str| {
            format!(
                "fp8 linear backward {:?} -> {:?}: {w}",
                x.size(),
                grad_out.size()
            )
        };
        let x2 = x.f_reshape([-1, k]).ctx(ctx("reshape x"))?;
        let g2 = grad_out.f_reshape([-1, n]).ctx(ctx("reshape grad"))?;
        let xq = fake_quantize_fp8(&x2, Fp8Format::E4m3, self.scaling)?;
        let wq = fake_quantize_fp8(&self.weight, Fp8Format::E4m3, self.scaling)?;
        let gq = fake_quantize_fp8(&g2, Fp8Format::E5m2, Fp8Scaling::PerTensor)?;
        let gx = gq
            .f_matmul(&wq)
            .ctx(ctx("grad input"))?
            .f_reshape(x.size())
            .ctx(ctx("reshape"))?;
        let gw = gq
            .f_tr()
            .ctx(ctx("grad weight"))?
            .f_matmul(&xq)
            .ctx(ctx("grad weight"))?;
        Ok((gx, gw))
    }
}

/// Straight-through FP8 fake quantization: the value is exactly `fq(t)`, the gradient is the
/// identity (`fq(t).detach() + (t - t.detach())`).
fn ste(t: &Tensor, format: Fp8Format, scaling: Fp8Scaling) -> Result<Tensor> {
    let fq = {
        let _g = tch::no_grad_guard();
        fake_quantize_fp8(&t.detach(), format, scaling)?
    };
    if !t.requires_grad() {
        return Ok(fq);
    }
    let zero = t.f_sub(&t.detach()).ctx("fp8 straight-through")?;
    fq.f_add(&zero).ctx("fp8 straight-through")
}
