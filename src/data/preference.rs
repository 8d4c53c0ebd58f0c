//! Preference pairs (`{prompt, chosen, rejected}`) for DPO, IPO, hinge and ORPO, tokenized the
//! way TRL's `DPOTrainer` (trl 1.16.0, `_prepare_dataset` and `DataCollatorForPreference`) does.
//!
//! - Strings: EOS is appended to `chosen` and `rejected` unless they already end with it; the
//!   prompt, `prompt + chosen` and `prompt + rejected` are tokenized with the tokenizer's special
//!   tokens (`tokenizer(text)`).
//! - Message lists (TRL's conversational form): the prompt is rendered with the chat template and
//!   `add_generation_prompt=True`, `prompt + chosen` and `prompt + rejected` without it, each
//!   tokenized as `apply_chat_template(tokenize=True)` does.
//! - The completion starts where the tokenized prompt and the tokenized prompt + completion stop
//!   agreeing (`common_prefix_length`, the shorter of the chosen and rejected ones).
//! - A row is `prompt + completion` cut at `max_seq_len` (TRL's `keep_start`); the completion
//!   tokens carry labels. A batch of `B` pairs is `2B` rows: the `B` chosen rows, then the `B`
//!   rejected rows (TRL's `[chosen, rejected]` concatenation).
//!
//! Bad records stop the load with `file:line` (or are counted and skipped with
//! `dataset.skip_invalid`): a missing `prompt`, `chosen` or `rejected`; chosen identical to
//! rejected (no preference to learn); a prompt with no tokens or one that fills `max_seq_len`
//! (TRL drops those silently: no completion token would be left).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;

use super::IGNORE_INDEX;
use super::collator::{Batch, Collator};
use super::config::{DataFormat, DatasetConfig};
use super::dataset::Example;
use super::loader::{BatchIter, LoaderOptions};
use super::records::{element_lines, kind, messages_from};
use super::template::Message;
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};

/// One preference record before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum PreferenceRecord {
    /// `{"prompt": "...", "chosen": "...", "rejected": "..."}`.
    Text {
        /// The prompt text.
        prompt: String,
        /// The preferred completion.
        chosen: String,
        /// The rejected completion.
        rejected: String,
    },
    /// Message lists: the prompt's turns, and the chosen and rejected continuations.
    Chat {
        /// The prompt's turns.
        prompt: Vec<Message>,
        /// The preferred continuation's turns.
        chosen: Vec<Message>,
        /// The rejected continuation's turns.
        rejected: Vec<Message>,
    },
}

/// A tokenized pair: the shared prompt and the two completions (uncut).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferencePair {
    /// Token ids of the prompt (shared by both rows).
    pub prompt: Vec<i64>,
    /// Token ids of the preferred completion.
    pub chosen: Vec<i64>,
    /// Token ids of the rejected completion.
    pub rejected: Vec<i64>,
}

impl PreferencePair {
    /// The training row of `completion`: `prompt + completion` cut at `max_len`, labels on the
    /// completion.
    fn row(&self, completion: &[i64], max_len: usize) -> Example {
        let mut input_ids: Vec<i64> = self.prompt.iter().chain(completion).copied().collect();
        let mut labels: Vec<i64> = std::iter::repeat_n(IGNORE_INDEX, self.prompt.len())
            .chain(completion.iter().copied())
            .collect();
        input_ids.truncate(max_len);
        labels.truncate(max_len);
        Example { input_ids, labels }
    }

    /// The chosen row (see [`PreferencePair`]).
    pub fn chosen_row(&self, max_len: usize) -> Example {
        self.row(&self.chosen, max_len)
    }

    /// The rejected row.
    pub fn rejected_row(&self, max_len: usize) -> Example {
        self.row(&self.rejected, max_len)
    }
}

