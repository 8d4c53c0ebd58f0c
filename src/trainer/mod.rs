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

mod checkpoint;
mod dist;
mod finish;

pub mod preference;
mod step;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tch::{Device, Tensor};

pub use checkpoint::{Loaded, TrainState, last_dir, load as load_resume_checkpoint};
pub use dist::C10dCollective;
pub use finish::{FINAL_DIR, final_dir};
pub use preference::{PreferenceConfig, PreferenceLoss, PreferenceObjective};
pub use step::{IGNORE_INDEX, Precision};

use crate::amp::{Autocast, LossScaler, LossScalerConfig};
use crate::callback::{Callback, Control, EvalMetrics, ModelSaver, StepMetrics};
use crate::data::Batch;
use crate::error::{Error, Result, TchResultExt};
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
    fn rank(&self) -> usize;
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
    pub steps: u64,
    /// Label tokens trained on.
    pub tokens: u64,
    /// Input tokens processed.
    pub input_tokens: u64,
    pub final_train_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    /// Input tokens per second of training: over [`FitSummary::train_secs`].
    pub tokens_per_sec: f64,
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

type SchedulerFactory = Box<dyn FnOnce(u64) -> Result<Box<dyn Scheduler>>>;

/// Builds a [`Trainer`]; [`TrainerBuilder::build`] checks the combination.
pub struct TrainerBuilder {
    model: Option<Box<dyn CausalLm>>,
    train: Option<Box<dyn BatchSource>>,
    eval: Option<Box<dyn BatchSource>>,
    optimizer: Option<Box<dyn DynOptimizer>>,
    scheduler: Option<SchedulerFactory>,
    base_lr: Option<f64>,
    callbacks: Vec<Box<dyn Callback>>,
    saver: Option<Box<dyn ModelSaver>>,
    device: Device,
    precision: Precision,
    loss_scaler: LossScalerConfig,
    grad_accum: usize,
    epochs: usize,
    max_steps: Option<u64>,
    clip_norm: Option<f64>,
    gradient_checkpointing: bool,
    seed: u64,
    eval_every: Option<u64>,
    output_dir: PathBuf,
    on_nonfinite: NonFinitePolicy,
    resume: bool,
    collective: Option<Box<dyn Collective>>,
    interrupt: Option<Arc<AtomicBool>>,
    checkpoint_every: Option<u64>,
    keep_freed_memory: bool,
    checkpoint_files: Vec<(String, Vec<u8>)>,
    preference: Option<PreferenceObjective>,
}

impl Default for TrainerBuilder {
    fn default() -> Self {
        TrainerBuilder {
            model: None,
            train: None,
            eval: None,
            optimizer: None,
            scheduler: None,
            base_lr: None,
            callbacks: Vec::new(),
            saver: None,
            device: Device::Cpu,
            precision: Precision::Auto,
            loss_scaler: LossScalerConfig::default(),
            grad_accum: 1,
            epochs: 1,
            max_steps: None,
            clip_norm: None,
            gradient_checkpointing: false,
            seed: 42,
            eval_every: None,
            output_dir: PathBuf::from("runs/default"),
            on_nonfinite: NonFinitePolicy::Stop,
            resume: false,
            collective: None,
            interrupt: None,
            checkpoint_every: None,
            keep_freed_memory: true,
            checkpoint_files: Vec::new(),
            preference: None,
        }
    }
}

