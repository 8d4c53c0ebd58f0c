//! `DatasetConfig`: the `dataset:` section of the YAML file.

use std::path::{Path, PathBuf};

use super::collator::PaddingSide;
use crate::error::{Error, Result};

/// File format of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// One JSON record per line.
    Jsonl,
    /// One JSON array of records.
    Json,
    /// Apache Parquet (as the Hugging Face Hub ships datasets).
    Parquet,
}

impl DataFormat {
    /// Guesses the format from the file extension (`.jsonl`/`.ndjson`, `.json`, `.parquet`).
    pub fn from_path(path: &Path) -> Result<DataFormat> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        match ext.as_deref() {
            Some("jsonl") | Some("ndjson") => Ok(DataFormat::Jsonl),
            Some("json") => Ok(DataFormat::Json),
            Some("parquet") | Some("pq") => Ok(DataFormat::Parquet),
            _ => Err(Error::config(
                "dataset.type",
                format!(
                    "cannot guess the format of {} from its extension; set `type` to jsonl, json \
                     or parquet",
                    path.display()
                ),
            )),
        }
    }
}

/// Dataset settings. Defaults: `max_seq_len` 1024, loss on assistant tokens only (TRL's
/// `assistant_only_loss`), no packing, stop on the first bad record, cache on.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// Training data file.
    pub path: PathBuf,
    /// `jsonl`, `json` or `parquet`; guessed from the extension when absent.
    #[serde(rename = "type", default)]
    pub format: Option<DataFormat>,
    /// Examples are cut to this many tokens.
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Train on every token (prompt and system too), as a language-modeling collator does.
    #[serde(default)]
    pub train_on_all_tokens: bool,
    /// Pack several examples into one row of `max_seq_len` tokens (block-diagonal attention,
    /// positions restart per example, no loss across example boundaries).
    #[serde(default)]
    pub packing: bool,
    /// Skip bad records (and report how many) instead of stopping at the first.
    #[serde(default)]
    pub skip_invalid: bool,
    /// Evaluation data file (same format rules).
    #[serde(default)]
    pub eval_path: Option<PathBuf>,
    /// A custom chat template: the template text, a path to a `.jinja` file, or `chatml` for the
    /// built-in ChatML template.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// Extra chat template variables, as `apply_chat_template(**kwargs)` passes them, e.g.
    /// `{enable_thinking: false}` for Qwen3 (issue 16).
    #[serde(default)]
    pub chat_template_kwargs: std::collections::BTreeMap<String, serde_json::Value>,
    /// Which side padding goes (right by default).
    #[serde(default)]
    pub padding_side: PaddingSide,
    /// Cache tokenized datasets on disk.
    #[serde(default = "default_true")]
    pub cache: bool,
    /// Where the cache lives (default `$VOLTTRAIN_CACHE/data`, else `~/.cache/volttrain/data`).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
}

fn default_max_seq_len() -> usize {
    1024
}

fn default_true() -> bool {
    true
}

impl Default for DatasetConfig {
    fn default() -> Self {
        DatasetConfig {
            path: PathBuf::new(),
            format: None,
            max_seq_len: default_max_seq_len(),
            train_on_all_tokens: false,
            packing: false,
            skip_invalid: false,
            eval_path: None,
            chat_template: None,
            chat_template_kwargs: Default::default(),
            padding_side: PaddingSide::Right,
            cache: true,
            cache_dir: None,
        }
    }
}

impl DatasetConfig {
    /// A config for `path` with the defaults.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DatasetConfig {
            path: path.into(),
            ..Default::default()
        }
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<()> {
        if self.max_seq_len < 2 {
            return Err(Error::config(
                "dataset.max_seq_len",
                format!("must be at least 2, got {}", self.max_seq_len),
            ));
        }
        if self.path.as_os_str().is_empty() {
            return Err(Error::config("dataset.path", "is empty"));
        }
        Ok(())
    }

    /// The format of `path`: `type` if set, else guessed from the extension.
    pub fn format_of(&self, path: &Path) -> Result<DataFormat> {
        match self.format {
            Some(f) => Ok(f),
            None => DataFormat::from_path(path),
        }
    }

    /// The cache directory in use.
    pub fn cache_dir(&self) -> PathBuf {
        if let Some(d) = &self.cache_dir {
            return d.clone();
        }
        if let Some(d) = std::env::var_os("VOLTTRAIN_CACHE") {
            return PathBuf::from(d).join("data");
        }
        match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".cache/volttrain/data"),
            None => std::env::temp_dir().join("volttrain-data-cache"),
        }
    }

    /// Applies `chat_template` (text or a `.jinja` path) to `tok`, if set, and
    /// `chat_template_kwargs`.
    pub fn apply_chat_template(&self, tok: &mut super::Tokenizer) -> Result<()> {
        if !self.chat_template_kwargs.is_empty() {
            tok.set_chat_template_kwargs(
                self.chat_template_kwargs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            );
        }
        let Some(t) = &self.chat_template else {
            return Ok(());
        };
        if t == "chatml" {
            tok.set_chat_template(
                super::template::CHATML_TEMPLATE,
                "dataset.chat_template: chatml",
            )
        } else if t.contains("{{") || t.contains("{%") {
            tok.set_chat_template(t, "dataset.chat_template")
        } else {
            let p = Path::new(t);
            let src = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            tok.set_chat_template(&src, p)
        }
    }
}
