//! `Gemma2ForCausalLM` and `Gemma3ForCausalLM` (text): GeGLU MLP (`gelu_pytorch_tanh`),
//! RMSNorm scaling by `1 + weight`, four norms per layer (pre/post attention, pre/post MLP),
//! embeddings times `sqrt(hidden_size)`, attention scale `query_pre_attn_scalar^-0.5`, final
//! logit soft-capping, sliding-window layers by `layer_types`, tied embeddings by default.
//! Gemma 2 soft-caps the attention scores too; Gemma 3 adds q/k norms and a separate RoPE
//! (`rope_local_base_freq`, or `rope_parameters.sliding_attention`) for sliding layers.
//!
//! transformers 5.23 `models/gemma2`, `models/gemma3` (`Gemma3TextConfig`; transformers does
//! not pass `attn_logit_softcapping` to Gemma 3's attention, so it has no effect there either).

use std::path::Path;

use serde_json::Value;

use super::config::{
    DecoderConfig, Defaults, Json, LayerRope, family_config, layer_types, rope_from_params,
};
use crate::error::Result;

fn defaults() -> Defaults {
    Defaults {
        head_dim: Some(256),
        rms_norm_eps: 1e-6,
        tie_word_embeddings: true,
        rope_theta: 10000.0,
        act_key: "hidden_activation",
        act: "gelu_pytorch_tanh",
        partial_rotary: false,
        pad_token_id: Some(0),
        original_max_position_embeddings: None,
    }
}

/// What Gemma 2 and 3 share; `pattern` is the default sliding-window period.
fn common(
    path: &Path,
    v: &Value,
    arch: &str,
    d: &Defaults,
    pattern: usize,
) -> Result<DecoderConfig> {
    let j = Json { path, v };
    let mut cfg = family_config(path, v, arch, d)?;
    if j.opt_bool("use_bidirectional_attention")?.unwrap_or(false) {
        return Err(j.err_key(
            "use_bidirectional_attention",
            "true is not supported (only causal language models)",
        ));
    }
    cfg.mlp_bias = false;
    cfg.norm_plus_one = true;
    cfg.sandwich_norms = true;
    cfg.embed_scale = Some((cfg.hidden_size as f64).sqrt());
    let scalar = j.opt_f64("query_pre_attn_scalar")?.unwrap_or(256.0);
    if scalar <= 0.0 {
        return Err(j.err_key("query_pre_attn_scalar", format!("{scalar} must be > 0")));
    }
    cfg.attn_scale = scalar.powf(-0.5);
    let window = match j.opt_i64("sliding_window")? {
        Some(w) if w > 0 => Some(w),
        Some(_) => None,
        None if v.get("sliding_window").is_some_and(Value::is_null) => None,
        None => Some(4096),
    };
    let sliding = match layer_types(&j, cfg.num_layers)? {
        Some(t) => t,
        None => (0..cfg.num_layers)
            .map(|i| (i + 1) % pattern != 0)
            .collect(),
    };
    cfg.sliding_windows = sliding
        .iter()
        .map(|&s| if s { window } else { None })
        .collect();
    Ok(cfg)
}

/// The configuration rules of `Gemma2ForCausalLM`.
pub fn config2(path: &Path, v: &Value) -> Result<DecoderConfig> {
    let mut cfg = common(path, v, "Gemma2ForCausalLM", &defaults(), 2)?;
    let j = Json { path, v };
    let cap = |key: &str, default: f64| -> Result<Option<f64>> {
        if v.get(key).is_some_and(Value::is_null) {
            return Ok(None);
        }
        Ok(Some(j.opt_f64(key)?.unwrap_or(default)).filter(|&c| c > 0.0))
    };
    cfg.attn_softcap = cap("attn_logit_softcapping", 50.0)?;
    cfg.final_softcap = cap("final_logit_softcapping", 30.0)?;
    Ok(cfg)
}

/// The configuration rules of `Gemma3ForCausalLM` (the text model).
pub fn config3(path: &Path, v: &Value) -> Result<DecoderConfig> {
    let j = Json { path, v };
    let pattern = j
        .opt_i64("sliding_window_pattern")?
        .or(j.opt_i64("_sliding_window_pattern")?)
        .unwrap_or(6)
        .max(1) as usize;
    let d = Defaults {
        rope_theta: 1_000_000.0,
        ..defaults()
    };
    // the nested per-layer-type form is read below; hide it from the common reader
    let nested = v
        .get("rope_parameters")
        .and_then(Value::as_object)
        .is_some_and(|o| o.contains_key("full_attention") || o.contains_key("sliding_attention"));
    let mut flat = v.clone();
    if nested && let Some(o) = flat.as_object_mut() {
        o.remove("rope_parameters");
    }
    let mut cfg = common(path, &flat, "Gemma3ForCausalLM", &d, pattern)?;
    cfg.qk_norm = true;
    cfg.final_softcap = j.opt_f64("final_logit_softcapping")?.filter(|&c| c > 0.0);
    let local_theta = j.opt_f64("rope_local_base_freq")?.unwrap_or(10_000.0);
    if nested {
        let rp = &v["rope_parameters"];
        let global_theta = j.opt_f64("rope_theta")?.unwrap_or(1_000_000.0);
        cfg.rope = rope_from_params(
            &j,
            "rope_parameters.full_attention",
            rp.get("full_attention").filter(|x| !x.is_null()),
            global_theta,
            cfg.head_dim,
            &d,
        )?;
        cfg.rope_local = Some(rope_from_params(
            &j,
            "rope_parameters.sliding_attention",
            rp.get("sliding_attention").filter(|x| !x.is_null()),
            local_theta,
            cfg.head_dim,
            &d,
        )?);
    } else {
        // older files: `rope_theta` + `rope_scaling` for global layers, `rope_local_base_freq`
        // (default RoPE) for sliding ones
        cfg.rope_local = Some(rope_from_params(
            &j,
            "rope_local_base_freq",
            None,
            local_theta,
            cfg.head_dim,
            &d,
        )?);
    }
    cfg.layer_rope = cfg
        .sliding_windows
        .iter()
        .zip(layer_types(&j, cfg.num_layers)?.unwrap_or_else(|| {
            (0..cfg.num_layers)
                .map(|i| (i + 1) % pattern != 0)
                .collect()
        }))
        .map(|(_, sliding)| {
            if sliding {
                LayerRope::Local
            } else {
                LayerRope::Global
            }
        })
        .collect();
    Ok(cfg)
}