impl TrainerBuilder {
    pub fn model(mut self, m: Box<dyn CausalLm>) -> Self {
        self.model = Some(m);
        self
    }
    pub fn train_data(mut self, d: Box<dyn BatchSource>) -> Self {
        self.train = Some(d);
        self
    }
    pub fn eval_data(mut self, d: Box<dyn BatchSource>) -> Self {
        self.eval = Some(d);
        self
    }
    /// The optimizer over the model's trainable parameters (see `optim::build_optimizer` to
    /// make one from a `ParamGrouper`).
    pub fn optimizer(mut self, o: Box<dyn DynOptimizer>) -> Self {
        self.optimizer = Some(o);
        self
    }
    /// A fixed schedule.
    pub fn scheduler(mut self, s: Box<dyn Scheduler>) -> Self {
        self.scheduler = Some(Box::new(move |_| Ok(s)));
        self
    }
    /// A schedule made once the total number of optimizer steps is known.
    pub fn scheduler_with(
        mut self,
        f: impl FnOnce(u64) -> Result<Box<dyn Scheduler>> + 'static,
    ) -> Self {
        self.scheduler = Some(Box::new(f));
        self
    }
    /// Base learning rate; each group gets `base_lr * lr_mult * schedule(step)`.
    pub fn base_lr(mut self, lr: f64) -> Self {
        self.base_lr = Some(lr);
        self
    }
    pub fn callback(mut self, c: Box<dyn Callback>) -> Self {
        self.callbacks.push(c);
        self
    }
    /// What callbacks (the epoch saver) write.
    pub fn saver(mut self, s: Box<dyn ModelSaver>) -> Self {
        self.saver = Some(s);
        self
    }
    pub fn device(mut self, d: Device) -> Self {
        self.device = d;
        self
    }
    pub fn precision(mut self, p: Precision) -> Self {
        self.precision = p;
        self
    }
    /// Dynamic loss scaling of `precision: fp16` (`torch.amp.GradScaler`'s defaults unless set).
    pub fn loss_scaler(mut self, c: LossScalerConfig) -> Self {
        self.loss_scaler = c;
        self
    }
    pub fn grad_accum(mut self, n: usize) -> Self {
        self.grad_accum = n;
        self
    }
    pub fn epochs(mut self, n: usize) -> Self {
        self.epochs = n;
        self
    }
    pub fn max_steps(mut self, n: Option<u64>) -> Self {
        self.max_steps = n;
        self
    }
    pub fn clip_norm(mut self, c: Option<f64>) -> Self {
        self.clip_norm = c;
        self
    }
    pub fn gradient_checkpointing(mut self, on: bool) -> Self {
        self.gradient_checkpointing = on;
        self
    }
    /// Keep memory freed between steps inside the process instead of handing it back to the
    /// kernel (glibc `mallopt`, process-wide, set when `fit` starts). Default `true`: it saves
    /// the page faults and page zeroing of re-taking the activations' memory every step
    /// (9% of the tokens/s of the 8-layer CPU LoRA bench step, none on full fine-tuning). The
    /// cost: the resident size stays at its peak, and the peak grows (+8-13% on that step; see
    /// `src/malloc.rs`). Turn it off when memory is what matters (QLoRA): `false` sets the
    /// opposite (freed blocks of 256 KiB or more go back to the kernel at once; glibc's own
    /// defaults keep most of them resident after the first step).
    pub fn keep_freed_memory(mut self, on: bool) -> Self {
        self.keep_freed_memory = on;
        self
    }
    pub fn seed(mut self, s: u64) -> Self {
        self.seed = s;
        self
    }
    /// Evaluate every `n` optimizer steps (always at each epoch end when eval data is given).
    pub fn eval_every(mut self, n: Option<u64>) -> Self {
        self.eval_every = n;
        self
    }
    pub fn output_dir(mut self, d: impl Into<PathBuf>) -> Self {
        self.output_dir = d.into();
        self
    }
    pub fn on_nonfinite(mut self, p: NonFinitePolicy) -> Self {
        self.on_nonfinite = p;
        self
    }
    /// Continue from `<output_dir>/last/`.
    pub fn resume(mut self, r: bool) -> Self {
        self.resume = r;
        self
    }
    /// Data-parallel collectives (rank, world size, gradient all-reduce).
    pub fn collective(mut self, c: Box<dyn Collective>) -> Self {
        self.collective = Some(c);
        self
    }
    /// A flag (set from a Ctrl-C handler) that ends the run after the current step with a resume
    /// checkpoint.
    pub fn interrupt_flag(mut self, f: Arc<AtomicBool>) -> Self {
        self.interrupt = Some(f);
        self
    }
    /// Also write the resume checkpoint every `n` steps (it is always written at epoch ends and
    /// on interrupt).
    pub fn checkpoint_every(mut self, n: Option<u64>) -> Self {
        self.checkpoint_every = n;
        self
    }

