//! Fused CPU kernels for the training step, and the libtorch calls tch does not expose.
//!
//! On the CPU a training step of a small Llama spends about a third of its time outside matrix
//! products, mostly in chains of elementwise kernels that each make a pass over memory and keep
//! their intermediates for backward. The C++ shim (`csrc/fused.cpp`, row loops in
//! `csrc/kernels.c`) provides four of those chains as single libtorch autograd functions:
//!
//! | Op | Replaces | Kept for backward |
//! |---|---|---|
//! | [`rms_norm`] | `x.pow(2).mean(-1)`, `rsqrt`, two `mul`s (transformers' `LlamaRMSNorm`) | `x`, `rstd` |
//! | [`swiglu`] | `silu(gate) * up` | `gate`, `up` |
//! | [`rope`] | `x * cos + rotate_half(x) * sin` | `cos`, `sin` |
//! | [`linear_cross_entropy`] | LM head product (soft-capped or not), `log_softmax`, `nll_loss` (sum) | the input gradients, formed in forward |
//!
//! They compute the same formulas in fp32 (parity with the composite ops is tested in
//! `tests/fused_ops.rs`, and the model parity tests against transformers run through them).
//!
//! Their backward passes are row loops, not differentiable ops: a backward with `create_graph`
//! (higher-order gradients) through them is an error; `VOLTTRAIN_FUSED_KERNELS=0` is the way to
//! run such a model.
//!
//! [`applies`] says whether a tensor takes the fused path: fp32 on the CPU, the shim's kernels
//! usable on this CPU (AVX2 and FMA on x86-64, checked at run time because `kernels.c` is
//! built with them), and not switched off with `VOLTTRAIN_FUSED_KERNELS=0` (read once). Other
//! tensors (CUDA, bf16, and every tensor while CPU autocast is on) keep the composite ops, so
//! callers branch on [`applies`].

use std::ffi::{c_char, c_int};
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::ffi::kernels::{
    vt_clear_grad, vt_fused_adamw, vt_fused_linear_ce, vt_fused_rms_norm, vt_fused_rope,
    vt_fused_swiglu,
};
use crate::ffi::{self, RawTensor, ptr};

/// Whether the fused kernels are usable in this process: the CPU has what `kernels.c` was
/// compiled for, and `VOLTTRAIN_FUSED_KERNELS` is not `0`.
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        let off = std::env::var("VOLTTRAIN_FUSED_KERNELS").is_ok_and(|v| v.trim() == "0");
        !off && cpu_supported()
    })
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn cpu_supported() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn cpu_supported() -> bool {
    true
}

/// Whether `t` takes the fused path: [`enabled`], on the CPU, fp32, and CPU autocast off.
///
/// Under autocast (`precision: bf16 | fp16`) the composite ops run instead: the LM head's fused
/// cross-entropy holds a matrix product that autocast computes in the half kind, and the
/// composite ops are the code a CUDA device runs (see [`crate::amp`]).
pub fn applies(t: &Tensor) -> bool {
    t.device() == Device::Cpu
        && t.kind() == Kind::Float
        && enabled()
        && !crate::amp::autocast_active(Device::Cpu)
}

/// Runs a kernel-library call that returns a new tensor (an [`Error::Kernel`] when the fused
/// kernels are off).
pub(crate) fn new_tensor(
    what: &str,
    f: impl FnOnce(RawTensor, *mut *mut c_char) -> c_int,
) -> Result<Tensor> {
    check_enabled(what)?;
    ffi::new_tensor(what, f)
}

fn check_enabled(what: &str) -> Result<()> {
    if enabled() {
        Ok(())
    } else {
        Err(Error::Kernel {
            op: what.to_string(),
            msg: "the fused CPU kernels are off (VOLTTRAIN_FUSED_KERNELS=0, or the CPU lacks \
                  AVX2/FMA); use the composite op"
                .into(),
        })
    }
}

/// `weight * (x * rsqrt(mean(x^2, -1) + eps))` (transformers' `LlamaRMSNorm` in fp32), `x`
/// `[..., h]` and `weight` `[h]`, with gradients for both.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    // SAFETY: the tensors are live for the call; the shim returns a new tensor.
    new_tensor("fused rms_norm", |out, err| unsafe {
        vt_fused_rms_norm(ptr(x), ptr(weight), eps, out, err)
    })
}

/// `silu(gate) * up` (the SwiGLU MLP's product), with gradients for both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    // SAFETY: as in rms_norm.
    new_tensor("fused swiglu", |out, err| unsafe {
        vt_fused_swiglu(ptr(gate), ptr(up), out, err)
    })
}

