//! Training callbacks.
//!
//! A [`Callback`] is told about the trainer's progress through hooks with no-op defaults, so an
//! implementation writes only the hooks it needs. Any hook can ask the trainer to stop through
//! [`Control::request_stop`]. A callback that keeps state across steps (a window of losses, a
//! best value) gives it to the resume checkpoint through [`Callback::state_dict`] and takes it
//! back through [`Callback::load_state_dict`], so a resumed run goes on as if never stopped.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::CausalLm;

/// Metrics of one optimizer step.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StepMetrics {
    /// Optimizer steps done so far (1 after the first step).
    pub step: u64,
    /// Epoch of the step, 0-based.
    pub epoch: usize,
    /// Mean loss over the label tokens of the step (all micro-batches).
    pub loss: f64,
    /// Learning rate of each group, by group name.
    pub lr: BTreeMap<String, f64>,
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    /// Label tokens in this step.
    pub tokens: u64,
    /// Input tokens per second over this step.
    pub tokens_per_sec: f64,
    /// Objective-specific metrics by name (preference tuning: TRL's `rewards/chosen`, ...),
    /// written beside the others (flattened into the same JSON object).
    #[serde(flatten, deserialize_with = "numbers_only")]
    pub extra: BTreeMap<String, f64>,
}

/// Metrics of one evaluation.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct EvalMetrics {
    /// Optimizer steps done when the evaluation ran.
    pub step: u64,
    /// Epoch of the evaluation, 0-based.
    pub epoch: usize,
    /// Mean loss over all label tokens of the eval set.
    pub eval_loss: f64,
    /// Label tokens evaluated.
    pub tokens: u64,
    /// Objective-specific metrics by name, as in [`StepMetrics::extra`].
    #[serde(flatten, deserialize_with = "numbers_only")]
    pub extra: BTreeMap<String, f64>,
}

/// The numeric entries of the flattened rest of a metrics object (other keys, such as a
/// `kind` tag, are left out).
fn numbers_only<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<BTreeMap<String, f64>, D::Error> {
    let all: BTreeMap<String, serde_json::Value> = serde::Deserialize::deserialize(d)?;
    Ok(all
        .into_iter()
        .filter_map(|(k, v)| v.as_f64().map(|x| (k, x)))
        .collect())
}

/// Writes what a training run saves (adapter in PEFT format or full weights, tokenizer files,
/// chat template, config) into a directory.
pub trait ModelSaver {
    /// Writes everything into `dir` (which exists and is empty).
    fn save_to(&self, model: &dyn CausalLm, dir: &Path) -> Result<()>;
}

/// What the trainer shows a callback, and the stop switch.
pub struct Control<'a> {
    /// Optimizer steps done so far.
    pub step: u64,
    /// The current epoch, 0-based.
    pub epoch: usize,
    /// The model being trained (read-only: a callback saves or inspects it).
    pub model: &'a dyn CausalLm,
    /// Writes the model the way the run saves it (adapter or full weights, tokenizer, config).
    pub saver: &'a dyn ModelSaver,
    /// The run's output directory.
    pub output_dir: &'a Path,
    /// True on the process that saves and logs (rank 0, or the only process).
    pub is_main: bool,
    stop: &'a mut Option<String>,
}

impl<'a> Control<'a> {
    /// Made by the trainer for each hook call.
    pub fn new(
        step: u64,
        epoch: usize,
        model: &'a dyn CausalLm,
        saver: &'a dyn ModelSaver,
        output_dir: &'a Path,
        is_main: bool,
        stop: &'a mut Option<String>,
    ) -> Self {
        Control {
            step,
            epoch,
            model,
            saver,
            output_dir,
            is_main,
            stop,
        }
    }

    /// Asks the trainer to stop after the current step, with a reason it logs.
    pub fn request_stop(&mut self, reason: impl Into<String>) {
        *self.stop = Some(reason.into());
    }

    /// The stop reason, if one was requested.
    pub fn stop_requested(&self) -> Option<&str> {
        self.stop.as_deref()
    }
}

