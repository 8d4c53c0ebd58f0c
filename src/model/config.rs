//! The decoder configuration shared by the Llama-family architectures, read from a Hugging Face
//! `config.json` (transformers 5.23 field names, with the older `rope_theta`/`rope_scaling` form
//! accepted as well).

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::nn::{RopeConfig, RopeScaling};

/// Everything the decoder needs to know about its shape, from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    /// `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`.
    pub architecture: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_layers: usize,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    /// Biases on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Biases on gate/up/down.
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    /// Per layer: `Some(w)` restricts attention to the last `w` positions (Mistral, Qwen2).
    pub sliding_windows: Vec<Option<i64>>,
    pub attention_dropout: f64,
}

/// Typed access to `config.json` with errors naming the file and key.
pub(crate) struct Json<'a> {
    pub path: &'a Path,
    pub v: &'a Value,
}

impl Json<'_> {
    fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::Config {
            file: Some(self.path.to_path_buf()),
            key: key.to_string(),
            msg: msg.into(),
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }

    pub fn i64(&self, key: &str) -> Result<i64> {
        self.opt_i64(key)?
            .ok_or_else(|| self.err(key, "missing (an integer is required)"))
    }

    pub fn opt_i64(&self, key: &str) -> Result<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_i64().filter(|&n| n >= 0).map(Some).ok_or_else(|| {
                self.err(key, format!("expected a non-negative integer, found {v}"))
            }),
        }
    }

    pub fn positive(&self, key: &str) -> Result<i64> {
        let n = self.i64(key)?;
        if n == 0 {
            return Err(self.err(key, "must be > 0"));
        }
        Ok(n)
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a number, found {v}"))),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected true or false, found {v}"))),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a string, found {v}"))),
        }
    }
}

/// Reads the parts common to the Llama family. The architecture files adjust biases and
/// sliding windows afterwards.
pub(crate) fn base_config(path: &Path, v: &Value, architecture: &str) -> Result<DecoderConfig> {
    let j = Json { path, v };
    let hidden_size = j.positive("hidden_size")?;
    let num_heads = j.positive("num_attention_heads")?;
    let num_kv_heads = j.opt_i64("num_key_value_heads")?.unwrap_or(num_heads);
    if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(j.err(
            "num_key_value_heads",
            format!("{num_kv_heads} must be > 0 and divide num_attention_heads ({num_heads})"),
        ));
    }
    let head_dim = match j.opt_i64("head_dim")? {
        Some(d) if d > 0 => d,
        _ => {
            if hidden_size % num_heads != 0 {
                return Err(j.err(
                    "head_dim",
                    "missing, and hidden_size is not a multiple of num_attention_heads",
                ));
            }
            hidden_size / num_heads
        }
    };
    if head_dim % 2 != 0 {
        return Err(j.err("head_dim", format!("{head_dim} must be even for RoPE")));
    }
    if let Some(act) = j.opt_str("hidden_act")?
        && act != "silu"
        && act != "swish"
    {
        return Err(j.err(
            "hidden_act",
            format!("`{act}` is not supported (only silu)"),
        ));
    }
    let num_layers = j.positive("num_hidden_layers")? as usize;
    let attention_bias = j.opt_bool("attention_bias")?.unwrap_or(false);
    Ok(DecoderConfig {
        architecture: architecture.to_string(),
        vocab_size: j.positive("vocab_size")?,
        hidden_size,
        intermediate_size: j.positive("intermediate_size")?,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: j.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
        rope: rope_config(&j, head_dim)?,
        qkv_bias: attention_bias,
        o_bias: attention_bias,
        mlp_bias: j.opt_bool("mlp_bias")?.unwrap_or(false),
        tie_word_embeddings: j.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        sliding_windows: vec![None; num_layers],
        attention_dropout: j.opt_f64("attention_dropout")?.unwrap_or(0.0),
    })
}

/// RoPE from `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling` (older).
fn rope_config(j: &Json<'_>, head_dim: i64) -> Result<RopeConfig> {
    let params = j.get("rope_parameters").or_else(|| j.get("rope_scaling"));
    let key = if j.get("rope_parameters").is_some() {
        "rope_parameters"
    } else {
        "rope_scaling"
    };
    let params = match params {
        None => None,
        Some(Value::Object(_)) => params,
        Some(other) => return Err(j.err(key, format!("expected an object, found {other}"))),
    };
    let pj = params.map(|v| Json { path: j.path, v });
    let theta = match &pj {
        Some(p) => p.opt_f64("rope_theta")?,
        None => None,
    }
    .or(j.opt_f64("rope_theta")?)
    .unwrap_or(10000.0);
    let rope_type = match &pj {
        Some(p) => p
            .opt_str("rope_type")?
            .or(p.opt_str("type")?)
            .unwrap_or("default"),
        None => "default",
    };
    let factor_of = |p: &Json<'_>, k: &str| -> Result<f64> {
        p.opt_f64(k)?
            .ok_or_else(|| j.err(&format!("{key}.{k}"), "missing for this rope_type"))
    };
    if let Some(p) = &pj
        && let Some(f) = p.opt_f64("partial_rotary_factor")?
        && f != 1.0
    {
        return Err(j.err(
            &format!("{key}.partial_rotary_factor"),
            format!("{f} is not supported (only 1.0)"),
        ));
    }
    let scaling = match (rope_type, &pj) {
        ("default", _) => RopeScaling::Default,
        ("linear", Some(p)) => RopeScaling::Linear {
            factor: factor_of(p, "factor")?,
        },
        ("llama3", Some(p)) => RopeScaling::Llama3 {
            factor: factor_of(p, "factor")?,
            low_freq_factor: factor_of(p, "low_freq_factor")?,
            high_freq_factor: factor_of(p, "high_freq_factor")?,
            original_max_position_embeddings: match p.opt_f64("original_max_position_embeddings")? {
                Some(n) => n,
                None => j
                    .opt_f64("original_max_position_embeddings")?
                    .or(j.opt_f64("max_position_embeddings")?)
                    .ok_or_else(|| {
                        j.err(
                            &format!("{key}.original_max_position_embeddings"),
                            "missing (nor is max_position_embeddings set)",
                        )
                    })?,
            },
        },
        (other, _) => {
            return Err(j.err(
                &format!("{key}.rope_type"),
                format!("`{other}` is not supported (supported: default, linear, llama3)"),
            ));
        }
    };
    Ok(RopeConfig {
        theta,
        dim: head_dim,
        scaling,
    })
}
