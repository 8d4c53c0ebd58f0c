//! The main job: supervised fine-tuning driven by one [`SftConfig`] (what `volttrain sft` runs),
//! and evaluation of a model or adapter (`volttrain eval`).
//!
//! A thin composition of the public pieces a host application would use itself: the config
//! sections ([`crate::config`]) name every component, and the registry ([`crate::plugin`])
//! builds them (quantizer, adapter, grouper, optimizer, scheduler, callbacks); the tokenizer,
//! datasets and [`LoaderSource`] come from [`crate::data`], the model from
//! [`crate::model::load_model`], the optimizer assembly from [`crate::optim::assemble_optimizer`],
//! the process group from [`crate::dist::init_from_env`], and the loop from the [`Trainer`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tch::Device;

use crate::adapter::{AdapterInjector, LoraInjector, load_peft_adapter};
use crate::callback::{
    Callback, EpochSaver, EvalMetrics, MetricsJsonl, Progress, SftSaver, TensorBoard,
};
use crate::config::SftConfig;
use crate::data::{
    Collator, DataLoader, DatasetConfig, LoaderOptions, LoaderSource, SftDataset, Tokenizer, pad_id,
};
use crate::dist::{ProcessGroup, apply_rank_threads};
use crate::error::{Error, Result, write_atomic};
use crate::model::{CausalLm, LoadOptions, load_model};
use crate::optim::{DynOptimizer, OptimizerChoice, OptimizerConfigs, assemble_optimizer};
use crate::plugin::{self, CallbackCtx, SchedulerCtx};
use crate::trainer::{C10dCollective, Collective, FitSummary, Trainer, TrainerBuilder};

/// How to run the job, besides the config.
#[derive(Default)]
pub struct RunOptions {
    /// Continue from `<output_dir>/last/`.
    pub resume: bool,
    /// Set from a Ctrl-C handler: finish the step, write `last/`, stop.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// Directory relative paths of `plugins:` are resolved against (the config's directory).
    pub base_dir: Option<PathBuf>,
}

/// Loads the tokenizer (with the dataset's custom template, if any) and the model (quantized
/// while loading when asked, by the registry's quantizer; in `model.dtype`, converted tensor by
/// tensor) onto `device`.
pub fn load_model_and_tokenizer(
    cfg: &SftConfig,
    device: Device,
) -> Result<(Box<dyn CausalLm>, Tokenizer)> {
    let mut tok = Tokenizer::from_dir(&cfg.model.path)?;
    cfg.dataset.apply_chat_template(&mut tok)?;
    let kind = cfg
        .model
        .dtype
        .resolve(cfg.training.precision, device, cfg.has_adapter())?;
    let mut opts = LoadOptions::new(kind, device);
    if let Some(q) = cfg.quantizer()? {
        opts = opts.with_quantizer(q);
    }
    let model = load_model(&cfg.model.path, &opts)?;
    tracing::info!(
        "model {} ({}, {} layers) on {:?}, base in {:?}",
        cfg.model.path.display(),
        model.architecture(),
        model.num_layers(),
        device,
        kind
    );
    Ok((model, tok))
}

fn loader(
    ds: SftDataset,
    tok: &Tokenizer,
    dcfg: &DatasetConfig,
    opts: LoaderOptions,
) -> Result<DataLoader> {
    Ok(DataLoader::new(
        Arc::new(ds),
        Collator::new(pad_id(tok)?, dcfg.padding_side),
        opts,
    ))
}

/// The optimizer of the job: the grouper of `grouper:` (default the reference grouping: Muon for
/// hidden matrices, AdamW for embeddings at 2x, the LM head at 0.1x, 1-D parameters without
/// weight decay), then each group's optimizer (the built-in Muon + AdamW pair, configured by
/// `optimizer: {name: reference, ...}`) or, with an `optimizer: {name: ...}` section, that
/// registered optimizer for every group. Everything is built through the registry.
pub(crate) fn job_optimizer(
    cfg: &SftConfig,
    model: &dyn CausalLm,
) -> Result<Box<dyn DynOptimizer>> {
    let t = &cfg.training;
    let g = cfg.grouper_section();
    let grouper = plugin::build_grouper(&g.name, &g.options_value())?;
    let options = cfg
        .optimizer
        .as_ref()
        .map_or(serde_yaml::Value::Null, |o| o.options_value());
    // the built-in pair's configs: `optimizer: {name: reference, adamw: ..., muon: ...}`, or the
    // defaults with `training.weight_decay`
    let configs = match &cfg.optimizer {
        Some(o) if o.name == "reference" => plugin::parse_config("optimizer", &options)?,
        _ => {
            let mut c = OptimizerConfigs::default();
            c.adamw.weight_decay = t.weight_decay;
            c.muon.weight_decay = t.weight_decay;
            c
        }
    };
    let choice = match &cfg.optimizer {
        Some(o) if o.name != "reference" => OptimizerChoice::Registered {
            name: &o.name,
            options: &options,
        },
        _ => OptimizerChoice::PerGroup(&configs),
    };
    assemble_optimizer(
        model,
        grouper.as_ref(),
        choice,
        t.required_lr()?,
        t.weight_decay,
    )
}

