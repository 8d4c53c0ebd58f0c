//! Trainable adapters on a frozen base model: the [`AdapterInjector`] extension point, LoRA
//! ([`lora`]), target presets ([`presets`]), the PEFT file format ([`peft`]) and the generic
//! adapter state file ([`state`]).

use std::path::Path;

use crate::error::Result;
use crate::model::CausalLm;

mod init_from;
pub mod lora;
pub mod peft;
pub mod presets;
pub mod state;

pub use init_from::inject_lora;
pub use lora::{
    AdaptersDisabled, LoraAdapter, LoraConfig, LoraInjector, Targets, merge_adapters,
    set_adapters_enabled, unmerge_adapters,
};
pub use peft::{load_peft_adapter, load_peft_adapter_as, read_peft_config, save_peft_adapter};
pub use presets::{PRESETS, get_targets, module_targets};
pub use state::{ADAPTER_STATE_FILE, load_adapter_state, save_adapter_state};

/// Wraps the matching linear modules of a model with adapters and returns the new trainable
/// parameters (full names). The base weights are left frozen. An injector also saves and loads
/// the state of the adapters it injects, so that every adapter, built-in or plugin, goes through
/// one path for the epoch saver ([`crate::callback::SftSaver`]), `lora.init_from` and
/// evaluation of a saved adapter.
///
/// # The save/load contract
///
/// - [`save`](AdapterInjector::save) writes the adapter state of a model this injector injected
///   into `dir` (created when missing), and nothing else: the caller adds tokenizer and config
///   files beside it. Every file is written atomically (a temporary file renamed into place),
///   so a crash leaves the previous file or the new one, never a torn one. LoRA writes PEFT's
///   `adapter_config.json` and `adapter_model.safetensors`; the default writes
///   [`ADAPTER_STATE_FILE`] ([`save_adapter_state`]).
/// - [`load`](AdapterInjector::load) injects into a model without this adapter and fills the
///   new parameters from what `save` wrote in `dir`. Every parameter the adapter needs must be
///   in the files and every saved tensor must be used; the returned parameters are trainable.
///   Afterwards `self` describes the loaded adapter (LoRA takes its rank, alpha and targets from
///   `dir`), so a later `save` writes it back in the same shape.
/// - Errors name the file, and the tensor or key, that is missing, unexpected or malformed.
///
/// The defaults keep every trainable parameter of the model under its full name in
/// [`ADAPTER_STATE_FILE`], so a plugin adapter whose [`inject`](AdapterInjector::inject)
/// returns its parameters needs no code to be saved and loaded; override both methods together
/// for a format of your own.
pub trait AdapterInjector: Send + Sync + std::fmt::Debug {
    /// Short name (`lora`).
    fn name(&self) -> &str;
    /// Injects into `model`; errors if nothing matches.
    fn inject(&self, model: &mut dyn CausalLm) -> Result<Vec<(String, tch::Tensor)>>;
    /// Writes the adapter state of `model` into `dir` (see the contract above).
    fn save(&self, model: &dyn CausalLm, dir: &Path) -> Result<()> {
        save_adapter_state(self.name(), model, dir)
    }
    /// Injects into `model` and loads the state saved in `dir`; returns the trainable
    /// parameters (see the contract above).
    fn load(&mut self, model: &mut dyn CausalLm, dir: &Path) -> Result<Vec<(String, tch::Tensor)>> {
        let params = self.inject(model)?;
        load_adapter_state(self.name(), &params, dir)?;
        Ok(params)
    }
}