/// Parses one JSON value into a [`PreferenceRecord`], or says what is wrong with it.
pub fn parse_preference_record(
    v: &serde_json::Value,
) -> std::result::Result<PreferenceRecord, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| format!("a record must be a JSON object, found {}", kind(v)))?;
    let get = |k: &str| -> std::result::Result<&serde_json::Value, String> {
        match obj.get(k) {
            Some(serde_json::Value::Null) | None => {
                let keys: Vec<&str> = obj.keys().map(|k| k.as_str()).collect();
                Err(format!(
                    "preference record has no `{k}` (a record needs `prompt`, `chosen` and \
                     `rejected`; keys: {})",
                    keys.join(", ")
                ))
            }
            Some(x) => Ok(x),
        }
    };
    let (p, c, r) = (get("prompt")?, get("chosen")?, get("rejected")?);
    let rec = match (p, c, r) {
        (
            serde_json::Value::String(p),
            serde_json::Value::String(c),
            serde_json::Value::String(r),
        ) => PreferenceRecord::Text {
            prompt: p.clone(),
            chosen: c.clone(),
            rejected: r.clone(),
        },
        (serde_json::Value::Array(_), serde_json::Value::Array(_), serde_json::Value::Array(_)) => {
            let prompt = messages_from(p, "prompt")?;
            let chosen = messages_from(c, "chosen")?;
            let rejected = messages_from(r, "rejected")?;
            for (k, m) in [
                ("prompt", &prompt),
                ("chosen", &chosen),
                ("rejected", &rejected),
            ] {
                if m.is_empty() {
                    return Err(format!("`{k}` has no messages"));
                }
            }
            PreferenceRecord::Chat {
                prompt,
                chosen,
                rejected,
            }
        }
        _ => {
            return Err(format!(
                "`prompt`, `chosen` and `rejected` must all be strings or all message lists, \
                 found {}, {} and {}",
                kind(p),
                kind(c),
                kind(r)
            ));
        }
    };
    let same = match &rec {
        PreferenceRecord::Text {
            chosen, rejected, ..
        } => chosen == rejected,
        PreferenceRecord::Chat {
            chosen, rejected, ..
        } => chosen == rejected,
    };
    if same {
        return Err(
            "`chosen` and `rejected` are identical: the pair states no preference".to_string(),
        );
    }
    Ok(rec)
}

/// Tokenized preference pairs.
#[derive(Debug, Clone)]
pub struct PreferenceDataset {
    /// The pairs, in file order.
    pub pairs: Vec<PreferencePair>,
    /// The file it came from.
    pub path: PathBuf,
    /// Bad records skipped under `skip_invalid` (each message names file:line).
    pub skipped: Vec<String>,
    /// Pairs with a row cut at `max_seq_len`.
    pub truncated: usize,
    /// Rows are cut to this many tokens.
    pub max_seq_len: usize,
}

fn data_err(path: &Path, line: usize, msg: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        line,
        msg: msg.into(),
    }
}

/// Length of the common start of `a` and `b` (TRL's `common_prefix_length`).
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn to_i64(v: &[u32]) -> Vec<i64> {
    v.iter().map(|&i| i as i64).collect()
}

/// Tokenizes one record as TRL does (see the module docs).
pub fn tokenize_pair(
    rec: &PreferenceRecord,
    tok: &Tokenizer,
) -> std::result::Result<PreferencePair, String> {
    let msg = |e: Error| match e {
        Error::Tokenizer { msg, .. } => msg,
        other => other.to_string(),
    };
    let (prompt, pc, pr) = match rec {
        PreferenceRecord::Text {
            prompt,
            chosen,
            rejected,
        } => {
            let eos = tok
                .eos()
                .ok_or_else(|| "the tokenizer has no eos_token to end the completions".to_string())?
                .content
                .clone();
            let with_eos = |s: &str| {
                if s.ends_with(&eos) {
                    s.to_string()
                } else {
                    format!("{s}{eos}")
                }
            };
            (
                tok.encode(prompt, true).map_err(msg)?,
                tok.encode(&format!("{prompt}{}", with_eos(chosen)), true)
                    .map_err(msg)?,
                tok.encode(&format!("{prompt}{}", with_eos(rejected)), true)
                    .map_err(msg)?,
            )
        }
        PreferenceRecord::Chat {
            prompt,
            chosen,
            rejected,
        } => {
            let join =
                |c: &[Message]| -> Vec<Message> { prompt.iter().chain(c).cloned().collect() };
            (
                tok.chat_ids(prompt, true).map_err(msg)?,
                tok.chat_ids(&join(chosen), false).map_err(msg)?,
                tok.chat_ids(&join(rejected), false).map_err(msg)?,
            )
        }
    };
    let n = common_prefix(&prompt, &pc).min(common_prefix(&prompt, &pr));
    if n == 0 {
        return Err(
            "the prompt has no tokens (a completion needs a prompt token before it)".into(),
        );
    }
    let pair = PreferencePair {
        prompt: to_i64(&prompt[..n]),
        chosen: to_i64(&pc[n..]),
        rejected: to_i64(&pr[n..]),
    };
    if pair.chosen.is_empty() || pair.rejected.is_empty() {
        return Err("`chosen` or `rejected` tokenizes to no completion token".into());
    }
    if pair.chosen == pair.rejected {
        return Err(
            "`chosen` and `rejected` tokenize to the same ids: the pair states no \
                    preference"
                .into(),
        );
    }
    Ok(pair)
}

