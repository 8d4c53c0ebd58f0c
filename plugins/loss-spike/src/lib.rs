//! `loss_spike`: a callback that watches the loss and the gradient norm after every optimizer
//! step and asks the trainer to stop ([`Control::request_stop`]) when training diverges.
//!
//! A step is a *spike* when its loss exceeds `factor` times the mean loss of the last `window`
//! steps that were not spikes (the check starts once the window is full), or when its gradient
//! norm exceeds `max_grad_norm`. `patience` consecutive spikes stop the run; a non-finite loss
//! or gradient norm stops it at once. On stop, the main process writes `loss_spike.json` into
//! the output directory (step, loss, baseline, grad norm, reason).
//!
//! The window and the count of spikes in a row are the callback's state
//! ([`Callback::state_dict`]): the trainer keeps them in the resume checkpoint, so a resumed run
//! detects exactly what the uninterrupted run would.
//!
//! ```yaml
//! plugins: [target/release/libvolttrain_loss_spike.so]
//! callbacks:
//!   - { name: loss_spike, window: 20, factor: 3.0, max_grad_norm: 100.0, patience: 1 }
//! ```

#![warn(missing_docs)]

use std::collections::VecDeque;

use volttrain::callback::{Callback, Control, StepMetrics};
use volttrain::error::{Error, Result, write_atomic};
use volttrain::plugin::{CallbackCtx, PluginRegistrar, parse_config};

/// The monitor's settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossSpikeConfig {
    /// Steps the baseline loss is averaged over. Default 20.
    pub window: usize,
    /// A loss above `factor` x baseline is a spike. Default 3.0; must be > 1.
    pub factor: f64,
    /// A gradient norm (before clipping) above this is a spike. Default: not checked.
    pub max_grad_norm: Option<f64>,
    /// Consecutive spikes that stop the run. Default 1.
    pub patience: u32,
    /// Stop at once on a NaN or infinite loss or gradient norm. Default true.
    pub stop_on_non_finite: bool,
}

impl Default for LossSpikeConfig {
    fn default() -> Self {
        LossSpikeConfig {
            window: 20,
            factor: 3.0,
            max_grad_norm: None,
            patience: 1,
            stop_on_non_finite: true,
        }
    }
}

impl LossSpikeConfig {
    fn validate(&self) -> Result<()> {
        let bad =
            |key: &str, msg: String| Err(Error::config(format!("callbacks.loss_spike.{key}"), msg));
        if self.window == 0 {
            return bad("window", "must be >= 1".into());
        }
        if self.factor.is_nan() || self.factor <= 1.0 {
            return bad("factor", format!("must be > 1, got {}", self.factor));
        }
        if self.patience == 0 {
            return bad("patience", "must be >= 1".into());
        }
        if let Some(m) = self.max_grad_norm
            && (m.is_nan() || m <= 0.0)
        {
            return bad("max_grad_norm", format!("must be > 0, got {m}"));
        }
        Ok(())
    }
}

/// What `loss_spike.json` holds.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SpikeReport {
    /// The optimizer step whose loss or grad norm was a spike.
    pub step: u64,
    /// That step's training loss.
    pub loss: f64,
    /// Mean loss of the window before the step (`None` while the window was filling).
    pub baseline: Option<f64>,
    /// That step's gradient norm before clipping.
    pub grad_norm: f64,
    /// The stop reason given to the trainer (`loss_spike: step 12: ...`).
    pub reason: String,
}

/// What [`Callback::state_dict`] gives: the window (oldest first) and the spikes in a row.
///
/// Losses are strings as Rust prints an `f64` (`3.396720839756284`, `NaN`, `inf`): they come
/// back bit for bit (a JSON number read back by `serde_json` may be one ulp off, and JSON has
/// no NaN, which the window may hold when `stop_on_non_finite` is off).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossSpikeState {
    /// Losses of the last steps that were not spikes, oldest first (at most `window`).
    pub recent: Vec<String>,
    /// Consecutive spikes up to the last step.
    pub consecutive: u32,
}

/// The monitor.
#[derive(Debug)]
pub struct LossSpike {
    config: LossSpikeConfig,
    recent: VecDeque<f64>,
    consecutive: u32,
}

impl LossSpike {
    /// A monitor with an empty window; errors name the invalid `config` field.
    pub fn new(config: LossSpikeConfig) -> Result<Self> {
        config.validate()?;
        Ok(LossSpike {
            recent: VecDeque::with_capacity(config.window),
            config,
            consecutive: 0,
        })
    }

