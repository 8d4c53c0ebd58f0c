//! [`TrainerBuilder`]: the trainer's settings, with their defaults, and the checks of
//! [`TrainerBuilder::build`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tch::Device;

use super::{BatchSource, Collective, NonFinitePolicy, PreferenceObjective, TrainState, Trainer};
use crate::amp::{Autocast, LossScaler, LossScalerConfig, Precision};
use crate::callback::{Callback, ModelSaver};
use crate::error::{Error, Result};
use crate::model::CausalLm;
use crate::optim::DynOptimizer;
use crate::sched::{Constant, Scheduler};

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
    keep_freed_memory: Option<bool>,
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
            keep_freed_memory: None,
            checkpoint_files: Vec::new(),
            preference: None,
        }
    }
}

impl TrainerBuilder {
    /// The model to train (adapters already injected; its trainable parameters are those with
    /// `requires_grad`). Required.
    pub fn model(mut self, m: Box<dyn CausalLm>) -> Self {
        self.model = Some(m);
        self
    }
    /// The training micro-batches. Required.
    pub fn train_data(mut self, d: Box<dyn BatchSource>) -> Self {
        self.train = Some(d);
        self
    }
    /// Evaluation data: evaluated before the first step of a fresh run, at each epoch end, every
    /// [`TrainerBuilder::eval_every`] steps and at the end of the run.
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
    /// Adds a callback; hooks are called in the order callbacks were added.
    pub fn callback(mut self, c: Box<dyn Callback>) -> Self {
        self.callbacks.push(c);
        self
    }
    /// What callbacks (the epoch saver) write.
    pub fn saver(mut self, s: Box<dyn ModelSaver>) -> Self {
        self.saver = Some(s);
        self
    }
    /// Where the model lives and training runs. Default: the CPU.
    pub fn device(mut self, d: Device) -> Self {
        self.device = d;
        self
    }
    /// Autocast precision. Default [`Precision::Auto`].
    pub fn precision(mut self, p: Precision) -> Self {
        self.precision = p;
        self
    }
    /// Dynamic loss scaling of `precision: fp16` (`torch.amp.GradScaler`'s defaults unless set).
    pub fn loss_scaler(mut self, c: LossScalerConfig) -> Self {
        self.loss_scaler = c;
        self
    }
    /// Micro-batches per optimizer step. Default 1.
    pub fn grad_accum(mut self, n: usize) -> Self {
        self.grad_accum = n;
        self
    }
    /// Passes over the training data. Default 1; ignored when `max_steps` is set.
    pub fn epochs(mut self, n: usize) -> Self {
        self.epochs = n;
        self
    }
    /// Stop after this many optimizer steps (epochs then run on as needed). Default: none.
    pub fn max_steps(mut self, n: Option<u64>) -> Self {
        self.max_steps = n;
        self
    }
    /// Clip the gradients to this global L2 norm. Default: no clipping.
    pub fn clip_norm(mut self, c: Option<f64>) -> Self {
        self.clip_norm = c;
        self
    }
    /// Recompute each decoder layer's activations in backward. Default off.
    pub fn gradient_checkpointing(mut self, on: bool) -> Self {
        self.gradient_checkpointing = on;
        self
    }
    /// Keep memory freed between steps inside the process instead of handing it back to the
    /// kernel (glibc `mallopt`, process-wide, set when `fit` starts).
    ///
    /// Not set (the default), the trainer leaves the host process's malloc settings alone: a
    /// library host opts in. `volttrain sft` turns it on (`training.keep_freed_memory`, default
    /// `true` in the YAML config). `true` saves the page faults and page zeroing of re-taking
    /// the activations' memory every step (9% of the tokens/s of the 8-layer CPU LoRA bench
    /// step, none on full fine-tuning); the cost: the resident size stays at its peak, and the
    /// peak grows (+8-13% on that step; see `src/malloc.rs`). `false` sets the opposite, for
    /// runs where memory is what matters (QLoRA): freed blocks of 256 KiB or more go back to
    /// the kernel at once (glibc's own defaults keep most of them resident after the first
    /// step).
    pub fn keep_freed_memory(mut self, on: bool) -> Self {
        self.keep_freed_memory = Some(on);
        self
    }
    /// Run seed: dropout masks derive from it. Default 42.
    pub fn seed(mut self, s: u64) -> Self {
        self.seed = s;
        self
    }
    /// Evaluate every `n` optimizer steps (always at each epoch end when eval data is given).
    pub fn eval_every(mut self, n: Option<u64>) -> Self {
        self.eval_every = n;
        self
    }
    /// Where `last/`, `final/` and the callbacks' files go. Default `runs/default`.
    pub fn output_dir(mut self, d: impl Into<PathBuf>) -> Self {
        self.output_dir = d.into();
        self
    }
    /// What a non-finite loss or gradient norm does. Default [`NonFinitePolicy::Stop`].
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
            return Err(Error::ParamGroups(format!(
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
            return Err(Error::ParamGroups(format!(
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
            None => Box::new(Constant),
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

pub(super) fn join_names<S: AsRef<str>>(names: &[S]) -> String {
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
        other => Err(Error::Unsupported {
            what: format!("Trainer: device {other:?}"),
            msg: "the trainer runs on the CPU or a CUDA GPU".into(),
        }),
    }
}

/// The saver when none was given: saving through it (an epoch saver) is an error naming the
/// directory, and the end of the run writes no `final/`.
struct NoSaver;
impl ModelSaver for NoSaver {
    fn save_to(&self, _: &dyn CausalLm, dir: &std::path::Path) -> Result<()> {
        Err(Error::invalid(format!(
            "nothing to save into {}: the trainer was built without a saver",
            dir.display()
        )))
    }
}
