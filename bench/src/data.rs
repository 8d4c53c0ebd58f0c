//! `data_prep`: JSONL to padded batches (render the chat template, find the assistant spans,
//! tokenize, mask, pad), VoltTrain against `datasets.map` + `DataCollatorForSeq2Seq`
//! (`reference/bench_data.py`) with the same tokenizer, template, data and thread budget.

use std::io::Write as _;
use std::sync::Arc;

use volttrain::data::loader::{DataLoader, LoaderOptions};
use volttrain::data::{Collator, DatasetConfig, SftDataset, Tokenizer};
use volttrain::error::{Error, Result};

use crate::{Measurement, PerfOpts, Stats, time_runs};

const BATCH: usize = 8;
const MAX_LEN: usize = 512;

/// Writes `n` records cycling through the bundled training set.
fn make_input(opts: &PerfOpts, n: usize, dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let src = opts.root.join("assets/data/train.jsonl");
    let text = std::fs::read_to_string(&src).map_err(|e| Error::io(&src, e))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return Err(Error::invalid(format!("{} has no records", src.display())));
    }
    let p = dir.join("bench.jsonl");
    let f = std::fs::File::create(&p).map_err(|e| Error::io(&p, e))?;
    let mut w = std::io::BufWriter::new(f);
    for i in 0..n {
        writeln!(w, "{}", lines[i % lines.len()]).map_err(|e| Error::io(&p, e))?;
    }
    w.flush().map_err(|e| Error::io(&p, e))?;
    Ok(p)
}

/// One VoltTrain pass: load (no cache), collate every batch. Returns (examples, tokens).
fn volttrain_pass(tok: &Tokenizer, path: &std::path::Path) -> Result<(usize, usize)> {
    let cfg = DatasetConfig {
        max_seq_len: MAX_LEN,
        cache: false,
        ..DatasetConfig::new(path)
    };
    let ds = Arc::new(SftDataset::load(&cfg, tok)?);
    let pad = tok
        .pad()
        .ok_or_else(|| Error::invalid("bench tokenizer has no pad/eos token"))?
        .id as i64;
    let dl = DataLoader::new(
        ds.clone(),
        Collator::new(pad, volttrain::data::PaddingSide::Right),
        LoaderOptions {
            batch_size: BATCH,
            shuffle: false,
            ..Default::default()
        },
    );
    let mut tokens = 0;
    for b in dl.epoch(0, 0)? {
        tokens += b?.num_tokens;
    }
    Ok((ds.len(), tokens))
}

/// Measures examples/s and tokens/s of both sides.
pub fn run(opts: &PerfOpts) -> Result<Vec<Measurement>> {
    let n = if opts.quick { 4_000 } else { 40_000 };
    let tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let input = make_input(opts, n, tmp.path())?;
    let tok_dir = opts.root.join("assets/tiny-llama");
    let tok = Tokenizer::from_dir(&tok_dir)?;

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.max(1))
        .build()
        .map_err(|e| Error::invalid(format!("rayon pool: {e}")))?;
    let mut counts = (0, 0);
    let secs = pool.install(|| {
        time_runs(tch::Device::Cpu, opts.warmup, opts.runs, || {
            counts = volttrain_pass(&tok, &input)?;
            Ok(())
        })
    })?;
    let (examples, tokens) = counts;

    let args: Vec<String> = [
        "--tok".to_string(),
        tok_dir.to_string_lossy().into_owned(),
        "--data".into(),
        input.to_string_lossy().into_owned(),
        "--batch-size".into(),
        BATCH.to_string(),
        "--max-len".into(),
        MAX_LEN.to_string(),
        "--runs".into(),
        opts.runs.to_string(),
        "--warmup".into(),
        opts.warmup.min(1).to_string(),
    ]
    .into();
    let env = [
        ("RAYON_NUM_THREADS", opts.threads.to_string()),
        ("TOKENIZERS_PARALLELISM", "true".to_string()),
        ("HF_DATASETS_OFFLINE", "1".to_string()),
    ];
    let r = crate::run_reference_env(opts, "bench_data.py", &args, &env)?;
    let ref_secs: Vec<f64> = r["seconds"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default();
    let ref_examples = r["examples"].as_u64().unwrap_or(0) as usize;
    let ref_tokens = r["tokens"].as_u64().unwrap_or(0) as usize;
    if ref_examples != examples || ref_tokens != tokens {
        return Err(Error::invalid(format!(
            "data_prep: the reference made {ref_examples} examples / {ref_tokens} tokens, \
             VoltTrain {examples} / {tokens}; the two sides must do the same work"
        )));
    }

    // Second start: the tokenized dataset comes from the on-disk cache.
    let cache_dir = tmp.path().join("cache");
    let cached_cfg = DatasetConfig {
        max_seq_len: MAX_LEN,
        cache_dir: Some(cache_dir),
        ..DatasetConfig::new(&input)
    };
    SftDataset::load(&cached_cfg, &tok)?;
    let cold = secs.iter().copied().fold(f64::INFINITY, f64::min);
    let hit = time_runs(tch::Device::Cpu, 0, opts.runs, || {
        let ds = SftDataset::load(&cached_cfg, &tok)?;
        if !ds.from_cache {
            return Err(Error::invalid(
                "data_prep: the second load missed the cache",
            ));
        }
        Ok(())
    })?;

    let ours = Stats::from_samples(&secs)?;
    let theirs = Stats::from_samples(&ref_secs)?;
    let note = format!(
        "{examples} chats, {tokens} tokens, batch {BATCH}, max_len {MAX_LEN}, {} threads, \
         tiny-llama ChatML tokenizer",
        opts.threads
    );
    let name = "datasets.map + DataCollatorForSeq2Seq".to_string();
    Ok(vec![
        Measurement {
            workload: "data_prep".into(),
            metric: "examples/s".into(),
            volttrain: ours.inverse(examples as f64),
            reference: Some(theirs.inverse(examples as f64)),
            reference_name: name.clone(),
            higher_is_better: true,
            note: note.clone(),
        },
        Measurement {
            workload: "data_prep".into(),
            metric: "tokens/s".into(),
            volttrain: ours.inverse(tokens as f64),
            reference: Some(theirs.inverse(tokens as f64)),
            reference_name: name,
            higher_is_better: true,
            note: note.clone(),
        },
        Measurement {
            workload: "data_prep_cached".into(),
            metric: "s/load".into(),
            volttrain: Stats::from_samples(&hit)?,
            reference: None,
            reference_name: String::new(),
            higher_is_better: false,
            note: format!(
                "load from the on-disk cache; the cold pass took {cold:.3} s (min); {note}"
            ),
        },
    ])
}
