//! Model-load workload: a random SmolLM2-135M-shaped Llama checkpoint (bf16 safetensors, tied
//! embeddings) loaded into fp32 by [`volttrain::model::load_model`] and by transformers'
//! `from_pretrained` (`reference/bench_load.py`), in the same run.

use volttrain::error::{Error, Result};
use volttrain::model::{LoadOptions, load_model};

use crate::{Measurement, PerfOpts, Stats, run_reference, time_runs_then_drop};

/// Times loading the 135M checkpoint on both sides; one [`Measurement`] in seconds per load.
pub fn load_135m(opts: &PerfOpts) -> Result<Vec<Measurement>> {
    tch::set_num_threads(opts.threads as i32);
    let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let dir_s = dir.path().display().to_string();
    let made = run_reference(opts, "bench_load.py", &["make".into(), dir_s.clone()])?;
    let params = made.get("params").and_then(|p| p.as_i64()).unwrap_or(0);
    let load = LoadOptions::new(tch::Kind::Float, opts.device);
    // the model is freed after the clock is read, as the reference `del`s it untimed
    let ours = time_runs_then_drop(opts.device, opts.warmup.max(1), opts.runs.max(1), || {
        load_model(dir.path(), &load)
    })?;
    let reference = run_reference(
        opts,
        "bench_load.py",
        &["time".into(), dir_s, opts.runs.max(1).to_string()],
    )?;
    let ref_secs: Vec<f64> = reference
        .get("seconds")
        .and_then(|s| s.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default();
    Ok(vec![Measurement {
        workload: "model_load_135m".into(),
        metric: "s/load".into(),
        volttrain: Stats::from_samples(&ours)?,
        reference: Some(Stats::from_samples(&ref_secs)?),
        reference_name: "transformers AutoModelForCausalLM.from_pretrained (fp32)".into(),
        higher_is_better: false,
        note: format!(
            "SmolLM2-135M shape, {params} params, bf16 safetensors on disk -> fp32 {:?}",
            opts.device
        ),
    }])
}
