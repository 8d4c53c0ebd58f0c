//! Several optimizers stepped as one, and [`build_optimizer`] that makes one from group specs.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{
    AdamW, AdamWConfig, DynOptimizer, GroupSpec, Muon, MuonConfig, NamedParam, Optimizer,
    ParamGroup, StateDict,
};
use crate::error::{Error, Result};

/// Optimizers stepped as one (Muon for matrices, AdamW for the rest).
///
/// The composite holds its own view of every part's groups, in part order, so that
/// [`DynOptimizer::groups_mut`] (what a scheduler writes) covers all of them; before each step it
/// copies each group's `lr`, `lr_mult` and `weight_decay` to the part that owns the group.
/// Parameter tensors are shared, not copied.
pub struct Composite {
    name: String,
    parts: Vec<Box<dyn DynOptimizer>>,
    /// Concatenation of the parts' groups (shallow clones).
    groups: Vec<ParamGroup>,
    /// For each part, its first group's index in `groups`.
    offsets: Vec<usize>,
    /// Parameter name to part index.
    owner: HashMap<String, usize>,
}

impl std::fmt::Debug for Composite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Composite")
            .field("name", &self.name)
            .field("groups", &self.groups)
            .finish_non_exhaustive()
    }
}

impl Composite {
    /// Steps `parts` as one. A parameter held by two parts is an error naming it.
    pub fn new(parts: Vec<Box<dyn DynOptimizer>>) -> Result<Self> {
        if parts.is_empty() {
            return Err(Error::invalid("composite optimizer: no parts given"));
        }
        let mut groups = Vec::new();
        let mut offsets = Vec::with_capacity(parts.len());
        let mut owner = HashMap::new();
        for (i, part) in parts.iter().enumerate() {
            offsets.push(groups.len());
            for g in part.groups() {
                for p in &g.params {
                    if let Some(prev) = owner.insert(p.name.clone(), i) {
                        return Err(Error::ParamGroups(format!(
                            "composite optimizer: parameter `{}` is held by both `{}` and `{}`; \
                             every parameter must be in exactly one group",
                            p.name,
                            parts[prev].name(),
                            part.name()
                        )));
                    }
                }
                groups.push(g.shallow_clone());
            }
        }
        let name = format!(
            "composite({})",
            parts.iter().map(|p| p.name()).collect::<Vec<_>>().join("+")
        );
        Ok(Composite {
            name,
            parts,
            groups,
            offsets,
            owner,
        })
    }

    /// The optimizers inside.
    pub fn parts(&self) -> &[Box<dyn DynOptimizer>] {
        &self.parts
    }

    fn sync_hyper(&mut self) {
        for (i, part) in self.parts.iter_mut().enumerate() {
            let off = self.offsets[i];
            for (k, g) in part.groups_mut().iter_mut().enumerate() {
                let src = &self.groups[off + k];
                g.lr = src.lr;
                g.lr_mult = src.lr_mult;
                g.weight_decay = src.weight_decay;
            }
        }
    }

    /// Checks that part `i`'s state key follows the `<param>.<what>` rule of [`Optimizer`]
    /// (everything before the last dot is one of the part's own parameters).
    fn check_key(&self, i: usize, key: &str) -> Result<()> {
        let param = key.rsplit_once('.').map(|(p, _)| p);
        if param.is_some_and(|p| self.owner.get(p) == Some(&i)) {
            return Ok(());
        }
        let part = self.parts[i].name();
        let why = match param {
            None => "it has no `.<what>` after a parameter name".to_string(),
            Some(p) => match self.owner.get(p) {
                Some(&o) => format!(
                    "`{p}` is a parameter of `{}`, not of `{part}`",
                    self.parts[o].name()
                ),
                None => format!("`{p}` is none of its parameters"),
            },
        };
        Err(Error::State {
            owner: self.name.clone(),
            msg: format!(
                "optimizer `{part}` gave the state key `{key}`, and {why}; inside a composite \
                 optimizer every state key must be `<param>.<what>`, the name of one of the \
                 part's own parameters, a dot and a name without a dot (see the `Optimizer` \
                 trait docs)"
            ),
        })
    }

    /// Splits `state` by the part that owns each entry's parameter (`<param>.<what>`).
    fn split_state(&self, state: &StateDict) -> Result<Vec<StateDict>> {
        let mut out: Vec<StateDict> = (0..self.parts.len())
            .map(|_| StateDict::default())
            .collect();
        let find = |key: &str| -> Result<usize> {
            // the parameter name is everything before the last '.'
            key.rsplit_once('.')
                .and_then(|(p, _)| self.owner.get(p).copied())
                .ok_or_else(|| Error::State {
                    owner: self.name.clone(),
                    msg: format!("`{key}` belongs to no parameter of this optimizer"),
                })
        };
        for (k, t) in &state.tensors {
            out[find(k)?].tensors.insert(k.clone(), t.shallow_clone());
        }
        for (k, v) in &state.scalars {
            out[find(k)?].scalars.insert(k.clone(), *v);
        }
        Ok(out)
    }
}

impl DynOptimizer for Composite {
    fn name(&self) -> &str {
        &self.name
    }

    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    fn groups_mut(&mut self) -> &mut [ParamGroup] {
        &mut self.groups
    }