/// The process group (under a launcher) and device of the job: `distributed:`, `model.device`
/// and `training.gpu_devices`.
pub(crate) fn job_process_group(cfg: &SftConfig) -> Result<(Option<ProcessGroup>, Device)> {
    crate::dist::init_from_env(
        &cfg.distributed.clone().unwrap_or_default(),
        cfg.device()?,
        cfg.model.device.is_some(),
        &cfg.training.gpu_devices,
    )
}

/// The adapter a job injected.
pub(crate) struct InjectedAdapter {
    /// The injector that holds the adapter: the saver writes through it
    /// ([`AdapterInjector::save`]), so a plugin adapter is saved in its own format.
    pub(crate) injector: Box<dyn AdapterInjector>,
    /// For the log: what was injected where (`LoRA r=8 on 28 tensors, 5120 trainable
    /// parameters`).
    pub(crate) summary: String,
}

/// Freezes the base of `model` and injects the run's adapter, built through the registry
/// (`adapter:`, or the `lora:` shorthand); with `lora.init_from`, the saved adapter's shape and
/// weights. Without an adapter, checks that the base is dense.
pub(crate) fn inject_adapter(
    cfg: &SftConfig,
    model: &mut dyn CausalLm,
) -> Result<Option<InjectedAdapter>> {
    let Some(section) = cfg.adapter_section()? else {
        if cfg.quantizer_section()?.is_some() {
            return Err(Error::config(
                "lora",
                "a quantized base is frozen: full fine-tuning needs a dense model; enable \
                 `lora` (QLoRA) or remove the quantization",
            ));
        }
        return Ok(None);
    };
    let mut options = section.options_value();
    let mut lora = cfg.lora_config()?;
    if let (Some(base), serde_yaml::Value::Mapping(m)) = (
        lora.as_ref()
            .and_then(|l| l.base_model_name_or_path.clone()),
        &mut options,
    ) {
        m.insert("base_model_name_or_path".into(), base.into());
    }
    let mut injector = plugin::build_adapter(&section.name, &options)?;
    model.freeze_base();
    let params = match &mut lora {
        // `lora.init_from`: the saved adapter's shape and weights
        Some(l) if l.init_from.is_some() => {
            let init = l.init_from.clone();
            let (used, params) = crate::adapter::inject_lora(model, l, init.as_deref())?;
            *l = used.clone();
            // the saver writes what was loaded (its rank and targets may differ from `lora:`)
            injector = Box::new(LoraInjector::new(used));
            params
        }
        _ => injector.inject(model)?,
    };
    let n: i64 = params.iter().map(|(_, t)| t.numel() as i64).sum();
    let what = match &lora {
        Some(l) => format!("LoRA r={}", l.r),
        None => format!("adapter `{}`", section.name),
    };
    let summary = format!(
        "{what} on {} tensors, {n} trainable parameters",
        params.len()
    );
    Ok(Some(InjectedAdapter { injector, summary }))
}

