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
    /// Tokens in the vocabulary (rows of the embedding).
    pub vocab_size: i64,
    /// Width of the residual stream.
    pub hidden_size: i64,
    /// Width of the MLP's gate and up projections.
    pub intermediate_size: i64,
    /// Decoder layers.
    pub num_layers: usize,
    /// Attention (query) heads.
    pub num_heads: i64,
    /// Key/value heads (fewer than `num_heads` under grouped-query attention).
    pub num_kv_heads: i64,
    /// Width of one head (`hidden_size / num_heads` unless `config.json` sets `head_dim`).
    pub head_dim: i64,
    /// Epsilon of the RMS norms.
    pub rms_norm_eps: f64,
    /// Rotary embedding settings (`rope_theta`, `rope_scaling`).
    pub rope: RopeConfig,
    /// Biases on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Biases on gate/up/down.
    pub mlp_bias: bool,
    /// The LM head shares the embedding's weight.
    pub tie_word_embeddings: bool,
    /// Per layer: `Some(w)` restricts attention to the last `w` positions (Mistral, Qwen2).
    pub sliding_windows: Vec<Option<i64>>,
    /// Dropout on the attention probabilities while training (`attention_dropout`, usually 0).
    pub attention_dropout: f64,
    /// The MLP's gate activation (`hidden_act`, Gemma's `hidden_activation`).
    pub hidden_act: Activation,
    /// Gemma's RMSNorm: scale by `1 + weight`, computed in fp32 before the cast back.
    pub norm_plus_one: bool,
    /// RMSNorm over each head of the queries and keys before RoPE (`q_norm`, `k_norm`: Qwen3,
    /// Gemma 3).
    pub qk_norm: bool,
    /// Gemma 2/3: the attention output is normed before the residual
    /// (`post_attention_layernorm`), and the MLP sits between `pre_feedforward_layernorm` and
    /// `post_feedforward_layernorm`.
    pub sandwich_norms: bool,
    /// Phi-3: one `qkv_proj` and one `gate_up_proj` instead of separate projections.
    pub fused_projections: bool,
    /// Gemma: embeddings multiplied by `sqrt(hidden_size)` (rounded to the model's kind).
    pub embed_scale: Option<f64>,
    /// The attention scores' scale: `head_dim^-0.5`, Gemma's `query_pre_attn_scalar^-0.5`.
    pub attn_scale: f64,
    /// Gemma 2: `tanh(scores / cap) * cap` before the mask (`attn_logit_softcapping`).
    pub attn_softcap: Option<f64>,
    /// Gemma 2/3: `tanh(logits / cap) * cap` on the LM head's output (`final_logit_softcapping`).
    pub final_softcap: Option<f64>,
    /// Gemma 3: the RoPE of sliding-window layers (`rope_local_base_freq`, or
    /// `rope_parameters.sliding_attention`).
    pub rope_local: Option<RopeConfig>,
    /// Per layer: which RoPE it applies.
    pub layer_rope: Vec<LayerRope>,
    /// `pad_token_id`: the embedding row that gets no gradient (`nn.Embedding(padding_idx)`).
    pub pad_token_id: Option<i64>,
    /// Phi-3's `resid_pdrop` (on each block's output before the residual, training only).
    pub resid_dropout: f64,
}

/// The MLP activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish` (SwiGLU).
    Silu,
    /// `gelu_pytorch_tanh` (GeGLU with the tanh approximation, Gemma).
    GeluTanh,
    /// `gelu` (exact erf form).
    Gelu,
}

/// Which rotary embedding a layer applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerRope {
    /// [`DecoderConfig::rope`].
    Global,
    /// [`DecoderConfig::rope_local`] (Gemma 3 sliding-window layers).
    Local,
    /// No RoPE (SmolLM3's `no_rope_layers` entries that are 0).
    None,
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

