//! Rotary position embeddings (RoPE): inverse frequencies for every RoPE type transformers
//! knows for causal LMs (default, linear, llama3, yarn, longrope, dynamic), the cos/sin tables
//! for given position ids, and their application to queries and keys (all or, for partial
//! rotary, the first dimensions of each head).
//!
//! Formulas follow transformers 5.23 `modeling_rope_utils.py` (`_compute_default_rope_parameters`
//! and the `_compute_*_parameters` functions of `ROPE_INIT_FUNCTIONS`, the `dynamic_rope_update`
//! decorator) and `modeling_llama.py` (`rotate_half`, `apply_rotary_pos_emb`). The vectors are
//! computed with the same libtorch ops in the same order and precision (fp32), so they are equal
//! to transformers' bit for bit; `tests/rope_types.rs` checks each type against transformers'
//! own function.

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TchResultExt};

/// Which inverse-frequency rule to use (`rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// The original RoPE: `1 / theta^(2i/d)`.
    Default,
    /// Position interpolation: frequencies divided by `factor`.
    Linear {
        /// Context extension factor (> 1 stretches the positions).
        factor: f64,
    },
    /// Llama 3.1 frequency-band scaling.
    Llama3 {
        /// Division of the low frequencies (8 for Llama 3.1).
        factor: f64,
        /// Wavelengths longer than `original_max_position_embeddings / low_freq_factor` are
        /// divided by `factor` (1 for Llama 3.1).
        low_freq_factor: f64,
        /// Wavelengths shorter than `original_max_position_embeddings / high_freq_factor` are
        /// kept (4 for Llama 3.1); between the two bounds the rule blends smoothly.
        high_freq_factor: f64,
        /// The context length of pre-training (8192 for Llama 3.1).
        original_max_position_embeddings: f64,
    },
    /// YaRN (`_compute_yarn_parameters`): interpolation blended with extrapolation over a ramp
    /// between the correction dimensions of `beta_fast` and `beta_slow`; cos/sin scaled by the
    /// attention factor.
    Yarn {
        /// Context extension factor over `original_max_position_embeddings`.
        factor: f64,
        /// The context length of pre-training.
        original_max_position_embeddings: f64,
        /// Explicit `attention_factor`; `None` derives it from `mscale`/`mscale_all_dim`.
        attention_factor: Option<f64>,
        /// DeepSeek-style `mscale`: with `mscale_all_dim` (both non-zero) the derived attention
        /// factor is `(0.1 mscale ln(factor) + 1) / (0.1 mscale_all_dim ln(factor) + 1)`;
        /// otherwise it is `0.1 ln(factor) + 1`.
        mscale: Option<f64>,
        /// DeepSeek-style `mscale_all_dim`, the divisor's `mscale` (see `mscale`).
        mscale_all_dim: Option<f64>,
        /// Default 32.
        beta_fast: f64,
        /// Default 1.
        beta_slow: f64,
        /// Default true: round the correction range outwards.
        truncate: bool,
    },
    /// LongRoPE (Phi-3): per-frequency `short_factor` while the batch's positions stay within
    /// `original_max_position_embeddings`, `long_factor` beyond; cos/sin scaled by the attention
    /// factor.
    LongRope {
        /// One divisor per rotary frequency (`dim / 2` values), for short batches.
        short_factor: Vec<f64>,
        /// One divisor per rotary frequency (`dim / 2` values), for long batches.
        long_factor: Vec<f64>,
        /// The context length of pre-training: the bound between short and long.
        original_max_position_embeddings: f64,
        /// `factor`, or `max_position_embeddings / original_max_position_embeddings`.
        factor: f64,
        /// Explicit cos/sin scale; `None` derives `sqrt(1 + ln(factor) / ln(original))`.
        attention_factor: Option<f64>,
    },
    /// Dynamic NTK: the base grows with the batch's length once it passes
    /// `max_position_embeddings`. Computed per batch from `max(position_ids) + 1`; transformers
    /// caches the grown table in the module and resets it only for a batch shorter than
    /// `max_position_embeddings`, so the two differ only for a batch exactly that long right
    /// after a longer one.
    Dynamic {
        /// How fast the base grows past `max_position_embeddings`.
        factor: f64,
        /// The length up to which the original frequencies are kept.
        max_position_embeddings: i64,
    },
}

