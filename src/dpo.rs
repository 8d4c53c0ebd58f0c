//! The preference-tuning job (`volttrain dpo`): the SFT job's model, LoRA, optimizer, schedule
//! and callbacks, with preference pairs as data ([`crate::data::preference`]) and a
//! [`PreferenceObjective`] (DPO, IPO, hinge, robust, ORPO) from the config's `preference:`
//! section.
//!
//! The reference of the reference-based losses: with LoRA, the trained model with its adapters
//! off; in full fine-tuning, a second frozen copy loaded from `model.path`, or, with
//! `preference.precompute_ref_log_probs`, the log-probabilities of every pair computed once before
//! the first step.

use std::path::PathBuf;
use std::sync::Arc;

use crate::callback::Progress;
use crate::config::SftConfig;
use crate::data::{
    Collator, LoaderOptions, LoaderSource, PreferenceDataset, PreferenceLoader, pad_id,
};
use crate::error::{Error, Result};
use crate::model::{LoadOptions, load_model};
use crate::plugin;
use crate::sft::{
    RunOptions, inject_adapter, job_optimizer, job_process_group, load_model_and_tokenizer,
};
use crate::trainer::{FitSummary, PreferenceConfig, PreferenceObjective};

/// [`BatchSource`](crate::trainer::BatchSource) over a [`PreferenceLoader`].
pub type PreferenceSource = LoaderSource<PreferenceLoader>;

/// Runs the preference-tuning job of `cfg` (its `preference:` section, or TRL's defaults).
pub fn run_dpo(cfg: &SftConfig, opts: RunOptions) -> Result<FitSummary> {
    cfg.training.required_lr()?;
    let base_dir = opts.base_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    plugin::load_plugins(&cfg.plugins, &base_dir)?;
    plugin::check_registry()?;
    crate::dist::apply_rank_threads(cfg.training.threads);
    let pcfg: PreferenceConfig = cfg.preference.clone().unwrap_or_default();
    pcfg.validate()?;
    let (pg, device) = job_process_group(cfg)?;
    let (rank, world) = pg.as_ref().map_or((0, 1), |p| (p.rank(), p.world_size()));
    let t = &cfg.training;
    // The same output-directory rules as `volttrain sft`: one writer, no silent overwrite,
    // resume only under the same math.
    let _output_lock = crate::run::prepare_output_dir(
        &t.output_dir,
        t.overwrite_output_dir,
        opts.resume,
        &cfg.to_yaml()?,
        rank == 0,
    )?;
    let (mut model, tok) = load_model_and_tokenizer(cfg, device)?;
    let dcfg = &cfg.dataset;
    if dcfg.packing {
        return Err(Error::config(
            "dataset.packing",
            "preference tuning does not pack pairs; set `packing: false`",
        ));
    }
    let train = Arc::new(PreferenceDataset::load(dcfg, &tok)?);
    let eval = PreferenceDataset::load_eval(dcfg, &tok)?.map(Arc::new);
    tracing::info!(
        "{} preference pairs from {}",
        train.len(),
        dcfg.path.display()
    );
    let collator = Collator::new(pad_id(&tok)?, dcfg.padding_side);
    let opts_for = |batch_size: usize, shuffle: bool, rank: usize, world: usize| LoaderOptions {
        batch_size,
        seed: t.seed,
        shuffle,
        drop_last: false,
        rank,
        world,
        packing: None,
    };
    let train_loader = PreferenceLoader::new(
        train.clone(),
        collator.clone(),
        opts_for(t.batch_size, true, rank, world),
    )?;
    let eval_bs = t.eval_batch_size.unwrap_or(t.batch_size);
    let eval_loader = eval
        .as_ref()
        .map(|ds| {
            PreferenceLoader::new(
                ds.clone(),
                collator.clone(),
                opts_for(eval_bs, false, rank, world),
            )
        })
        .transpose()?;

    tch::manual_seed(t.seed as i64);
    let mut objective = PreferenceObjective::new(pcfg.clone())?;
    let adapter = match inject_adapter(cfg, model.as_mut())? {
        Some(a) => {
            tracing::info!(
                "{}; the reference is the model with its adapters off",
                a.summary
            );
            Some(a.injector)
        }
        None => {
            if pcfg.needs_reference() && !pcfg.precompute_ref_log_probs {
                tracing::info!(
                    "full fine-tuning: loading a frozen reference copy of {}",
                    cfg.model.path.display()
                );
                let reference =
                    load_model(&cfg.model.path, &LoadOptions::new(tch::Kind::Float, device))?;
                objective = objective.with_reference_model(reference);
            }
            None
        }
    };
    if pcfg.precompute_ref_log_probs && world > 1 {
        // Every rank needs the rows of every pair (shards change with the epoch).
        let mut all = PreferenceSource::new(PreferenceLoader::new(
            train.clone(),
            collator.clone(),
            opts_for(t.batch_size, false, 0, 1),
        )?);
        objective.precompute(model.as_ref(), &mut all, 0, device)?;
        if let Some(ds) = &eval {
            let mut all = PreferenceSource::new(PreferenceLoader::new(
                ds.clone(),
                collator.clone(),
                opts_for(eval_bs, false, 0, 1),
            )?);
            objective.precompute(model.as_ref(), &mut all, 0, device)?;
        }
    }
    let optimizer = job_optimizer(cfg, model.as_ref())?;

    let mut builder = crate::sft::job_builder(
        cfg,
        model,
        optimizer,
        device,
        opts.resume,
        adapter,
        tok,
        rank,
    )?
    .train_data(Box::new(PreferenceSource::new(train_loader)))
    .preference(objective);
    if let Some(e) = eval_loader {
        builder = builder.eval_data(Box::new(PreferenceSource::new(e)));
    }
    builder = crate::sft::with_run_wiring(builder, cfg, pg, opts.interrupt)?;
    let mut trainer = builder.build()?;
    let total = trainer.total_steps();
    trainer.add_callback(Box::new(Progress::new(total, t.log_every)));
    trainer.fit()
}
