//! `Phi3ForCausalLM` (Phi-3, Phi-3.5, Phi-4): the Llama decoder with one fused `qkv_proj`
//! (queries, then keys, then values) and one fused `gate_up_proj` (gate, then up), partial
//! rotary embeddings (`partial_rotary_factor`), LongRoPE, an optional sliding window on every
//! layer, `resid_pdrop` on each block's output while training (transformers 5.23
//! `models/phi3`).

use std::path::Path;

use serde_json::Value;

use super::config::{DecoderConfig, Defaults, Json, family_config};
use crate::error::Result;

fn defaults() -> Defaults {
    Defaults {
        rms_norm_eps: 1e-5,
        partial_rotary: true,
        original_max_position_embeddings: Some(4096),
        ..Defaults::llama()
    }
}

/// The configuration rules of `Phi3ForCausalLM`.
pub fn config(path: &Path, v: &Value) -> Result<DecoderConfig> {
    let mut cfg = family_config(path, v, "Phi3ForCausalLM", &defaults())?;
    let j = Json { path, v };
    cfg.qkv_bias = false;
    cfg.o_bias = false;
    cfg.mlp_bias = false;
    cfg.fused_projections = true;
    cfg.resid_dropout = j.opt_f64("resid_pdrop")?.unwrap_or(0.0);
    let window = j.opt_i64("sliding_window")?.filter(|&w| w > 0);
    cfg.sliding_windows = vec![window; cfg.num_layers];
    Ok(cfg)
}
