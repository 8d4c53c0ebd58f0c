//! `SftDataset`: records tokenized into `input_ids` and `labels`, cached on disk.
//!
//! Loss masking for chats follows TRL's prefix rendering: the tokens an assistant turn adds
//! (between the render of `messages[..i]` with `add_generation_prompt=true` and the render of
//! `messages[..=i]`) carry labels; everything else is [`IGNORE_INDEX`]. The whole conversation is
//! tokenized once, as `apply_chat_template(tokenize=True)` does, and the turn spans are mapped to
//! tokens through the tokenizer's byte offsets; a token that straddles a span boundary is an
//! error (the template and tokenizer disagree about where the turn starts).
//!
//! A template that is not prefix-stable cannot be read this way. When it is byte-equal to Qwen3's
//! (which drops the `<think>` block of earlier assistant turns) or Phi-3's (which ends every
//! render with `eos_token`), conversations that prefix rendering cannot locate are rendered with
//! its training variant instead, as TRL's `SFTTrainer` does with `assistant_only_loss=True` (see
//! `training_template.rs`); any other such template is an error naming the turn.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::IGNORE_INDEX;
use super::config::{DataFormat, DatasetConfig};
use super::records::{self, Located, ReadOutcome, Record};
use super::tokenizer::{Tokenizer, hex};
use super::training_template::TrainingTemplate;
use crate::error::{Error, Result};

/// One tokenized training example. `labels[i]` is `input_ids[i]` where the loss applies and
/// [`IGNORE_INDEX`] elsewhere (not shifted; the trainer shifts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids of the rendered record.
    pub input_ids: Vec<i64>,
    /// `input_ids` where the loss applies, [`IGNORE_INDEX`] elsewhere; same length.
    pub labels: Vec<i64>,
}

impl Example {
    /// Tokens in the example.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether the example has no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of tokens that carry a label.
    pub fn num_label_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// A tokenized dataset.
#[derive(Debug, Clone)]
pub struct SftDataset {
    /// The examples, in file order.
    pub examples: Vec<Example>,
    /// The file it came from.
    pub path: PathBuf,
    /// Bad records skipped under `skip_invalid` (each message names file:line).
    pub skipped: Vec<String>,
    /// Examples cut at `max_seq_len`.
    pub truncated: usize,
    /// Whether it was read from the on-disk cache.
    pub from_cache: bool,
}

/// Text prepared for the tokenizer: the string, whether to add the post-processor's special
/// tokens, and the byte spans that carry labels (`None`: every token).
struct Prepared {
    text: String,
    add_special: bool,
    spans: Option<Vec<(usize, usize)>>,
    /// Whether an appended EOS carries a label.
    eos_label: bool,
    /// Whether the chat was rendered with the training variant of its template.
    training_variant: bool,
}

/// An example and whether it was cut, or what is wrong with the record.
type Built = std::result::Result<(Example, bool), String>;

// version 2: multi-turn Qwen3 chats (refused, or skipped with skip_invalid, by version 1) are
// rendered with the training variant
const CACHE_MAGIC: &[u8; 8] = b"VTSFT\0\0\x02";

impl SftDataset {
    /// Loads the training file of `cfg` (its `chat_template` must already be applied to `tok`,
    /// see [`DatasetConfig::apply_chat_template`]).
    pub fn load(cfg: &DatasetConfig, tok: &Tokenizer) -> Result<SftDataset> {
        cfg.validate()?;
        Self::load_file(&cfg.path, cfg, tok)
    }

    /// Loads `cfg.eval_path`, if set.
    pub fn load_eval(cfg: &DatasetConfig, tok: &Tokenizer) -> Result<Option<SftDataset>> {
        cfg.validate()?;
        match &cfg.eval_path {
            Some(p) => Ok(Some(Self::load_file(p, cfg, tok)?)),
            None => Ok(None),
        }
    }