/// Hooks into the training loop. Every hook has a no-op default.
#[allow(unused_variables)]
pub trait Callback: Send {
    /// Name used in logs and errors.
    fn name(&self) -> &str {
        "callback"
    }
    /// Before the first step (after a resume: before the first step still to take).
    fn on_fit_start(&mut self, ctl: &mut Control<'_>) -> Result<()> {
        Ok(())
    }
    /// After the last step and the final eval, before the trainer returns.
    fn on_fit_end(&mut self, ctl: &mut Control<'_>) -> Result<()> {
        Ok(())
    }
    /// Before the first step of each epoch.
    fn on_epoch_start(&mut self, ctl: &mut Control<'_>) -> Result<()> {
        Ok(())
    }
    /// After the last step of each epoch (the trainer then evaluates and saves `epoch-N/`).
    fn on_epoch_end(&mut self, ctl: &mut Control<'_>) -> Result<()> {
        Ok(())
    }
    /// After each optimizer step, with its metrics.
    fn on_step_end(&mut self, ctl: &mut Control<'_>, metrics: &StepMetrics) -> Result<()> {
        Ok(())
    }
    /// After each evaluation, with its metrics.
    fn on_eval_end(&mut self, ctl: &mut Control<'_>, metrics: &EvalMetrics) -> Result<()> {
        Ok(())
    }
    /// After the trainer (or a callback) saved into `dir`.
    fn on_save(&mut self, ctl: &mut Control<'_>, dir: &Path) -> Result<()> {
        Ok(())
    }
    /// The run failed with `error`; the last chance to flush logs.
    fn on_error(&mut self, error: &Error) {}
    /// What this callback adds to the run summary after `on_fit_end` (under its name in
    /// `FitSummary::callbacks`), e.g. a tracker's delivered and dropped points.
    fn summary(&self) -> Option<serde_json::Value> {
        None
    }
    /// The state to carry over a resume, as JSON (`None`, the default: the callback keeps
    /// none). The trainer writes it into the resume checkpoint `last/`, in the same atomic write
    /// as the weights and the optimizer state, as one entry of `last/callbacks.json`
    /// ([`crate::trainer::CALLBACK_STATE`]) under the callback's key: its [`Callback::name`],
    /// and `name#2`, `name#3`, ... for further callbacks of the same name. Called on the main
    /// process after the hooks of the step the checkpoint is written at.
    ///
    /// Floats that must come back bit for bit are best written as strings (`x.to_string()`,
    /// read back with `s.parse::<f64>()`): `serde_json` may read a JSON number back one ulp
    /// off, and JSON has no NaN or infinity.
    fn state_dict(&self) -> Result<Option<serde_json::Value>> {
        Ok(None)
    }
    /// Takes back what [`Callback::state_dict`] gave, when a run resumes: called once, before
    /// `on_fit_start`, on every process. On resume, a saved state whose key no callback of the
    /// run has is an error (callbacks are matched by key, not by position, so their order may
    /// change); a callback whose key has no saved state is not called and starts afresh.
    ///
    /// The default refuses any state: a callback that returns state must take it back.
    fn load_state_dict(&mut self, state: serde_json::Value) -> Result<()> {
        let _ = state;
        Err(Error::State {
            owner: format!("callback `{}`", self.name()),
            msg: "the callback keeps no state, but the resume checkpoint holds some for it".into(),
        })
    }
}

mod metrics;
mod mlflow;
mod progress;
mod samples;
mod saver;
mod tensorboard;
pub mod tracker;
mod wandb;

pub use metrics::MetricsJsonl;
pub use mlflow::{Mlflow, MlflowConfig};
pub use progress::Progress;
pub use samples::{SampleGenerations, SampleGenerationsConfig};
pub use saver::{EpochSaver, SftSaver, epoch_dirs};
pub use tensorboard::{TensorBoard, TensorBoardWriter};
pub use wandb::{Wandb, WandbConfig, WandbMode, shorthand_section as wandb_shorthand};
