//! The training loop.
//!
//! ```text
//! let summary = Trainer::builder()
//!     .model(model)                 // Box<dyn CausalLm>, adapters already injected
//!     .train_data(train)            // Box<dyn BatchSource>
//!     .eval_data(eval)
//!     .optimizer(opt)               // Box<dyn DynOptimizer>
//!     .scheduler(sched)
//!     .base_lr(2e-3)
//!     .epochs(3)
//!     .build()?
//!     .fit()?;
//! ```
//!
//! Per optimizer step: `grad_accum` micro-batches, the loss summed over label tokens and divided
//! by the label tokens of the whole step (all micro-batches, all ranks); gradient all-reduce in
//! data parallel; clipping by global norm; a non-finite check; the optimizer step; the schedule.
//!
//! Where things are: [`TrainerBuilder`] and its checks in `builder.rs`; the loop
//! ([`Trainer::fit`]) and one optimizer step (`Trainer::train_step`) in `fit.rs`; evaluation
//! ([`Trainer::evaluate`], [`evaluate_model`]) in `eval.rs`; the resume checkpoint `last/` in
//! `checkpoint.rs`; the end of a run (`final/`) in `finish.rs`; the loss of one micro-batch in
//! `step.rs`.

mod builder;
mod checkpoint;
mod dist;
mod eval;
mod finish;
mod fit;

pub mod preference;
mod step;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tch::{Device, Tensor};

/// Label id ignored by the loss: the one constant, [`crate::data::IGNORE_INDEX`].
pub use crate::data::IGNORE_INDEX;
pub use builder::TrainerBuilder;
pub use checkpoint::{
    CALLBACK_STATE, Loaded, TrainState, last_dir, load as load_resume_checkpoint,
};
pub use dist::C10dCollective;
pub use eval::{evaluate_model, evaluate_model_in};
pub use finish::{FINAL_DIR, final_dir};
pub use preference::{PreferenceConfig, PreferenceLoss, PreferenceObjective};
pub use step::Precision;

use crate::amp::{Autocast, LossScaler};
use crate::callback::{Callback, Control, EvalMetrics, ModelSaver, StepMetrics};
use crate::data::Batch;
use crate::error::Result;
use crate::model::CausalLm;
use crate::optim::DynOptimizer;
use crate::sched::Scheduler;

/// A source of micro-batches with random access, so a run can resume at any position and data
/// parallel ranks can read disjoint shards.
pub trait BatchSource: Send {
    /// Micro-batches in `epoch` (for this rank).
    fn num_batches(&self, epoch: usize) -> usize;
    /// Micro-batch `index` of `epoch`; the order within an epoch is a function of the seed and
    /// the epoch only.
    fn batch(&mut self, epoch: usize, index: usize) -> Result<Batch>;
}

/// Collective operations for data-parallel training ([`C10dCollective`] implements them over
/// PyTorch's c10d).
pub trait Collective: Send {
    /// This process's rank, 0-based; rank 0 logs, evaluates into metrics and saves.
    fn rank(&self) -> usize;
    /// Number of ranks in the run.
    fn world_size(&self) -> usize;
    /// Sums `values` over all ranks.
    fn all_reduce_f64(&mut self, values: &[f64]) -> Result<Vec<f64>>;
    /// Called once before training with the trainable parameters (same order on every rank).
    fn prepare_grads(&mut self, params: &[(String, Tensor)]) -> Result<()>;
    /// Whether gradient all-reduces may start during the coming backward (off for all but the
    /// last micro-batch of an accumulation, as DDP's `no_sync`).
    fn sync_in_backward(&mut self, on: bool) {
        let _ = on;
    }
    /// Averages the gradients over all ranks, in place (after the step's last backward).
    fn average_grads(&mut self) -> Result<()>;
    /// Copies rank 0's values of `params` to every rank.
    fn broadcast_params(&mut self, params: &[(String, Tensor)]) -> Result<()>;
}

/// What to do when the loss or gradient norm is not finite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonFinitePolicy {
    /// Stop with an error naming the step; nothing is updated or saved.
    #[default]
    Stop,
    /// Drop the step's gradients, count it, and go on.
    Skip,
}

/// Result of [`Trainer::fit`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct FitSummary {
    /// The optimizer step the run ended at, skipped steps included (a resumed run counts on
    /// from its checkpoint's step).
    pub steps: u64,
    /// Label tokens trained on.
    pub tokens: u64,
    /// Input tokens processed.
    pub input_tokens: u64,
    /// Training loss of the last step this `fit` took (`None`: it took none).
    pub final_train_loss: Option<f64>,
    /// Loss of the final evaluation (`None`: no eval data).
    pub final_eval_loss: Option<f64>,
    /// Input tokens per second of training: over [`FitSummary::train_secs`].
    pub tokens_per_sec: f64,
    /// Steps dropped over the whole run (resumed part included) for a non-finite loss or
    /// gradient ([`NonFinitePolicy::Skip`]) or by the loss scaler's overflow check.
    pub skipped_steps: u64,
    /// Seconds of training: from the start of `fit` through the last step, the final eval and
    /// the final save, before the fit-end callbacks (which close tracker runs and flush logs),
    /// as transformers' `train_runtime` is measured before `on_train_end`.
    pub train_secs: f64,
    /// Seconds of the whole `fit`, the fit-end callbacks included.
    pub elapsed_secs: f64,
    /// Why the run stopped early, if a callback asked.
    pub stopped_by: Option<String>,
    /// What callbacks report, by callback name (`Callback::summary`): e.g. `wandb` and `mlflow`
    /// give their delivered and dropped points.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub callbacks: BTreeMap<String, serde_json::Value>,
}