/// A family's defaults for keys a `config.json` may leave out (the values of its transformers
/// config class).
#[derive(Debug, Clone)]
pub(crate) struct Defaults {
    /// `None`: `hidden_size / num_attention_heads`.
    pub head_dim: Option<i64>,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub rope_theta: f64,
    /// The key naming the activation (`hidden_act`, Gemma's `hidden_activation`) and its default.
    pub act_key: &'static str,
    pub act: &'static str,
    /// Whether `partial_rotary_factor` < 1 is implemented by the family (Phi-3).
    pub partial_rotary: bool,
    pub pad_token_id: Option<i64>,
    /// `original_max_position_embeddings` when the file has none (Phi-3: 4096).
    pub original_max_position_embeddings: Option<i64>,
}

impl Defaults {
    /// `LlamaConfig`'s defaults (also Mistral's and Qwen2's for the keys read here).
    pub fn llama() -> Self {
        Defaults {
            head_dim: None,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: false,
            rope_theta: 10000.0,
            act_key: "hidden_act",
            act: "silu",
            partial_rotary: false,
            pad_token_id: None,
            original_max_position_embeddings: None,
        }
    }
}

impl Json<'_> {
    pub fn err_key(&self, key: &str, msg: impl Into<String>) -> Error {
        self.err(key, msg)
    }

    /// A list of strings, `None` when absent.
    pub fn opt_strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => serde_json::from_value(x.clone())
                .map(Some)
                .map_err(|e| self.err(key, format!("expected a list of strings: {e}"))),
        }
    }

    /// A list of integers, `None` when absent.
    pub fn opt_ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => serde_json::from_value(x.clone())
                .map(Some)
                .map_err(|e| self.err(key, format!("expected a list of integers: {e}"))),
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
}

/// `layer_types` checked against the layer count, each `full_attention` or
/// `sliding_attention`; `None` when absent.
pub(crate) fn layer_types(j: &Json<'_>, num_layers: usize) -> Result<Option<Vec<bool>>> {
    let Some(types) = j.opt_strings("layer_types")? else {
        return Ok(None);
    };
    if types.len() != num_layers {
        return Err(j.err(
            "layer_types",
            format!("has {} entries for {} layers", types.len(), num_layers),
        ));
    }
    types
        .iter()
        .enumerate()
        .map(|(i, t)| match t.as_str() {
            "sliding_attention" => Ok(true),
            "full_attention" => Ok(false),
            other => Err(j.err(
                &format!("layer_types[{i}]"),
                format!("`{other}` is not supported (full_attention or sliding_attention)"),
            )),
        })
        .collect::<Result<Vec<bool>>>()
        .map(Some)
}

/// Reads the parts common to the Llama family with `LlamaConfig`'s defaults. The architecture
/// files adjust biases and sliding windows afterwards.
pub(crate) fn base_config(path: &Path, v: &Value, architecture: &str) -> Result<DecoderConfig> {
    family_config(path, v, architecture, &Defaults::llama())
}

