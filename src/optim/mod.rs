//! Optimizers, parameter groups and gradient clipping.
//!
//! Two layers, as burn does it: [`Optimizer`] is the typed trait that is pleasant to implement
//! (with its own config type), [`DynOptimizer`] its object-safe twin that the trainer, the
//! registry and plugins hold as `Box<dyn DynOptimizer>`; every `Optimizer` is a `DynOptimizer`
//! through a blanket impl.
//!
//! Built-ins: [`AdamW`] (equal to `torch.optim.AdamW`), [`Muon`] (Newton-Schulz orthogonalized
//! momentum for matrices), [`Composite`] (several optimizers stepped as one), the
//! [`ReferenceGrouper`] (Muon for hidden matrices, AdamW for the rest) with [`build_optimizer`],
//! and [`clip_grad_norm`].

use std::collections::{BTreeMap, HashSet};

use tch::Tensor;

use crate::error::{Error, Result, TchResultExt};

pub mod adamw;
pub mod assemble;
pub mod clip;
pub mod composite;
pub mod group;
pub mod muon;

pub use adamw::{AdamW, AdamWConfig};
pub use assemble::{OptimizerChoice, assemble_optimizer, param_infos, trainable_parameters};
pub use clip::{clip_grad_norm, clip_grad_norm_tensors, grad_norm_clipped};
pub use composite::{Composite, OptimizerConfigs, build_optimizer, param_group};
pub use group::{ReferenceGrouper, ReferenceGrouperConfig, validate_groups};
pub use muon::{Muon, MuonConfig, MuonScale, NsMethod, NsPrecision};

/// A named parameter.
#[derive(Debug)]
pub struct NamedParam {
    /// Hugging Face name (`model.layers.0.mlp.up_proj.weight`); state keys start with it.
    pub name: String,
    /// The parameter itself, sharing the model's storage and `.grad()`.
    pub tensor: Tensor,
}

/// A group of parameters stepped with the same hyper-parameters.
#[derive(Debug)]
pub struct ParamGroup {
    /// Group name, for logs (`muon`, `adamw_embed`, ...).
    pub name: String,
    /// The parameters this group steps; each parameter is in exactly one group.
    pub params: Vec<NamedParam>,
    /// Current learning rate (the scheduler writes it each step: `base_lr * lr_mult * factor`).
    pub lr: f64,
    /// Multiplier on the base lr kept by the scheduler (2.0 for embeddings, 0.1 for the head).
    pub lr_mult: f64,
    /// Decoupled weight decay coefficient of this group (0: none; norms and biases usually).
    pub weight_decay: f64,
}

impl NamedParam {
    /// A named parameter sharing `tensor`'s storage (and its `.grad()`).
    pub fn new(name: impl Into<String>, tensor: &Tensor) -> Self {
        NamedParam {
            name: name.into(),
            tensor: tensor.shallow_clone(),
        }
    }
}

impl ParamGroup {
    /// A group with `lr = base_lr * lr_mult`.
    pub fn new(
        name: impl Into<String>,
        params: Vec<NamedParam>,
        base_lr: f64,
        lr_mult: f64,
        weight_decay: f64,
    ) -> Self {
        ParamGroup {
            name: name.into(),
            params,
            lr: base_lr * lr_mult,
            lr_mult,
            weight_decay,
        }
    }

    /// The same group over the same tensors (storage and grads are shared, not copied).
    pub fn shallow_clone(&self) -> ParamGroup {
        ParamGroup {
            name: self.name.clone(),
            params: self
                .params
                .iter()
                .map(|p| NamedParam::new(p.name.clone(), &p.tensor))
                .collect(),
            lr: self.lr,
            lr_mult: self.lr_mult,
            weight_decay: self.weight_decay,
        }
    }
}

/// Full optimizer state, for exact resume: tensors by name plus scalars by name.
#[derive(Debug, Default)]
pub struct StateDict {
    /// Per-parameter buffers (`<param>.exp_avg`, `<param>.momentum_buffer`), on the device.
    pub tensors: BTreeMap<String, Tensor>,
    /// Per-parameter numbers (`<param>.step`).
    pub scalars: BTreeMap<String, f64>,
}

/// The typed optimizer trait.
///
/// # State keys
///
/// [`Optimizer::state_dict`] names every entry `<param>.<what>`: the full name of the parameter
/// the entry belongs to ([`NamedParam::name`]), a dot, and a name for the entry without a dot
/// (`model.layers.0.mlp.up_proj.weight.exp_avg`, `lm_head.weight.step`). [`Composite`] relies on
/// it to hand each part of a composite optimizer its own entries on resume (everything before
/// the last dot must be one of the part's parameters), and refuses a part whose keys break it.
/// An optimizer that keeps a value for no single parameter stores it under each parameter it
/// applies to (AdamW's `step` is per parameter). [`Optimizer::load_state_dict`] gets back
/// exactly the entries its `state_dict` gave, as `examples/custom_optimizer.rs` shows.
pub trait Optimizer: Send + Sized + 'static {
    /// Hyper-parameters, deserialized from the YAML `optimizer` section.
    type Config: Clone + Default + serde::de::DeserializeOwned + serde::Serialize;
    /// Builds the optimizer over `groups`.
    fn new(groups: Vec<ParamGroup>, config: Self::Config) -> Result<Self>;
    /// Short name (`adamw`, `muon`).
    fn name(&self) -> &str;
    /// The parameter groups, in the order given to [`Optimizer::new`].
    fn groups(&self) -> &[ParamGroup];
    /// The groups for changing hyper-parameters between steps (the scheduler sets `lr`).
    fn groups_mut(&mut self) -> &mut [ParamGroup];
    /// One update from the current `.grad()` of every parameter (parameters without a grad are
    /// skipped).
    fn step(&mut self) -> Result<()>;
    /// The full state, for exact resume, keyed `<param>.<what>` (see the trait docs).
    fn state_dict(&self) -> Result<StateDict>;
    /// Takes back what [`Optimizer::state_dict`] gave.
    fn load_state_dict(&mut self, state: &StateDict) -> Result<()>;
}

