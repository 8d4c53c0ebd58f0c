//! Model-family workload (issue 16): random Qwen3-0.6B- and Gemma-2-2B-shaped checkpoints (bf16
//! safetensors, tied embeddings, written by `reference/bench_families.py`), each next to a Llama
//! of the same widths, heads and vocabulary, loaded into fp32 by
//! [`volttrain::model::load_model`] and by transformers' `from_pretrained`, and trained for LoRA
//! steps (r 16 on every attention and MLP projection, AdamW, fp32) by VoltTrain (a child process,
//! as `crate::sft` does) and by transformers + peft, in the same run with the same threads and
//! tokens.
//!
//! Quick mode keeps the real layer shapes, vocabularies and heads but fewer layers (Qwen3 8 of
//! 28, Gemma 2 4 of 26) and a small batch, so the pair fits a 2-core machine in a few minutes;
//! `--full` uses every layer.

use volttrain::error::{Error, Result};
use volttrain::model::{LoadOptions, load_model};

use crate::{Measurement, PerfOpts, Stats, run_reference, time_runs_then_drop};

/// One family's benchmark shape.
struct Shape {
    family: &'static str,
    name: &'static str,
    layers_full: usize,
    layers_quick: usize,
    batch: i64,
    seq: i64,
}

const SHAPES: [Shape; 2] = [
    Shape {
        family: "qwen3",
        name: "Qwen3-0.6B",
        layers_full: 28,
        layers_quick: 8,
        batch: 2,
        seq: 128,
    },
    Shape {
        family: "gemma2",
        name: "Gemma-2-2B",
        layers_full: 26,
        layers_quick: 4,
        batch: 1,
        seq: 128,
    },
];

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

/// Load time and LoRA step rate of each family against transformers (+ peft), each preceded by
/// a Llama with the family's widths, heads, vocabulary and tying (`llama-<family>` in
/// `reference/bench_families.py`): the Llama row the family's row is compared with, same size,
/// same run, so the comparison measures the architecture and not the size.
pub fn run(opts: &PerfOpts) -> Result<Vec<Measurement>> {
    tch::set_num_threads(opts.threads as i32);
    let mut rows = Vec::new();
    for s in SHAPES {
        let twin = format!("llama-{}", s.family);
        let twin_name = format!("Llama with {} widths", s.name);
        rows.extend(measure(opts, &s, &twin, &twin_name)?);
        rows.extend(measure(opts, &s, s.family, s.name)?);
    }
    Ok(rows)
}

/// The load row and the LoRA step row of checkpoint `family` (named `name` in the notes) at
/// shape `s`.
fn measure(opts: &PerfOpts, s: &Shape, family: &str, name: &str) -> Result<[Measurement; 2]> {
    let layers = if opts.quick {
        s.layers_quick
    } else {
        s.layers_full
    };
    let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let d = dir.path().display().to_string();
    let made = run_reference(
        opts,
        "bench_families.py",
        &[
            "make".into(),
            family.into(),
            d.clone(),
            layers.to_string(),
            s.batch.to_string(),
            s.seq.to_string(),
        ],
    )?;
    let params = made.get("params").and_then(|p| p.as_i64()).unwrap_or(0);
    let shape = format!(
        "{name} shape, {layers} layers, {params} params, random weights, bf16 safetensors -> fp32"
    );

    // load time: the reference first, then ours, one warm-up each
    let theirs = run_reference(
        opts,
        "bench_families.py",
        &[
            "load".into(),
            d.clone(),
            opts.runs.to_string(),
            opts.threads.to_string(),
        ],
    )?;
    let load = LoadOptions::new(tch::Kind::Float, opts.device);
    // the model is freed after the clock is read, as the reference `del`s it untimed
    let ours = time_runs_then_drop(opts.device, 1, opts.runs, || load_model(dir.path(), &load))?;
    let key = family.replace('-', "_");
    let load_row = Measurement {
        workload: format!("model_load_{key}"),
        metric: "s/load".into(),
        volttrain: Stats::from_samples(&ours)?,
        reference: Some(Stats::from_samples(&seconds(&theirs, "seconds")?)?),
        reference_name: "transformers AutoModelForCausalLM.from_pretrained (fp32)".into(),
        higher_is_better: false,
        note: shape.clone(),
    };

    // LoRA steps
    let tokens = (s.batch * s.seq) as f64;
    let theirs = run_reference(
        opts,
        "bench_families.py",
        &[
            "lora".into(),
            d.clone(),
            opts.warmup.to_string(),
            opts.runs.to_string(),
            opts.threads.to_string(),
        ],
    )?;
    let ours = crate::sft::spawn_child_json("lora", dir.path(), opts)?;
    let step_row = Measurement {
        workload: format!("lora_step_{key}"),
        metric: "tokens/s".into(),
        volttrain: Stats::from_samples(&seconds(&ours, "step_seconds")?)?.inverse(tokens),
        reference: Some(Stats::from_samples(&seconds(&theirs, "step_seconds")?)?.inverse(tokens)),
        reference_name: format!(
            "transformers + peft ({} attention)",
            theirs.get("attn").and_then(|a| a.as_str()).unwrap_or("?")
        ),
        higher_is_better: true,
        note: format!(
            "{shape}, batch {}x{}, LoRA r16 on all attention and MLP projections, AdamW; peak RSS MB: volttrain {:.0} reference {:.0}",
            s.batch,
            s.seq,
            ours.get("peak_rss_mb")
                .and_then(|x| x.as_f64())
                .unwrap_or(f64::NAN),
            theirs
                .get("peak_rss_mb")
                .and_then(|x| x.as_f64())
                .unwrap_or(f64::NAN),
        ),
    };
    Ok([load_row, step_row])
}