/// Reads the parts common to every supported family, with the family's defaults.
pub(crate) fn family_config(
    path: &Path,
    v: &Value,
    architecture: &str,
    d: &Defaults,
) -> Result<DecoderConfig> {
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
    let head_dim = match j.opt_i64("head_dim")?.filter(|&d| d > 0).or(d.head_dim) {
        Some(d) => d,
        None => {
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
    let act = j.opt_str(d.act_key)?.unwrap_or(d.act);
    let hidden_act = match act {
        "silu" | "swish" => Activation::Silu,
        "gelu_pytorch_tanh" => Activation::GeluTanh,
        "gelu" => Activation::Gelu,
        other => {
            return Err(j.err(
                d.act_key,
                format!("`{other}` is not supported (silu, swish, gelu_pytorch_tanh, gelu)"),
            ));
        }
    };
    let num_layers = j.positive("num_hidden_layers")? as usize;
    let attention_bias = j.opt_bool("attention_bias")?.unwrap_or(false);
    let vocab_size = j.positive("vocab_size")?;
    let rope = rope_config(&j, head_dim, d)?;
    Ok(DecoderConfig {
        architecture: architecture.to_string(),
        vocab_size,
        hidden_size,
        intermediate_size: j.positive("intermediate_size")?,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: j.opt_f64("rms_norm_eps")?.unwrap_or(d.rms_norm_eps),
        rope,
        qkv_bias: attention_bias,
        o_bias: attention_bias,
        mlp_bias: j.opt_bool("mlp_bias")?.unwrap_or(false),
        tie_word_embeddings: j
            .opt_bool("tie_word_embeddings")?
            .unwrap_or(d.tie_word_embeddings),
        sliding_windows: vec![None; num_layers],
        attention_dropout: j.opt_f64("attention_dropout")?.unwrap_or(0.0),
        hidden_act,
        norm_plus_one: false,
        qk_norm: false,
        sandwich_norms: false,
        fused_projections: false,
        embed_scale: None,
        attn_scale: (head_dim as f64).powf(-0.5),
        attn_softcap: None,
        final_softcap: None,
        rope_local: None,
        layer_rope: vec![LayerRope::Global; num_layers],
        pad_token_id: if j.has("pad_token_id") {
            // a pad id outside the vocabulary has no row to protect
            match j.get("pad_token_id").and_then(Value::as_i64) {
                Some(p) if (0..vocab_size).contains(&p) => Some(p),
                _ => None,
            }
        } else {
            d.pad_token_id.filter(|p| (0..vocab_size).contains(p))
        },
        resid_dropout: 0.0,
    })
}

/// RoPE from `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling` (older).
fn rope_config(j: &Json<'_>, head_dim: i64, d: &Defaults) -> Result<RopeConfig> {
    let (key, params) = match (j.get("rope_parameters"), j.get("rope_scaling")) {
        (Some(p), _) => ("rope_parameters", Some(p)),
        (None, Some(p)) => ("rope_scaling", Some(p)),
        (None, None) => ("rope_parameters", None),
    };
    let theta = j.opt_f64("rope_theta")?.unwrap_or(d.rope_theta);
    rope_from_params(j, key, params, theta, head_dim, d)
}

/// One RoPE parameter object (`params`, found under `key` for messages); `theta` is used when
/// it names no `rope_theta`.
pub(crate) fn rope_from_params(
    j: &Json<'_>,
    key: &str,
    params: Option<&Value>,
    theta: f64,
    head_dim: i64,
    d: &Defaults,
) -> Result<RopeConfig> {
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
    .unwrap_or(theta);
    let mut rope_type = match &pj {
        Some(p) => p
            .opt_str("rope_type")?
            .or(p.opt_str("type")?)
            .unwrap_or("default"),
        None => "default",
    };
    // Phi-3's config renames its older names for LongRoPE
    if d.partial_rotary && matches!(rope_type, "su" | "yarn") {
        rope_type = "longrope";
    }
    let partial = match &pj {
        Some(p) => p.opt_f64("partial_rotary_factor")?,
        None => None,
    }
    .or(j.opt_f64("partial_rotary_factor")?)
    .unwrap_or(1.0);
    let dim = if partial == 1.0 {
        head_dim
    } else if !d.partial_rotary {
        return Err(j.err(
            &format!("{key}.partial_rotary_factor"),
            format!("{partial} is not supported by this architecture (only 1.0)"),
        ));
    } else {
        let dim = (head_dim as f64 * partial) as i64;
        if dim <= 0 || dim % 2 != 0 {
            return Err(j.err(
                &format!("{key}.partial_rotary_factor"),
                format!("{partial} gives {dim} rotary dimensions of head_dim {head_dim}; they must be even and > 0"),
            ));
        }
        dim
    };
    let need = |p: &Json<'_>, k: &str| -> Result<f64> {
        p.opt_f64(k)?.ok_or_else(|| {
            j.err(
                &format!("{key}.{k}"),
                format!("missing for rope_type `{rope_type}`"),
            )
        })
    };
    let max_pos = j.opt_i64("max_position_embeddings")?;
    // transformers' `standardize_rope_params`: a top-level `original_max_position_embeddings`
    // wins over the one inside the RoPE parameters
    let omax = |p: &Json<'_>| -> Result<f64> {
        if let Some(n) = j.opt_f64("original_max_position_embeddings")? {
            return Ok(n);
        }
        if let Some(n) = d.original_max_position_embeddings {
            return Ok(n as f64);
        }
        match p.opt_f64("original_max_position_embeddings")? {
            Some(n) => Ok(n),
            None => max_pos.map(|m| m as f64).ok_or_else(|| {
                j.err(
                    &format!("{key}.original_max_position_embeddings"),
                    "missing (nor is max_position_embeddings set)",
                )
            }),
        }
    };
    let scaling = match (rope_type, &pj) {
        ("default", _) => RopeScaling::Default,
        ("linear", Some(p)) => RopeScaling::Linear {
            factor: need(p, "factor")?,
        },
        ("llama3", Some(p)) => RopeScaling::Llama3 {
            factor: need(p, "factor")?,
            low_freq_factor: need(p, "low_freq_factor")?,
            high_freq_factor: need(p, "high_freq_factor")?,
            original_max_position_embeddings: omax(p)?,
        },
        ("yarn", Some(p)) => {
            let o = omax(p)?;
            let factor = match p.opt_f64("factor")? {
                Some(f) => f,
                None => {
                    max_pos.ok_or_else(|| j.err(&format!("{key}.factor"), "missing"))? as f64 / o
                }
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: o,
                attention_factor: p.opt_f64("attention_factor")?,
                mscale: p.opt_f64("mscale")?,
                mscale_all_dim: p.opt_f64("mscale_all_dim")?,
                beta_fast: p
                    .opt_f64("beta_fast")?
                    .filter(|&b| b != 0.0)
                    .unwrap_or(32.0),
                beta_slow: p.opt_f64("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0),
                truncate: p.opt_bool("truncate")?.unwrap_or(true),
            }
        }
        ("longrope", Some(p)) => {
            let o = omax(p)?;
            let list = |k: &str| -> Result<Vec<f64>> {
                let v = p.get(k).ok_or_else(|| {
                    j.err(&format!("{key}.{k}"), "missing for rope_type `longrope`")
                })?;
                let xs: Vec<f64> = serde_json::from_value(v.clone()).map_err(|e| {
                    j.err(
                        &format!("{key}.{k}"),
                        format!("expected a list of numbers: {e}"),
                    )
                })?;
                if xs.len() as i64 != dim / 2 {
                    return Err(j.err(
                        &format!("{key}.{k}"),
                        format!(
                            "has {} entries; {} rotary dimensions need {}",
                            xs.len(),
                            dim,
                            dim / 2
                        ),
                    ));
                }
                Ok(xs)
            };
            let factor = match p.opt_f64("factor")? {
                Some(f) => f,
                None => match max_pos {
                    Some(m) => m as f64 / o,
                    None => return Err(j.err(&format!("{key}.factor"), "missing")),
                },
            };
            RopeScaling::LongRope {
                short_factor: list("short_factor")?,
                long_factor: list("long_factor")?,
                original_max_position_embeddings: o,
                factor,
                attention_factor: p.opt_f64("attention_factor")?,
            }
        }
        ("dynamic", Some(p)) => RopeScaling::Dynamic {
            factor: need(p, "factor")?,
            max_position_embeddings: max_pos.ok_or_else(|| {
                j.err(
                    "max_position_embeddings",
                    "missing (dynamic RoPE scales relative to it)",
                )
            })?,
        },
        (other, _) => {
            return Err(j.err(
                &format!("{key}.rope_type"),
                format!(
                    "`{other}` is not supported (supported: default, linear, llama3, yarn, longrope, dynamic)"
                ),
            ));
        }
    };
    Ok(RopeConfig {
        theta,
        dim,
        scaling,
    })
}
