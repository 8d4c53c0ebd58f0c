//! Optimizers, parameter groups and gradient clipping.
//!
//! Two layers, as burn does it: [`Optimizer`] is the typed trait that is pleasant to implement
//! (with its own config type), [`DynOptimizer`] its object-safe twin that the trainer, the
//! registry and plugins hold as `Box<dyn DynOptimizer>`; every `Optimizer` is a `DynOptimizer`
//! through a blanket impl.

use std::collections::BTreeMap;

use tch::Tensor;

use crate::error::Result;

/// A named parameter.
#[derive(Debug)]
pub struct NamedParam {
    pub name: String,
    pub tensor: Tensor,
}

/// A group of parameters stepped with the same hyper-parameters.
#[derive(Debug)]
pub struct ParamGroup {
    /// Group name, for logs (`muon`, `adamw_embed`, ...).
    pub name: String,
    pub params: Vec<NamedParam>,
    /// Current learning rate (the scheduler writes it each step: `base_lr * lr_mult * factor`).
    pub lr: f64,
    /// Multiplier on the base lr kept by the scheduler (2.0 for embeddings, 0.1 for the head).
    pub lr_mult: f64,
    pub weight_decay: f64,
}

/// Full optimizer state, for exact resume: tensors by name plus scalars by name.
#[derive(Debug, Default)]
pub struct StateDict {
    pub tensors: BTreeMap<String, Tensor>,
    pub scalars: BTreeMap<String, f64>,
}

/// The typed optimizer trait.
pub trait Optimizer: Send + Sized + 'static {
    /// Hyper-parameters, deserialized from the YAML `optimizer` section.
    type Config: Clone + Default + serde::de::DeserializeOwned + serde::Serialize;
    /// Builds the optimizer over `groups`.
    fn new(groups: Vec<ParamGroup>, config: Self::Config) -> Result<Self>;
    /// Short name (`adamw`, `muon`).
    fn name(&self) -> &str;
    fn groups(&self) -> &[ParamGroup];
    fn groups_mut(&mut self) -> &mut [ParamGroup];
    /// One update from the current `.grad()` of every parameter (parameters without a grad are
    /// skipped).
    fn step(&mut self) -> Result<()>;
    fn state_dict(&self) -> Result<StateDict>;
    fn load_state_dict(&mut self, state: &StateDict) -> Result<()>;
}

/// Object-safe twin of [`Optimizer`].
pub trait DynOptimizer: Send {
    fn name(&self) -> &str;
    fn groups(&self) -> &[ParamGroup];
    fn groups_mut(&mut self) -> &mut [ParamGroup];
    fn step(&mut self) -> Result<()>;
    /// Sets every parameter's grad to zero (drops it).
    fn zero_grad(&mut self) {
        for g in self.groups_mut() {
            for p in &mut g.params {
                p.tensor.zero_grad();
            }
        }
    }
    fn state_dict(&self) -> Result<StateDict>;
    fn load_state_dict(&mut self, state: &StateDict) -> Result<()>;
}

impl<T: Optimizer> DynOptimizer for T {
    fn name(&self) -> &str {
        Optimizer::name(self)
    }
    fn groups(&self) -> &[ParamGroup] {
        Optimizer::groups(self)
    }
    fn groups_mut(&mut self) -> &mut [ParamGroup] {
        Optimizer::groups_mut(self)
    }
    fn step(&mut self) -> Result<()> {
        Optimizer::step(self)
    }
    fn state_dict(&self) -> Result<StateDict> {
        Optimizer::state_dict(self)
    }
    fn load_state_dict(&mut self, state: &StateDict) -> Result<()> {
        Optimizer::load_state_dict(self, state)
    }
}

/// What a [`ParamGrouper`] knows of a trainable parameter.
#[derive(Debug, Clone)]
pub struct ParamInfo {
    /// Hugging Face name (`model.layers.0.mlp.up_proj.weight`, `...lora_A.weight`).
    pub name: String,
    pub shape: Vec<i64>,
    pub role: ParamRole,
}

/// Where a parameter sits in the model, as far as grouping cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamRole {
    /// Token embedding (also the LM head when tied).
    Embedding,
    /// Untied LM head / unembedding.
    LmHead,
    /// Everything else (matrices, norms, biases, adapters).
    Other,
}

/// One group as a grouper decides it: which optimizer, lr multiplier and weight decay.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupSpec {
    pub name: String,
    /// Registered optimizer name (`muon`, `adamw`).
    pub optimizer: String,
    pub lr_mult: f64,
    /// `None` means the optimizer's configured weight decay.
    pub weight_decay: Option<f64>,
    /// Parameter names in this group.
    pub params: Vec<String>,
}

/// Assigns every trainable parameter to exactly one group.
pub trait ParamGrouper: Send + Sync + std::fmt::Debug {
    /// Short name (`reference`, ...).
    fn name(&self) -> &str;
    /// The groups for `params`. A parameter in no group or in two groups is an error naming it.
    fn group(&self, params: &[ParamInfo]) -> Result<Vec<GroupSpec>>;
}
