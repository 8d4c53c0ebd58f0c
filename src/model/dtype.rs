//! `model.dtype`: the kind the frozen base is held in.
//!
//! The checkpoint's tensors are converted one by one while loading (each straight from the
//! mapped file into a new tensor of the target kind, see [`crate::model::load_model`]), so the
//! load never holds the model in another kind. Trainable weights stay fp32 whatever this says:
//! LoRA factors are made in fp32, `modules_to_save` are converted to fp32 when they become
//! trainable, and full fine-tuning keeps an fp32 model (its master weights).

use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

use crate::amp::Precision;
use crate::error::{Error, Result};

/// `model.dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelDtype {
    /// The autocast kind of `training.precision` on a CUDA device (bf16 where the GPU has it)
    /// when the base is frozen (LoRA, QLoRA); fp32 on the CPU and for full fine-tuning.
    #[default]
    Auto,
    /// 32-bit floats.
    Fp32,
    /// bfloat16.
    Bf16,
    /// 16-bit floats (IEEE half).
    Fp16,
}

impl ModelDtype {
    /// The kind to load the base in. `frozen`: the base is frozen (an adapter is trained).
    /// A half kind needs autocast (`training.precision: bf16 | fp16`: products of fp32
    /// activations with half weights have no kind otherwise) and a frozen base.
    pub fn resolve(self, precision: Precision, device: Device, frozen: bool) -> Result<Kind> {
        let amp = precision.autocast_kind(device);
        let kind = match self {
            ModelDtype::Auto => {
                return Ok(match amp {
                    Some(k) if frozen && device.is_cuda() => k,
                    _ => Kind::Float,
                });
            }
            ModelDtype::Fp32 => return Ok(Kind::Float),
            ModelDtype::Bf16 => Kind::BFloat16,
            ModelDtype::Fp16 => Kind::Half,
        };
        if !frozen {
            return Err(Error::config(
                "model.dtype",
                format!(
                    "{kind:?} holds a frozen base; full fine-tuning keeps fp32 master weights. \
                     Use `model.dtype: fp32` (or auto), or enable `lora`"
                ),
            ));
        }
        if amp.is_none() {
            return Err(Error::config(
                "model.dtype",
                format!(
                    "a {kind:?} base needs autocast: set `training.precision: bf16` or `fp16` \
                     (it resolves to fp32 here), or use `model.dtype: fp32`"
                ),
            ));
        }
        Ok(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_rules() {
        let cpu = Device::Cpu;
        assert_eq!(
            ModelDtype::Auto
                .resolve(Precision::Auto, cpu, true)
                .unwrap(),
            Kind::Float
        );
        // auto follows autocast only on CUDA
        assert_eq!(
            ModelDtype::Auto
                .resolve(Precision::Bf16, cpu, true)
                .unwrap(),
            Kind::Float
        );
        assert_eq!(
            ModelDtype::Bf16
                .resolve(Precision::Bf16, cpu, true)
                .unwrap(),
            Kind::BFloat16
        );
        assert_eq!(
            ModelDtype::Fp16
                .resolve(Precision::Fp16, cpu, true)
                .unwrap(),
            Kind::Half
        );
        let e = ModelDtype::Bf16
            .resolve(Precision::Fp32, cpu, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.dtype") && e.contains("precision"), "{e}");
        let e = ModelDtype::Bf16
            .resolve(Precision::Bf16, cpu, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("full fine-tuning"), "{e}");
        assert_eq!(
            ModelDtype::Fp32
                .resolve(Precision::Bf16, cpu, false)
                .unwrap(),
            Kind::Float
        );
    }
}