    /// Loads `path` with the settings of `cfg`; uses and fills the cache when `cfg.cache`.
    pub fn load_file(path: &Path, cfg: &DatasetConfig, tok: &Tokenizer) -> Result<SftDataset> {
        let format = cfg.format_of(path)?;
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let cache_file = if cfg.cache {
            let key = cache_key(&bytes, format, cfg, tok);
            Some(cfg.cache_dir().join(format!("{key}.bin")))
        } else {
            None
        };
        if let Some(ds) = cache_file.as_deref().and_then(|cf| read_cache(cf, path)) {
            report(&ds);
            return Ok(ds);
        }
        let outcome = match format {
            DataFormat::Jsonl => {
                let text = utf8(path, &bytes)?;
                records::read_jsonl(path, text)
            }
            DataFormat::Json => records::read_json_array(path, utf8(path, &bytes)?)?,
            DataFormat::Parquet => super::parquet::read_parquet(path, bytes)?,
        };
        let ds = Self::from_records(path, outcome, cfg, tok)?;
        if let Some(cf) = &cache_file
            && let Err(e) = write_cache(cf, &ds)
        {
            tracing::warn!("could not write dataset cache {}: {e}", cf.display());
        }
        report(&ds);
        Ok(ds)
    }

    /// Tokenizes parsed records. Bad records (from reading, rendering or tokenizing) stop the
    /// load with the earliest one's file:line, or are skipped and counted with `skip_invalid`.
    pub fn from_records(
        path: &Path,
        outcome: ReadOutcome,
        cfg: &DatasetConfig,
        tok: &Tokenizer,
    ) -> Result<SftDataset> {
        let ReadOutcome {
            records,
            mut errors,
        } = outcome;
        let eos = tok.eos().ok_or_else(|| {
            tok.err(
                "no eos_token in tokenizer_config.json; SFT appends EOS to every example".into(),
            )
        })?;
        let eos_id = eos.id as i64;
        let training = match (cfg.train_on_all_tokens, tok.chat_template()) {
            (false, Some(t)) => TrainingTemplate::for_template(t)?,
            _ => None,
        };

        let prepared: Vec<(usize, std::result::Result<Prepared, String>)> = records
            .par_iter()
            .map(|r| {
                let p = prepare(&r.value, cfg.train_on_all_tokens, tok, training.as_ref());
                (r.line, p)
            })
            .collect();
        if let Some(t) = &training {
            let n = prepared
                .iter()
                .filter(|(_, p)| p.as_ref().is_ok_and(|p| p.training_variant))
                .count();
            if n > 0 {
                tracing::info!(
                    "{}: the chat template is {}'s, which is not prefix-stable; {n} \
                     conversation(s) rendered with its training variant ({}), as TRL's \
                     SFTTrainer does with assistant_only_loss",
                    path.display(),
                    t.name,
                    t.source
                );
            }
        }
        let mut ok: Vec<(usize, Prepared)> = Vec::with_capacity(prepared.len());
        for (line, p) in prepared {
            match p {
                Ok(p) => ok.push((line, p)),
                Err(msg) => errors.push(data_err(path, line, msg)),
            }
        }
        // Group by add_special so each group is one parallel encode_batch call.
        let mut encoded: Vec<Option<tokenizers::Encoding>> = vec![None; ok.len()];
        for add_special in [false, true] {
            let idx: Vec<usize> = (0..ok.len())
                .filter(|&i| ok[i].1.add_special == add_special)
                .collect();
            if idx.is_empty() {
                continue;
            }
            let texts: Vec<&str> = idx.iter().map(|&i| ok[i].1.text.as_str()).collect();
            let encs = tok
                .inner()
                .encode_batch(texts, add_special)
                .map_err(|e| tok.err(format!("encode_batch on {}: {e}", path.display())))?;
            for (i, e) in idx.into_iter().zip(encs) {
                encoded[i] = Some(e);
            }
        }

        let built: Vec<(usize, Built)> = ok
            .par_iter()
            .zip(encoded.par_iter())
            .map(|((line, p), enc)| {
                let r = match enc {
                    Some(enc) => build_example(p, enc, eos_id, cfg),
                    None => Err("internal: record was not encoded".to_string()),
                };
                (*line, r)
            })
            .collect();
        let mut examples = Vec::with_capacity(built.len());
        let mut lines = Vec::with_capacity(built.len());
        let mut truncated = 0;
        for (line, r) in built {
            match r {
                Ok((ex, cut)) => {
                    truncated += cut as usize;
                    examples.push(ex);
                    lines.push(line);
                }
                Err(msg) => errors.push(data_err(path, line, msg)),
            }
        }
        if !errors.is_empty() {
            errors.sort_by_key(|e| match e {
                Error::Data { line, .. } => *line,
                _ => 0,
            });
            if !cfg.skip_invalid {
                let n = errors.len();
                let first = errors.swap_remove(0);
                if n == 1 {
                    return Err(first);
                }
                return Err(match first {
                    Error::Data { path, line, msg } => Error::Data {
                        path,
                        line,
                        msg: format!(
                            "{msg} ({} more bad records; set `skip_invalid: true` to skip them)",
                            n - 1
                        ),
                    },
                    other => other,
                });
            }
        }
        if examples.is_empty() {
            return Err(data_err(
                path,
                0,
                format!(
                    "no usable records ({} skipped as invalid){}",
                    errors.len(),
                    errors
                        .first()
                        .map(|e| format!("; first: {e}"))
                        .unwrap_or_default()
                ),
            ));
        }
        Ok(SftDataset {
            examples,
            path: path.to_path_buf(),
            skipped: errors.iter().map(|e| e.to_string()).collect(),
            truncated,
            from_cache: false,
        })
    }

