//! VoltTrain as a library: the YAML job (`volttrain sft`) composed by hand with
//! `Trainer::builder()` — the bundled tiny Llama and chat data, LoRA on every projection, the
//! reference grouping (Muon for hidden matrices, AdamW for the rest), warmup + cosine, evaluation
//! and a PEFT adapter saved after each epoch.
//!
//! The part between `README:begin` and `README:end` is the README's "Library use" snippet,
//! verbatim (`tests/readme_snippet.rs` checks it). Run: `./dev cargo run --example library_use`.
//! `cargo test` runs it too (the test at the end), so the snippet is a fine-tuning that works.

use std::path::{Path, PathBuf};

// README:begin
use std::sync::Arc;

use volttrain::adapter::{AdapterInjector, LoraConfig, LoraInjector};
use volttrain::callback::{EpochSaver, SftSaver};
use volttrain::data::{Collator, DataLoader, DatasetConfig, LoaderOptions, LoaderSource};
use volttrain::data::{SftDataset, Tokenizer, pad_id};
use volttrain::model::{LoadOptions, load_model};
use volttrain::optim::{OptimizerChoice, OptimizerConfigs, ReferenceGrouper, assemble_optimizer};
use volttrain::sched::Cosine;
use volttrain::trainer::{FitSummary, Trainer};

/// LoRA fine-tuning of the Hugging Face model in `model_dir` on the chat JSONL files.
fn fine_tune(
    model_dir: &Path,
    train: &Path,
    eval: &Path,
    out: &Path,
) -> volttrain::Result<FitSummary> {
    let device = tch::Device::cuda_if_available();
    // Tokenizer and chat template from the model directory; the data rendered with it.
    let tok = Tokenizer::from_dir(model_dir)?;
    let data = DatasetConfig {
        path: train.into(),
        eval_path: Some(eval.into()),
        ..Default::default()
    };
    let collator = Collator::new(pad_id(&tok)?, data.padding_side);
    let batches = |ds: SftDataset, shuffle: bool| {
        let opts = LoaderOptions {
            batch_size: 4,
            shuffle,
            ..Default::default()
        };
        LoaderSource::new(DataLoader::new(Arc::new(ds), collator.clone(), opts))
    };
    let train_data = batches(SftDataset::load(&data, &tok)?, true);
    let eval_data = batches(SftDataset::load_file(eval, &data, &tok)?, false);

    // The frozen base in fp32 (model.dtype), LoRA r16 / alpha 32 on every projection.
    let mut model = load_model(model_dir, &LoadOptions::new(tch::Kind::Float, device))?;
    model.freeze_base();
    let lora = LoraInjector::new(LoraConfig::default());
    lora.inject(model.as_mut())?;

    // The reference grouping: Muon for hidden matrices, AdamW for embeddings (2x lr) and head.
    let grouper = ReferenceGrouper::default();
    let configs = OptimizerConfigs::default();
    let optimizer = assemble_optimizer(
        model.as_ref(),
        &grouper,
        OptimizerChoice::PerGroup(&configs),
        2e-3,
        0.0,
    )?;

    Trainer::builder()
        .model(model)
        .train_data(Box::new(train_data))
        .eval_data(Box::new(eval_data))
        .optimizer(optimizer)
        .base_lr(2e-3)
        .scheduler_with(|total_steps| {
            Ok(Box::new(Cosine {
                warmup_steps: 2,
                total_steps,
                min_lr_ratio: 0.1,
                num_cycles: 0.5,
            }))
        })
        .device(device)
        .epochs(2)
        .output_dir(out)
        // After each epoch: `out/epoch-N/` with the PEFT adapter and the tokenizer, last 2 kept.
        .saver(Box::new(SftSaver::new(
            Some(Box::new(lora)),
            Arc::new(tok),
            "",
        )))
        .callback(Box::new(EpochSaver {
            keep_last: 2,
            every: 1,
        }))
        .build()?
        .fit()
}
// README:end

fn bundled(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn main() -> volttrain::Result<()> {
    let out = tempfile::tempdir().map_err(|e| volttrain::Error::io(std::env::temp_dir(), e))?;
    let summary = fine_tune(
        &bundled("assets/tiny-llama"),
        &bundled("assets/data/train.jsonl"),
        &bundled("assets/data/eval.jsonl"),
        out.path(),
    )?;
    println!(
        "{} steps, {} label tokens, train loss {:.4}, eval loss {:.4}, {:.0} tokens/s",
        summary.steps,
        summary.tokens,
        summary.final_train_loss.unwrap_or(f64::NAN),
        summary.final_eval_loss.unwrap_or(f64::NAN),
        summary.tokens_per_sec
    );
    for epoch in ["epoch-1", "epoch-2"] {
        let adapter = out.path().join(epoch).join("adapter_model.safetensors");
        if !adapter.is_file() {
            return Err(volttrain::Error::checkpoint(
                adapter,
                "the epoch saver wrote no adapter",
            ));
        }
    }
    println!("adapters in {}", out.path().display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example fine-tunes for real: the eval loss after two epochs is below the base
    /// model's on the same eval set, and each epoch's PEFT adapter is on disk.
    #[test]
    fn fine_tunes_the_bundled_model() {
        let (model_dir, eval) = (
            bundled("assets/tiny-llama"),
            bundled("assets/data/eval.jsonl"),
        );
        let tok = Tokenizer::from_dir(&model_dir).unwrap();
        let data = DatasetConfig {
            path: eval.clone(),
            ..Default::default()
        };
        let loader = DataLoader::new(
            Arc::new(SftDataset::load_file(&eval, &data, &tok).unwrap()),
            Collator::new(pad_id(&tok).unwrap(), data.padding_side),
            LoaderOptions {
                batch_size: 4,
                shuffle: false,
                ..Default::default()
            },
        );
        let device = tch::Device::cuda_if_available();
        let base = load_model(&model_dir, &LoadOptions::new(tch::Kind::Float, device)).unwrap();
        let base_loss = volttrain::trainer::evaluate_model_in(
            base.as_ref(),
            &mut LoaderSource::new(loader),
            device,
            volttrain::amp::Precision::Fp32,
        )
        .unwrap()
        .eval_loss;

        let out = tempfile::tempdir().unwrap();
        let s = fine_tune(
            &model_dir,
            &bundled("assets/data/train.jsonl"),
            &eval,
            out.path(),
        )
        .unwrap();
        let tuned = s.final_eval_loss.unwrap();
        assert!(s.steps > 0 && tuned.is_finite());
        assert!(
            tuned < base_loss,
            "eval loss {tuned} not below the base model's {base_loss}"
        );
        for epoch in ["epoch-1", "epoch-2"] {
            assert!(
                out.path()
                    .join(epoch)
                    .join("adapter_model.safetensors")
                    .is_file(),
                "{epoch}"
            );
            assert!(
                out.path().join(epoch).join("adapter_config.json").is_file(),
                "{epoch}"
            );
        }
    }
}
