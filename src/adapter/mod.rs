//! Trainable adapters on a frozen base model.

use crate::error::Result;
use crate::model::CausalLm;

/// Wraps the matching linear modules of a model with adapters and returns the new trainable
/// parameters (full names). The base weights are left frozen.
pub trait AdapterInjector: Send + Sync + std::fmt::Debug {
    /// Short name (`lora`).
    fn name(&self) -> &str;
    /// Injects into `model`; errors if nothing matches.
    fn inject(&self, model: &mut dyn CausalLm) -> Result<Vec<(String, tch::Tensor)>>;
}