    /// Examples in the dataset.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether the dataset has no examples.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Total tokens over all examples.
    pub fn num_tokens(&self) -> usize {
        self.examples.iter().map(|e| e.len()).sum()
    }

    /// Groups examples into packed rows of at most `max_len` tokens, in dataset order (greedy:
    /// a row is closed when the next example does not fit).
    pub fn pack(&self, max_len: usize) -> Vec<Vec<usize>> {
        let mut rows = Vec::new();
        let mut cur: Vec<usize> = Vec::new();
        let mut used = 0;
        for (i, e) in self.examples.iter().enumerate() {
            let n = e.len().min(max_len);
            if !cur.is_empty() && used + n > max_len {
                rows.push(std::mem::take(&mut cur));
                used = 0;
            }
            cur.push(i);
            used += n;
        }
        if !cur.is_empty() {
            rows.push(cur);
        }
        rows
    }
}

fn report(ds: &SftDataset) {
    if !ds.skipped.is_empty() {
        tracing::warn!(
            "{}: skipped {} invalid record(s) (skip_invalid: true); first: {}",
            ds.path.display(),
            ds.skipped.len(),
            ds.skipped[0]
        );
    }
    let unlabelled = ds
        .examples
        .iter()
        .filter(|e| e.num_label_tokens() == 0)
        .count();
    if unlabelled > 0 {
        tracing::warn!(
            "{}: {unlabelled} example(s) have no label tokens left (cut at max_seq_len before \
             the assistant turn?); they add no loss",
            ds.path.display()
        );
    }
    if ds.truncated > 0 {
        tracing::info!(
            "{}: {} example(s) cut at max_seq_len",
            ds.path.display(),
            ds.truncated
        );
    }
}

fn utf8<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str> {
    std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        data_err(path, line, format!("not valid UTF-8: {e}"))
    })
}

fn data_err(path: &Path, line: usize, msg: String) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        line,
        msg,
    }
}

