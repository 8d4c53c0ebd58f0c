//! The linear layer every architecture uses for its projections.
//!
//! A [`Linear`] holds its weight either dense or quantized ([`LinearWeight`]), an optional bias,
//! and an optional trainable [`LinearAdapter`] (LoRA). Quantizers swap the weight, adapter
//! injectors set the adapter; the architectures only call [`Linear::forward`].

use std::fmt;

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TchResultExt};
use crate::quant::QuantizedTensor;

/// The weight of a linear layer, `[out_features, in_features]` as in PyTorch.
pub enum LinearWeight {
    /// A plain tensor (trainable or frozen, as its `requires_grad` says).
    Dense(Tensor),
    /// A frozen weight stored in a packed, quantized format.
    Quantized(Box<dyn QuantizedTensor>),
}

impl fmt::Debug for LinearWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinearWeight::Dense(t) => write!(f, "Dense({:?}, {:?})", t.size(), t.kind()),
            LinearWeight::Quantized(q) => write!(f, "Quantized({}, {:?})", q.format(), q.shape()),
        }
    }
}

/// A trainable addition to a linear layer's output (LoRA and friends).
pub trait LinearAdapter: Send + fmt::Debug {
    /// Returns `base_out + delta(x)`; `train` enables dropout.
    fn forward(&self, x: &Tensor, base_out: Tensor, train: bool) -> Result<Tensor>;
    /// The adapter's parameters with names relative to the layer (`lora_A.weight`, ...).
    fn named_parameters(&self) -> Vec<(String, Tensor)>;
    /// The dense `[out, in]` weight delta this adapter adds (for merging).
    fn delta_weight(&self) -> Result<Tensor>;
    /// Downcasting support for format-specific savers.
    fn as_any(&self) -> &dyn std::any::Any;
    /// The adapter as a plain low-rank update `delta(x) = x A^T B^T * scaling` for this call,
    /// when it is one (no dropout to draw with `train`): lets [`Linear::forward`] fuse it into
    /// the base product's output. `None` (the default) always goes through
    /// [`LinearAdapter::forward`].
    fn low_rank(&self, _train: bool) -> Option<LowRank<'_>> {
        None
    }
}

/// A low-rank update `x A^T B^T * scaling`, see [`LinearAdapter::low_rank`].
#[derive(Debug, Clone, Copy)]
pub struct LowRank<'a> {
    /// `[r, in]`.
    pub a: &'a Tensor,
    /// `[out, r]`.
    pub b: &'a Tensor,
    /// Factor on the update (`alpha / r` for LoRA).
    pub scaling: f64,
}

impl LowRank<'_> {
    /// `A * scaling`, `[r, in]` (the scaling is folded into the small factor, so the update
    /// costs no pass over the `[tokens, out]` output; equal up to fp32 rounding, exactly for a
    /// power-of-two scaling).
    fn scaled_a(&self) -> Result<Tensor> {
        self.a.f_mul_scalar(self.scaling).ctx("lora scaling")
    }

    /// Whether the fused products apply to input `x`: CPU with autocast off (the in-place
    /// accumulation is not an autocast op), and factors of the input's kind (otherwise the
    /// adapter's own casting forward runs, as PEFT's does).
    fn fits(&self, x: &Tensor) -> bool {
        x.device() == Device::Cpu
            && self.a.kind() == x.kind()
            && self.b.kind() == x.kind()
            && !crate::amp::autocast_active(Device::Cpu)
    }
}

/// `y = x W^T + b (+ adapter(x))`.
#[derive(Debug)]
pub struct Linear {
    /// `W`, `[out, in]`: dense, or quantized (then frozen).
    pub weight: LinearWeight,
    /// `b`, `[out]`, if the layer has one.
    pub bias: Option<Tensor>,
    /// A trainable update added to the output (LoRA), if one was injected.
    pub adapter: Option<Box<dyn LinearAdapter>>,
    /// True once an adapter's delta was added into a dense weight (see [`Linear::merge`]).
    pub merged: bool,
}

