//! `volttrain generate`: the command-line arguments and their run.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use tch::{Device, Kind};

use super::{GenerateConfig, eos_ids, generate_text, prompt_ids};
use crate::adapter::load_peft_adapter;
use crate::error::{Error, Result};
use crate::export::tokenizer_for;
use crate::model::{LoadOptions, load_model};

/// `volttrain generate --model DIR [--adapter DIR] [--chat] --prompt TEXT ...`
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// A Hugging Face model directory (e.g. one written by `volttrain merge`).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter directory applied on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Render the prompt as one user turn with the chat template and the generation prompt.
    #[arg(long)]
    pub chat: bool,
    /// The prompt text (with `--chat`, the user turn).
    #[arg(long)]
    pub prompt: String,
    /// Most tokens to generate (default 128).
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches this (1.0 keeps
    /// all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Seed of the sampler (unused by greedy decoding).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the text contains this string (repeatable); it is not printed.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// `cpu`, `cuda` or `cuda:N` (default: cpu).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

fn device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| {
                Error::config("device", format!("`{other}` is not cpu, cuda or cuda:N"))
            }),
    }
}

/// Loads the model (and adapter), streams the generation to stdout and a summary line to
/// stderr.
pub fn run(args: &GenerateArgs) -> Result<()> {
    let device = device(&args.device)?;
    if device != Device::Cpu && !tch::Cuda::is_available() {
        return Err(Error::config("device", "CUDA is not available"));
    }
    let tok = tokenizer_for(&args.model, args.adapter.as_deref())?;
    let mut model = load_model(&args.model, &LoadOptions::new(Kind::Float, device))?;
    if let Some(a) = &args.adapter {
        load_peft_adapter(model.as_mut(), a)?;
    }
    let cfg = GenerateConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        stop_strings: args.stop.clone(),
        eos_token_ids: eos_ids(&args.model, Some(&tok))?,
    };
    let prompt = prompt_ids(&tok, &args.prompt, args.chat)?;
    let mut out = std::io::stdout().lock();
    let g = generate_text(model.as_ref(), &tok, &prompt, &cfg, &mut |s| {
        out.write_all(s.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| Error::io("<stdout>", e))
    })?;
    writeln!(out).map_err(|e| Error::io("<stdout>", e))?;
    eprintln!(
        "{}",
        serde_json::json!({
            "prompt_tokens": prompt.len(),
            "new_tokens": g.tokens.len(),
            "finish": g.finish,
            "prefill_secs": g.prefill_secs,
            "decode_tokens_per_sec": g.decode_tokens_per_sec(),
        })
    );
    Ok(())
}
