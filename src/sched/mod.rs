//! Learning-rate schedules.
//!
//! A [`Scheduler`] maps the optimizer step to a factor on the base learning rate. It is applied
//! per group ([`apply`]): `group.lr = base_lr * group.lr_mult * factor(step)`, so the groups'
//! multipliers (2x embeddings, 0.1x LM head) are kept at every step.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
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

/// A schedule as the YAML `scheduler` section holds it (`type: cosine`, ...).
///
/// Every schedule's factor equals the `lr_lambda` of the `transformers` function named on its
/// variant, evaluated at the same 0-based step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SchedulerConfig {
    /// Factor 1 (`get_constant_schedule`).
    #[default]
    Constant,
    /// Linear warmup from 0, then 1 (`get_constant_schedule_with_warmup`).
    ConstantWithWarmup {
        /// Optimizer steps of the linear warmup from 0 (0: no warmup).
        warmup_steps: u64,
    },
    /// Linear warmup from 0, then linear decay to 0 at `total_steps`
    /// (`get_linear_schedule_with_warmup`).
    Linear {
        /// Optimizer steps of the linear warmup from 0 (0: no warmup).
        warmup_steps: u64,
        /// Optimizer steps of the whole run; the factor reaches 0 here.
        total_steps: u64,
    },
    /// Linear warmup from 0, then cosine decay to `min_lr_ratio` at `total_steps`
    /// (`get_cosine_with_min_lr_schedule_with_warmup` with `min_lr_rate`; with a floor of 0 it is
    /// `get_cosine_schedule_with_warmup`). `num_cycles` defaults to 0.5 (one half cosine).
    Cosine {
        /// Optimizer steps of the linear warmup from 0 (0: no warmup).
        warmup_steps: u64,
        /// Optimizer steps of the whole run; the decay reaches `min_lr_ratio` here.
        total_steps: u64,
        /// The floor of the decay as a fraction of the base lr, in [0, 1] (default 0).
        #[serde(default)]
        min_lr_ratio: f64,
        /// Cosine periods over the decay (default 0.5: one half cosine down to the floor).
        #[serde(default = "half")]
        num_cycles: f64,
    },
    /// Warmup-stable-decay (`get_wsd_schedule` with linear warmup): linear warmup from
    /// `min_lr_ratio`, then 1 until `total_steps - decay_steps`, then `decay` down to
    /// `min_lr_ratio`, then `min_lr_ratio`.
    Wsd {
        /// Optimizer steps of the linear warmup from `min_lr_ratio` (0: no warmup).
        warmup_steps: u64,
        /// Optimizer steps of the final decay, which ends at `total_steps`.
        decay_steps: u64,
        /// Optimizer steps of the whole run; the stable phase lasts
        /// `total_steps - warmup_steps - decay_steps`.
        total_steps: u64,
        /// Where warmup starts and decay ends, as a fraction of the base lr, in [0, 1]
        /// (default 0).
        #[serde(default)]
        min_lr_ratio: f64,
        /// The decay's shape (default: cosine).
        #[serde(default)]
        decay: WsdDecay,
    },
}

fn half() -> f64 {
    0.5
}

/// Shape of the WSD decay phase (`decay_type` of `transformers.get_wsd_schedule`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WsdDecay {
    /// Straight line from 1 to `min_lr_ratio`.
    Linear,
    /// Half cosine (the `transformers` default).
    #[default]
    Cosine,
    /// `1 - sqrt(progress)` (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
    /// Beyond Fixed Training Durations").
    #[serde(rename = "1-sqrt")]
    OneMinusSqrt,
}

impl SchedulerConfig {
    /// Builds the schedule, checking that the step counts and ratios make sense.
    pub fn build(&self) -> Result<Box<dyn Scheduler>> {
        let ratio = |r: f64| {
            if (0.0..=1.0).contains(&r) {
                Ok(r)
            } else {
                Err(Error::config(
                    "scheduler.min_lr_ratio",
                    format!("must be in [0, 1], got {r}"),
                ))
            }
        };
        Ok(match *self {
            SchedulerConfig::Constant => Box::new(Constant),
            SchedulerConfig::ConstantWithWarmup { warmup_steps } => {
                Box::new(ConstantWithWarmup { warmup_steps })
            }
            SchedulerConfig::Linear {
                warmup_steps,
                total_steps,
            } => {
                check_total(warmup_steps, total_steps)?;
                Box::new(Linear {
                    warmup_steps,
                    total_steps,
                })
            }
            SchedulerConfig::Cosine {
                warmup_steps,
                total_steps,
                min_lr_ratio,
                num_cycles,
            } => {
                check_total(warmup_steps, total_steps)?;
                if !(num_cycles.is_finite() && num_cycles > 0.0) {
                    return Err(Error::config(
                        "scheduler.num_cycles",
                        format!("must be > 0, got {num_cycles}"),
                    ));
                }
                Box::new(Cosine {
                    warmup_steps,
                    total_steps,
                    min_lr_ratio: ratio(min_lr_ratio)?,
                    num_cycles,
                })
            }
            SchedulerConfig::Wsd {
                warmup_steps,
                decay_steps,
                total_steps,
                min_lr_ratio,
                decay,
            } => {
                if warmup_steps + decay_steps > total_steps {
                    return Err(Error::config(
                        "scheduler.total_steps",
                        format!(
                            "warmup_steps ({warmup_steps}) + decay_steps ({decay_steps}) exceed \
                             total_steps ({total_steps})"
                        ),
                    ));
                }
                Box::new(Wsd {
                    warmup_steps,
                    stable_steps: total_steps - warmup_steps - decay_steps,
                    decay_steps,
                    min_lr_ratio: ratio(min_lr_ratio)?,
                    decay,
                })
            }
        })
    }
}

