//! `Qwen3ForCausalLM`: the Qwen2 layout with an RMSNorm over each query and key head before
//! RoPE (`q_norm`, `k_norm`), `attention_bias` on q/k/v/o (default off), no MLP biases
//! (transformers 5.23 `models/qwen3`). Sliding windows follow `layer_types`, or
//! `use_sliding_window` from `max_window_layers` on, as in Qwen2.

use std::path::Path;

use serde_json::Value;

use super::config::{DecoderConfig, Defaults, family_config};
use crate::error::Result;

/// `Qwen3Config`'s defaults for the keys a `config.json` may leave out.
fn defaults() -> Defaults {
    Defaults {
        head_dim: Some(128),
        ..Defaults::llama()
    }
}

/// The configuration rules of `Qwen3ForCausalLM`.
pub fn config(path: &Path, v: &Value) -> Result<DecoderConfig> {
    let mut cfg = family_config(path, v, "Qwen3ForCausalLM", &defaults())?;
    cfg.mlp_bias = false;
    cfg.qk_norm = true;
    cfg.sliding_windows = super::qwen2::qwen_sliding_windows(path, v, cfg.num_layers)?;
    Ok(cfg)
}