/// RoPE parameters of a model (or of one layer type).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// The frequency base (`rope_theta`, e.g. 10000 or 500000).
    pub theta: f64,
    /// Rotated dimensions: the head dimension times `partial_rotary_factor`.
    pub dim: i64,
    /// The inverse-frequency rule (`rope_scaling`).
    pub scaling: RopeScaling,
}

fn f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Vec::<f32>::try_from(t.f_contiguous().ctx("rope to vec")?).ctx("rope to vec")
}

impl RopeConfig {
    /// Whether the tables depend on the batch's length (dynamic, longrope).
    pub fn depends_on_length(&self) -> bool {
        matches!(
            self.scaling,
            RopeScaling::Dynamic { .. } | RopeScaling::LongRope { .. }
        )
    }

    /// `arange(0, dim, 2).float() / dim`, fp32.
    fn exponents(&self) -> Result<Tensor> {
        Tensor::f_arange_start_step(0, self.dim, 2, (Kind::Int64, Device::Cpu))
            .ctx("rope arange")?
            .f_to_kind(Kind::Float)
            .ctx("rope arange")?
            .f_div_scalar(self.dim)
            .ctx("rope exponents")
    }

    /// `base ** exponents` with `base` an fp32 scalar, as `python_float ** fp32_tensor` does.
    fn base_pow(base: &Tensor, exp: &Tensor) -> Result<Tensor> {
        base.f_pow(exp).ctx("rope base pow")
    }

    fn scalar(v: f64) -> Tensor {
        Tensor::from(v as f32)
    }