/// Renders a record and finds its label spans.
fn prepare(
    r: &Record,
    all_tokens: bool,
    tok: &Tokenizer,
    training: Option<&TrainingTemplate>,
) -> std::result::Result<Prepared, String> {
    match r {
        Record::Text(t) => Ok(Prepared {
            text: t.clone(),
            add_special: true,
            spans: None,
            eos_label: true,
            training_variant: false,
        }),
        Record::PromptCompletion { prompt, completion } => {
            let text = format!("{prompt}{completion}");
            let spans = (!all_tokens).then(|| vec![(prompt.len(), text.len())]);
            Ok(Prepared {
                text,
                add_special: true,
                spans,
                eos_label: true,
                training_variant: false,
            })
        }
        Record::Chat {
            messages: msgs,
            first_trainable,
        } => {
            let render = |m: &[super::Message], generation: bool| {
                tok.apply_chat_template(m, generation).map_err(|e| match e {
                    Error::Tokenizer { msg, .. } => msg,
                    other => other.to_string(),
                })
            };
            let full = render(msgs, false)?;
            let ends_with_assistant = msgs.last().is_some_and(|m| m.role == "assistant");
            if all_tokens {
                return Ok(Prepared {
                    text: full,
                    add_special: false,
                    spans: None,
                    eos_label: true,
                    training_variant: false,
                });
            }
            let mut spans = Vec::new();
            for (i, m) in msgs.iter().enumerate() {
                if m.role != "assistant" || i < *first_trainable {
                    continue;
                }
                // transformers refuses to render an empty conversation: a leading assistant
                // turn starts at byte 0.
                let before = if i == 0 {
                    String::new()
                } else {
                    render(&msgs[..i], true)?
                };
                let upto = render(&msgs[..=i], false)?;
                let stable = full.starts_with(&before) && upto.starts_with(&before);
                if let (false, Some(t)) = (stable && full.starts_with(&upto), training) {
                    let (text, spans) = t.render(msgs, *first_trainable, tok)?;
                    return Ok(Prepared {
                        text,
                        add_special: false,
                        spans: Some(spans),
                        eos_label: ends_with_assistant,
                        training_variant: true,
                    });
                }
                if !stable {
                    return Err(format!(
                        "chat template is not prefix-stable: the render of the first {i} \
                         message(s) with add_generation_prompt is not a prefix of the whole \
                         conversation, so assistant turn {i} cannot be located; use a template \
                         that renders turns incrementally or set `train_on_all_tokens: true`"
                    ));
                }
                if !full.starts_with(&upto) {
                    return Err(format!(
                        "chat template is not prefix-stable: the render of the first {} \
                         message(s) is not a prefix of the whole conversation; use a template \
                         that renders turns incrementally or set `train_on_all_tokens: true`",
                        i + 1
                    ));
                }
                spans.push((before.len(), upto.len()));
            }
            Ok(Prepared {
                text: full,
                add_special: false,
                spans: Some(spans),
                eos_label: ends_with_assistant,
                training_variant: false,
            })
        }
    }
}

/// Ids and labels from an encoding; appends EOS, truncates. Returns whether it was cut.
fn build_example(
    p: &Prepared,
    enc: &tokenizers::Encoding,
    eos_id: i64,
    cfg: &DatasetConfig,
) -> std::result::Result<(Example, bool), String> {
    let ids = enc.get_ids();
    let offsets = enc.get_offsets();
    let special = enc.get_special_tokens_mask();
    let mut input_ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let mut labels: Vec<i64> = match &p.spans {
        None => input_ids.clone(),
        Some(spans) => {
            let mut labels = vec![IGNORE_INDEX; ids.len()];
            for (j, &(s, e)) in offsets.iter().enumerate() {
                if p.add_special && special.get(j).copied().unwrap_or(0) == 1 {
                    continue;
                }
                for &(a, b) in spans {
                    for boundary in [a, b] {
                        if s < boundary && boundary < e {
                            return Err(format!(
                                "token {j} (bytes {s}..{e}) straddles the start or end of an \
                                 assistant turn at byte {boundary} of the rendered text; the \
                                 tokenizer merges across the template's turn boundary"
                            ));
                        }
                    }
                    if s >= a && s < b {
                        labels[j] = input_ids[j];
                    }
                }
            }
            labels
        }
    };
    if input_ids.last() != Some(&eos_id) {
        input_ids.push(eos_id);
        labels.push(if p.eos_label || cfg.train_on_all_tokens {
            eos_id
        } else {
            IGNORE_INDEX
        });
    }
    let cut = input_ids.len() > cfg.max_seq_len;
    input_ids.truncate(cfg.max_seq_len);
    labels.truncate(cfg.max_seq_len);
    Ok((Example { input_ids, labels }, cut))
}

