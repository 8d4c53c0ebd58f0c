//! Mamba workload (issue 17): forward + backward of a mamba-130m-shaped model (d_model 768,
//! d_state 16, expand 2, 24 layers; 4 layers in quick mode), batch 4 x 256, fp32, against
//! transformers' PyTorch mixer path (`reference/bench_mamba.py`), same run, same threads.
//!
//! Both sides compute the mean cross-entropy of the shifted logits (the logits are materialized
//! on both) and call backward on it; VoltTrain's step runs [`volttrain::model::SsmLm`] with the
//! fused CPU selective scan. Goal: at least 3x on the CPU.

use volttrain::error::{Error, Result, TchResultExt};
use volttrain::model::{ForwardInput, LoadOptions, load_model, safetensors::load_safetensors};

use crate::{Measurement, PerfOpts, Stats, run_reference, time_runs};

const LAYERS_FULL: usize = 24;
const LAYERS_QUICK: usize = 4;
/// Measured steps in full mode, on both sides. transformers' PyTorch mixer path loops over the
/// 256 positions in Python for each of the 24 layers (minutes per step on 2 cores, ~11 GB), so
/// the default 7 runs would keep the machine busy for most of an hour.
const RUNS_FULL: usize = 3;
const BATCH: i64 = 4;
const SEQ: i64 = 256;

fn seconds(v: &serde_json::Value, key: &str) -> Result<Vec<f64>> {
    let s: Vec<f64> = v
        .get(key)
        .and_then(|s| s.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default();
    if s.is_empty() {
        return Err(Error::invalid(format!("no `{key}` in {v}")));
    }
    Ok(s)
}

/// Forward + backward tokens/s of VoltTrain and transformers on the same checkpoint and batch.
pub fn run(opts: &PerfOpts) -> Result<Vec<Measurement>> {
    tch::set_num_threads(opts.threads as i32);
    let layers = if opts.quick {
        LAYERS_QUICK
    } else {
        LAYERS_FULL
    };
    let runs = if opts.quick {
        opts.runs
    } else {
        opts.runs.min(RUNS_FULL)
    };
    let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let d = dir.path().display().to_string();
    let made = run_reference(
        opts,
        "bench_mamba.py",
        &[
            "make".into(),
            d.clone(),
            layers.to_string(),
            BATCH.to_string(),
            SEQ.to_string(),
        ],
    )?;
    let params = made.get("params").and_then(|p| p.as_i64()).unwrap_or(0);
    let theirs = run_reference(
        opts,
        "bench_mamba.py",
        &[
            "fwdbwd".into(),
            d.clone(),
            opts.warmup.to_string(),
            runs.to_string(),
            opts.threads.to_string(),
        ],
    )?;

    let model = load_model(dir.path(), &LoadOptions::new(tch::Kind::Float, opts.device))?;
    let batch = load_safetensors(&dir.path().join("batch.safetensors"))?;
    let ids = batch
        .get("input_ids")
        .ok_or_else(|| Error::invalid("batch.safetensors has no input_ids"))?
        .f_to_device(opts.device)
        .ctx("ids to device")?;
    let vocab = model.vocab_size();
    let labels = ids
        .f_narrow(1, 1, SEQ - 1)
        .ctx("labels")?
        .f_reshape([-1])
        .ctx("labels")?;
    let params_list: Vec<tch::Tensor> = model
        .named_parameters()
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    let ours = time_runs(opts.device, opts.warmup, runs, || {
        let input = ForwardInput {
            input_ids: &ids,
            attention_mask: None,
            position_ids: None,
        };
        let logits = model.forward(&input, true)?;
        let loss = logits
            .f_narrow(1, 0, SEQ - 1)
            .ctx("shift")?
            .f_reshape([-1, vocab])
            .ctx("shift")?
            .f_cross_entropy_loss::<&tch::Tensor>(&labels, None, tch::Reduction::Mean, -100, 0.0)
            .ctx("cross entropy")?;
        loss.f_backward().ctx("backward")?;
        for p in &params_list {
            volttrain::fused::clear_grad(p)?;
        }
        Ok(())
    })?;
    let tokens = (BATCH * SEQ) as f64;
    Ok(vec![Measurement {
        workload: "mamba_fwd_bwd".into(),
        metric: "tokens/s".into(),
        volttrain: Stats::from_samples(&ours)?.inverse(tokens),
        reference: Some(Stats::from_samples(&seconds(&theirs, "step_seconds")?)?.inverse(tokens)),
        reference_name: "transformers MambaForCausalLM (PyTorch mixer path)".into(),
        higher_is_better: true,
        note: format!(
            "mamba-130m shape (d_model 768, d_state 16, expand 2), {layers} layers, {params} params, \
             fp32, batch {BATCH}x{SEQ}, forward + backward of the mean cross-entropy; reference \
             peak RSS MB {:.0}",
            theirs
                .get("peak_rss_mb")
                .and_then(|x| x.as_f64())
                .unwrap_or(f64::NAN)
        ),
    }])
}