    fn step(&mut self) -> Result<()> {
        self.sync_hyper();
        for part in &mut self.parts {
            part.step()?;
        }
        Ok(())
    }

    /// The parts' states together. A part's key that breaks the `<param>.<what>` rule is an
    /// error naming the part and the key: on resume it could not be handed back.
    fn state_dict(&self) -> Result<StateDict> {
        let mut out = StateDict::default();
        for (i, part) in self.parts.iter().enumerate() {
            let s = part.state_dict()?;
            for k in s.tensors.keys().chain(s.scalars.keys()) {
                self.check_key(i, k)?;
            }
            out.tensors.extend(s.tensors);
            out.scalars.extend(s.scalars);
        }
        Ok(out)
    }

    fn load_state_dict(&mut self, state: &StateDict) -> Result<()> {
        let split = self.split_state(state)?;
        for (part, s) in self.parts.iter_mut().zip(&split) {
            part.load_state_dict(s)?;
        }
        Ok(())
    }
}

/// Configurations of the built-in optimizers, as the YAML `optimizer` section holds them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfigs {
    /// Hyper-parameters of the AdamW groups (`optimizer.adamw`).
    pub adamw: AdamWConfig,
    /// Hyper-parameters of the Muon groups (`optimizer.muon`).
    pub muon: MuonConfig,
}

/// The [`ParamGroup`] a grouper's `spec` describes: its parameters looked up in `by_name`, lr
/// `base_lr` (the scheduler applies `lr_mult`), and the spec's weight decay or `default_wd`.
pub fn param_group(
    spec: GroupSpec,
    by_name: &HashMap<&str, &Tensor>,
    base_lr: f64,
    default_wd: f64,
) -> Result<ParamGroup> {
    let members = spec
        .params
        .iter()
        .map(|n| {
            by_name
                .get(n.as_str())
                .map(|t| NamedParam::new(n.clone(), t))
                .ok_or_else(|| {
                    Error::ParamGroups(format!("group `{}`: unknown parameter `{n}`", spec.name))
                })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ParamGroup::new(
        spec.name,
        members,
        base_lr,
        spec.lr_mult,
        spec.weight_decay.unwrap_or(default_wd),
    ))
}

/// Makes the optimizer the trainer holds from a grouper's `groups`: each distinct
/// [`GroupSpec::optimizer`] steps its groups, as one [`Composite`] when there are several.
/// `muon` and `adamw` are built with `configs`; any other name is resolved through the registry
/// ([`crate::plugin::build_optimizer`]) with its default options, so a grouper may send groups
/// to a host's or plugin's optimizer.
///
/// `params` are the trainable parameters by name. Every one must be in exactly one group and
/// every name in a group must be in `params` (see [`super::validate_groups`]); a group's `lr` is
/// `base_lr * lr_mult` and its weight decay the spec's, or else the optimizer config's (`muon`,
/// `adamw`) or 0.
pub fn build_optimizer(
    groups: Vec<GroupSpec>,
    params: &[(String, Tensor)],
    base_lr: f64,
    configs: &OptimizerConfigs,
) -> Result<Box<dyn DynOptimizer>> {
    if !(base_lr.is_finite() && base_lr >= 0.0) {
        return Err(Error::config(
            "training.lr",
            format!("must be finite and >= 0, got {base_lr}"),
        ));
    }
    let names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    super::validate_groups(&names, &groups)?;
    let by_name: HashMap<&str, &Tensor> = params.iter().map(|(n, t)| (n.as_str(), t)).collect();
    // (optimizer name, its groups), in the order of first use
    let mut parts: Vec<(String, Vec<ParamGroup>)> = Vec::new();
    for spec in groups {
        let default_wd = match spec.optimizer.as_str() {
            "muon" => configs.muon.weight_decay,
            "adamw" => configs.adamw.weight_decay,
            _ => 0.0,
        };
        let name = spec.optimizer.clone();
        let group = param_group(spec, &by_name, base_lr, default_wd)?;
        match parts.iter_mut().find(|(n, _)| *n == name) {
            Some((_, list)) => list.push(group),
            None => parts.push((name, vec![group])),
        }
    }
    let mut built: Vec<Box<dyn DynOptimizer>> = Vec::with_capacity(parts.len());
    for (name, groups) in parts {
        built.push(match name.as_str() {
            "muon" => Box::new(Muon::new(groups, configs.muon.clone())?),
            "adamw" => Box::new(AdamW::new(groups, configs.adamw.clone())?),
            other => {
                let group_names: Vec<String> = groups.iter().map(|g| g.name.clone()).collect();
                crate::plugin::build_optimizer(other, groups, &serde_yaml::Value::Null).map_err(
                    |e| match e {
                        Error::UnknownComponent { kind, name, known } => Error::UnknownComponent {
                            kind,
                            name: format!("{name} (group `{}`)", group_names.join("`, `")),
                            known,
                        },
                        e => e,
                    },
                )?
            }
        });
    }
    if built.len() == 1
        && let Some(only) = built.pop()
    {
        return Ok(only);
    }
    Ok(Box::new(Composite::new(built)?))
}

/// Names of every parameter held by `opt`, for diagnostics.
pub fn param_names(opt: &dyn DynOptimizer) -> Vec<String> {
    opt.groups()
        .iter()
        .flat_map(|g| g.params.iter().map(|p| p.name.clone()))
        .collect()
}