    /// Also write `bytes` as `name` into every resume checkpoint (`last/`), e.g. the resolved
    /// config, so a resumed run can be checked against what wrote the checkpoint.
    pub fn checkpoint_file(mut self, name: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Self {
        self.checkpoint_files.push((name.into(), bytes.into()));
        self
    }

    /// Train on preference pairs with this objective (DPO, IPO, hinge, robust, ORPO) instead of
    /// the SFT cross-entropy; the data yields `2B` rows per batch of `B` pairs, chosen rows
    /// first (see [`crate::data::preference`]).
    pub fn preference(mut self, o: PreferenceObjective) -> Self {
        self.preference = Some(o);
        self
    }

    /// Checks the combination and makes the trainer.
    pub fn build(self) -> Result<Trainer> {
        let model = self
            .model
            .ok_or_else(|| Error::invalid("Trainer: no model given (TrainerBuilder::model)"))?;
        let train = self
            .train
            .ok_or_else(|| Error::invalid("Trainer: no training data (train_data)"))?;
        let optimizer = self
            .optimizer
            .ok_or_else(|| Error::invalid("Trainer: no optimizer given (optimizer)"))?;
        let base_lr = self
            .base_lr
            .ok_or_else(|| Error::invalid("Trainer: no base learning rate (base_lr)"))?;
        if !(base_lr.is_finite() && base_lr > 0.0) {
            return Err(Error::invalid(format!(
                "Trainer: base_lr must be > 0, got {base_lr}"
            )));
        }
        if self.grad_accum == 0 {
            return Err(Error::invalid("Trainer: grad_accum must be >= 1"));
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return Err(Error::invalid("Trainer: give epochs >= 1 or max_steps"));
        }
        if self.eval_every.is_some() && self.eval.is_none() {
            return Err(Error::invalid(
                "Trainer: eval_every is set but no eval data was given (eval_data)",
            ));
        }
        if let Some(c) = self.clip_norm
            && (c.is_nan() || c <= 0.0)
        {
            return Err(Error::invalid(format!(
                "Trainer: clip_norm must be > 0, got {c}"
            )));
        }
        check_device(self.device)?;
        let amp = Autocast::new(self.precision, self.device);
        let scaler = if self.precision.loss_scaling(self.device) {
            Some(LossScaler::new(self.loss_scaler, self.device)?)
        } else {
            None
        };
        if model.device() != self.device {
            return Err(Error::invalid(format!(
                "Trainer: the model is on {:?} but the trainer device is {:?}",
                model.device(),
                self.device
            )));
        }
        // Every trainable parameter must be stepped by the optimizer, exactly once.
        let mut in_opt: BTreeMap<String, usize> = BTreeMap::new();
        for g in optimizer.groups() {
            for p in &g.params {
                *in_opt.entry(p.name.clone()).or_default() += 1;
            }
        }
        let trainable: Vec<String> = model
            .named_parameters()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(n, _)| n)
            .collect();
        if trainable.is_empty() {
            return Err(Error::invalid(
                "Trainer: the model has no trainable parameter (requires_grad)",
            ));
        }
        let missing: Vec<&String> = trainable
            .iter()
            .filter(|n| !in_opt.contains_key(*n))
            .collect();
        if !missing.is_empty() {
            return Err(Error::invalid(format!(
                "Trainer: trainable parameters not in any optimizer group: {}",
                join_names(&missing)
            )));
        }
        let twice: Vec<&String> = in_opt
            .iter()
            .filter(|(_, c)| **c > 1)
            .map(|(n, _)| n)
            .collect();
        if !twice.is_empty() {
            return Err(Error::invalid(format!(
                "Trainer: parameters in more than one optimizer group: {}",
                join_names(&twice)
            )));
        }
        if let Some(o) = &self.preference {
            o.check(model.as_ref())?;
        }
        let world = self.collective.as_ref().map_or(1, |c| c.world_size());
        let per_epoch = train.num_batches(0).div_ceil(self.grad_accum) as u64;
        if per_epoch == 0 {
            return Err(Error::invalid("Trainer: the training data yields no batch"));
        }
        let total_steps = self
            .max_steps
            .unwrap_or(per_epoch * self.epochs as u64)
            .max(1);
        let epochs = if self.max_steps.is_some() {
            usize::MAX
        } else {
            self.epochs
        };
        let scheduler = match self.scheduler {
            Some(f) => f(total_steps)?,
            None => Box::new(ConstantSchedule),
        };
        let save_final = self.saver.is_some();
        Ok(Trainer {
            amp,
            scaler,
            save_final,
            model,
            train,
            eval: self.eval,
            optimizer,
            scheduler,
            base_lr,
            callbacks: self.callbacks,
            saver: self.saver.unwrap_or_else(|| Box::new(NoSaver)),
            device: self.device,
            grad_accum: self.grad_accum,
            epochs,
            total_steps,
            clip_norm: self.clip_norm,
            gradient_checkpointing: self.gradient_checkpointing,
            keep_freed_memory: self.keep_freed_memory,
            eval_every: self.eval_every,
            output_dir: self.output_dir,
            on_nonfinite: self.on_nonfinite,
            resume: self.resume,
            collective: self.collective,
            interrupt: self.interrupt,
            checkpoint_every: self.checkpoint_every,
            checkpoint_files: self.checkpoint_files,
            preference: self.preference,
            state: TrainState {
                seed: self.seed,
                world_size: world,
                ..Default::default()
            },
        })
    }
}

