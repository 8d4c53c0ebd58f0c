//! Dynamic loss scaling for fp16 training, with the semantics of `torch.amp.GradScaler` and the
//! same ATen kernels (`_amp_foreach_non_finite_check_and_unscale_`, `_amp_update_scale_`).
//!
//! Per optimizer step: the loss is multiplied by the scale before backward; [`LossScaler::unscale`]
//! divides every gradient by it (multiplying by `1/scale`, computed in fp64 and rounded to fp32,
//! as GradScaler does) and reports whether any is inf or NaN, before clipping; when one is, the
//! optimizer step is skipped; [`LossScaler::update`] then halves the scale (backoff), or doubles
//! it after `growth_interval` clean steps in a row.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result, TchResultExt};
use crate::ffi::kernels::{vt_amp_unscale, vt_amp_update_scale};
use crate::ffi::{self, ptr};

/// Hyper-parameters of [`LossScaler`] (`training.loss_scaler`). Defaults are
/// `torch.amp.GradScaler`'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossScalerConfig {
    /// Scale of the first step. Default `65536` (2^16, GradScaler's `init_scale`).
    pub init_scale: f64,
    /// Factor the scale grows by after `growth_interval` clean steps. Default `2.0`.
    pub growth_factor: f64,
    /// Factor the scale shrinks by on a step with inf/NaN gradients. Default `0.5`.
    pub backoff_factor: f64,
    /// Clean steps in a row before the scale grows. Default `2000`.
    pub growth_interval: u64,
}