    fn baseline(&self) -> Option<f64> {
        (self.recent.len() == self.config.window)
            .then(|| self.recent.iter().sum::<f64>() / self.recent.len() as f64)
    }

    /// Why step `m` is a spike, if it is one.
    fn spike(&self, m: &StepMetrics, baseline: Option<f64>) -> Option<String> {
        if let Some(base) = baseline
            && m.loss > self.config.factor * base
        {
            return Some(format!(
                "loss {} > {} x the mean {} of the last {} steps",
                m.loss, self.config.factor, base, self.config.window
            ));
        }
        if let Some(max) = self.config.max_grad_norm
            && m.grad_norm > max
        {
            return Some(format!(
                "gradient norm {} > max_grad_norm {max}",
                m.grad_norm
            ));
        }
        None
    }

    fn stop(
        &self,
        ctl: &mut Control<'_>,
        m: &StepMetrics,
        baseline: Option<f64>,
        why: String,
    ) -> Result<()> {
        let reason = format!("loss_spike: step {}: {why}", m.step);
        if ctl.is_main {
            let report = SpikeReport {
                step: m.step,
                loss: m.loss,
                baseline,
                grad_norm: m.grad_norm,
                reason: reason.clone(),
            };
            let path = ctl.output_dir.join("loss_spike.json");
            let json = serde_json::to_vec_pretty(&report).map_err(|e| Error::Json {
                path: path.clone(),
                source: e,
            })?;
            write_atomic(&path, &json)?;
        }
        ctl.request_stop(reason);
        Ok(())
    }
}

impl Callback for LossSpike {
    fn name(&self) -> &str {
        "loss_spike"
    }

    fn on_step_end(&mut self, ctl: &mut Control<'_>, m: &StepMetrics) -> Result<()> {
        let baseline = self.baseline();
        if self.config.stop_on_non_finite && !(m.loss.is_finite() && m.grad_norm.is_finite()) {
            let why = format!(
                "non-finite loss {} or gradient norm {}",
                m.loss, m.grad_norm
            );
            return self.stop(ctl, m, baseline, why);
        }
        match self.spike(m, baseline) {
            Some(why) => {
                self.consecutive += 1;
                if self.consecutive >= self.config.patience {
                    let why = if self.config.patience > 1 {
                        format!("{why} ({} spikes in a row)", self.consecutive)
                    } else {
                        why
                    };
                    return self.stop(ctl, m, baseline, why);
                }
            }
            None => {
                self.consecutive = 0;
                if self.recent.len() == self.config.window {
                    self.recent.pop_front();
                }
                self.recent.push_back(m.loss);
            }
        }
        Ok(())
    }

    fn state_dict(&self) -> Result<Option<serde_json::Value>> {
        let state = LossSpikeState {
            recent: self.recent.iter().map(f64::to_string).collect(),
            consecutive: self.consecutive,
        };
        serde_json::to_value(state)
            .map(Some)
            .map_err(|e| state_error(e.to_string()))
    }

    /// Takes back the window and the spike count. A window saved with a larger `window` keeps
    /// its newest `window` losses.
    fn load_state_dict(&mut self, state: serde_json::Value) -> Result<()> {
        let state: LossSpikeState =
            serde_json::from_value(state).map_err(|e| state_error(e.to_string()))?;
        let mut recent = state
            .recent
            .iter()
            .map(|x| {
                x.parse::<f64>()
                    .map_err(|_| state_error(format!("`{x}` is not a loss")))
            })
            .collect::<Result<VecDeque<f64>>>()?;
        while recent.len() > self.config.window {
            recent.pop_front();
        }
        self.recent = recent;
        self.consecutive = state.consecutive;
        Ok(())
    }
}

/// A saved state that does not fit: `loss_spike state: {msg}`.
fn state_error(msg: String) -> Error {
    Error::State {
        owner: "loss_spike".into(),
        msg,
    }
}

fn build(cfg: &serde_yaml::Value, _: &CallbackCtx) -> Result<Box<dyn Callback>> {
    Ok(Box::new(LossSpike::new(parse_config(
        "callbacks.loss_spike",
        cfg,
    )?)?))
}

fn register(r: &mut PluginRegistrar) -> Result<()> {
    r.register_callback("loss_spike", build);
    Ok(())
}

volttrain::declare_plugin!(register);
