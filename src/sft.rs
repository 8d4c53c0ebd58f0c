//! The main job: supervised fine-tuning driven by one [`SftConfig`] (what `volttrain sft` runs),
//! and evaluation of a model or adapter (`volttrain eval`).
//!
//! The pieces are the public ones a host application would use itself: the tokenizer and
//! dataset from [`crate::data`], the model from [`crate::model::load_model`] (quantized while
//! loading when asked), LoRA from [`crate::adapter`], the reference grouping and optimizers from
//! [`crate::optim`], schedules and callbacks from the registry ([`crate::plugin`]), and the
//! [`Trainer`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tch::{Device, Tensor};

use crate::adapter::{AdapterInjector, LoraConfig, LoraInjector, load_peft_adapter};
use crate::callback::{
    Callback, EpochSaver, EvalMetrics, MetricsJsonl, Progress, SftSaver, TensorBoard,
};
use crate::config::SftConfig;
use crate::data::{Collator, DataLoader, DatasetConfig, LoaderOptions, SftDataset, Tokenizer};
use crate::dist::{DistConfig, DistEnv, ProcessGroup, apply_rank_threads, select_device};
use crate::error::{Error, Result, TchResultExt, write_atomic};
use crate::model::{CausalLm, LoadOptions, load_model};
use crate::optim::{
    DynOptimizer, GroupSpec, OptimizerConfigs, ParamGrouper, ParamInfo, ParamRole,
    ReferenceGrouper, ReferenceGrouperConfig, build_optimizer, param_group,
};
use crate::plugin::{self, CallbackCtx, SchedulerCtx};
use crate::quant::QuantConfig;
use crate::trainer::{
    BatchSource, C10dCollective, Collective, FitSummary, Trainer, TrainerBuilder,
};

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

/// [`BatchSource`] over a [`DataLoader`]: the index batches of an epoch are computed once.
pub struct LoaderSource {
    loader: DataLoader,
    epoch: Option<(usize, Vec<Vec<usize>>)>,
}

impl LoaderSource {
    pub fn new(loader: DataLoader) -> Self {
        LoaderSource {
            loader,
            epoch: None,
        }
    }
}

impl BatchSource for LoaderSource {
    fn num_batches(&self, _epoch: usize) -> usize {
        self.loader.num_batches().unwrap_or(0)
    }

    fn batch(&mut self, epoch: usize, index: usize) -> Result<crate::data::Batch> {
        if self.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let batches: Vec<Vec<usize>> = self.loader.batches(epoch as u64, 0)?.collect();
            self.epoch = Some((epoch, batches));
        }
        let idx = self
            .epoch
            .as_ref()
            .and_then(|(_, b)| b.get(index))
            .ok_or_else(|| {
                Error::invalid(format!("batch {index} of epoch {epoch} out of range"))
            })?;
        self.loader.collate(idx)
    }
}

pub(crate) fn dataset_config(cfg: &SftConfig) -> Result<DatasetConfig> {
    let d: DatasetConfig = serde_path_to_error::deserialize(cfg.dataset.clone()).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." {
            "dataset".to_string()
        } else {
            format!("dataset.{path}")
        };
        Error::config(key, e.into_inner().to_string())
    })?;
    d.validate()?;
    Ok(d)
}

pub(crate) fn quant_config(cfg: &SftConfig) -> Result<Option<QuantConfig>> {
    let section = match &cfg.quantization {
        None => None,
        Some(v) => Some(serde_path_to_error::deserialize(v.clone()).map_err(|e| {
            Error::config(
                format!("quantization.{}", e.path()),
                e.into_inner().to_string(),
            )
        })?),
    };
    QuantConfig::resolve(section, cfg.model.train_4bit, cfg.model.train_8bit)
}

/// The LoRA config of the run, if LoRA is on.
pub fn lora_config(cfg: &SftConfig) -> Option<LoraConfig> {
    let l = cfg.lora.as_ref().filter(|l| l.enabled)?;
    Some(LoraConfig {
        r: l.rank,
        alpha: l.alpha,
        dropout: l.dropout,
        use_rslora: l.use_rslora,
        target: l.target_modules.clone(),
        modules_to_save: l.modules_to_save.clone(),
        base_model_name_or_path: Some(cfg.model.path.display().to_string()),
        ..LoraConfig::default()
    })
}

