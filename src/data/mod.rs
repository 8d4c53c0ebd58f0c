//! Data: tokenizer and chat templates, SFT datasets, the collator and the batch iterator.
//!
//! ```text
//! Tokenizer::from_dir(dir)          tokenizer.json + tokenizer_config.json + chat template
//! SftDataset::load(&cfg, &tok)      JSONL / JSON / Parquet -> tokenized examples with labels (cached)
//! BatchIter::new(&ds, ...)          deterministic shuffle per (seed, epoch), shards, resume
//! Collator::collate(&examples)      padded (or packed) Batch { input_ids, attention_mask, labels }
//! ```
//!
//! ```
//! use std::sync::Arc;
//! use volttrain::data::{Collator, DataLoader, DatasetConfig, LoaderOptions, SftDataset, Tokenizer};
//!
//! # fn main() -> volttrain::Result<()> {
//! let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
//! let cfg = DatasetConfig {
//!     max_seq_len: 256,
//!     cache: false,
//!     ..DatasetConfig::new(root.join("assets/data/eval.jsonl"))
//! };
//! let mut tok = Tokenizer::from_dir(root.join("assets/tiny-llama"))?;
//! cfg.apply_chat_template(&mut tok)?; // a custom template, if the config gives one
//! let ds = Arc::new(SftDataset::load(&cfg, &tok)?);
//! let pad = tok.pad().map(|p| p.id as i64).unwrap_or(0);
//! let loader = DataLoader::new(
//!     ds,
//!     Collator::new(pad, cfg.padding_side),
//!     LoaderOptions { batch_size: 4, ..Default::default() },
//! );
//! let batch = loader.epoch(0, 0)?.next().expect("one batch")?;
//! assert_eq!(batch.input_ids.size()[0], 4);
//! assert_eq!(batch.labels.size(), batch.input_ids.size());
//! # Ok(())
//! # }
//! ```

pub mod collator;
pub mod config;
pub mod dataset;
pub mod loader;
pub mod parquet;
pub mod preference;
pub mod records;
pub mod template;
pub mod tokenizer;
mod training_template;

pub use collator::{Batch, Collator, PaddingSide};
pub use config::{DataFormat, DatasetConfig};
pub use dataset::{Example, SftDataset};
pub use loader::{BatchIter, DataLoader, EpochBatches, LoaderOptions, LoaderSource, pad_id};
pub use preference::{PreferenceDataset, PreferenceLoader, PreferencePair, PreferenceRecord};
pub use records::Record;
pub use template::{ChatTemplate, Message};
pub use tokenizer::{SpecialToken, Tokenizer};

/// Label value that the loss ignores (PyTorch's `CrossEntropyLoss(ignore_index=-100)`).
pub const IGNORE_INDEX: i64 = -100;