fn check_total(warmup_steps: u64, total_steps: u64) -> Result<()> {
    if warmup_steps > total_steps {
        return Err(Error::config(
            "scheduler.warmup_steps",
            format!("({warmup_steps}) exceeds total_steps ({total_steps})"),
        ));
    }
    Ok(())
}

/// `step / max(1, warmup)`, the warmup ramp all `transformers` schedules share.
fn ramp(step: u64, warmup_steps: u64) -> f64 {
    step as f64 / warmup_steps.max(1) as f64
}

/// Factor 1 at every step.
#[derive(Debug, Clone, Copy)]
pub struct Constant;

impl Scheduler for Constant {
    fn name(&self) -> &str {
        "constant"
    }
    fn factor(&self, _step: u64) -> f64 {
        1.0
    }
}

/// Linear warmup, then 1.
#[derive(Debug, Clone, Copy)]
pub struct ConstantWithWarmup {
    /// Optimizer steps of the linear warmup from 0 (0: no warmup).
    pub warmup_steps: u64,
}

impl Scheduler for ConstantWithWarmup {
    fn name(&self) -> &str {
        "constant_with_warmup"
    }
    fn factor(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            ramp(step, self.warmup_steps)
        } else {
            1.0
        }
    }
}

/// Linear warmup, then linear decay to 0.
#[derive(Debug, Clone, Copy)]
pub struct Linear {
    /// Optimizer steps of the linear warmup from 0 (0: no warmup).
    pub warmup_steps: u64,
    /// Optimizer steps of the whole run; the factor reaches 0 here.
    pub total_steps: u64,
}

impl Scheduler for Linear {
    fn name(&self) -> &str {
        "linear"
    }
    fn factor(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return ramp(step, self.warmup_steps);
        }
        let left = self.total_steps as f64 - step as f64;
        (left / (self.total_steps - self.warmup_steps).max(1) as f64).max(0.0)
    }
}

/// Linear warmup, then cosine decay to `min_lr_ratio`.
#[derive(Debug, Clone, Copy)]
pub struct Cosine {
    /// Optimizer steps of the linear warmup from 0 (0: no warmup).
    pub warmup_steps: u64,
    /// Optimizer steps of the whole run; the decay reaches `min_lr_ratio` here.
    pub total_steps: u64,
    /// The floor of the decay as a fraction of the base lr, in [0, 1].
    pub min_lr_ratio: f64,
    /// Cosine periods over the decay (0.5: one half cosine down to the floor).
    pub num_cycles: f64,
}

impl Scheduler for Cosine {
    fn name(&self) -> &str {
        "cosine"
    }
    fn factor(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return ramp(step, self.warmup_steps);
        }
        let progress = (step - self.warmup_steps) as f64
            / (self.total_steps - self.warmup_steps).max(1) as f64;
        let f = 0.5 * (1.0 + (std::f64::consts::PI * self.num_cycles * 2.0 * progress).cos());
        (f * (1.0 - self.min_lr_ratio) + self.min_lr_ratio).max(0.0)
    }
}

/// Warmup-stable-decay.
#[derive(Debug, Clone, Copy)]
pub struct Wsd {
    /// Optimizer steps of the linear warmup from `min_lr_ratio` (0: no warmup).
    pub warmup_steps: u64,
    /// Optimizer steps at factor 1 after the warmup.
    pub stable_steps: u64,
    /// Optimizer steps of the decay to `min_lr_ratio` after the stable phase.
    pub decay_steps: u64,
    /// Where warmup starts and decay ends, as a fraction of the base lr, in [0, 1].
    pub min_lr_ratio: f64,
    /// The decay's shape.
    pub decay: WsdDecay,
}

impl Scheduler for Wsd {
    fn name(&self) -> &str {
        "wsd"
    }
    fn factor(&self, step: u64) -> f64 {
        let r = self.min_lr_ratio;
        if step < self.warmup_steps {
            return (ramp(step, self.warmup_steps) * (1.0 - r) + r).max(0.0);
        }
        let decay_start = self.warmup_steps + self.stable_steps;
        if step < decay_start {
            return 1.0;
        }
        if step < decay_start + self.decay_steps {
            let progress = (step - decay_start) as f64 / self.decay_steps.max(1) as f64;
            let f = match self.decay {
                WsdDecay::Linear => 1.0 - progress,
                WsdDecay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
                WsdDecay::OneMinusSqrt => 1.0 - progress.sqrt(),
            };
            return (f * (1.0 - r) + r).max(0.0);
        }
        r
    }
}