fn join_names<S: AsRef<str>>(names: &[S]) -> String {
    let shown: Vec<&str> = names.iter().take(8).map(|s| s.as_ref()).collect();
    let more = names.len().saturating_sub(8);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

fn check_device(d: Device) -> Result<()> {
    match d {
        Device::Cpu => Ok(()),
        Device::Cuda(i) => {
            let n = tch::Cuda::device_count() as usize;
            if i < n {
                Ok(())
            } else {
                Err(Error::invalid(format!(
                    "Trainer: device cuda:{i} is not there ({n} CUDA device(s) visible)"
                )))
            }
        }
        other => Err(Error::invalid(format!(
            "Trainer: unsupported device {other:?}"
        ))),
    }
}

#[derive(Debug)]
struct ConstantSchedule;
impl Scheduler for ConstantSchedule {
    fn name(&self) -> &str {
        "constant"
    }
    fn factor(&self, _: u64) -> f64 {
        1.0
    }
}

struct NoSaver;
impl ModelSaver for NoSaver {
    fn save_to(&self, _: &dyn CausalLm, dir: &std::path::Path) -> Result<()> {
        Err(Error::invalid(format!(
            "nothing to save into {}: the trainer was built without a saver",
            dir.display()
        )))
    }
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
    keep_freed_memory: bool,
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
            r.map_err(|e| Error::invalid(format!("callback `{}`: {e}", cb.name())))?;
        }
        Ok(())
    }

    /// Runs the training. On error every callback's `on_error` is called first.
    pub fn fit(&mut self) -> Result<FitSummary> {
        match self.fit_inner() {
            Ok(s) => Ok(s),
            Err(e) => {
                for cb in self.callbacks.iter_mut() {
                    cb.on_error(&e);
                }
                Err(e)
            }
        }
    }

    fn restore(&mut self) -> Result<()> {
        let loaded = checkpoint::load(&self.output_dir)?;
        let world = self.state.world_size;
        if loaded.state.world_size != world {
            return Err(Error::checkpoint(
                last_dir(&self.output_dir),
                format!(
                    "written with world size {} but this run has {world}; resume with the same number of processes",
                    loaded.state.world_size
                ),
            ));
        }
        let mut saved: BTreeMap<String, Tensor> = loaded.trainable.into_iter().collect();
        let _g = tch::no_grad_guard();
        for (name, mut p) in self.trainable() {
            let src = saved.remove(&name).ok_or_else(|| {
                Error::checkpoint(
                    last_dir(&self.output_dir),
                    format!("trainable parameter `{name}` is not in the checkpoint"),
                )
            })?;
            if src.size() != p.size() {
                return Err(Error::checkpoint(
                    last_dir(&self.output_dir),
                    format!(
                        "`{name}`: checkpoint shape {:?}, model {:?}",
                        src.size(),
                        p.size()
                    ),
                ));
            }
            p.f_copy_(&src).ctx(format!("restore {name}"))?;
        }
        if !saved.is_empty() {
            let names: Vec<String> = saved.into_keys().collect();
            return Err(Error::checkpoint(
                last_dir(&self.output_dir),
                format!(
                    "checkpoint has tensors the model does not train: {}",
                    join_names(&names)
                ),
            ));
        }
        self.optimizer.load_state_dict(&loaded.optim)?;
        let seed = self.state.seed;
        self.state = loaded.state;
        self.state.seed = seed;
        self.restore_scaler()?;
        tracing::info!(
            step = self.state.step,
            epoch = self.state.epoch,
            "resumed from {}",
            last_dir(&self.output_dir).display()
        );
        Ok(())
    }

    fn save_resume(&mut self) -> Result<PathBuf> {
        let sd = self.optimizer.state_dict()?;
        self.state.loss_scaler = self.scaler.as_ref().map(LossScaler::state).transpose()?;
        checkpoint::save(
            &self.output_dir,
            &self.state,
            &self.trainable(),
            &sd,
            &self.checkpoint_files,
        )
    }

    fn fit_inner(&mut self) -> Result<FitSummary> {
        let start = Instant::now();
        if self.keep_freed_memory {
            crate::malloc::keep_freed_memory();
        } else {
            crate::malloc::return_freed_memory();
        }
        if let Some(o) = self.preference.as_mut() {
            // Before `restore`: the reference is the model as it was given.
            preference::precompute_if_asked(
                o,
                self.model.as_ref(),
                self.train.as_mut(),
                self.eval.as_mut(),
                self.device,
            )?;
        }
        if self.resume {
            self.restore()?;
        }
        if let Some(c) = self.collective.as_mut() {
            c.broadcast_params(&self.model.named_parameters())?;
            let trainable: Vec<(String, Tensor)> = self
                .optimizer
                .groups()
                .iter()
                .flat_map(|g| {
                    g.params
                        .iter()
                        .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
                })
                .collect();
            c.prepare_grads(&trainable)?;
        }
        let mut stop: Option<String> = None;
        let mut last_loss = None;
        let mut last_eval = None;
        let input_tokens_at_start = self.state.input_tokens;
        let mut saved_at: Option<u64> = None;
        let mut evaluated_at: Option<u64> = None;
        self.call(Hook::FitStart, &mut stop)?;
        if self.eval.is_some() && self.state.step == 0 {
            // The starting point, so the log shows how far training moved the eval loss.
            last_eval = Some(self.run_eval(&mut stop)?);
            evaluated_at = Some(0);
        }

        'epochs: while self.state.epoch < self.epochs && self.state.step < self.total_steps {
            let epoch = self.state.epoch;
            let n_batches = self.train.num_batches(epoch);
            if self.state.batch_in_epoch == 0 {
                self.call(Hook::EpochStart, &mut stop)?;
            }
            while self.state.batch_in_epoch < n_batches && self.state.step < self.total_steps {
                let t0 = Instant::now();
                let first = self.state.batch_in_epoch;
                let last = (first + self.grad_accum).min(n_batches);
                let mut prepared = Vec::with_capacity(last - first);
                for i in first..last {
                    let b = self.train.batch(epoch, i)?;
                    prepared.push(step::prepare(&b, self.device)?);
                }
                // The loss is a mean over units: label tokens (SFT) or pairs (preference).
                let units = |p: &step::Prepared| match &self.preference {
                    Some(_) => PreferenceObjective::units(p),
                    None => p.n_labels as f64,
                };
                let mut counts = [
                    prepared.iter().map(|p| p.n_labels as f64).sum::<f64>(),
                    prepared.iter().map(|p| p.n_inputs as f64).sum::<f64>(),
                    prepared.iter().map(units).sum::<f64>(),
                ];
                if let Some(c) = self.collective.as_mut() {
                    let r = c.all_reduce_f64(&counts)?;
                    counts = [r[0], r[1], r[2]];
                }
                let n_labels = counts[0];
                let n_units = counts[2];
                // Gradients are averaged over ranks afterwards, so each rank scales its summed
                // loss by world / (units of the step on all ranks).
                let world = self.collective.as_ref().map_or(1, |c| c.world_size()) as f64;
                let scale = if n_units > 0.0 { world / n_units } else { 0.0 };
                let mut loss_sum = 0.0;
                let amp = self.amp;
                // fp16: the loss times the loss scale (exact: a power of two)
                let scale = match &self.scaler {
                    Some(s) => scale * s.scale()?,
                    None => scale,
                };
                let n_micro = prepared.len();
                for (micro, p) in prepared.iter().enumerate() {
                    if let Some(c) = self.collective.as_mut() {
                        // With checkpointing a parameter's gradient can arrive in several
                        // backward calls (tied embeddings), so buckets are reduced after it.
                        c.sync_in_backward(micro + 1 == n_micro && !self.gradient_checkpointing);
                    }
                    let model = self.model.as_ref();
                    let ckpt = self.gradient_checkpointing;
                    let seed = (self.state.seed, self.state.step, micro);
                    loss_sum += match self.preference.as_mut() {
                        Some(o) => o.forward_backward(model, p, scale, ckpt, seed, amp)?,
                        None => step::forward_backward(model, p, scale, ckpt, seed, amp)?,
                    };
                }
                let mut params: Vec<Tensor> = Vec::new();
                for g in self.optimizer.groups() {
                    for p in &g.params {
                        params.push(p.tensor.shallow_clone());
                    }
                }
                let mut extra_sums = self.preference.as_mut().map(|o| o.take_sums().to_vec());
                if let Some(c) = self.collective.as_mut() {
                    c.average_grads()?;
                    let r = c.all_reduce_f64(&[loss_sum])?;
                    loss_sum = r[0];
                    if let Some(s) = extra_sums.as_mut() {
                        *s = c.all_reduce_f64(s)?;
                    }
                }
                let loss = if n_units > 0.0 {
                    loss_sum / n_units
                } else {
                    0.0
                };
                // fp16: gradients unscaled before clipping; inf/NaN ones skip the step
                let found_inf = match self.scaler.as_mut() {
                    Some(s) => s.unscale(&params)?,
                    None => false,
                };
                let grad_norm = crate::optim::grad_norm_clipped(&params, self.clip_norm)?;
                let step_no = self.state.step + 1;
                if found_inf && loss.is_finite() {
                    tracing::info!(
                        "step {step_no}: fp16 gradients overflowed; step skipped, loss scale lowered"
                    );
                    self.optimizer.zero_grad();
                    self.end_scaler_step(true)?;
                    self.state.skipped_steps += 1;
                    self.state.batch_in_epoch = last;
                    self.state.step += 1;
                    continue;
                }
                if !loss.is_finite() || !grad_norm.is_finite() {
                    let what = if loss.is_finite() {
                        format!("gradient norm ({grad_norm})")
                    } else {
                        format!("loss ({loss})")
                    };
                    match self.on_nonfinite {
                        NonFinitePolicy::Stop => {
                            self.optimizer.zero_grad();
                            return Err(Error::NonFinite {
                                step: step_no,
                                what,
                            });
                        }
                        NonFinitePolicy::Skip => {
                            tracing::warn!("step {step_no}: non-finite {what}; step skipped");
                            self.optimizer.zero_grad();
                            self.end_scaler_step(true)?;
                            self.state.skipped_steps += 1;
                            self.state.batch_in_epoch = last;
                            self.state.step += 1;
                            continue;
                        }
                    }
                }
                crate::sched::apply(
                    self.scheduler.as_ref(),
                    self.optimizer.as_mut(),
                    self.base_lr,
                    self.state.step,
                );
                self.optimizer.step()?;
                self.optimizer.zero_grad();
                self.end_scaler_step(false)?;
                self.state.step = step_no;
                self.state.batch_in_epoch = last;
                self.state.label_tokens += n_labels as u64;
                self.state.input_tokens += counts[1] as u64;
                last_loss = Some(loss);
                let dt = t0.elapsed().as_secs_f64();
                let metrics = StepMetrics {
                    step: step_no,
                    epoch,
                    loss,
                    lr: self
                        .optimizer
                        .groups()
                        .iter()
                        .map(|g| (g.name.clone(), g.lr))
                        .collect(),
                    grad_norm,
                    tokens: n_labels as u64,
                    tokens_per_sec: counts[1] / dt.max(1e-9),
                    extra: extra_sums
                        .map(|s| preference::metrics_from_sums(&s))
                        .unwrap_or_default(),
                };
                self.call(Hook::Step(&metrics), &mut stop)?;
                if let Some(n) = self.eval_every
                    && n > 0
                    && step_no.is_multiple_of(n)
                {
                    last_eval = Some(self.run_eval(&mut stop)?);
                    evaluated_at = Some(step_no);
                }
                if let Some(n) = self.checkpoint_every
                    && n > 0
                    && step_no.is_multiple_of(n)
                    && self.is_main()
                {
                    let d = self.save_resume()?;
                    saved_at = Some(self.state.step);
                    self.call(Hook::Save(&d), &mut stop)?;
                }
                let mut interrupted = self
                    .interrupt
                    .as_ref()
                    .is_some_and(|f| f.load(Ordering::SeqCst));
                if let Some(c) = self.collective.as_mut() {
                    // Ranks see a Ctrl-C at different moments: stop every rank after the same
                    // step when any rank saw it.
                    let r = c.all_reduce_f64(&[f64::from(u8::from(interrupted))])?;
                    interrupted = r[0] > 0.0;
                }
                if interrupted {
                    let dir = if self.is_main() {
                        self.save_resume()?
                    } else {
                        last_dir(&self.output_dir)
                    };
                    // the end of the run: one more eval, the final adapter (as at max_steps)
                    self.finish(&mut evaluated_at, &mut stop)?;
                    if let Some(c) = self.collective.as_mut() {
                        // No rank exits before rank 0 has written `last/`: a launcher stops
                        // the other ranks as soon as one exits with an error.
                        c.all_reduce_f64(&[0.0])?;
                    }
                    return Err(Error::Interrupted {
                        step: self.state.step,
                        dir,
                    });
                }
                if stop.is_some() {
                    break 'epochs;
                }
            }
            if self.state.batch_in_epoch >= n_batches {
                if self.eval.is_some() {
                    last_eval = Some(self.run_eval(&mut stop)?);
                    evaluated_at = Some(self.state.step);
                }
                self.call(Hook::EpochEnd, &mut stop)?;
                self.state.epoch += 1;
                self.state.batch_in_epoch = 0;
                if self.is_main() {
                    let d = self.save_resume()?;
                    saved_at = Some(self.state.step);
                    self.call(Hook::Save(&d), &mut stop)?;
                }
                if stop.is_some() {
                    break;
                }
            }
        }
        // The end of the run (also mid-epoch: max_steps, a callback's stop): eval after the last
        // step unless it just ran, and the final weights in `final/`.
        if let Some(l) = self.finish(&mut evaluated_at, &mut stop)? {
            last_eval = Some(l);
        }
        // A run that ends mid-epoch (max_steps, a callback's stop) still leaves `last/`.
        if self.is_main() && self.state.step > 0 && saved_at != Some(self.state.step) {
            let d = self.save_resume()?;
            self.call(Hook::Save(&d), &mut stop)?;
        }
        let train_secs = start.elapsed().as_secs_f64();
        self.call(Hook::FitEnd, &mut stop)?;
        if let Some(reason) = &stop {
            tracing::info!("stopped early: {reason}");
        }
        let elapsed = start.elapsed().as_secs_f64();
        Ok(FitSummary {
            steps: self.state.step,
            tokens: self.state.label_tokens,
            input_tokens: self.state.input_tokens,
            final_train_loss: last_loss,
            final_eval_loss: last_eval,
            tokens_per_sec: (self.state.input_tokens - input_tokens_at_start) as f64
                / train_secs.max(1e-9),
            skipped_steps: self.state.skipped_steps,
            train_secs,
            elapsed_secs: elapsed,
            stopped_by: stop,
            callbacks: self
                .callbacks
                .iter()
                .filter_map(|c| c.summary().map(|s| (c.name().to_string(), s)))
                .collect(),
        })
    }

    /// Adds a callback after `build` (e.g. one that needs [`Trainer::total_steps`]).
    pub fn add_callback(&mut self, c: Box<dyn Callback>) {
        self.callbacks.push(c);
    }

    /// Mean loss over all label tokens of the eval data (all ranks).
    pub fn evaluate(&mut self) -> Result<EvalMetrics> {
        let Some(eval) = self.eval.as_mut() else {
            return Err(Error::invalid("evaluate: no eval data was given"));
        };
        let amp = self.amp;
        let model = self.model.as_ref();
        let (mut sums, mut extra) = match self.preference.as_mut() {
            // Loss summed over pairs, label tokens, and the metric sums (last: the pairs).
            Some(o) => preference::eval_sums(o, model, eval.as_mut(), self.device, amp)?,
            None => {
                let s = eval_sums(model, eval.as_mut(), self.device, amp)?;
                (vec![s[0], s[1]], Vec::new())
            }
        };
        if let Some(c) = self.collective.as_mut() {
            sums = c.all_reduce_f64(&sums)?;
            if !extra.is_empty() {
                extra = c.all_reduce_f64(&extra)?;
            }
        }
        if sums[1] == 0.0 {
            return Err(Error::invalid("evaluate: the eval data has no label token"));
        }
        // The loss is a mean over pairs for preference objectives, over label tokens otherwise.
        let denom = extra.last().copied().unwrap_or(sums[1]);
        Ok(EvalMetrics {
            step: self.state.step,
            epoch: self.state.epoch,
            eval_loss: sums[0] / denom,
            tokens: sums[1] as u64,
            extra: preference::metrics_from_sums(&extra),
        })
    }

    fn run_eval(&mut self, stop: &mut Option<String>) -> Result<f64> {
        let m = self.evaluate()?;
        tracing::info!(
            step = m.step,
            eval_loss = m.eval_loss,
            tokens = m.tokens,
            "eval"
        );
        self.call(Hook::Eval(&m), stop)?;
        Ok(m.eval_loss)
    }
}

