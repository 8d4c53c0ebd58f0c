//! A Hugging Face tokenizer directory: `tokenizer.json` (through the `tokenizers` crate), special
//! tokens from `tokenizer_config.json` (or `special_tokens_map.json`), and the chat template.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::template::{ChatTemplate, Message};
use crate::error::{Error, Result};

/// A special token: its text and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    /// The token's text (`<|endoftext|>`).
    pub content: String,
    /// The token's id in the vocabulary.
    pub id: u32,
}

/// Tokenizer plus special tokens and chat template, as transformers' `AutoTokenizer` sees a
/// directory.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    dir: PathBuf,
    /// Raw `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` (if present).
    tokenizer_json: Vec<u8>,
    config_json: Option<Vec<u8>>,
    special_map_json: Option<Vec<u8>>,
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
    pad: Option<SpecialToken>,
    unk: Option<SpecialToken>,
    /// Whether `pad` fell back to `eos`.
    pad_is_eos_fallback: bool,
    template: Option<ChatTemplate>,
    /// Whether the template came from a `chat_template.jinja` file or a custom config; such a
    /// template is written as `chat_template.jinja` by [`Tokenizer::save_to`].
    template_in_file: bool,
    /// Extra template variables (`apply_chat_template(**kwargs)`, e.g. `enable_thinking`).
    template_kwargs: Vec<(String, serde_json::Value)>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("dir", &self.dir)
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("template", &self.template)
            .finish()
    }
}