/// Reads the JSON values of a JSONL or JSON-array file, each with its 1-based line.
fn read_values(
    path: &Path,
    text: &str,
    format: DataFormat,
) -> Result<Vec<(usize, std::result::Result<serde_json::Value, String>)>> {
    match format {
        DataFormat::Jsonl => Ok(text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                (
                    i + 1,
                    serde_json::from_str(l).map_err(|e| format!("malformed JSON: {e}")),
                )
            })
            .collect()),
        DataFormat::Json => {
            let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                data_err(
                    path,
                    e.line(),
                    format!("malformed JSON: {e}; a .json dataset must be one array of records"),
                )
            })?;
            let serde_json::Value::Array(arr) = v else {
                return Err(data_err(
                    path,
                    1,
                    format!(
                        "a .json dataset must be an array of records, found {}",
                        kind(&v)
                    ),
                ));
            };
            let lines = element_lines(text);
            Ok(arr
                .into_iter()
                .enumerate()
                .map(|(i, el)| (lines.get(i).copied().unwrap_or(1), Ok(el)))
                .collect())
        }
        DataFormat::Parquet => Err(Error::config(
            "dataset.type",
            format!(
                "{}: preference data is read from JSONL or JSON files (parquet is not supported \
                 for preference tuning yet)",
                path.display()
            ),
        )),
    }
}

impl PreferenceDataset {
    /// Loads the training file of `cfg` (the chat template already applied to `tok`).
    pub fn load(cfg: &DatasetConfig, tok: &Tokenizer) -> Result<PreferenceDataset> {
        cfg.validate()?;
        Self::load_file(&cfg.path, cfg, tok)
    }

    /// Loads `cfg.eval_path`, if set.
    pub fn load_eval(cfg: &DatasetConfig, tok: &Tokenizer) -> Result<Option<PreferenceDataset>> {
        cfg.validate()?;
        cfg.eval_path
            .as_ref()
            .map(|p| Self::load_file(p, cfg, tok))
            .transpose()
    }