/// Object-safe twin of [`Optimizer`].
pub trait DynOptimizer: Send {
    /// See [`Optimizer::name`].
    fn name(&self) -> &str;
    /// See [`Optimizer::groups`].
    fn groups(&self) -> &[ParamGroup];
    /// See [`Optimizer::groups_mut`].
    fn groups_mut(&mut self) -> &mut [ParamGroup];
    /// See [`Optimizer::step`].
    fn step(&mut self) -> Result<()>;
    /// Drops every parameter's grad (`zero_grad(set_to_none=True)`, PyTorch's default): the
    /// next backward hands its gradient over instead of adding it into a zeroed buffer, which
    /// saves a fill and an addition over every trainable parameter per step.
    fn zero_grad(&mut self) {
        for g in self.groups_mut() {
            for p in &mut g.params {
                if crate::fused::clear_grad(&p.tensor).is_err() {
                    p.tensor.zero_grad();
                }
            }
        }
    }
    /// See [`Optimizer::state_dict`] (keys `<param>.<what>`).
    fn state_dict(&self) -> Result<StateDict>;
    /// See [`Optimizer::load_state_dict`].
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
    /// The tensor's shape (`[out, in]` for a linear weight).
    pub shape: Vec<i64>,
    /// Embedding, LM head or other.
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
    /// Group name, for logs and the per-group lr of the metrics (`muon`, `adamw_embed`).
    pub name: String,
    /// Registered optimizer name (`muon`, `adamw`, a host's or plugin's), resolved through the
    /// registry by [`build_optimizer`].
    pub optimizer: String,
    /// Multiplier on the base learning rate (1.0: the base lr).
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

/// Checks what every optimizer needs of its groups: finite non-negative lr and weight decay,
/// floating-point parameters, and no parameter name twice.
pub(crate) fn check_groups(who: &str, groups: &[ParamGroup]) -> Result<()> {
    let mut seen = HashSet::new();
    for g in groups {
        if !(g.lr.is_finite() && g.lr >= 0.0) {
            return Err(Error::ParamGroups(format!(
                "{who}: group `{}` has lr {}; it must be finite and >= 0",
                g.name, g.lr
            )));
        }
        if !(g.weight_decay.is_finite() && g.weight_decay >= 0.0) {
            return Err(Error::ParamGroups(format!(
                "{who}: group `{}` has weight_decay {}; it must be finite and >= 0",
                g.name, g.weight_decay
            )));
        }
        for p in &g.params {
            if !seen.insert(p.name.as_str()) {
                return Err(Error::ParamGroups(format!(
                    "{who}: parameter `{}` appears twice (second time in group `{}`); every \
                     parameter must be in exactly one group",
                    p.name, g.name
                )));
            }
            if !p.tensor.defined() {
                return Err(Error::ParamGroups(format!(
                    "{who}: parameter `{}` is an undefined tensor",
                    p.name
                )));
            }
            let kind = p
                .tensor
                .f_kind()
                .ctx(format!("{who}: kind of `{}`", p.name))?;
            if !matches!(
                kind,
                tch::Kind::Half | tch::Kind::Float | tch::Kind::Double | tch::Kind::BFloat16
            ) {
                return Err(Error::ParamGroups(format!(
                    "{who}: parameter `{}` has kind {kind:?}; only floating-point parameters can \
                     be optimized",
                    p.name
                )));
            }
        }
    }
    Ok(())
}

/// A copy of `t` that does not share storage (for state dicts).
pub(crate) fn deep_copy(t: &Tensor) -> Result<Tensor> {
    let mut out = t.f_empty_like().ctx("copying optimizer state")?;
    out.f_copy_(t).ctx("copying optimizer state")?;
    Ok(out)
}

/// Copies `state.tensors[key]` into `dst`, checking presence and shape.
pub(crate) fn load_tensor(who: &str, state: &StateDict, key: &str, dst: &mut Tensor) -> Result<()> {
    let src = state.tensors.get(key).ok_or_else(|| Error::State {
        owner: who.to_string(),
        msg: format!(
            "missing tensor `{key}`; was the state saved by the same optimizer over the same \
                 parameters?"
        ),
    })?;
    if src.size() != dst.size() {
        return Err(Error::State {
            owner: who.to_string(),
            msg: format!(
                "`{key}` has shape {:?}, the optimizer expects {:?}",
                src.size(),
                dst.size()
            ),
        });
    }
    dst.f_copy_(src)
        .ctx(format!("{who} state: loading `{key}`"))
}

/// Errors on entries of `state` not in `expected` (state of another optimizer or model).
pub(crate) fn check_no_extra(
    who: &str,
    state: &StateDict,
    expected: &HashSet<String>,
) -> Result<()> {
    let extra: Vec<&String> = state
        .tensors
        .keys()
        .chain(state.scalars.keys())
        .filter(|k| !expected.contains(*k))
        .collect();
    if extra.is_empty() {
        Ok(())
    } else {
        Err(Error::State {
            owner: who.to_string(),
            msg: format!(
                "{} entries that this optimizer does not hold: {:?}",
                extra.len(),
                extra
            ),
        })
    }
}