fn cache_key(bytes: &[u8], format: DataFormat, cfg: &DatasetConfig, tok: &Tokenizer) -> String {
    let mut h = Sha256::new();
    h.update(CACHE_MAGIC);
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(Sha256::digest(bytes));
    h.update(tok.fingerprint().as_bytes());
    h.update(
        format!(
            "{format:?}|{}|{}|{}",
            cfg.max_seq_len, cfg.train_on_all_tokens, cfg.skip_invalid
        )
        .as_bytes(),
    );
    hex(&h.finalize())
}

fn write_cache(file: &Path, ds: &SftDataset) -> Result<()> {
    let mut buf = Vec::with_capacity(16 + ds.num_tokens() * 5);
    buf.extend_from_slice(CACHE_MAGIC);
    buf.extend_from_slice(&(ds.examples.len() as u64).to_le_bytes());
    buf.extend_from_slice(&(ds.truncated as u64).to_le_bytes());
    buf.extend_from_slice(&(ds.skipped.len() as u64).to_le_bytes());
    for s in &ds.skipped {
        buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
        buf.extend_from_slice(s.as_bytes());
    }
    for e in &ds.examples {
        buf.extend_from_slice(&(e.len() as u32).to_le_bytes());
        for &id in &e.input_ids {
            buf.extend_from_slice(&(id as u32).to_le_bytes());
        }
        for &l in &e.labels {
            buf.push((l != IGNORE_INDEX) as u8);
        }
    }
    crate::error::write_atomic(file, &buf)
}

/// Reads a cache file; any problem (missing, truncated, other version) is a miss.
fn read_cache(file: &Path, path: &Path) -> Option<SftDataset> {
    let mut f = std::fs::File::open(file).ok()?;
    let mut b = Vec::new();
    f.read_to_end(&mut b).ok()?;
    let mut r = Reader { b: &b, at: 0 };
    if r.take(8)? != CACHE_MAGIC {
        return None;
    }
    let n = r.u64()? as usize;
    let truncated = r.u64()? as usize;
    let n_skipped = r.u64()? as usize;
    let mut skipped = Vec::new();
    for _ in 0..n_skipped {
        let len = r.u64()? as usize;
        skipped.push(String::from_utf8(r.take(len)?.to_vec()).ok()?);
    }
    let mut examples = Vec::with_capacity(n.min(b.len()));
    for _ in 0..n {
        let len = r.u32()? as usize;
        let ids_b = r.take(len.checked_mul(4)?)?;
        let input_ids: Vec<i64> = ids_b
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect();
        let mask = r.take(len)?;
        let labels = input_ids
            .iter()
            .zip(mask)
            .map(|(&id, &m)| if m == 1 { id } else { IGNORE_INDEX })
            .collect();
        examples.push(Example { input_ids, labels });
    }
    if r.at != b.len() {
        return None;
    }
    Some(SftDataset {
        examples,
        path: path.to_path_buf(),
        skipped,
        truncated,
        from_cache: true,
    })
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
}

/// Used by tests and benches: parse + tokenize `records` without a file.
pub fn tokenize_records(
    path: &Path,
    records: Vec<Located<Record>>,
    cfg: &DatasetConfig,
    tok: &Tokenizer,
) -> Result<SftDataset> {
    SftDataset::from_records(
        path,
        ReadOutcome {
            records,
            errors: Vec::new(),
        },
        cfg,
        tok,
    )
}