/// The training loop. Made by [`Trainer::builder`].
pub struct Trainer {
    /// The autocast setting `precision` resolved to on `device`.
    amp: Autocast,
    /// fp16's dynamic loss scaling.
    scaler: Option<LossScaler>,
    /// Whether a saver was given: the end of the run writes `final/` (see [`FINAL_DIR`]).
    save_final: bool,
    model: Box<dyn CausalLm>,
    train: Box<dyn BatchSource>,
    eval: Option<Box<dyn BatchSource>>,
    optimizer: Box<dyn DynOptimizer>,
    scheduler: Box<dyn Scheduler>,
    base_lr: f64,
    callbacks: Vec<Box<dyn Callback>>,
    saver: Box<dyn ModelSaver>,
    device: Device,
    grad_accum: usize,
    epochs: usize,
    total_steps: u64,
    clip_norm: Option<f64>,
    gradient_checkpointing: bool,
    /// `None`: the host's malloc settings are left alone.
    keep_freed_memory: Option<bool>,
    eval_every: Option<u64>,
    output_dir: PathBuf,
    on_nonfinite: NonFinitePolicy,
    resume: bool,
    collective: Option<Box<dyn Collective>>,
    interrupt: Option<Arc<AtomicBool>>,
    checkpoint_every: Option<u64>,
    checkpoint_files: Vec<(String, Vec<u8>)>,
    preference: Option<PreferenceObjective>,
    state: TrainState,
}

/// Which hook to call.
enum Hook<'m> {
    FitStart,
    FitEnd,
    EpochStart,
    EpochEnd,
    Step(&'m StepMetrics),
    Eval(&'m EvalMetrics),
    Save(&'m std::path::Path),
}

impl Hook<'_> {
    /// The [`Callback`] method this hook calls, for logs.
    fn name(&self) -> &'static str {
        match self {
            Hook::FitStart => "on_fit_start",
            Hook::FitEnd => "on_fit_end",
            Hook::EpochStart => "on_epoch_start",
            Hook::EpochEnd => "on_epoch_end",
            Hook::Step(_) => "on_step_end",
            Hook::Eval(_) => "on_eval_end",
            Hook::Save(_) => "on_save",
        }
    }
}

impl Trainer {
    /// A new builder.
    pub fn builder() -> TrainerBuilder {
        TrainerBuilder::default()
    }

    /// The model (e.g. to save it after `fit`).
    pub fn model(&self) -> &dyn CausalLm {
        self.model.as_ref()
    }

    /// Takes the model out of the trainer.
    pub fn into_model(self) -> Box<dyn CausalLm> {
        self.model
    }

    /// Optimizer steps the run will take.
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// Current position.
    pub fn state(&self) -> &TrainState {
        &self.state
    }

    fn is_main(&self) -> bool {
        self.collective.as_ref().is_none_or(|c| c.rank() == 0)
    }

    fn trainable(&self) -> Vec<(String, Tensor)> {
        self.model
            .named_parameters()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect()
    }

    fn call(&mut self, hook: Hook<'_>, stop: &mut Option<String>) -> Result<()> {
        let is_main = self.is_main();
        for cb in self.callbacks.iter_mut() {
            let mut ctl = Control::new(
                self.state.step,
                self.state.epoch,
                self.model.as_ref(),
                self.saver.as_ref(),
                &self.output_dir,
                is_main,
                stop,
            );
            let r = match &hook {
                Hook::FitStart => cb.on_fit_start(&mut ctl),
                Hook::FitEnd => cb.on_fit_end(&mut ctl),
                Hook::EpochStart => cb.on_epoch_start(&mut ctl),
                Hook::EpochEnd => cb.on_epoch_end(&mut ctl),
                Hook::Step(m) => cb.on_step_end(&mut ctl, m),
                Hook::Eval(m) => cb.on_eval_end(&mut ctl, m),
                Hook::Save(d) => cb.on_save(&mut ctl, d),
            };
            // The error keeps its variant (a callback's `Error::Config` stays one); the log
            // says which callback and hook failed.
            if let Err(e) = r {
                tracing::error!(
                    callback = cb.name(),
                    hook = hook.name(),
                    "callback failed: {e}"
                );
                return Err(e);
            }
        }
        Ok(())
    }

    /// Adds a callback after `build` (e.g. one that needs [`Trainer::total_steps`]).
    pub fn add_callback(&mut self, c: Box<dyn Callback>) {
        self.callbacks.push(c);
    }
}