    /// Loads `path` with the settings of `cfg` (`max_seq_len`, `skip_invalid`, `type`).
    pub fn load_file(path: &Path, cfg: &DatasetConfig, tok: &Tokenizer) -> Result<Self> {
        let format = cfg.format_of(path)?;
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let values = read_values(path, &text, format)?;
        let built: Vec<(usize, std::result::Result<PreferencePair, String>)> = values
            .into_par_iter()
            .map(|(line, v)| {
                let r = v
                    .and_then(|v| parse_preference_record(&v))
                    .and_then(|rec| tokenize_pair(&rec, tok))
                    .and_then(|p| {
                        if p.prompt.len() >= cfg.max_seq_len {
                            Err(format!(
                                "the prompt is {} tokens, which fills dataset.max_seq_len ({}): \
                                 no completion token would be left; raise max_seq_len or \
                                 shorten the prompt",
                                p.prompt.len(),
                                cfg.max_seq_len
                            ))
                        } else {
                            Ok(p)
                        }
                    });
                (line, r)
            })
            .collect();
        let mut pairs = Vec::with_capacity(built.len());
        let mut errors: Vec<Error> = Vec::new();
        for (line, r) in built {
            match r {
                Ok(p) => pairs.push(p),
                Err(m) => errors.push(data_err(path, line, m)),
            }
        }
        if !errors.is_empty() && !cfg.skip_invalid {
            let n = errors.len();
            let first = errors.swap_remove(0);
            return Err(match first {
                Error::Data { path, line, msg } if n > 1 => Error::Data {
                    path,
                    line,
                    msg: format!(
                        "{msg} ({} more bad records; set `skip_invalid: true` to skip them)",
                        n - 1
                    ),
                },
                e => e,
            });
        }
        if pairs.is_empty() {
            return Err(data_err(
                path,
                0,
                format!(
                    "no usable preference pairs ({} skipped as invalid){}",
                    errors.len(),
                    errors
                        .first()
                        .map(|e| format!("; first: {e}"))
                        .unwrap_or_default()
                ),
            ));
        }
        let max = cfg.max_seq_len;
        let truncated = pairs
            .iter()
            .filter(|p| p.prompt.len() + p.chosen.len().max(p.rejected.len()) > max)
            .count();
        let ds = PreferenceDataset {
            pairs,
            path: path.to_path_buf(),
            skipped: errors.iter().map(|e| e.to_string()).collect(),
            truncated,
            max_seq_len: max,
        };
        if !ds.skipped.is_empty() {
            tracing::warn!(
                "{}: skipped {} invalid preference record(s) (skip_invalid: true); first: {}",
                path.display(),
                ds.skipped.len(),
                ds.skipped[0]
            );
        }
        if truncated > 0 {
            tracing::info!("{}: {truncated} pair(s) cut at max_seq_len", path.display());
        }
        Ok(ds)
    }

    /// Pairs in the dataset.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether the dataset has no pairs.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

/// Batches of preference pairs: a deterministic order per epoch (as [`super::DataLoader`]),
/// each batch of `B` pairs collated to `2B` rows, chosen rows first.
#[derive(Debug, Clone)]
pub struct PreferenceLoader {
    dataset: Arc<PreferenceDataset>,
    collator: Collator,
    opts: LoaderOptions,
}

impl PreferenceLoader {
    /// `opts.packing` must be `None` (pairs are not packed).
    pub fn new(
        dataset: Arc<PreferenceDataset>,
        collator: Collator,
        opts: LoaderOptions,
    ) -> Result<Self> {
        if opts.packing.is_some() {
            return Err(Error::config(
                "dataset.packing",
                "preference tuning does not pack pairs; set `packing: false`",
            ));
        }
        Ok(PreferenceLoader {
            dataset,
            collator,
            opts,
        })
    }

    /// The dataset it reads.
    pub fn dataset(&self) -> &PreferenceDataset {
        &self.dataset
    }

    /// The index batches of `epoch` from batch `start`.
    pub fn batches(&self, epoch: u64, start: usize) -> Result<BatchIter> {
        let mut it = BatchIter::new(self.dataset.len(), epoch, &self.opts)?;
        it.skip_to(start);
        Ok(it)
    }

    /// Batches per epoch for this rank.
    pub fn num_batches(&self) -> Result<usize> {
        Ok(self.batches(0, 0)?.num_batches())
    }

    /// Collates the pairs `idx` into `2 * idx.len()` rows: chosen rows, then rejected rows.
    pub fn collate(&self, idx: &[usize]) -> Result<Batch> {
        let max = self.dataset.max_seq_len;
        let pairs: Vec<&PreferencePair> = idx
            .iter()
            .map(|&i| {
                self.dataset.pairs.get(i).ok_or_else(|| {
                    Error::invalid(format!(
                        "pair index {i} out of range ({})",
                        self.dataset.len()
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let rows: Vec<Example> = pairs
            .iter()
            .map(|p| p.chosen_row(max))
            .chain(pairs.iter().map(|p| p.rejected_row(max)))
            .collect();
        let refs: Vec<&Example> = rows.iter().collect();
        self.collator.collate(&refs)
    }
}
