//! `SmolLM3ForCausalLM`: the Llama decoder where the layers `no_rope_layers` marks 0 apply no
//! rotary embedding (default: every fourth layer, `no_rope_layer_interval`), tied embeddings
//! by default, and an optional sliding window on layers `layer_types` marks (transformers 5.23
//! `models/smollm3`).

use std::path::Path;

use serde_json::Value;

use super::config::{DecoderConfig, Defaults, Json, LayerRope, family_config, layer_types};
use crate::error::Result;

fn defaults() -> Defaults {
    Defaults {
        tie_word_embeddings: true,
        rope_theta: 2_000_000.0,
        pad_token_id: Some(128004),
        ..Defaults::llama()
    }
}

/// The configuration rules of `SmolLM3ForCausalLM`.
pub fn config(path: &Path, v: &Value) -> Result<DecoderConfig> {
    let mut cfg = family_config(path, v, "SmolLM3ForCausalLM", &defaults())?;
    let j = Json { path, v };
    let n = cfg.num_layers;
    let use_rope: Vec<bool> = match j.opt_ints("no_rope_layers")? {
        Some(flags) => {
            if flags.len() != n {
                return Err(j.err_key(
                    "no_rope_layers",
                    format!("has {} entries for {n} layers", flags.len()),
                ));
            }
            flags.iter().map(|&f| f != 0).collect()
        }
        None => {
            let every = j.opt_i64("no_rope_layer_interval")?.unwrap_or(4).max(1) as usize;
            (0..n).map(|i| (i + 1) % every != 0).collect()
        }
    };
    cfg.layer_rope = use_rope
        .iter()
        .map(|&r| {
            if r {
                LayerRope::Global
            } else {
                LayerRope::None
            }
        })
        .collect();
    let use_sliding = j.opt_bool("use_sliding_window")?.unwrap_or(false);
    let window = j.opt_i64("sliding_window")?.filter(|&w| w > 0);
    let sliding: Vec<bool> = match layer_types(&j, n)? {
        Some(t) => t,
        None => use_rope
            .iter()
            .map(|&r| use_sliding && window.is_some() && !r)
            .collect(),
    };
    cfg.sliding_windows = sliding
        .iter()
        .map(|&s| if s && use_sliding { window } else { None })
        .collect();
    Ok(cfg)
}