impl Linear {
    /// A dense layer from its weight `[out, in]` and optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight: LinearWeight::Dense(weight),
            bias,
            adapter: None,
            merged: false,
        }
    }

    /// `(out_features, in_features)`.
    pub fn shape(&self) -> (i64, i64) {
        match &self.weight {
            LinearWeight::Dense(w) => {
                let s = w.size();
                (s[0], s[1])
            }
            LinearWeight::Quantized(q) => q.shape(),
        }
    }

    /// The forward pass. `x` has shape `[..., in_features]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if let (Some(a), false, LinearWeight::Dense(w)) = (&self.adapter, self.merged, &self.weight)
            && let Some(lr) = a.low_rank(train)
            && lr.fits(x)
        {
            // base + (x (s A)^T) B^T as one accumulating product: no separate pass for the
            // scaling and the sum over the output
            let (x2, lead) = flatten(x)?;
            let mut y = x2.f_linear(w, self.bias.as_ref()).ctx("linear forward")?;
            let _ = y
                .f_addmm_(
                    &x2.f_linear::<&Tensor>(&lr.scaled_a()?, None)
                        .ctx("lora_A")?,
                    &lr.b.f_tr().ctx("lora_B")?,
                )
                .ctx("lora_B")?;
            return unflatten(y, &lead);
        }
        let base = match &self.weight {
            LinearWeight::Dense(w) => x.f_linear(w, self.bias.as_ref()).ctx("linear forward")?,
            LinearWeight::Quantized(q) => {
                let y = q.linear(x)?;
                match &self.bias {
                    Some(b) => y.f_add(b).ctx("linear bias")?,
                    None => y,
                }
            }
        };
        match (&self.adapter, self.merged) {
            (Some(a), false) => a.forward(x, base, train),
            _ => Ok(base),
        }
    }

    /// The weight as a dense tensor of `kind` (dequantized if needed), without adapter.
    pub fn dense_weight(&self, kind: Kind) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => w.f_to_kind(kind).ctx("linear weight to kind"),
            LinearWeight::Quantized(q) => q.dequantize(kind),
        }
    }

    /// Adds the adapter's delta into a dense weight (inference speed-up, or export).
    pub fn merge(&mut self) -> Result<()> {
        self.apply_delta(1.0, true)
    }

    /// Subtracts a merged adapter's delta again.
    pub fn unmerge(&mut self) -> Result<()> {
        self.apply_delta(-1.0, false)
    }

    fn apply_delta(&mut self, sign: f64, merged_after: bool) -> Result<()> {
        if self.merged == merged_after {
            return Ok(());
        }
        let Some(adapter) = &self.adapter else {
            return Ok(());
        };
        let LinearWeight::Dense(w) = &mut self.weight else {
            return Err(crate::Error::Unsupported {
                what: "merging an adapter into a quantized weight".into(),
                msg: "cannot merge an adapter into a quantized weight; dequantize the base first"
                    .into(),
            });
        };
        let _g = tch::no_grad_guard();
        let delta = adapter
            .delta_weight()?
            .f_to_kind(w.kind())
            .ctx("merge delta")?;
        let _ = w.f_add_(&(delta * sign)).ctx("merge adapter")?;
        self.merged = merged_after;
        Ok(())
    }

    /// Named parameters of the layer relative to it: `weight` (when dense), `bias`, and the
    /// adapter's (`lora_A.weight`, ...).
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        if let LinearWeight::Dense(w) = &self.weight {
            out.push(("weight".to_string(), w.shallow_clone()));
        }
        if let Some(b) = &self.bias {
            out.push(("bias".to_string(), b.shallow_clone()));
        }
        if let Some(a) = &self.adapter {
            out.extend(a.named_parameters());
        }
        out
    }
}

/// `x` as `[rows, in]` and the leading dimensions to restore.
fn flatten(x: &Tensor) -> Result<(Tensor, Vec<i64>)> {
    let size = x.size();
    let Some((&inp, lead)) = size.split_last() else {
        return Err(crate::Error::Shape {
            op: "linear".into(),
            msg: "input is a scalar".into(),
        });
    };
    Ok((x.f_reshape([-1, inp]).ctx("linear flatten")?, lead.to_vec()))
}

fn unflatten(y: Tensor, lead: &[i64]) -> Result<Tensor> {
    let mut shape = lead.to_vec();
    shape.push(y.size()[1]);
    y.f_reshape(shape.as_slice()).ctx("linear unflatten")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_forward_matches_matmul() {
        let w = Tensor::from_slice(&[1f32, 2., 3., 4., 5., 6.]).view([2, 3]);
        let b = Tensor::from_slice(&[0.5f32, -1.0]);
        let x = Tensor::from_slice(&[1f32, 0., -1.]).view([1, 3]);
        let lin = Linear::new(w, Some(b));
        let y = lin.forward(&x, false).unwrap();
        // [1-3+0.5, 4-6-1] = [-1.5, -3]
        let got: Vec<f32> = y.view([-1]).try_into().unwrap();
        assert_eq!(got, vec![-1.5, -3.0]);
        assert_eq!(lin.shape(), (2, 3));
    }
}