    /// The inverse frequencies `[dim / 2]` (fp32, on the CPU) and the attention factor that
    /// scales cos and sin, for a batch whose largest position id is `seq_len - 1` (`None`: the
    /// tables a model is built with, what transformers' `rope_init_fn(config)` returns).
    pub fn inv_freq_at(&self, seq_len: Option<i64>) -> Result<(Tensor, f64)> {
        let exps = self.exponents()?;
        let theta = Self::scalar(self.theta);
        let plain = || -> Result<Tensor> {
            Self::base_pow(&theta, &exps)?
                .f_reciprocal()
                .ctx("rope 1/x")
        };
        Ok(match &self.scaling {
            RopeScaling::Default => (plain()?, 1.0),
            RopeScaling::Linear { factor } => {
                (plain()?.f_div_scalar(*factor).ctx("rope linear")?, 1.0)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let inv = plain()?;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let wavelen = inv
                    .f_reciprocal()
                    .ctx("llama3 wavelen")?
                    .f_mul_scalar(2.0 * std::f64::consts::PI)
                    .ctx("llama3 wavelen")?;
                let low = wavelen.f_gt(low_wavelen).ctx("llama3")?;
                let scaled = inv.f_div_scalar(*factor).ctx("llama3")?;
                let inv_llama = scaled.f_where_self(&low, &inv).ctx("llama3")?;
                // (old / wavelen - low) / (high - low); `scalar / tensor` is
                // `tensor.reciprocal() * scalar` in PyTorch
                let smooth = wavelen
                    .f_reciprocal()
                    .ctx("llama3 smooth")?
                    .f_mul_scalar(*old)
                    .ctx("llama3 smooth")?
                    .f_sub_scalar(*low_freq_factor)
                    .ctx("llama3 smooth")?
                    .f_div_scalar(high_freq_factor - low_freq_factor)
                    .ctx("llama3 smooth")?;
                let smoothed = smooth
                    .f_neg()
                    .ctx("llama3")?
                    .f_add_scalar(1.0)
                    .ctx("llama3")?
                    .f_mul(&inv_llama)
                    .ctx("llama3")?
                    .f_div_scalar(*factor)
                    .ctx("llama3")?
                    .f_add(&smooth.f_mul(&inv_llama).ctx("llama3")?)
                    .ctx("llama3")?;
                let medium = wavelen
                    .f_lt(high_wavelen)
                    .ctx("llama3")?
                    .f_logical_not()
                    .ctx("llama3")?
                    .f_logical_and(&low.f_logical_not().ctx("llama3")?)
                    .ctx("llama3")?;
                (
                    smoothed.f_where_self(&medium, &inv_llama).ctx("llama3")?,
                    1.0,
                )
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: omax,
                attention_factor,
                mscale,
                mscale_all_dim,
                beta_fast,
                beta_slow,
                truncate,
            } => {
                let get_mscale = |scale: f64, m: f64| -> f64 {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let att = match (attention_factor, mscale, mscale_all_dim) {
                    (Some(a), _, _) => *a,
                    (None, Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => {
                        get_mscale(*factor, *m) / get_mscale(*factor, *ma)
                    }
                    _ => get_mscale(*factor, 1.0),
                };
                let dim = self.dim as f64;
                let base = self.theta;
                let corr = |rot: f64| {
                    dim * (omax / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
                };
                let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(dim - 1.0);
                if low == high {
                    high += 0.001;
                }
                let pos_freqs = Self::base_pow(&theta, &exps)?;
                let extrapolation = pos_freqs.f_reciprocal().ctx("yarn")?;
                let interpolation = pos_freqs
                    .f_mul_scalar(*factor)
                    .ctx("yarn")?
                    .f_reciprocal()
                    .ctx("yarn")?;
                let ramp = Tensor::f_arange(self.dim / 2, (Kind::Float, Device::Cpu))
                    .ctx("yarn ramp")?
                    .f_sub_scalar(low)
                    .ctx("yarn ramp")?
                    .f_div_scalar(high - low)
                    .ctx("yarn ramp")?
                    .f_clamp(0.0, 1.0)
                    .ctx("yarn ramp")?;
                let extra_factor = ramp.f_neg().ctx("yarn")?.f_add_scalar(1.0).ctx("yarn")?;
                let one_minus = extra_factor
                    .f_neg()
                    .ctx("yarn")?
                    .f_add_scalar(1.0)
                    .ctx("yarn")?;
                let inv = interpolation
                    .f_mul(&one_minus)
                    .ctx("yarn")?
                    .f_add(&extrapolation.f_mul(&extra_factor).ctx("yarn")?)
                    .ctx("yarn")?;
                (inv, att)
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings: omax,
                factor,
                attention_factor,
            } => {
                let att = match attention_factor {
                    Some(a) => *a,
                    None if *factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / omax.ln()).sqrt(),
                };
                let long = seq_len.is_some_and(|s| s as f64 > *omax);
                let ext: Vec<f32> = if long { long_factor } else { short_factor }
                    .iter()
                    .map(|&x| x as f32)
                    .collect();
                if ext.len() as i64 != self.dim / 2 {
                    return Err(crate::Error::Shape {
                        op: "longrope".into(),
                        msg: format!(
                            "{} factors for {} rotary frequencies",
                            ext.len(),
                            self.dim / 2
                        ),
                    });
                }
                let ext = Tensor::f_from_slice(&ext).ctx("longrope factors")?;
                let inv = ext
                    .f_mul(&Self::base_pow(&theta, &exps)?)
                    .ctx("longrope")?
                    .f_reciprocal()
                    .ctx("longrope")?;
                (inv, att)
            }
            RopeScaling::Dynamic {
                factor,
                max_position_embeddings: maxp,
            } => {
                let seq = seq_len.unwrap_or(*maxp).max(*maxp);
                let dim = self.dim as f64;
                // fp32 scalar arithmetic, as transformers does on the `max(position_ids) + 1`
                // tensor
                let base = Tensor::from(seq)
                    .f_mul_scalar(*factor)
                    .ctx("dynamic")?
                    .f_div_scalar(*maxp)
                    .ctx("dynamic")?
                    .f_sub_scalar(factor - 1.0)
                    .ctx("dynamic")?
                    .f_pow_tensor_scalar(dim / (dim - 2.0))
                    .ctx("dynamic")?
                    .f_mul_scalar(self.theta)
                    .ctx("dynamic")?;
                let inv = if seq_len.is_some_and(|s| s > *maxp) {
                    Self::base_pow(&base, &exps)?
                        .f_reciprocal()
                        .ctx("dynamic")?
                } else {
                    plain()?
                };
                (inv, 1.0)
            }
        })
    }

    /// The inverse frequencies a model is built with, `[dim / 2]` fp32 on `device`.
    pub fn inv_freq(&self, device: Device) -> Result<Tensor> {
        self.inv_freq_at(None)?
            .0
            .f_to_device(device)
            .ctx("rope inv_freq to device")
    }

    /// The inverse frequencies as plain numbers (tests, diagnostics).
    pub fn inv_freq_values(&self, seq_len: Option<i64>) -> Result<(Vec<f32>, f64)> {
        let (t, a) = self.inv_freq_at(seq_len)?;
        Ok((f32_vec(&t)?, a))
    }
}

/// `(cos, sin)` of shape `[batch, seq, dim]` in `kind` for `position_ids` `[batch, seq]`.
pub fn rope_tables(
    inv_freq: &Tensor,
    position_ids: &Tensor,
    kind: Kind,
) -> Result<(Tensor, Tensor)> {
    rope_tables_scaled(inv_freq, position_ids, kind, 1.0)
}

/// [`rope_tables`] with cos and sin multiplied by `attention_scaling` in fp32 (yarn, longrope).
pub fn rope_tables_scaled(
    inv_freq: &Tensor,
    position_ids: &Tensor,
    kind: Kind,
    attention_scaling: f64,
) -> Result<(Tensor, Tensor)> {
    let pos = position_ids
        .f_to_kind(Kind::Float)
        .ctx("rope positions to fp32")?
        .f_unsqueeze(-1)
        .ctx("rope positions unsqueeze")?;
    let freqs = pos.f_mul(inv_freq).ctx("rope freqs")?;
    let emb = Tensor::f_cat(&[&freqs, &freqs], -1).ctx("rope cat")?;
    let (mut cos, mut sin) = (emb.f_cos().ctx("rope cos")?, emb.f_sin().ctx("rope sin")?);
    if attention_scaling != 1.0 {
        cos = cos
            .f_mul_scalar(attention_scaling)
            .ctx("rope attention scaling")?;
        sin = sin
            .f_mul_scalar(attention_scaling)
            .ctx("rope attention scaling")?;
    }
    Ok((
        cos.f_to_kind(kind).ctx("rope cos kind")?,
        sin.f_to_kind(kind).ctx("rope sin kind")?,
    ))
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.size().last().copied().unwrap_or(0);
    let x1 = x.f_narrow(-1, 0, d / 2).ctx("rotate_half")?;
    let x2 = x.f_narrow(-1, d / 2, d - d / 2).ctx("rotate_half")?;
    Tensor::f_cat(&[&x2.f_neg().ctx("rotate_half neg")?, &x1], -1).ctx("rotate_half cat")
}

/// `x * cos + rotate_half(x) * sin` for `x` `[batch, heads, seq, dim]` and tables
/// `[batch, seq, rot]`. When `rot < dim` (partial rotary, Phi-3) only the first `rot` channels
/// rotate and the rest pass through (transformers' Phi-3 `apply_rotary_pos_emb`).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let cos = cos.f_unsqueeze(1).ctx("rope cos unsqueeze")?;
    let sin = sin.f_unsqueeze(1).ctx("rope sin unsqueeze")?;
    let dim = x.size().last().copied().unwrap_or(0);
    let rot = cos.size().last().copied().unwrap_or(0);
    let rotate = |x: &Tensor| -> Result<Tensor> {
        x.f_mul(&cos)
            .ctx("rope x*cos")?
            .f_add(&rotate_half(x)?.f_mul(&sin).ctx("rope rot*sin")?)
            .ctx("rope add")
    };
    if rot == dim {
        return rotate(x);
    }
    let head = x.f_narrow(-1, 0, rot).ctx("partial rope")?;
    let pass = x.f_narrow(-1, rot, dim - rot).ctx("partial rope")?;
    Tensor::f_cat(&[&rotate(&head)?, &pass], -1).ctx("partial rope cat")
}