/// Loads the tokenizer (with the dataset's custom template, if any) and the model (quantized
/// while loading when asked; in `model.dtype`, converted tensor by tensor) onto `device`.
pub fn load_model_and_tokenizer(
    cfg: &SftConfig,
    device: Device,
) -> Result<(Box<dyn CausalLm>, Tokenizer, DatasetConfig)> {
    let dcfg = dataset_config(cfg)?;
    let mut tok = Tokenizer::from_dir(&cfg.model.path)?;
    dcfg.apply_chat_template(&mut tok)?;
    let frozen = lora_config(cfg).is_some();
    let kind = cfg
        .model
        .dtype
        .resolve(cfg.training.precision, device, frozen)?;
    let mut opts = LoadOptions::new(kind, device);
    if let Some(q) = quant_config(cfg)? {
        opts = opts.with_quantizer(q.quantizer()?);
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
    Ok((model, tok, dcfg))
}

fn loader(
    ds: SftDataset,
    tok: &Tokenizer,
    dcfg: &DatasetConfig,
    opts: LoaderOptions,
) -> Result<DataLoader> {
    let pad = tok
        .pad()
        .or(tok.eos())
        .ok_or_else(|| Error::Tokenizer {
            path: tok.dir().to_path_buf(),
            msg: "no pad and no eos token: set pad_token in tokenizer_config.json".into(),
        })?
        .id as i64;
    Ok(DataLoader::new(
        Arc::new(ds),
        Collator::new(pad, dcfg.padding_side),
        opts,
    ))
}

/// Puts every trainable parameter in a group: the reference grouping (Muon for hidden matrices,
/// AdamW for embeddings at 2x, the LM head at 0.1x, 1-D parameters without weight decay), then
/// either the built-in Muon + AdamW pair or, with an `optimizer: {name: ...}` section, that
/// registered optimizer for every group.
pub(crate) fn make_optimizer(
    cfg: &SftConfig,
    model: &dyn CausalLm,
) -> Result<Box<dyn DynOptimizer>> {
    let trainable: Vec<(String, Tensor)> = model
        .named_parameters()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    let infos: Vec<ParamInfo> = trainable
        .iter()
        .map(|(n, t)| ParamInfo {
            name: n.clone(),
            shape: t.size(),
            role: if n == model.embed_param() {
                ParamRole::Embedding
            } else if n == model.lm_head_param() {
                ParamRole::LmHead
            } else {
                ParamRole::Other
            },
        })
        .collect();
    let lr = cfg.training.lr;
    let wd = cfg.training.weight_decay;
    let custom = cfg.optimizer.as_ref().filter(|o| o.name != "reference");
    let grouper = ReferenceGrouper::new(ReferenceGrouperConfig {
        use_muon: cfg.training.use_muon && custom.is_none(),
        ..Default::default()
    });
    let specs: Vec<GroupSpec> = grouper.group(&infos)?;
    match custom {
        None => {
            let mut configs: OptimizerConfigs = match &cfg.optimizer {
                Some(o) => plugin::parse_config("optimizer", &o.options_value())?,
                None => OptimizerConfigs::default(),
            };
            if cfg.optimizer.is_none() {
                configs.adamw.weight_decay = wd;
                configs.muon.weight_decay = wd;
            }
            build_optimizer(specs, &trainable, lr, &configs)
        }
        Some(o) => {
            let by_name: std::collections::HashMap<&str, &Tensor> =
                trainable.iter().map(|(n, t)| (n.as_str(), t)).collect();
            let groups = specs
                .into_iter()
                .map(|s| param_group(s, &by_name, lr, wd))
                .collect::<Result<Vec<_>>>()?;
            plugin::build_optimizer(&o.name, groups, &o.options_value())
        }
    }
}

pub(crate) fn dist_setup(cfg: &SftConfig) -> Result<(Option<ProcessGroup>, Device)> {
    let env = DistEnv::from_env()?;
    let dcfg: DistConfig = cfg.distributed.clone().unwrap_or_default();
    dcfg.validate()?;
    match env {
        // One process: `model.device`, or the one GPU `training.gpu_devices` lists.
        None if cfg.training.gpu_devices.is_empty() => Ok((None, cfg.device()?)),
        None => Ok((
            None,
            select_device(
                cfg.device()?,
                cfg.model.device.is_some(),
                &cfg.training.gpu_devices,
                None,
                tch::Cuda::device_count().max(0) as usize,
            )?,
        )),
        Some(env) => {
            let device = select_device(
                cfg.device()?,
                cfg.model.device.is_some(),
                &cfg.training.gpu_devices,
                Some(&env),
                tch::Cuda::device_count().max(0) as usize,
            )?;
            // NCCL for CUDA ranks, Gloo for CPU ranks, unless distributed.backend says.
            let pg = ProcessGroup::on_device(&env, &dcfg, device)?;
            Ok((Some(pg), device))
        }
    }
}

/// Runs the fine-tuning job of `cfg`.
pub fn run_sft(cfg: &SftConfig, opts: RunOptions) -> Result<FitSummary> {
    let base_dir = opts.base_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    plugin::load_plugins(&cfg.plugins, &base_dir)?;
    plugin::check_registry()?;
    // training.threads, else OMP_NUM_THREADS, else ranks on one machine split its cores.
    apply_rank_threads(cfg.training.threads);
    let (pg, device) = dist_setup(cfg)?;
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
    let (mut model, tok, dcfg) = load_model_and_tokenizer(cfg, device)?;

    let train = SftDataset::load(&dcfg, &tok)?;
    let eval = SftDataset::load_eval(&dcfg, &tok)?;
    let packing = dcfg.packing.then_some(dcfg.max_seq_len);
    let train_loader = loader(
        train,
        &tok,
        &dcfg,
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
            &dcfg,
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

    let mut lora = lora_config(cfg);
    // New weights (LoRA A, ...) are drawn from the run seed, as `transformers.set_seed` before
    // the model is built: two runs of one config start alike (data-parallel ranks also get rank
    // 0's values by broadcast).
    tch::manual_seed(t.seed as i64);
    match &mut lora {
        Some(l) => {
            model.freeze_base();
            // `lora.init_from`: the saved adapter's shape and weights
            let init = cfg.lora.as_ref().and_then(|s| s.init_from.as_deref());
            let (used, params) = crate::adapter::inject_lora(model.as_mut(), l, init)?;
            *l = used;
            let n: i64 = params.iter().map(|(_, t)| t.numel() as i64).sum();
            tracing::info!(
                "LoRA r={} on {} tensors, {n} trainable parameters",
                l.r,
                params.len()
            );
        }
        None => {
            if cfg.model.train_4bit || cfg.model.train_8bit || cfg.quantization.is_some() {
                return Err(Error::config(
                    "lora",
                    "a quantized base is frozen: full fine-tuning needs a dense model; enable \
                     `lora` (QLoRA) or remove the quantization",
                ));
            }
        }
    }
    let optimizer = make_optimizer(cfg, model.as_ref())?;

    let mut builder = job_builder(cfg, model, optimizer, device, opts.resume, lora, tok, rank)?
        .train_data(Box::new(LoaderSource::new(train_loader)));
    if let Some(e) = eval_loader {
        builder = builder.eval_data(Box::new(LoaderSource::new(e)));
    }
    builder = with_run_wiring(builder, cfg, pg, opts.interrupt)?;
    let mut trainer = builder.build()?;
    let total = trainer.total_steps();
    trainer.add_callback(Box::new(Progress::new(total, t.log_every)));
    let summary = trainer.fit()?;
    if let Some(dir) = std::env::var_os(RANK_PARAMS_ENV) {
        write_rank_params(trainer.model(), Path::new(&dir), rank)?;
    }
    Ok(summary)
}

/// Test hook: when set to a directory, every rank writes its trainable parameters after
/// training to `<dir>/rank-<r>.safetensors` (only rank 0 saves otherwise), so a test can check
/// that all data-parallel ranks ended with the same weights.
pub const RANK_PARAMS_ENV: &str = "VOLTTRAIN_RANK_PARAMS_DIR";

fn write_rank_params(model: &dyn CausalLm, dir: &Path, rank: usize) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let params: Vec<(String, Tensor)> = model
        .named_parameters()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(n, t)| {
            let cpu = t
                .f_detach()
                .and_then(|t| t.f_to(Device::Cpu))
                .ctx(format!("{RANK_PARAMS_ENV}: copy {n} to the CPU"))?;
            Ok((n, cpu))
        })
        .collect::<Result<_>>()?;
    let path = dir.join(format!("rank-{rank}.safetensors"));
    Tensor::write_safetensors(&params, &path).ctx(format!("write {}", path.display()))
}

