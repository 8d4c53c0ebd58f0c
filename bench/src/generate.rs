//! Decode workload (issue 18): greedy generation with the KV cache on a random model with
//! SmolLM2-135M's shape (`reference/generate_ref.py --make-smollm2`, fp32), VoltTrain's
//! [`volttrain::generate::Generate`] against transformers' `generate(do_sample=False)`
//! (`reference/bench_generate.py`), same prompt length, new tokens and threads, in the same run.
//! Decode tokens/s counts the tokens after the first (the first comes from the prefill).
//! Quick mode keeps the layer shape and vocabulary with 8 of the 30 layers.

use volttrain::error::{Error, Result};
use volttrain::generate::{Generate, GenerateConfig};
use volttrain::model::{LoadOptions, load_model};

use crate::{Measurement, PerfOpts, Stats, run_reference};

/// Decode tokens/s of VoltTrain and transformers.
pub fn run(opts: &PerfOpts) -> Result<Vec<Measurement>> {
    tch::set_num_threads(opts.threads as i32);
    let layers = if opts.quick { 8 } else { 30 };
    let (prompt_len, new) = if opts.quick { (32, 32) } else { (128, 128) };
    let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let d = dir.path().join("smollm2");
    run_reference(
        opts,
        "generate_ref.py",
        &[
            "--make-smollm2".into(),
            d.display().to_string(),
            layers.to_string(),
            "49152".into(),
        ],
    )?;
    let theirs = run_reference(
        opts,
        "bench_generate.py",
        &[
            d.display().to_string(),
            prompt_len.to_string(),
            new.to_string(),
            opts.warmup.to_string(),
            opts.runs.to_string(),
            opts.threads.to_string(),
        ],
    )?;
    let ref_secs: Vec<f64> = theirs
        .get("decode_seconds")
        .and_then(|s| s.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default();
    if ref_secs.is_empty() {
        return Err(Error::invalid(format!("no decode_seconds in {theirs}")));
    }
    let model = load_model(&d, &LoadOptions::new(tch::Kind::Float, opts.device))?;
    // the same prompt as the reference cannot be drawn identically; any ids give the same work
    let prompt: Vec<u32> = (0..prompt_len as u32)
        .map(|i| 3 + (i * 7919) % 49000)
        .collect();
    let cfg = GenerateConfig {
        max_new_tokens: new,
        ..Default::default()
    };
    for _ in 0..opts.warmup {
        model.generate(&prompt, &cfg, &mut |_| Ok(true))?;
    }
    let mut ours = Vec::new();
    for _ in 0..opts.runs {
        let g = model.generate(&prompt, &cfg, &mut |_| Ok(true))?;
        ours.push(g.decode_secs);
    }
    let decoded = (new - 1) as f64;
    Ok(vec![Measurement {
        workload: "generate_decode".into(),
        metric: "tokens/s".into(),
        volttrain: Stats::from_samples(&ours)?.inverse(decoded),
        reference: Some(Stats::from_samples(&ref_secs)?.inverse(decoded)),
        reference_name: format!(
            "transformers generate(do_sample=False), DynamicCache ({} attention)",
            theirs.get("attn").and_then(|a| a.as_str()).unwrap_or("?")
        ),
        higher_is_better: true,
        note: format!(
            "SmolLM2-135M shape, {layers} layers, random fp32 weights, batch 1, prompt {prompt_len}, {new} new tokens (greedy)"
        ),
    }])
}