fn eval_sums(
    model: &dyn CausalLm,
    data: &mut dyn BatchSource,
    device: Device,
    amp: Autocast,
) -> Result<[f64; 2]> {
    let mut sums = [0.0, 0.0];
    for i in 0..data.num_batches(0) {
        let b = data.batch(0, i)?;
        let p = step::prepare(&b, device)?;
        sums[0] += step::eval_loss(model, &p, amp)?;
        sums[1] += p.n_labels as f64;
    }
    Ok(sums)
}

/// Mean loss over all label tokens of `data` (epoch 0), without a trainer: what
/// `volttrain eval` prints. `precision: auto`: bf16 autocast on CUDA devices with native bf16,
/// fp32 elsewhere.
pub fn evaluate_model(
    model: &dyn CausalLm,
    data: &mut dyn BatchSource,
    device: Device,
) -> Result<EvalMetrics> {
    evaluate_model_in(model, data, device, Precision::Auto)
}

/// [`evaluate_model`] in `precision` (what `volttrain eval` runs with `training.precision`).
pub fn evaluate_model_in(
    model: &dyn CausalLm,
    data: &mut dyn BatchSource,
    device: Device,
    precision: Precision,
) -> Result<EvalMetrics> {
    let sums = eval_sums(model, data, device, Autocast::new(precision, device))?;
    if sums[1] == 0.0 {
        return Err(Error::invalid("evaluate: the eval data has no label token"));
    }
    Ok(EvalMetrics {
        step: 0,
        epoch: 0,
        eval_loss: sums[0] / sums[1],
        tokens: sums[1] as u64,
        extra: BTreeMap::new(),
    })
}
