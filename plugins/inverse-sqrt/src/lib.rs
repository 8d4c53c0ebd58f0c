//! `inverse_sqrt`: linear warmup, then an inverse square-root decay, as Hugging Face
//! transformers' `get_inverse_sqrt_schedule` (adapted there from big_vision):
//!
//! ```text
//! factor(t) = t / max(1, warmup_steps)                      for t < warmup_steps
//! factor(t) = 1 / sqrt((t + timescale - warmup) / timescale)  otherwise
//! ```
//!
//! with `timescale` defaulting to `warmup_steps`, or 10 000 when there is no warmup. `t` is the
//! 0-based optimizer step (the first update uses `factor(0)`, as `LambdaLR` does).
//!
//! ```yaml
//! plugins: [target/release/libvolttrain_inverse_sqrt.so]
//! scheduler: { name: inverse_sqrt, warmup_steps: 100 }
//! ```

#![warn(missing_docs)]

use volttrain::error::{Error, Result};
use volttrain::plugin::{PluginRegistrar, SchedulerCtx, parse_config};
use volttrain::sched::Scheduler;

/// The schedule's settings.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InverseSqrtConfig {
    /// Steps of linear warmup from 0. Default 0.
    pub warmup_steps: u64,
    /// Decay time scale: after warmup the factor is `1 / sqrt(1 + (t - warmup) / timescale)`,
    /// so it halves `3 x timescale` steps after warmup. Default `warmup_steps`, or 10 000 when
    /// that is 0 (transformers' defaults).
    pub timescale: Option<u64>,
}

/// The schedule.
#[derive(Debug, Clone)]
pub struct InverseSqrt {
    warmup: u64,
    timescale: u64,
}

impl InverseSqrt {
    /// The schedule of `config`, `timescale` resolved to its default when unset (0 is an error).
    pub fn new(config: &InverseSqrtConfig) -> Result<Self> {
        let timescale = config.timescale.unwrap_or(if config.warmup_steps == 0 {
            10_000
        } else {
            config.warmup_steps
        });
        if timescale == 0 {
            return Err(Error::config("scheduler.timescale", "must be >= 1"));
        }
        Ok(InverseSqrt {
            warmup: config.warmup_steps,
            timescale,
        })
    }
}

impl Scheduler for InverseSqrt {
    fn name(&self) -> &str {
        "inverse_sqrt"
    }

    fn factor(&self, step: u64) -> f64 {
        if step < self.warmup {
            return step as f64 / self.warmup.max(1) as f64;
        }
        let shifted = (step - self.warmup) as f64 + self.timescale as f64;
        1.0 / (shifted / self.timescale as f64).sqrt()
    }
}

fn build(cfg: &serde_yaml::Value, _: &SchedulerCtx) -> Result<Box<dyn Scheduler>> {
    let config: InverseSqrtConfig = parse_config("scheduler", cfg)?;
    Ok(Box::new(InverseSqrt::new(&config)?))
}

fn register(r: &mut PluginRegistrar) -> Result<()> {
    r.register_scheduler("inverse_sqrt", build);
    Ok(())
}

volttrain::declare_plugin!(register);