/// Runs the fine-tuning job of `cfg`.
pub fn run_sft(cfg: &SftConfig, opts: RunOptions) -> Result<FitSummary> {
    cfg.training.required_lr()?;
    let base_dir = opts.base_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    plugin::load_plugins(&cfg.plugins, &base_dir)?;
    plugin::check_registry()?;
    // training.threads, else OMP_NUM_THREADS, else ranks on one machine split its cores.
    apply_rank_threads(cfg.training.threads);
    let (pg, device) = job_process_group(cfg)?;
    let (rank, world) = pg.as_ref().map_or((0, 1), |p| (p.rank(), p.world_size()));
    let t = &cfg.training;
    // One writer per output directory, no silent overwrite, resume only under the same math.
    let _output_lock = crate::run::prepare_output_dir(
        &t.output_dir,
        t.overwrite_output_dir,
        opts.resume,
        &cfg.to_yaml()?,
        rank == 0,
    )?;
    let (mut model, tok) = load_model_and_tokenizer(cfg, device)?;
    let dcfg = &cfg.dataset;
    let train = SftDataset::load(dcfg, &tok)?;
    let eval = SftDataset::load_eval(dcfg, &tok)?;
    let packing = dcfg.packing.then_some(dcfg.max_seq_len);
    let train_loader = loader(
        train,
        &tok,
        dcfg,
        LoaderOptions {
            batch_size: t.batch_size,
            seed: t.seed,
            shuffle: true,
            drop_last: false,
            rank,
            world,
            packing,
        },
    )?;
    let eval_loader = match eval {
        Some(ds) => Some(loader(
            ds,
            &tok,
            dcfg,
            LoaderOptions {
                batch_size: t.eval_batch_size.unwrap_or(t.batch_size),
                seed: t.seed,
                shuffle: false,
                drop_last: false,
                rank,
                world,
                packing: None,
            },
        )?),
        None => None,
    };

    // New weights (LoRA A, ...) are drawn from the run seed, as `transformers.set_seed` before
    // the model is built: two runs of one config start alike (data-parallel ranks also get rank
    // 0's values by broadcast).
    tch::manual_seed(t.seed as i64);
    let adapter = inject_adapter(cfg, model.as_mut())?.map(|a| {
        tracing::info!("{}", a.summary);
        a.injector
    });
    let optimizer = job_optimizer(cfg, model.as_ref())?;

    let mut builder = job_builder(
        cfg,
        model,
        optimizer,
        device,
        opts.resume,
        adapter,
        tok,
        rank,
    )?
    .train_data(Box::new(LoaderSource::new(train_loader)));
    if let Some(e) = eval_loader {
        builder = builder.eval_data(Box::new(LoaderSource::new(e)));
    }
    builder = with_run_wiring(builder, cfg, pg, opts.interrupt)?;
    let mut trainer = builder.build()?;
    let total = trainer.total_steps();
    trainer.add_callback(Box::new(Progress::new(total, t.log_every)));
    trainer.fit()
}

/// Mean loss over the label tokens of the eval set (`dataset.eval_path`), for the base model or
/// with the PEFT adapter in `adapter`.
pub fn run_eval(cfg: &SftConfig, adapter: Option<&Path>) -> Result<EvalMetrics> {
    let device = cfg.device()?;
    let (mut model, tok) = load_model_and_tokenizer(cfg, device)?;
    let dcfg = &cfg.dataset;
    if let Some(dir) = adapter {
        match cfg.adapter_section()? {
            // a registered adapter reads its own files (`AdapterInjector::load`)
            Some(section) if section.name != "lora" => {
                plugin::build_adapter(&section.name, &section.options_value())?
                    .load(model.as_mut(), dir)?;
            }
            // a PEFT LoRA directory, whatever the config's adapter section says of its shape
            _ => {
                load_peft_adapter(model.as_mut(), dir)?;
            }
        }
    }
    let path = dcfg.eval_path.clone().ok_or_else(|| {
        Error::config(
            "dataset.eval_path",
            "`volttrain eval` needs an eval file; set dataset.eval_path",
        )
    })?;
    let ds = SftDataset::load_file(&path, dcfg, &tok)?;
    let l = loader(
        ds,
        &tok,
        dcfg,
        LoaderOptions {
            batch_size: cfg
                .training
                .eval_batch_size
                .unwrap_or(cfg.training.batch_size),
            shuffle: false,
            ..LoaderOptions::default()
        },
    )?;
    crate::trainer::evaluate_model_in(
        model.as_ref(),
        &mut LoaderSource::new(l),
        device,
        cfg.training.precision,
    )
}