impl Default for LossScalerConfig {
    fn default() -> Self {
        LossScalerConfig {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

impl LossScalerConfig {
    /// GradScaler's own checks, with the config key in the message.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |k: &str, msg: String| Err(Error::config(format!("training.loss_scaler.{k}"), msg));
        if !(self.init_scale.is_finite() && self.init_scale > 0.0) {
            return bad(
                "init_scale",
                format!("must be > 0, got {}", self.init_scale),
            );
        }
        if !(self.growth_factor.is_finite() && self.growth_factor > 1.0) {
            return bad(
                "growth_factor",
                format!("must be > 1.0, got {}", self.growth_factor),
            );
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return bad(
                "backoff_factor",
                format!("must be in (0, 1), got {}", self.backoff_factor),
            );
        }
        if self.growth_interval == 0 || self.growth_interval > i32::MAX as u64 {
            return bad(
                "growth_interval",
                format!("must be in 1..=2^31-1, got {}", self.growth_interval),
            );
        }
        Ok(())
    }
}

/// What a resume checkpoint keeps of a [`LossScaler`] (GradScaler's `state_dict`: `scale` and
/// `_growth_tracker`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScalerState {
    /// The current loss scale (finite, > 0).
    pub scale: f64,
    /// Consecutive steps without overflow since the scale last changed (>= 0).
    pub growth_tracker: i64,
}

/// `torch.amp.GradScaler` for one optimizer.
#[derive(Debug)]
pub struct LossScaler {
    cfg: LossScalerConfig,
    /// fp32 scalar on the device.
    scale: Tensor,
    /// int32 scalar on the device: clean steps since the last change.
    growth_tracker: Tensor,
    /// Set by [`LossScaler::unscale`], read by [`LossScaler::update`].
    found_inf: Tensor,
}

impl LossScaler {
    /// A scaler at `cfg.init_scale` whose state lives on `device` (the gradients' device).
    pub fn new(cfg: LossScalerConfig, device: Device) -> Result<Self> {
        cfg.validate()?;
        let ctx = "loss scaler";
        Ok(LossScaler {
            scale: Tensor::f_full([0i64; 0], cfg.init_scale, (Kind::Float, device)).ctx(ctx)?,
            growth_tracker: Tensor::f_zeros([0i64; 0], (Kind::Int, device)).ctx(ctx)?,
            found_inf: Tensor::f_zeros([0i64; 0], (Kind::Float, device)).ctx(ctx)?,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LossScalerConfig {
        &self.cfg
    }

    /// The current scale (what the loss is multiplied by).
    pub fn scale(&self) -> Result<f64> {
        self.scale.f_double_value(&[]).ctx("loss scale value")
    }

    /// GradScaler's `unscale_`: divides the gradients of `params` (those that have one) by the
    /// scale in place and returns whether any is inf or NaN. Call once per step, after the last
    /// backward (and the data-parallel average), before clipping.
    pub fn unscale(&mut self, params: &[Tensor]) -> Result<bool> {
        let _g = tch::no_grad_guard();
        let ctx = "loss scaler unscale";
        let inv = self
            .scale
            .f_to_kind(Kind::Double)
            .and_then(|s| s.f_reciprocal())
            .and_then(|s| s.f_to_kind(Kind::Float))
            .ctx(ctx)?;
        let _ = self.found_inf.f_zero_().ctx(ctx)?;
        let mut grads = Vec::with_capacity(params.len());
        for p in params {
            let g = p.f_grad().ctx(ctx)?;
            if g.defined() {
                grads.push(g);
            }
        }
        let ptrs = ffi::tensor_ptrs(&grads);
        // SAFETY: every tensor is live for the call; the kernel updates the gradients and
        // `found_inf` in place.
        ffi::kernel(ctx, |err| unsafe {
            vt_amp_unscale(
                ptrs.as_ptr(),
                ptrs.len(),
                ptr(&self.found_inf),
                ptr(&inv),
                err,
            )
        })?;
        Ok(self.found_inf.f_double_value(&[]).ctx(ctx)? != 0.0)
    }

    /// GradScaler's `update`: backoff when the last [`LossScaler::unscale`] found inf/NaN
    /// (`found_inf`), growth after `growth_interval` clean steps. Call once per step, after the
    /// (possibly skipped) optimizer step.
    pub fn update(&mut self, found_inf: bool) -> Result<()> {
        let ctx = "loss scaler update";
        let _ = self
            .found_inf
            .f_fill_(if found_inf { 1.0 } else { 0.0 })
            .ctx(ctx)?;
        // SAFETY: the tensors are live for the call; the kernel updates scale and tracker.
        ffi::kernel(ctx, |err| unsafe {
            vt_amp_update_scale(
                ptr(&self.scale),
                ptr(&self.growth_tracker),
                ptr(&self.found_inf),
                self.cfg.growth_factor,
                self.cfg.backoff_factor,
                self.cfg.growth_interval as i64,
                err,
            )
        })
    }

    /// The state to save.
    pub fn state(&self) -> Result<LossScalerState> {
        Ok(LossScalerState {
            scale: self.scale()?,
            growth_tracker: self
                .growth_tracker
                .f_int64_value(&[])
                .ctx("loss scaler growth tracker")?,
        })
    }

    /// Restores a saved state.
    pub fn load_state(&mut self, s: &LossScalerState) -> Result<()> {
        if !(s.scale.is_finite() && s.scale > 0.0) || s.growth_tracker < 0 {
            return Err(Error::State {
                owner: "loss scaler".into(),
                msg: format!(
                    "scale must be finite and > 0 and growth_tracker >= 0, got {} and {}",
                    s.scale, s.growth_tracker
                ),
            });
        }
        let ctx = "loss scaler load";
        let _ = self.scale.f_fill_(s.scale).ctx(ctx)?;
        let _ = self.growth_tracker.f_fill_(s.growth_tracker).ctx(ctx)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_growth_and_state_round_trip() {
        let cfg = LossScalerConfig {
            growth_interval: 2,
            ..Default::default()
        };
        let mut s = LossScaler::new(cfg.clone(), Device::Cpu).unwrap();
        assert_eq!(s.scale().unwrap(), 65536.0);
        let p = Tensor::zeros([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        (&p * 4.0).sum(Kind::Float).backward();
        assert!(!s.unscale(std::slice::from_ref(&p)).unwrap());
        let g: Vec<f32> = p.grad().try_into().unwrap();
        assert_eq!(g, vec![4.0 / 65536.0; 3]);
        s.update(false).unwrap();
        s.update(false).unwrap();
        assert_eq!(s.scale().unwrap(), 131072.0);
        s.update(true).unwrap();
        assert_eq!(s.scale().unwrap(), 65536.0);
        s.update(false).unwrap();
        let st = s.state().unwrap();
        assert_eq!(
            st,
            LossScalerState {
                scale: 65536.0,
                growth_tracker: 1
            }
        );
        let mut t = LossScaler::new(cfg, Device::Cpu).unwrap();
        t.load_state(&st).unwrap();
        assert_eq!(t.state().unwrap(), st);
        assert!(
            LossScalerConfig {
                backoff_factor: 1.0,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
    }
}
