//! `MistralForCausalLM`: the Llama decoder with an optional sliding window on every layer
//! (transformers 5.23 `models/mistral`: `sliding_window`, default 4096, `null` disables it).

use std::path::Path;

use serde_json::Value;

use super::config::{DecoderConfig, Json, base_config};
use crate::error::Result;

/// The configuration rules of `MistralForCausalLM`: no biases, `sliding_window` on all layers.
pub fn config(path: &Path, v: &Value) -> Result<DecoderConfig> {
    let mut cfg = base_config(path, v, "MistralForCausalLM")?;
    cfg.qkv_bias = false;
    cfg.o_bias = false;
    cfg.mlp_bias = false;
    let window = Json { path, v }.opt_i64("sliding_window")?;
    cfg.sliding_windows = vec![window.filter(|&w| w > 0); cfg.num_layers];
    Ok(cfg)
}