/// What every YAML job (`volttrain sft`, `volttrain dpo`) adds to its trainer alike: the
/// data-parallel collective, the interrupt flag, and the callbacks (`metrics.jsonl`, the epoch
/// saver, TensorBoard, the `callbacks:` list, the reference's W&B shorthand).
pub(crate) fn with_run_wiring(
    mut builder: TrainerBuilder,
    cfg: &SftConfig,
    pg: Option<ProcessGroup>,
    interrupt: Option<Arc<AtomicBool>>,
) -> Result<TrainerBuilder> {
    let t = &cfg.training;
    if let Some(pg) = pg {
        let bucket = cfg.distributed.as_ref().map_or(25.0, |d| d.bucket_mb);
        builder =
            builder.collective(Box::new(C10dCollective::new(pg, bucket)) as Box<dyn Collective>);
    }
    if let Some(f) = interrupt {
        builder = builder.interrupt_flag(f);
    }
    let cb_ctx = CallbackCtx {
        output_dir: t.output_dir.clone(),
    };
    let mut callbacks: Vec<Box<dyn Callback>> = vec![
        Box::new(MetricsJsonl::new(t.output_dir.join("metrics.jsonl"))),
        Box::new(EpochSaver {
            keep_last: t.keep_last,
            every: 1,
        }),
    ];
    if t.tensorboard {
        callbacks.push(Box::new(TensorBoard::new(t.output_dir.join("tensorboard"))));
    }
    for c in &cfg.callbacks {
        let mut options = c.options_value();
        // `sample_generations` tokenizes with the run's tokenizer unless told otherwise
        if c.name == "sample_generations"
            && let serde_yaml::Value::Mapping(m) = &mut options
            && !m.contains_key("tokenizer")
        {
            m.insert(
                "tokenizer".into(),
                cfg.model.path.display().to_string().into(),
            );
        }
        callbacks.push(plugin::build_callback(&c.name, &options, &cb_ctx)?);
    }
    if let Some(section) = crate::callback::wandb_shorthand(t)? {
        if cfg.callbacks.iter().any(|c| c.name == "wandb") {
            return Err(Error::config(
                "training.use_wandb",
                "W&B is set up twice (training.use_wandb and a `wandb` callback); keep one",
            ));
        }
        callbacks.push(plugin::build_callback("wandb", &section, &cb_ctx)?);
    }
    for c in callbacks {
        builder = builder.callback(c);
    }
    Ok(builder)
}

/// The trainer settings every YAML job (`volttrain sft`, `volttrain dpo`) takes from its config
/// alike: the `training` keys, the resolved config (written to `config.resolved.yaml` by rank 0
/// and into every resume checkpoint), the saver, and the schedule (`scheduler:` from the
/// registry, or the reference warmup + cosine). The job adds its data (and objective).
#[allow(clippy::too_many_arguments)]
pub(crate) fn job_builder(
    cfg: &SftConfig,
    model: Box<dyn CausalLm>,
    optimizer: Box<dyn DynOptimizer>,
    device: Device,
    resume: bool,
    adapter: Option<Box<dyn AdapterInjector>>,
    tok: Tokenizer,
    rank: usize,
) -> Result<TrainerBuilder> {
    let t = &cfg.training;
    let config_yaml = cfg.to_yaml()?;
    if rank == 0 {
        std::fs::create_dir_all(&t.output_dir).map_err(|e| Error::io(&t.output_dir, e))?;
        write_atomic(
            &t.output_dir.join("config.resolved.yaml"),
            config_yaml.as_bytes(),
        )?;
    }
    let sched_section = cfg.scheduler.clone();
    let training = t.clone();
    Ok(Trainer::builder()
        .model(model)
        .optimizer(optimizer)
        .base_lr(t.required_lr()?)
        .device(device)
        .precision(t.precision)
        .loss_scaler(t.loss_scaler.clone())
        .grad_accum(t.gradient_accumulation)
        .epochs(t.epochs)
        .max_steps(t.max_steps)
        .clip_norm(t.grad_clip)
        .gradient_checkpointing(t.gradient_checkpointing)
        .keep_freed_memory(t.keep_freed_memory)
        .seed(t.seed)
        .eval_every(t.eval_every)
        .output_dir(&t.output_dir)
        .on_nonfinite(t.on_nonfinite)
        .resume(resume)
        .checkpoint_every(t.checkpoint_every)
        .checkpoint_file(crate::run::CHECKPOINT_CONFIG, config_yaml.clone())
        .saver(Box::new(SftSaver::new(adapter, Arc::new(tok), config_yaml)))
        .scheduler_with(move |total| match sched_section {
            Some(s) => plugin::build_scheduler(
                &s.name,
                &s.options_value(),
                &SchedulerCtx { total_steps: total },
            ),
            None => training.reference_schedule(total).build(),
        }))
}
