//! Rotary position embeddings (RoPE): inverse frequencies (default and Llama 3 scaling), the
//! cos/sin tables for given position ids, and their application to queries and keys.
//!
//! Formulas follow transformers 5.23 `modeling_rope_utils.py` (`_compute_default_rope_parameters`,
//! `_compute_llama3_parameters`) and `modeling_llama.py` (`rotate_half`, `apply_rotary_pos_emb`).

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TchResultExt};

/// Which inverse-frequency rule to use.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// The original RoPE: `1 / theta^(2i/d)`.
    Default,
    /// Position interpolation: frequencies divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1 frequency-band scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// RoPE parameters of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// Rotated dimensions (the head dimension).
    pub dim: i64,
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// The inverse frequencies, `[dim / 2]` fp32 on `device`.
    pub fn inv_freq(&self, device: Device) -> Result<Tensor> {
        let half = self.dim / 2;
        // transformers computes `1 / theta ** (arange(0, dim, 2) / dim)` in fp32.
        let base: Vec<f32> = (0..half)
            .map(|i| 1.0f32 / (self.theta as f32).powf((2 * i) as f32 / self.dim as f32))
            .collect();
        let freqs: Vec<f32> = match &self.scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|&f| f / *factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let f = f as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .map(|f| f as f32)
                    .collect()
            }
        };
        Tensor::f_from_slice(&freqs)
            .ctx("rope inv_freq")?
            .f_to_device(device)
            .ctx("rope inv_freq to device")
    }
}

/// `(cos, sin)` of shape `[batch, seq, dim]` in `kind` for `position_ids` `[batch, seq]`.
pub fn rope_tables(
    inv_freq: &Tensor,
    position_ids: &Tensor,
    kind: Kind,
) -> Result<(Tensor, Tensor)> {
    let pos = position_ids
        .f_to_kind(Kind::Float)
        .ctx("rope positions to fp32")?
        .f_unsqueeze(-1)
        .ctx("rope positions unsqueeze")?;
    let freqs = pos.f_mul(inv_freq).ctx("rope freqs")?;
    let emb = Tensor::f_cat(&[&freqs, &freqs], -1).ctx("rope cat")?;
    let cos = emb
        .f_cos()
        .ctx("rope cos")?
        .f_to_kind(kind)
        .ctx("rope cos kind")?;
    let sin = emb
        .f_sin()
        .ctx("rope sin")?
        .f_to_kind(kind)
        .ctx("rope sin kind")?;
    Ok((cos, sin))
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.size().last().copied().unwrap_or(0);
    let x1 = x.f_narrow(-1, 0, d / 2).ctx("rotate_half")?;
    let x2 = x.f_narrow(-1, d / 2, d - d / 2).ctx("rotate_half")?;
    Tensor::f_cat(&[&x2.f_neg().ctx("rotate_half neg")?, &x1], -1).ctx("rotate_half cat")
}

/// `x * cos + rotate_half(x) * sin` for `x` `[batch, heads, seq, dim]` and tables
/// `[batch, seq, dim]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let cos = cos.f_unsqueeze(1).ctx("rope cos unsqueeze")?;
    let sin = sin.f_unsqueeze(1).ctx("rope sin unsqueeze")?;
    x.f_mul(&cos)
        .ctx("rope x*cos")?
        .f_add(&rotate_half(x)?.f_mul(&sin).ctx("rope rot*sin")?)
        .ctx("rope add")
}
