//! Trainable adapters on a frozen base model: LoRA ([`lora`]), target presets ([`presets`]) and
//! the PEFT file format ([`peft`]).

use crate::error::Result;
use crate::model::CausalLm;

mod init_from;
pub mod lora;
pub mod peft;
pub mod presets;

pub use init_from::inject_lora;
pub use lora::{
    AdaptersDisabled, LoraAdapter, LoraConfig, LoraInjector, Targets, merge_adapters,
    set_adapters_enabled, unmerge_adapters,
};
pub use peft::{load_peft_adapter, load_peft_adapter_as, read_peft_config, save_peft_adapter};
pub use presets::{PRESETS, get_targets, module_targets};

/// Wraps the matching linear modules of a model with adapters and returns the new trainable
/// parameters (full names). The base weights are left frozen.
pub trait AdapterInjector: Send + Sync + std::fmt::Debug {
    /// Short name (`lora`).
    fn name(&self) -> &str;
    /// Injects into `model`; errors if nothing matches.
    fn inject(&self, model: &mut dyn CausalLm) -> Result<Vec<(String, tch::Tensor)>>;
}
