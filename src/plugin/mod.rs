//! Plugins: a registry of named component factories, filled statically and by dylibs.
//!
//! Every extension point ([`Optimizer`](crate::optim::Optimizer),
//! [`ParamGrouper`](crate::optim::ParamGrouper), [`Scheduler`](crate::sched::Scheduler),
//! [`Quantizer`](crate::quant::Quantizer), [`AdapterInjector`](crate::adapter::AdapterInjector),
//! [`Callback`](crate::callback::Callback)) has named factories that build a component from its
//! YAML section (`optimizer: { name: lion, beta1: 0.9 }`). Built-ins, host crates and dylib
//! plugins register the same way, and [`list`] / [`format_list`] say where each came from.
//!
//! # Static registration
//!
//! In VoltTrain or in a host application, at item level:
//!
//! ```
//! use volttrain::optim::{DynOptimizer, ParamGroup};
//!
//! fn build_sgd(
//!     groups: Vec<ParamGroup>,
//!     cfg: &serde_yaml::Value,
//! ) -> volttrain::Result<Box<dyn DynOptimizer>> {
//!     # let _ = (groups, cfg);
//!     # Err(volttrain::Error::invalid("doc example"))
//!     // parse cfg with volttrain::plugin::parse_config, build the optimizer
//! }
//! volttrain::register_optimizer!("doc_sgd", build_sgd);
//!
//! let known = volttrain::plugin::names(volttrain::plugin::ComponentKind::Optimizer);
//! assert!(known.contains(&"doc_sgd".to_string()));
//! ```
//!
//! Registrations are const descriptors collected with `inventory`; the table is sorted and
//! does not depend on registration order. A name registered twice is an error naming both
//! origins ([`check_registry`], and any build of that name).
//!
//! # Dylib plugins
//!
//! A plugin is a crate with `crate-type = ["cdylib"]` that depends on `volttrain` and declares
//! itself once:
//!
//! ```
//! use volttrain::plugin::PluginRegistrar;
//!
//! fn register(r: &mut PluginRegistrar) -> volttrain::Result<()> {
//!     // r.register_optimizer("lion", volttrain::plugin::optimizer_factory::<Lion>);
//!     # let _ = r;
//!     Ok(())
//! }
//! volttrain::declare_plugin!(register);
//! ```
//!
//! `plugins/lion`, `plugins/loss-spike` and `plugins/inverse-sqrt` are complete examples.
//!
//! The host loads it with [`load_plugin`] (or the YAML `plugins: [path/to/libmy_plugin.so]`).
//! The loader checks the declaration's ABI version, then its rustc, VoltTrain and libtorch
//! versions, before calling anything else in the library; a mismatch is an error naming both
//! versions and what to rebuild. A library without the entry point is rejected with its path,
//! and a register function that fails or panics is an error: the panic is caught inside the
//! plugin and never unwinds into the host. Libraries are never unloaded.
//!
//! **The rule.** Rust values cross the boundary: `tch::Tensor`, `serde_yaml::Value`,
//! `Box<dyn DynOptimizer>`, [`Error`](crate::Error). That is sound only when the host and the
//! plugin use the same rustc, the same VoltTrain (and so the same `tch`, `serde_yaml`,
//! ...) and the same libtorch, with the default global allocator on both sides. The declaration
//! check enforces the versions it can see; build plugins in the host's workspace (same
//! `Cargo.lock`), and do not set a `#[global_allocator]` in a plugin.
//!
//! **Panics.** A panic may not unwind from a plugin's copy of `std` into the host's (it aborts).
//! The register function, every factory and every fallible method of a built component
//! (`step`, `state_dict`, callback hooks, `quantize`, `dequantize`, `inject`, `group`, and the
//! `save` / `load` of adapters and quantized formats) run
//! behind guards made on the plugin's side, so a panic there comes back as an
//! [`Error::Plugin`](crate::Error) naming the component and the method. Methods that cannot
//! return an error (`Scheduler::factor`, `name`, `shape`, ...) must not panic.

mod builtins;
#[cfg(test)]
mod declaration_fuzz;
mod dylib;
mod guard;
mod registry;

pub use dylib::{
    DECLARATION_SYMBOL, PLUGIN_ABI_VERSION, PluginDeclaration, PluginInfo, PluginRegistrar,
    RUSTC_VERSION, RegisterFn, VOLTTRAIN_VERSION, load_plugin, load_plugins, loaded_plugins,
};
pub use registry::{
    AdapterFactory, CallbackCtx, CallbackFactory, ComponentDescriptor, ComponentKind, Factory,
    GrouperFactory, OptimizerFactory, Origin, QuantizerFactory, RegistryEntry, SchedulerCtx,
    SchedulerFactory, build_adapter, build_callback, build_grouper, build_optimizer,
    build_quantizer, build_scheduler, check_registry, format_list, list, names, optimizer_factory,
    parse_config,
};

/// Used by the macros; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use super::dylib::run_register;
    pub use inventory;
}
