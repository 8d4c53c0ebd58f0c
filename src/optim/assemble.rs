//! A model's trainable parameters under one optimizer: what a grouper sees of them
//! ([`param_infos`]), and the optimizer over a grouper's groups ([`assemble_optimizer`]), as the
//! YAML job does it. A host reproduces the reference set-up with
//! `assemble_optimizer(model, &ReferenceGrouper::default(), OptimizerChoice::PerGroup(&configs),
//! lr, weight_decay)`.

use std::collections::HashMap;

use tch::Tensor;

use super::{
    DynOptimizer, OptimizerConfigs, ParamGrouper, ParamInfo, ParamRole, build_optimizer,
    param_group,
};
use crate::error::Result;
use crate::model::CausalLm;

/// The parameters of `model` that require a gradient, by Hugging Face name.
pub fn trainable_parameters(model: &dyn CausalLm) -> Vec<(String, Tensor)> {
    model
        .named_parameters()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect()
}

/// What a [`ParamGrouper`] sees of each trainable parameter of `model`: its name, its shape and
/// its role (the token embedding, the untied LM head, or anything else), in the model's order.
pub fn param_infos(model: &dyn CausalLm) -> Vec<ParamInfo> {
    infos_of(model, &trainable_parameters(model))
}

fn infos_of(model: &dyn CausalLm, trainable: &[(String, Tensor)]) -> Vec<ParamInfo> {
    trainable
        .iter()
        .map(|(n, t)| ParamInfo {
            name: n.clone(),
            shape: t.size(),
            role: if n == model.embed_param() {
                ParamRole::Embedding
            } else if n == model.lm_head_param() {
                ParamRole::LmHead
            } else {
                ParamRole::Other
            },
        })
        .collect()
}

/// Which optimizer steps the groups of a grouper.
#[derive(Debug, Clone, Copy)]
pub enum OptimizerChoice<'a> {
    /// Each group's own [`GroupSpec::optimizer`](super::GroupSpec::optimizer): Muon and AdamW
    /// with these configs, any other name built through the registry (see [`build_optimizer`]).
    PerGroup(&'a OptimizerConfigs),
    /// One registered optimizer for every group (`optimizer: {name: lion, ...}`), built through
    /// the registry with these options; groups without their own weight decay get
    /// `weight_decay`.
    Registered {
        /// The registered optimizer name (`lion`).
        name: &'a str,
        /// The rest of the `optimizer` section, handed to the optimizer's factory.
        options: &'a serde_yaml::Value,
    },
}

/// The optimizer over the trainable parameters of `model`, grouped by `grouper`, at base lr
/// `lr` (each group scaled by its `lr_mult` by the scheduler).
pub fn assemble_optimizer(
    model: &dyn CausalLm,
    grouper: &dyn ParamGrouper,
    choice: OptimizerChoice<'_>,
    lr: f64,
    weight_decay: f64,
) -> Result<Box<dyn DynOptimizer>> {
    let trainable = trainable_parameters(model);
    let specs = grouper.group(&infos_of(model, &trainable))?;
    match choice {
        OptimizerChoice::PerGroup(configs) => build_optimizer(specs, &trainable, lr, configs),
        OptimizerChoice::Registered { name, options } => {
            let by_name: HashMap<&str, &Tensor> =
                trainable.iter().map(|(n, t)| (n.as_str(), t)).collect();
            let groups = specs
                .into_iter()
                .map(|s| param_group(s, &by_name, lr, weight_decay))
                .collect::<Result<Vec<_>>>()?;
            crate::plugin::build_optimizer(name, groups, options)
        }
    }
}
