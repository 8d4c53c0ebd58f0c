//! Learning-rate schedules.
//!
//! A [`Scheduler`] maps the optimizer step to a factor on the base learning rate. It is applied
//! per group ([`apply`]): `group.lr = base_lr * group.lr_mult * factor(step)`, so the groups'
//! multipliers (2x embeddings, 0.1x LM head) are kept at every step.

use crate::optim::DynOptimizer;

/// A learning-rate schedule.
pub trait Scheduler: Send + Sync + std::fmt::Debug {
    /// Short name (`cosine`, `wsd`, ...).
    fn name(&self) -> &str;
    /// Factor on the base lr for optimizer step `step` (0-based: the factor used by the
    /// `step`-th update).
    fn factor(&self, step: u64) -> f64;
}

/// Writes every group's lr for `step`: `base_lr * lr_mult * factor(step)`.
pub fn apply(sched: &dyn Scheduler, opt: &mut dyn DynOptimizer, base_lr: f64, step: u64) {
    let f = sched.factor(step);
    for g in opt.groups_mut() {
        g.lr = base_lr * g.lr_mult * f;
    }
}
