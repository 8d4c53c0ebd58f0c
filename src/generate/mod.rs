//! Text generation with a KV cache: greedy decoding (transformers' `generate(do_sample=False)`)
//! or sampling with temperature, top-k and top-p (transformers' `TemperatureLogitsWarper`,
//! `TopKLogitsWarper`, `TopPLogitsWarper`, applied in that order), stopping at an end-of-sequence
//! id, at a stop string or after `max_new_tokens`.
//!
//! The prompt is run once (prefill) to fill the cache; every further token costs one position
//! ([`CausalLm::forward_cached`]). [`Generate::generate`] works on token ids,
//! [`generate_text`] adds the tokenizer: prompt rendering, streamed text and stop strings.

use std::path::Path;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;
use tch::{Kind, Tensor};

use crate::data::Tokenizer;
use crate::data::template::Message;
use crate::error::{Error, Result, TchResultExt};
use crate::model::{CausalLm, KvCache};

pub mod cli;

/// How to generate.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateConfig {
    /// New tokens at most (default 128).
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy (argmax, transformers' `do_sample=False`).
    /// Default 0.
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`
    /// (1 = off, the default).
    pub top_p: f64,
    /// Keep the `top_k` most likely tokens (0 = off, the default).
    pub top_k: usize,
    /// Seed of the sampler (default 0); greedy decoding does not use it.
    pub seed: u64,
    /// Generation stops after a token whose text completes one of these; the text is cut
    /// before it (transformers' `stop_strings`).
    pub stop_strings: Vec<String>,
    /// End-of-sequence ids; empty means those of the model directory (see [`eos_ids`]).
    pub eos_token_ids: Vec<u32>,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        GenerateConfig {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop_strings: Vec::new(),
            eos_token_ids: Vec::new(),
        }
    }
}

impl GenerateConfig {
    /// Checks the ranges, naming the field.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::config(
                "temperature",
                format!("must be >= 0, got {}", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::config(
                "top_p",
                format!("must be in (0, 1], got {}", self.top_p),
            ));
        }
        if self.stop_strings.iter().any(String::is_empty) {
            return Err(Error::config("stop_strings", "an entry is empty"));
        }
        Ok(())
    }

    fn greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token was generated (it is part of the tokens, not of the text).
    Eos,
    /// A stop string appeared.
    Stop,
    /// `max_new_tokens` were generated.
    Length,
    /// The caller's token callback asked to stop.
    Callback,
}

/// The result of one generation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    /// The new token ids (an end-of-sequence id last when that ended it).
    pub tokens: Vec<u32>,
    /// Their text (special tokens skipped, cut before a stop string); empty from
    /// [`Generate::generate`], which has no tokenizer.
    pub text: String,
    /// Why generation stopped.
    pub finish: FinishReason,
    /// Seconds spent on the prompt (prefill, first token included).
    pub prefill_secs: f64,
    /// Seconds spent on the tokens after the first.
    pub decode_secs: f64,
}

impl Generation {
    /// Tokens per second after the first token (0 when there was a single token).
    pub fn decode_tokens_per_sec(&self) -> f64 {
        let n = self.tokens.len().saturating_sub(1);
        if n == 0 || self.decode_secs <= 0.0 {
            0.0
        } else {
            n as f64 / self.decode_secs
        }
    }
}

/// Picks the next token from `[vocab]` logits.
struct Sampler {
    rng: StdRng,
}

impl Sampler {
    fn new(seed: u64) -> Self {
        Sampler {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    fn next(&mut self, logits: &Tensor, cfg: &GenerateConfig) -> Result<u32> {
        let logits = logits.f_to_kind(Kind::Float).ctx("logits to fp32")?;
        if cfg.greedy() {
            let id = logits
                .f_argmax(-1, false)
                .ctx("argmax")?
                .f_int64_value(&[])
                .ctx("argmax")?;
            return u32::try_from(id).map_err(|_| Error::Internal(format!("token id {id}")));
        }
        let mut scores: Vec<f32> = Vec::<f32>::try_from(
            logits
                .f_div_scalar(cfg.temperature)
                .ctx("temperature")?
                .f_to_device(tch::Device::Cpu)
                .ctx("logits to cpu")?
                .f_flatten(0, -1)
                .ctx("flatten logits")?,
        )
        .ctx("logits to a vector")?;
        // top-k: keep the scores >= the k-th largest (ties kept, as transformers' warper)
        if cfg.top_k > 0 && cfg.top_k < scores.len() {
            let mut sorted = scores.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let kth = sorted[cfg.top_k - 1];
            for s in &mut scores {
                if *s < kth {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<f64> = scores.iter().map(|&s| f64::from(s - max).exp()).collect();
        let sum: f64 = probs.iter().sum();
        for p in &mut probs {
            *p /= sum;
        }
        // top-p: drop the least likely tokens whose cumulative probability (ascending) stays
        // within 1 - top_p; the most likely token is always kept
        if cfg.top_p < 1.0 {
            let mut order: Vec<usize> = (0..probs.len()).collect();
            order.sort_by(|&a, &b| probs[a].total_cmp(&probs[b]));
            let mut cum = 0.0;
            let last = order.len() - 1;
            for (rank, &i) in order.iter().enumerate() {
                cum += probs[i];
                if cum <= 1.0 - cfg.top_p && rank < last {
                    probs[i] = 0.0;
                } else {
                    break;
                }
            }
            let sum: f64 = probs.iter().sum();
            for p in &mut probs {
                *p /= sum;
            }
        }
        let u: f64 = self.rng.random();
        let mut cum = 0.0;
        let mut pick = None;
        for (i, p) in probs.iter().enumerate() {
            if *p > 0.0 {
                pick = Some(i);
                cum += p;
                if u < cum {
                    break;
                }
            }
        }
        let i = pick.ok_or_else(|| Error::invalid("sampling: every probability is zero"))?;
        Ok(i as u32)
    }
}

/// Generation on a loaded model: `model.generate(&prompt_ids, &cfg, |id| ...)`.
pub trait Generate {
    /// Generates after `prompt` (token ids, non-empty). `on_token` sees each new id as it is
    /// chosen and returns whether to go on. Stop strings need a tokenizer: see
    /// [`generate_text`].
    fn generate(
        &self,
        prompt: &[u32],
        cfg: &GenerateConfig,
        on_token: &mut dyn FnMut(u32) -> Result<bool>,
    ) -> Result<Generation>;
}

impl<M: CausalLm + ?Sized> Generate for M {
    fn generate(
        &self,
        prompt: &[u32],
        cfg: &GenerateConfig,
        on_token: &mut dyn FnMut(u32) -> Result<bool>,
    ) -> Result<Generation> {
        cfg.validate()?;
        if prompt.is_empty() {
            return Err(Error::invalid("generate: the prompt has no tokens"));
        }
        let vocab = self.vocab_size();
        if let Some(bad) = prompt.iter().find(|&&id| i64::from(id) >= vocab) {
            return Err(Error::invalid(format!(
                "generate: prompt token id {bad} is outside the model's vocabulary ({vocab})"
            )));
        }
        let _g = tch::no_grad_guard();
        let mut cache = KvCache::new(self.num_layers());
        let mut sampler = Sampler::new(cfg.seed);
        let ids: Vec<i64> = prompt.iter().map(|&x| i64::from(x)).collect();
        let mut input = Tensor::from_slice(&ids)
            .f_view([1, ids.len() as i64])
            .ctx("prompt ids")?;
        let start = Instant::now();
        let mut first_at = None;
        let mut tokens = Vec::new();
        let mut finish = FinishReason::Length;
        while tokens.len() < cfg.max_new_tokens {
            let logits = self.forward_cached(&input, &mut cache)?;
            let id = sampler.next(&logits.f_get(0).ctx("logits row")?, cfg)?;
            if first_at.is_none() {
                first_at = Some(start.elapsed().as_secs_f64());
            }
            tokens.push(id);
            if cfg.eos_token_ids.contains(&id) {
                finish = FinishReason::Eos;
                break;
            }
            if !on_token(id)? {
                finish = FinishReason::Callback;
                break;
            }
            input = Tensor::from_slice(&[i64::from(id)])
                .f_view([1, 1])
                .ctx("next id")?;
        }
        let total = start.elapsed().as_secs_f64();
        let prefill = first_at.unwrap_or(total);
        Ok(Generation {
            tokens,
            text: String::new(),
            finish,
            prefill_secs: prefill,
            decode_secs: total - prefill,
        })
    }
}

/// The end-of-sequence ids transformers' `generate` uses for the model in `dir`:
/// `eos_token_id` of `generation_config.json` (a number or a list), else of `config.json`,
/// else the tokenizer's eos token.
pub fn eos_ids(dir: &Path, tok: Option<&Tokenizer>) -> Result<Vec<u32>> {
    for name in ["generation_config.json", "config.json"] {
        let path = dir.join(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(&path, e)),
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.clone(),
            source: e,
        })?;
        let bad = || Error::Config {
            file: Some(path.clone()),
            key: "eos_token_id".into(),
            msg: "must be a token id or a list of them".into(),
        };
        let id = |x: &Value| x.as_u64().and_then(|n| u32::try_from(n).ok());
        match v.get("eos_token_id") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(a)) => {
                return a.iter().map(|x| id(x).ok_or_else(bad)).collect();
            }
            Some(x) => return Ok(vec![id(x).ok_or_else(bad)?]),
        }
    }
    Ok(tok
        .and_then(Tokenizer::eos)
        .map(|t| vec![t.id])
        .unwrap_or_default())
}

/// The prompt's ids: the text tokenized as `tokenizer(text)` does (with the post-processor's
/// special tokens), or with `chat`, rendered as one user turn with the chat template and the
/// generation prompt (`apply_chat_template(..., add_generation_prompt=True)`).
pub fn prompt_ids(tok: &Tokenizer, prompt: &str, chat: bool) -> Result<Vec<u32>> {
    if chat {
        tok.chat_ids(&[Message::new("user", prompt)], true)
    } else {
        tok.encode(prompt, true)
    }
}

/// Where in `text` a stop string first ends a match, and the start of that match.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// The length of the longest end of `text` that begins some stop string (text that may still
/// become a stop string and must not be streamed yet).
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if text.ends_with(&s[..i]) {
                hold = hold.max(i);
            }
        }
    }
    hold
}

/// [`Generate::generate`] with text: streams the new text to `on_text` as it becomes final
/// (never a partial UTF-8 character, never the start of a stop string) and stops at the
/// config's stop strings. Special tokens are left out of the text.
pub fn generate_text(
    model: &dyn CausalLm,
    tok: &Tokenizer,
    prompt: &[u32],
    cfg: &GenerateConfig,
    on_text: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<Generation> {
    let mut ids: Vec<u32> = Vec::new();
    let mut text = String::new();
    let mut emitted = 0usize;
    let mut stopped = false;
    let mut step = |id: u32| -> Result<bool> {
        ids.push(id);
        text = tok.decode(&ids, true)?;
        if let Some(at) = find_stop(&text, &cfg.stop_strings) {
            text.truncate(at);
            if at > emitted {
                on_text(&text[emitted..])?;
            }
            emitted = text.len();
            stopped = true;
            return Ok(false);
        }
        // an incomplete character decodes to U+FFFD until its last byte arrives
        let stable = text.trim_end_matches('\u{FFFD}').len();
        let safe = stable - held_back(&text[..stable], &cfg.stop_strings);
        if safe > emitted && text.is_char_boundary(safe) {
            on_text(&text[emitted..safe])?;
            emitted = safe;
        }
        Ok(true)
    };
    let mut out = model.generate(prompt, cfg, &mut step)?;
    if stopped {
        out.finish = FinishReason::Stop;
    }
    if !stopped {
        // the end: flush what was held back (an EOS is not part of the text)
        let body: Vec<u32> = out
            .tokens
            .iter()
            .copied()
            .filter(|id| !(out.finish == FinishReason::Eos && cfg.eos_token_ids.contains(id)))
            .collect();
        text = tok.decode(&body, true)?;
        if text.len() > emitted && text.is_char_boundary(emitted) {
            on_text(&text[emitted..])?;
        }
    }
    out.text = text;
    Ok(out)
}
