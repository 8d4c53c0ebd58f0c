//! Preference-tuning workload: one DPO (sigmoid) step with LoRA r16 on a SmolLM2-135M-shaped
//! Llama (the model of [`crate::sft`]), 2 pairs = 4 rows of 256 tokens (128 prompt + 128
//! completion), fp32, AdamW, against TRL's `DPOTrainer.training_step` plus its AdamW step on the
//! very same weights and tokens (`reference/bench_dpo.py`), in the same run. Both sides compute
//! the reference log-probs with the adapters off, every step.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use volttrain::data::{Batch, IGNORE_INDEX};
use volttrain::error::{Error, Result};
use volttrain::model::{CausalLm, LoadOptions, load_model};
use volttrain::optim::{AdamW, AdamWConfig, Optimizer, ParamGroup};
use volttrain::trainer::{PreferenceConfig, PreferenceObjective, Trainer};

use crate::sft::{Clock, Repeat};
use crate::{Measurement, PerfOpts, Stats, run_reference};

const PAIRS: i64 = 2;
const PROMPT: i64 = 128;
const COMPLETION: i64 = 128;

/// Seconds of each measured VoltTrain DPO step on the model and rows in `dir`.
fn ours(dir: &std::path::Path, opts: &PerfOpts) -> Result<Vec<f64>> {
    let mut model: Box<dyn CausalLm> =
        load_model(dir, &LoadOptions::new(Kind::Float, opts.device))?;
    crate::inject_bench_lora(model.as_mut())?;
    let params = crate::trainable_named(model.as_ref());
    let opt = AdamW::new(
        vec![ParamGroup::new("all", params, 1e-4, 1.0, 0.0)],
        AdamWConfig::default(),
    )?;
    let ids = Tensor::read_safetensors(dir.join("pref_batch.safetensors"))
        .map_err(|e| Error::invalid(format!("benchmark batch: {e}")))?
        .into_iter()
        .find(|(n, _)| n == "input_ids")
        .map(|(_, t)| t)
        .ok_or_else(|| Error::invalid("benchmark batch has no input_ids"))?;
    let rows = 2 * PAIRS;
    let t = PROMPT + COMPLETION;
    let prompt_mask = Tensor::arange(t, (Kind::Int64, Device::Cpu))
        .lt(PROMPT)
        .unsqueeze(0)
        .expand([rows, t], false);
    let labels = ids.masked_fill(&prompt_mask, IGNORE_INDEX);
    let batch = Batch {
        attention_mask: Tensor::ones([rows, t], (Kind::Int64, Device::Cpu)),
        labels,
        input_ids: ids,
        position_ids: None,
        num_tokens: (rows * t) as usize,
        num_label_tokens: (rows * COMPLETION) as usize,
    };
    let times = Arc::new(Mutex::new(vec![Instant::now()]));
    let out = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let mut tr = Trainer::builder()
        .model(model)
        .train_data(Box::new(Repeat(batch)))
        .preference(PreferenceObjective::new(PreferenceConfig::default())?)
        .optimizer(Box::new(opt))
        .base_lr(1e-4)
        .device(opts.device)
        .max_steps(Some((opts.warmup + opts.runs) as u64))
        .output_dir(out.path())
        .checkpoint_every(Some(u64::MAX))
        .callback(Box::new(Clock(times.clone())))
        .build()?;
    tr.fit()?;
    let v = times
        .lock()
        .map_err(|_| Error::invalid("clock poisoned"))?
        .clone();
    Ok(v.windows(2)
        .skip(opts.warmup)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect())
}

/// The DPO LoRA step on both sides; one [`Measurement`] in input tokens per second.
pub fn run(opts: &PerfOpts) -> Result<Vec<Measurement>> {
    tch::set_num_threads(opts.threads as i32);
    let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let l = crate::sft::layers(opts.quick);
    let reference = run_reference(
        opts,
        "bench_dpo.py",
        &[
            "--model-dir".into(),
            dir.path().display().to_string(),
            "--layers".into(),
            l.to_string(),
            "--warmup".into(),
            opts.warmup.to_string(),
            "--runs".into(),
            opts.runs.to_string(),
            "--threads".into(),
            opts.threads.to_string(),
            "--tokenizer".into(),
            opts.root.join("assets/tiny-llama").display().to_string(),
        ],
    )?;
    let ref_secs: Vec<f64> = reference["step_seconds"]
        .as_array()
        .ok_or_else(|| Error::invalid("bench_dpo.py: no step_seconds"))?
        .iter()
        .filter_map(|x| x.as_f64())
        .collect();
    let ours = ours(dir.path(), opts)?;
    let tokens = (2 * PAIRS * (PROMPT + COMPLETION)) as f64;
    Ok(vec![Measurement {
        workload: "dpo_lora_step".into(),
        metric: "tokens/s".into(),
        volttrain: Stats::from_samples(&ours)?.inverse(tokens),
        reference: Some(Stats::from_samples(&ref_secs)?.inverse(tokens)),
        reference_name: format!(
            "trl {} DPOTrainer.training_step + AdamW",
            reference["trl"].as_str().unwrap_or("?")
        ),
        higher_is_better: true,
        note: format!(
            "SmolLM2-135M shape with {l} layers, LoRA r16 on 7 projections, sigmoid loss, \
             {PAIRS} pairs = {} rows x {} tokens ({PROMPT} prompt + {COMPLETION} completion), \
             reference log-probs with adapters off every step, fp32",
            2 * PAIRS,
            PROMPT + COMPLETION
        ),
    }])
}