fn read_opt(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn parse_json(path: &Path, bytes: &[u8]) -> Result<serde_json::Value> {
    serde_json::from_slice(bytes).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// A special token entry: a string, an `AddedToken` dict (`{"content": ...}`) or null.
fn token_text(path: &Path, key: &str, v: &serde_json::Value) -> Result<Option<String>> {
    match v {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => Ok(Some(s.clone())),
        serde_json::Value::Object(m) => match m.get("content") {
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(Error::Tokenizer {
                path: path.to_path_buf(),
                msg: format!("`{key}` is a dict without a string `content`"),
            }),
        },
        other => Err(Error::Tokenizer {
            path: path.to_path_buf(),
            msg: format!("`{key}` must be a string or an AddedToken dict, found {other}"),
        }),
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`, the special tokens of `dir/tokenizer_config.json` (falling back
    /// to `special_tokens_map.json`) and the chat template (`dir/chat_template.jinja`, which
    /// transformers prefers, else the config's `chat_template`). A missing pad token falls back
    /// to eos with a warning.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let tok_path = dir.join("tokenizer.json");
        let tokenizer_json = std::fs::read(&tok_path).map_err(|e| Error::io(&tok_path, e))?;
        let mut inner =
            tokenizers::Tokenizer::from_bytes(&tokenizer_json).map_err(|e| Error::Tokenizer {
                path: tok_path.clone(),
                msg: format!("cannot parse tokenizer.json: {e}"),
            })?;
        // transformers encodes without the padding/truncation stored in tokenizer.json.
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| Error::Tokenizer {
            path: tok_path.clone(),
            msg: format!("cannot disable truncation: {e}"),
        })?;

        let cfg_path = dir.join("tokenizer_config.json");
        let config_json = read_opt(&cfg_path)?;
        let cfg = match &config_json {
            Some(b) => parse_json(&cfg_path, b)?,
            None => serde_json::Value::Null,
        };
        let map_path = dir.join("special_tokens_map.json");
        let special_map_json = read_opt(&map_path)?;
        let map = match &special_map_json {
            Some(b) => parse_json(&map_path, b)?,
            None => serde_json::Value::Null,
        };

        let mut t = Tokenizer {
            inner,
            dir: dir.clone(),
            tokenizer_json,
            config_json,
            special_map_json,
            bos: None,
            eos: None,
            pad: None,
            unk: None,
            pad_is_eos_fallback: false,
            template: None,
            template_in_file: false,
            template_kwargs: Vec::new(),
        };
        let special = |key: &str| -> Result<Option<SpecialToken>> {
            let (path, v) = match cfg.get(key) {
                Some(v) => (&cfg_path, v),
                None => match map.get(key) {
                    Some(v) => (&map_path, v),
                    None => return Ok(None),
                },
            };
            let Some(content) = token_text(path, key, v)? else {
                return Ok(None);
            };
            let id = t
                .inner
                .token_to_id(&content)
                .ok_or_else(|| Error::Tokenizer {
                    path: path.clone(),
                    msg: format!(
                        "`{key}` is {content:?}, which is not in tokenizer.json's vocabulary"
                    ),
                })?;
            Ok(Some(SpecialToken { content, id }))
        };
        let bos = special("bos_token")?;
        let eos = special("eos_token")?;
        let pad = special("pad_token")?;
        let unk = special("unk_token")?;
        t.bos = bos;
        t.eos = eos;
        t.unk = unk;
        t.pad = match pad {
            Some(p) => Some(p),
            None => {
                if let Some(e) = &t.eos {
                    tracing::warn!(
                        "{}: no pad_token; padding with eos_token {:?}",
                        cfg_path.display(),
                        e.content
                    );
                    t.pad_is_eos_fallback = true;
                }
                t.eos.clone()
            }
        };

        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.exists() {
            t.template = Some(ChatTemplate::from_file(&jinja_path)?);
            t.template_in_file = true;
        } else if let Some(v) = cfg.get("chat_template") {
            t.template = template_from_config(&cfg_path, v)?;
        }
        Ok(t)
    }

    /// Replaces the chat template by a custom one (for models without one). `source` is the
    /// template text; `origin` names where it came from in error messages.
    pub fn set_chat_template(&mut self, source: &str, origin: impl Into<PathBuf>) -> Result<()> {
        self.template = Some(ChatTemplate::new(source, origin)?);
        self.template_in_file = true;
        Ok(())
    }

    /// The directory this tokenizer was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The beginning-of-sequence token, when the tokenizer config names one.
    pub fn bos(&self) -> Option<&SpecialToken> {
        self.bos.as_ref()
    }

    /// The end-of-sequence token, when the tokenizer config names one.
    pub fn eos(&self) -> Option<&SpecialToken> {
        self.eos.as_ref()
    }

    /// The pad token (eos when the config has none; see [`Tokenizer::pad_is_eos_fallback`]).
    pub fn pad(&self) -> Option<&SpecialToken> {
        self.pad.as_ref()
    }

    /// The unknown-token token, when the tokenizer config names one.
    pub fn unk(&self) -> Option<&SpecialToken> {
        self.unk.as_ref()
    }

    /// Whether the config had no pad token and eos is used instead.
    pub fn pad_is_eos_fallback(&self) -> bool {
        self.pad_is_eos_fallback
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The chat template, if any.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// The special tokens given to the template, as transformers' `special_tokens_map`. When the
    /// pad token fell back to eos, `pad_token` is still not given (transformers leaves it unset).
    pub fn template_vars(&self) -> Vec<(&'static str, &str)> {
        let mut v = Vec::new();
        if let Some(t) = &self.bos {
            v.push(("bos_token", t.content.as_str()));
        }
        if let Some(t) = &self.eos {
            v.push(("eos_token", t.content.as_str()));
        }
        if let Some(t) = &self.unk {
            v.push(("unk_token", t.content.as_str()));
        }
        if let (Some(t), false) = (&self.pad, self.pad_is_eos_fallback) {
            v.push(("pad_token", t.content.as_str()));
        }
        v
    }

    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let t = self.template.as_ref().ok_or_else(|| Error::Tokenizer {
            path: self.dir.clone(),
            msg: "no chat template: tokenizer_config.json has no `chat_template` and there is no \
                  chat_template.jinja; set `chat_template` in the dataset config"
                .into(),
        })?;
        if messages.is_empty() {
            return Err(self.err(
                "cannot apply the chat template to an empty conversation (as transformers)".into(),
            ));
        }
        t.render_with(
            messages,
            add_generation_prompt,
            &self.template_vars(),
            &self.template_kwargs,
        )
    }

    /// Extra variables every chat template render gets, as transformers'
    /// `apply_chat_template(messages, **kwargs)` passes them (Qwen3's `enable_thinking`).
    /// Replaces the earlier set.
    pub fn set_chat_template_kwargs(&mut self, kwargs: Vec<(String, serde_json::Value)>) {
        self.template_kwargs = kwargs;
    }

    /// The extra template variables (see [`Tokenizer::set_chat_template_kwargs`]).
    pub fn chat_template_kwargs(&self) -> &[(String, serde_json::Value)] {
        &self.template_kwargs
    }

    /// Token ids of `text`, with or without the post-processor's special tokens.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.err(format!("encode: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// `apply_chat_template(messages, tokenize=True)`: the rendered text tokenized with
    /// `add_special_tokens=False`, as transformers does.
    pub fn chat_ids(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>> {
        self.encode(
            &self.apply_chat_template(messages, add_generation_prompt)?,
            false,
        )
    }

    /// Decodes ids back to text.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.err(format!("decode: {e}")))
    }

    pub(crate) fn err(&self, msg: String) -> Error {
        Error::Tokenizer {
            path: self.dir.clone(),
            msg,
        }
    }

    /// A digest of everything that changes tokenization: tokenizer.json, the special tokens and
    /// the chat template (for dataset caches).
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"tokenizer.json\0");
        h.update(&self.tokenizer_json);
        for (k, v) in self.template_vars() {
            h.update(k.as_bytes());
            h.update(b"=");
            h.update(v.as_bytes());
            h.update(b"\0");
        }
        if let Some(p) = &self.pad {
            h.update(format!("pad_id={}\0", p.id).as_bytes());
        }
        h.update(b"template\0");
        if let Some(t) = &self.template {
            h.update(t.source().as_bytes());
        }
        if !self.template_kwargs.is_empty() {
            h.update(b"\0template_kwargs\0");
            for (k, v) in &self.template_kwargs {
                h.update(format!("{k}={v}\0").as_bytes());
            }
        }
        hex(&h.finalize())
    }

    /// Writes the tokenizer files into `dir` (for checkpoints and adapters): `tokenizer.json`,
    /// `tokenizer_config.json`, `special_tokens_map.json` as loaded, and the chat template as
    /// `chat_template.jinja` when it came from a file or a custom config (transformers prefers
    /// that file over the config's `chat_template`).
    pub fn save_to(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        crate::error::write_atomic(&dir.join("tokenizer.json"), &self.tokenizer_json)?;
        if let Some(b) = &self.config_json {
            crate::error::write_atomic(&dir.join("tokenizer_config.json"), b)?;
        }
        if let Some(b) = &self.special_map_json {
            crate::error::write_atomic(&dir.join("special_tokens_map.json"), b)?;
        }
        if let (Some(t), true) = (&self.template, self.template_in_file) {
            crate::error::write_atomic(&dir.join("chat_template.jinja"), t.source().as_bytes())?;
        }
        Ok(())
    }
}

/// `chat_template` in tokenizer_config.json: a string, or a list of `{name, template}` of which
/// transformers uses `default`.
fn template_from_config(path: &Path, v: &serde_json::Value) -> Result<Option<ChatTemplate>> {
    match v {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => Ok(Some(ChatTemplate::new(s.clone(), path)?)),
        serde_json::Value::Array(items) => {
            for it in items {
                if it.get("name").and_then(|n| n.as_str()) == Some("default")
                    && let Some(s) = it.get("template").and_then(|t| t.as_str())
                {
                    return Ok(Some(ChatTemplate::new(s, path)?));
                }
            }
            Err(Error::Tokenizer {
                path: path.to_path_buf(),
                msg: "`chat_template` is a list without a `default` entry".into(),
            })
        }
        other => Err(Error::Tokenizer {
            path: path.to_path_buf(),
            msg: format!("`chat_template` must be a string, found {other}"),
        }),
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}
