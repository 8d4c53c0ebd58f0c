//! Gradient clipping by global L2 norm, as `torch.nn.utils.clip_grad_norm_`.
//!
//! `total = || (||g_1||, ..., ||g_n||) ||_2` over every parameter that has a gradient;
//! `coef = min(1, max_norm / (total + 1e-6))`; every gradient is multiplied by `coef`.
//! Returns `total`, the norm before clipping, for logging.

use tch::{Kind, Tensor};

use super::DynOptimizer;
use crate::error::{Error, Result, TchResultExt};

/// Clips the gradients of every parameter of every group of `opt`; see the module docs.
pub fn clip_grad_norm(opt: &mut dyn DynOptimizer, max_norm: f64) -> Result<f64> {
    let params: Vec<Tensor> = opt
        .groups()
        .iter()
        .flat_map(|g| g.params.iter().map(|p| p.tensor.shallow_clone()))
        .collect();
    clip_grad_norm_tensors(&params, max_norm)
}

/// Clips the gradients of `params`; see the module docs. Parameters without a gradient are
/// skipped; with none at all the norm is 0.
pub fn clip_grad_norm_tensors(params: &[Tensor], max_norm: f64) -> Result<f64> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::config(
            "training.max_grad_norm",
            format!("must be finite and > 0, got {max_norm}"),
        ));
    }
    grad_norm_clipped(params, Some(max_norm))
}

/// The global L2 norm of the gradients of `params` (before clipping), clipping them to
/// `max_norm` when given; see the module docs.
pub fn grad_norm_clipped(params: &[Tensor], max_norm: Option<f64>) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let ctx = "clip_grad_norm";
    let mut grads = Vec::with_capacity(params.len());
    for p in params {
        let g = p.f_grad().ctx(ctx)?;
        if g.defined() {
            grads.push(g);
        }
    }
    let Some(first) = grads.first() else {
        return Ok(0.0);
    };
    let device = first.device();
    let mut norms = Vec::with_capacity(grads.len());
    for g in &grads {
        // per-tensor norms in the grads' kind, as torch's `_foreach_norm`
        let n = g.f_norm().and_then(|n| n.f_to(device)).ctx(ctx)?;
        norms.push(n);
    }
    let total = Tensor::f_stack(&norms, 0)
        .and_then(|s| s.f_norm())
        .and_then(|t| t.f_to_kind(Kind::Double))
        .ctx(ctx)?;
    let total_f = total.f_double_value(&[]).ctx(ctx)?;
    let Some(max_norm) = max_norm else {
        return Ok(total_f);
    };
    let coef = (max_norm / (total_f + 1e-6)).min(1.0);
    // multiplying by 1.0 changes nothing, so it is skipped
    if coef < 1.0 {
        for g in &mut grads {
            let _ = g.f_mul_scalar_(coef).ctx(ctx)?;
        }
    }
    Ok(total_f)
}