/// Rotary embedding of `x` `[batch, seq, heads, head_dim]` (note the layout: heads after seq,
/// as the projections produce them) with `cos`, `sin` `[1 or batch, seq, head_dim]`:
/// `x * cos + rotate_half(x) * sin`. Gradient for `x` only.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    // SAFETY: as in rms_norm.
    new_tensor("fused rope", |out, err| unsafe {
        vt_fused_rope(ptr(x), ptr(cos), ptr(sin), out, err)
    })
}

/// Cross-entropy of the logits `hidden weight^T` (`hidden` `[n, k]`, `weight` `[vocab, k]`)
/// against `targets` `[n]` (int64, `ignore_index` rows skipped), summed, times `scale`.
///
/// Returns the scaled loss (a scalar to call backward on) and the unscaled sum. The logits are
/// formed a chunk of rows at a time (about 32 MiB of them, or `k / 8` rows where that is more, up
/// to 256 MiB: each chunk reads the whole weight) and never all at once: under grad
/// mode each chunk is turned into its gradient and multiplied into the gradients of `hidden`
/// and `weight` during this call, then freed; backward multiplies those by its incoming
/// gradient. `backward` may run once (no `retain_graph`).
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
    scale: f64,
) -> Result<(Tensor, f64)> {
    linear_cross_entropy_chunked(hidden, weight, targets, ignore_index, scale, None, 0)
}

/// [`linear_cross_entropy`] of soft-capped logits `cap * tanh(hidden weight^T / cap)` (Gemma 2's
/// `final_logit_softcapping`), the cap applied inside each chunk: forward, and the gradient
/// through it (`1 - tanh(z / cap)^2`). `cap` must be finite and > 0.
pub fn linear_cross_entropy_softcapped(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
    scale: f64,
    cap: f64,
) -> Result<(Tensor, f64)> {
    linear_cross_entropy_chunked(hidden, weight, targets, ignore_index, scale, Some(cap), 0)
}

/// [`linear_cross_entropy`] (or [`linear_cross_entropy_softcapped`] with `cap`) with
/// `chunk_rows` rows of logits per chunk (0: the default above), for tests of the chunking.
#[doc(hidden)]
pub fn linear_cross_entropy_chunked(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
    scale: f64,
    cap: Option<f64>,
    chunk_rows: i64,
) -> Result<(Tensor, f64)> {
    let cap = match cap {
        None => 0.0,
        Some(c) if c.is_finite() && c > 0.0 => c,
        Some(c) => {
            return Err(Error::invalid(format!(
                "fused cross-entropy: the logit soft-cap must be a finite number > 0, got {c}"
            )));
        }
    };
    let mut sum = f64::NAN;
    // SAFETY: as in rms_norm; `sum` outlives the call.
    let loss = new_tensor("fused cross-entropy", |out, err| unsafe {
        vt_fused_linear_ce(
            ptr(hidden),
            ptr(weight),
            ptr(targets),
            ignore_index,
            scale,
            cap,
            chunk_rows.max(0),
            out,
            &mut sum,
            err,
        )
    })?;
    Ok((loss, sum))
}

/// Drops `param.grad` (PyTorch's `zero_grad(set_to_none=True)`); tch only zeroes it in place.
pub fn clear_grad(param: &Tensor) -> Result<()> {
    // SAFETY: the tensor is live for the call; the shim only resets its grad field.
    ffi::kernel("clear_grad", |err| unsafe {
        vt_clear_grad(ptr(param), err)
    })
}

/// Hyper-parameters of one [`fused_adamw`] call.
pub(crate) struct FusedAdamW {
    /// The parameter's update count including this update.
    pub step: u64,
    pub lr: f64,
    pub betas: (f64, f64),
    pub weight_decay: f64,
    pub eps: f64,
}

/// One AdamW update of `param` through libtorch's fused CPU kernel (the shim's
/// `vt_fused_adamw`, `torch.optim.AdamW(fused=True)`). All tensors contiguous, same kind.
pub(crate) fn fused_adamw(
    param: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    max_exp_avg_sq: Option<&Tensor>,
    h: &FusedAdamW,
) -> Result<()> {
    let vm = max_exp_avg_sq.map_or(std::ptr::null_mut(), ptr);
    // SAFETY: every tensor is live for the call; the shim updates them in place.
    ffi::kernel("fused_adamw", |err| unsafe {
        vt_fused_adamw(
            ptr(param),
            ptr(grad),
            ptr(exp_avg),
            ptr(exp_avg_sq),
            vm,
            h.step as f64,
            h.lr,
            h.betas.0,
            h.betas.1,
            h.weight_decay,
            h.eps,
            err,
        )
    })
}
