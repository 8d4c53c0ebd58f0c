//! `sample_generations`: after every `every`-th evaluation, generates a completion for each
//! configured prompt with the model being trained (greedy by default, KV cache) and logs them to
//! `metrics.jsonl` (a `"kind": "samples"` line) and to TensorBoard as text, as TRL's completion
//! logging (`LogCompletionsCallback`) does for its trackers.

use std::fs::OpenOptions;
use std::path::PathBuf;

use serde::Deserialize;

use crate::callback::{Callback, Control, EvalMetrics, TensorBoardWriter};
use crate::data::Tokenizer;
use crate::error::{Error, Result};
use crate::generate::{GenerateConfig, eos_ids, generate_text, prompt_ids};

/// The `sample_generations` callback's YAML options.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleGenerationsConfig {
    /// The prompts (required, at least one).
    #[serde(default)]
    pub prompts: Vec<String>,
    /// New tokens per completion (default 64).
    #[serde(default = "default_max_new")]
    pub max_new_tokens: usize,
    /// Generate after every this many evaluations (default 1: every evaluation).
    #[serde(default = "one")]
    pub every: usize,
    /// Render each prompt as one user turn with the chat template (default true).
    #[serde(default = "yes")]
    pub chat: bool,
    /// Sampling temperature (default 0: greedy).
    #[serde(default)]
    pub temperature: f64,
    /// The tokenizer directory (default: the run's `model.path`).
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Where the samples go: `metrics.jsonl` and the TensorBoard directory (defaults: in the
    /// run's output directory).
    #[serde(default)]
    pub metrics_path: Option<PathBuf>,
    /// TensorBoard directory for the samples (default: `<output_dir>/tensorboard`).
    #[serde(default)]
    pub tensorboard_dir: Option<PathBuf>,
}

impl Default for SampleGenerationsConfig {
    /// No prompts (an error when built: give at least one), 64 new tokens, every evaluation,
    /// chat rendering, greedy.
    fn default() -> Self {
        SampleGenerationsConfig {
            prompts: Vec::new(),
            max_new_tokens: default_max_new(),
            every: one(),
            chat: yes(),
            temperature: 0.0,
            tokenizer: None,
            metrics_path: None,
            tensorboard_dir: None,
        }
    }
}

fn default_max_new() -> usize {
    64
}
fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}

/// See the module docs.
pub struct SampleGenerations {
    cfg: SampleGenerationsConfig,
    tok: Tokenizer,
    eos: Vec<u32>,
    metrics: PathBuf,
    tb_dir: PathBuf,
    tb: Option<TensorBoardWriter>,
    evals: usize,
}

impl SampleGenerations {
    /// Loads the tokenizer; `output_dir` is the run's.
    pub fn new(cfg: SampleGenerationsConfig, output_dir: &std::path::Path) -> Result<Self> {
        if cfg.prompts.is_empty() {
            return Err(Error::config(
                "callbacks.sample_generations.prompts",
                "give at least one prompt",
            ));
        }
        if cfg.every == 0 {
            return Err(Error::config(
                "callbacks.sample_generations.every",
                "must be >= 1",
            ));
        }
        let dir = cfg.tokenizer.clone().ok_or_else(|| {
            Error::config(
                "callbacks.sample_generations.tokenizer",
                "missing: the tokenizer directory (the job sets it to model.path)",
            )
        })?;
        let tok = Tokenizer::from_dir(&dir)?;
        let eos = eos_ids(&dir, Some(&tok))?;
        Ok(SampleGenerations {
            metrics: cfg
                .metrics_path
                .clone()
                .unwrap_or_else(|| output_dir.join("metrics.jsonl")),
            tb_dir: cfg
                .tensorboard_dir
                .clone()
                .unwrap_or_else(|| output_dir.join("tensorboard")),
            cfg,
            tok,
            eos,
            tb: None,
            evals: 0,
        })
    }
}

impl Callback for SampleGenerations {
    fn name(&self) -> &str {
        "sample_generations"
    }

    fn on_eval_end(&mut self, ctl: &mut Control<'_>, _m: &EvalMetrics) -> Result<()> {
        self.evals += 1;
        if !ctl.is_main || !self.evals.is_multiple_of(self.cfg.every) {
            return Ok(());
        }
        let gcfg = GenerateConfig {
            max_new_tokens: self.cfg.max_new_tokens,
            temperature: self.cfg.temperature,
            seed: ctl.step,
            eos_token_ids: self.eos.clone(),
            ..Default::default()
        };
        let mut samples = Vec::new();
        for p in &self.cfg.prompts {
            let ids = prompt_ids(&self.tok, p, self.cfg.chat)?;
            let g = generate_text(ctl.model, &self.tok, &ids, &gcfg, &mut |_| Ok(()))?;
            samples.push(serde_json::json!({"prompt": p, "completion": g.text}));
        }
        let line = serde_json::json!({
            "kind": "samples",
            "step": ctl.step,
            "epoch": ctl.epoch,
            "samples": samples,
        });
        if let Some(dir) = self.metrics.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.metrics)
            .map_err(|e| Error::io(&self.metrics, e))?;
        crate::callback::metrics::append_whole(&mut f, format!("{line}\n").as_bytes())
            .map_err(|e| Error::io(&self.metrics, e))?;
        if self.tb.is_none() {
            self.tb = Some(TensorBoardWriter::create(&self.tb_dir)?);
        }
        if let Some(tb) = self.tb.as_mut() {
            for (i, s) in samples.iter().enumerate() {
                let md = format!(
                    "**prompt:** {}\n\n**completion:** {}",
                    s["prompt"].as_str().unwrap_or_default(),
                    s["completion"].as_str().unwrap_or_default()
                );
                tb.text(ctl.step as i64, &format!("samples/{i}"), &md)?;
            }
        }
        Ok(())
    }
}
