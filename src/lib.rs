//! # VoltTrain
//!
//! An embeddable LLM-training SDK on libtorch (through [`tch`]).
//!
//! The core defines the extension traits and their built-ins:
//!
//! | trait | module | built-ins |
//! |---|---|---|
//! | [`optim::Optimizer`] | [`optim`] | AdamW, Muon, composite |
//! | [`optim::ParamGrouper`] | [`optim`] | the reference grouping (Muon for matrices, AdamW for the rest) |
//! | [`sched::Scheduler`] | [`sched`] | warmup + cosine, constant, linear, WSD |
//! | [`quant::Quantizer`] | [`quant`] | NF4, FP4, int8, FP8 |
//! | [`adapter::AdapterInjector`] | [`adapter`] | LoRA (PEFT format) |
//!
//! Models implement [`model::CausalLm`]; their linear layers are [`nn::Linear`], which can hold a
//! dense or quantized frozen weight plus an optional trainable adapter.

#![warn(missing_docs)]

pub mod adapter;
pub mod amp;
pub mod callback;
pub mod config;
pub mod data;
pub mod dist;
pub mod dpo;
pub mod env_report;
pub mod error;
pub mod export;
mod ffi;
pub mod fused;
pub mod generate;
mod malloc;
pub mod model;
pub mod nn;
pub mod optim;
pub mod plugin;
pub mod quant;
pub mod run;
pub mod sched;
pub mod sft;
pub mod trainer;

pub use error::{Error, Result};

/// The libtorch version this build of VoltTrain is made for (tch 0.24).
pub const LIBTORCH_VERSION: &str = "2.11.0";

/// The most used items in one import.
pub mod prelude {
    pub use crate::error::{Error, Result, TchResultExt};
    pub use crate::model::CausalLm;
    pub use crate::nn::Linear;
}
