//! `volttrain export`: the command-line arguments and their run.

use std::path::PathBuf;

use clap::Args;

use super::gguf::{GgufType, export_gguf};
use crate::error::{Error, Result};

/// `volttrain export --model DIR [--adapter DIR] --format gguf --type q8_0 --out FILE`
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// A Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter directory merged into the model first.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Output format (`gguf`).
    #[arg(long, default_value = "gguf")]
    pub format: String,
    /// Tensor type: f32, f16, bf16 or q8_0 (norms and other 1-D tensors stay f32).
    #[arg(long = "type", default_value = "f16")]
    pub ty: String,
    /// The output file.
    #[arg(long)]
    pub out: PathBuf,
}

/// Writes the file and prints a JSON summary.
pub fn run(args: &ExportArgs) -> Result<()> {
    if args.format != "gguf" {
        return Err(Error::config(
            "format",
            format!("`{}` is not supported; use gguf", args.format),
        ));
    }
    let ty: GgufType = args.ty.parse()?;
    let r = export_gguf(&args.model, args.adapter.as_deref(), ty, &args.out)?;
    if !r.f16_fallback.is_empty() {
        eprintln!(
            "note: {} tensors have rows that are not a multiple of 32 values and were written as f16: {}",
            r.f16_fallback.len(),
            r.f16_fallback.join(", ")
        );
    }
    println!(
        "{}",
        serde_json::to_string(&r)
            .map_err(|e| Error::Internal(format!("serialize the summary: {e}")))?
    );
    Ok(())
}
