//! `Qwen2ForCausalLM`: the Llama decoder with biases on q/k/v (not on o), and a sliding window
//! only on layers marked `sliding_attention` (transformers 5.23 `models/qwen2`: `layer_types`, or
//! `use_sliding_window` with layers from `max_window_layers` on).

use std::path::Path;

use serde_json::Value;

use super::config::{DecoderConfig, Json, base_config, layer_types};
use crate::error::Result;

/// The configuration rules of `Qwen2ForCausalLM`.
pub fn config(path: &Path, v: &Value) -> Result<DecoderConfig> {
    let mut cfg = base_config(path, v, "Qwen2ForCausalLM")?;
    cfg.qkv_bias = true;
    cfg.o_bias = false;
    cfg.mlp_bias = false;
    cfg.sliding_windows = qwen_sliding_windows(path, v, cfg.num_layers)?;
    Ok(cfg)
}

/// Qwen2/Qwen3 sliding windows: `sliding_window` (when `use_sliding_window`) on the layers
/// `layer_types` marks `sliding_attention`, or without `layer_types` on the layers from
/// `max_window_layers` (default 28) on.
pub(crate) fn qwen_sliding_windows(
    path: &Path,
    v: &Value,
    num_layers: usize,
) -> Result<Vec<Option<i64>>> {
    let j = Json { path, v };
    let window = if j.opt_bool("use_sliding_window")?.unwrap_or(false) {
        j.opt_i64("sliding_window")?.filter(|&w| w > 0)
    } else {
        None
    };
    Ok(match layer_types(&j, num_layers)? {
        Some(types) => types
            .iter()
            .map(|&sliding| if sliding { window } else { None })
            .collect(),
        None => {
            let from = j.opt_i64("max_window_layers")?.unwrap_or(28) as usize;
            (0..num_layers)
                .map(|i| if i >= from { window } else { None })
                .collect()
        }
    })
}
