//! Data: tokenizer and chat templates, SFT datasets, the collator and the batch iterator.
//!
//! ```text
//! Tokenizer::from_dir(dir)          tokenizer.json + tokenizer_config.json + chat template
//! SftDataset::load(&cfg, &tok)      JSONL / JSON / Parquet -> tokenized examples with labels (cached)
//! BatchIter::new(&ds, ...)          deterministic shuffle per (seed, epoch), shards, resume
//! Collator::collate(&examples)      padded (or packed) Batch { input_ids, attention_mask, labels }
//! ```

pub mod collator;
pub mod config;
pub mod dataset;
pub mod loader;
pub mod parquet;
pub mod records;
pub mod template;
pub mod tokenizer;

pub use collator::{Batch, Collator, PaddingSide};
pub use config::{DataFormat, DatasetConfig};
pub use dataset::{Example, SftDataset};
pub use loader::{BatchIter, DataLoader, LoaderOptions};
pub use records::Record;
pub use template::{ChatTemplate, Message};
pub use tokenizer::{SpecialToken, Tokenizer};

/// Label value that the loss ignores (PyTorch's `CrossEntropyLoss(ignore_index=-100)`).
pub const IGNORE_INDEX: i64 = -100;