/// Mean loss over the label tokens of the eval set (`dataset.eval_path`), for the base model or
/// with the PEFT adapter in `adapter`.
pub fn run_eval(cfg: &SftConfig, adapter: Option<&Path>) -> Result<EvalMetrics> {
    let device = cfg.device()?;
    let (mut model, tok, dcfg) = load_model_and_tokenizer(cfg, device)?;
    if let Some(dir) = adapter {
        load_peft_adapter(model.as_mut(), dir)?;
    }
    let path = dcfg.eval_path.clone().ok_or_else(|| {
        Error::config(
            "dataset.eval_path",
            "`volttrain eval` needs an eval file; set dataset.eval_path",
        )
    })?;
    let ds = SftDataset::load_file(&path, &dcfg, &tok)?;
    let l = loader(
        ds,
        &tok,
        &dcfg,
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
    lora: Option<LoraConfig>,
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
    let warmup_ratio = t.warmup_ratio;
    let warmup_fixed = t.warmup_steps;
    let min_lr_ratio = t.min_lr_ratio;
    Ok(Trainer::builder()
        .model(model)
        .optimizer(optimizer)
        .base_lr(t.lr)
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
        .saver(Box::new(SftSaver::new(
            lora.map(|c| Box::new(LoraInjector::new(c)) as Box<dyn AdapterInjector>),
            Arc::new(tok),
            config_yaml,
        )))
        .scheduler_with(move |total| {
            let ctx = SchedulerCtx { total_steps: total };
            match sched_section {
                Some(s) => plugin::build_scheduler(&s.name, &s.options_value(), &ctx),
                None => {
                    let warmup = warmup_fixed
                        .unwrap_or_else(|| (warmup_ratio * total as f64).round() as u64);
                    let mut m = serde_yaml::Mapping::new();
                    m.insert("warmup_steps".into(), warmup.into());
                    m.insert("min_lr_ratio".into(), min_lr_ratio.into());
                    plugin::build_scheduler("cosine", &serde_yaml::Value::Mapping(m), &ctx)
                }
            }
        }))
}
