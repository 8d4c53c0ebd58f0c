//! RMSNorm as in Llama (`LlamaRMSNorm`): computed in fp32, cast back, then scaled.

use tch::{Kind, Tensor};

use crate::error::{Result, TchResultExt};

/// `weight * (x / sqrt(mean(x^2) + eps))`, the statistics in fp32 (transformers'
/// `LlamaRMSNorm.forward`). fp32 on the CPU runs as one fused op ([`crate::fused::rms_norm`]),
/// everything else through [`rms_norm_composite`].
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::fused::applies(x) && crate::fused::applies(weight) {
        return crate::fused::rms_norm(x, weight, eps);
    }
    rms_norm_composite(x, weight, eps)
}

/// [`rms_norm`] as the chain of libtorch ops transformers runs (any device and kind).
pub fn rms_norm_composite(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let kind = x.kind();
    let xf = x.f_to_kind(Kind::Float).ctx("rms_norm to fp32")?;
    let var = xf
        .f_square()
        .ctx("rms_norm square")?
        .f_mean_dim(-1, true, Kind::Float)
        .ctx("rms_norm mean")?;
    let normed = xf
        .f_mul(
            &var.f_add_scalar(eps)
                .ctx("rms_norm eps")?
                .f_rsqrt()
                .ctx("rms_norm rsqrt")?,
        )
        .ctx("rms_norm scale")?
        .f_to_kind(kind)
        .ctx("rms_norm cast back")?;
    weight.f_mul(&normed).ctx("rms_norm weight")
}

/// Gemma's RMSNorm: `(x / sqrt(mean(x^2) + eps)) * (1 + weight)`, the whole product in fp32
/// and cast back at the end (transformers' `Gemma2RMSNorm`/`Gemma3RMSNorm`). fp32 on the CPU
/// runs through the fused op with the weight `1 + w`.
pub fn rms_norm_plus_one(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::fused::applies(x) && crate::fused::applies(weight) {
        let w = weight.f_add_scalar(1.0).ctx("rms_norm 1 + w")?;
        return crate::fused::rms_norm(x, &w, eps);
    }
    let kind = x.kind();
    let xf = x.f_to_kind(Kind::Float).ctx("rms_norm to fp32")?;
    let var = xf
        .f_square()
        .ctx("rms_norm square")?
        .f_mean_dim(-1, true, Kind::Float)
        .ctx("rms_norm mean")?;
    let w = weight
        .f_to_kind(Kind::Float)
        .ctx("rms_norm weight fp32")?
        .f_add_scalar(1.0)
        .ctx("rms_norm 1 + w")?;
    xf.f_mul(
        &var.f_add_scalar(eps)
            .ctx("rms_norm eps")?
            .f_rsqrt()
            .ctx("rms_norm rsqrt")?,
    )
    .ctx("rms_norm scale")?
    .f_mul(&w)
    .ctx("rms_norm weight")?
    .f_to_kind(kind)
    .ctx("rms_norm cast back")
}
