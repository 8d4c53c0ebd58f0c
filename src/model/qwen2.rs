//! `Qwen2ForCausalLM`: the Llama decoder with biases on q/k/v (not on o), and a sliding window
//! only on layers marked `sliding_attention` (transformers 5.23 `models/qwen2`: `layer_types`, or
//! `use_sliding_window` with layers from `max_window_layers` on).

use std::path::Path;

use serde_json::Value;

use super::config::{DecoderConfig, Json, base_config};
use crate::error::{Error, Result};

/// The configuration rules of `Qwen2ForCausalLM`.
pub fn config(path: &Path, v: &Value) -> Result<DecoderConfig> {
    let mut cfg = base_config(path, v, "Qwen2ForCausalLM")?;
    cfg.qkv_bias = true;
    cfg.o_bias = false;
    cfg.mlp_bias = false;
    let j = Json { path, v };
    let window = if j.opt_bool("use_sliding_window")?.unwrap_or(false) {
        j.opt_i64("sliding_window")?.filter(|&w| w > 0)
    } else {
        None
    };
    let layer_types: Option<Vec<String>> = match v.get("layer_types").filter(|x| !x.is_null()) {
        None => None,
        Some(x) => Some(
            serde_json::from_value(x.clone()).map_err(|e| Error::Config {
                file: Some(path.to_path_buf()),
                key: "layer_types".into(),
                msg: format!("expected a list of strings: {e}"),
            })?,
        ),
    };
    cfg.sliding_windows = match layer_types {
        Some(types) => {
            if types.len() != cfg.num_layers {
                return Err(Error::Config {
                    file: Some(path.to_path_buf()),
                    key: "layer_types".into(),
                    msg: format!("has {} entries for {} layers", types.len(), cfg.num_layers),
                });
            }
            types
                .iter()
                .map(|t| {
                    if t == "sliding_attention" {
                        window
                    } else {
                        None
                    }
                })
                .collect()
        }
        None => {
            let from = j.opt_i64("max_window_layers")?.unwrap_or(28) as usize;
            (0..cfg.num_layers)
                .map(|i| if i >= from { window } else { None })
                .collect()
        }
    };
    Ok(cfg)
}
