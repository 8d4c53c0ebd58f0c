//! Lion ("EvoLved Sign Momentum"), from Chen et al. 2023, *Symbolic Discovery of Optimization
//! Algorithms* (arXiv:2302.06675), Algorithm 2, as a VoltTrain dylib plugin.
//!
//! For each parameter `θ` with gradient `g` and momentum `m` (zeros at start):
//!
//! ```text
//! c = β1·m + (1 − β1)·g
//! θ = θ − lr·(sign(c) + λ·θ)        (decoupled weight decay λ)
//! m = β2·m + (1 − β2)·g
//! ```
//!
//! `lr` and `λ` are the group's ([`ParamGroup::lr`], [`ParamGroup::weight_decay`]), so schedules
//! and per-group multipliers apply. YAML: `optimizer: { name: lion, lr: 3.0e-5, betas: [0.9, 0.99],
//! weight_decay: 0.1 }`.

#![warn(missing_docs)]

use tch::Tensor;
use volttrain::error::{Error, Result, TchResultExt};
use volttrain::optim::{Optimizer, ParamGroup, StateDict};
use volttrain::plugin::PluginRegistrar;

/// Lion's settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LionConfig {
    /// Base learning rate; when set, every group's lr becomes `lr * lr_mult`. When absent the
    /// groups keep the lr they were built with. The paper uses an lr 3-10x smaller than AdamW's.
    /// In a trainer run the trainer sets each group's lr every step (`training.lr` x `lr_mult`
    /// x the schedule), so there set `training.lr` instead.
    pub lr: Option<f64>,
    /// `(β1, β2)`: the interpolation for the update direction and the momentum decay. Default
    /// `(0.9, 0.99)`, the paper's default (Section 3.2 and Algorithm 2).
    pub betas: (f64, f64),
    /// Decoupled weight decay λ; when set, replaces every group's. The paper uses a λ 3-10x
    /// larger than AdamW's.
    pub weight_decay: Option<f64>,
}

impl Default for LionConfig {
    fn default() -> Self {
        LionConfig {
            lr: None,
            betas: (0.9, 0.99),
            weight_decay: None,
        }
    }
}

/// The Lion optimizer.
#[derive(Debug)]
pub struct Lion {
    groups: Vec<ParamGroup>,
    beta1: f64,
    beta2: f64,
    /// Momentum per parameter name, made at the parameter's first step.
    exp_avg: std::collections::BTreeMap<String, Tensor>,
    steps: u64,
}

fn check_beta(name: &str, b: f64) -> Result<()> {
    if (0.0..1.0).contains(&b) {
        Ok(())
    } else {
        Err(Error::config(
            format!("optimizer.betas.{name}"),
            format!("must be in [0, 1), got {b}"),
        ))
    }
}

impl Optimizer for Lion {
    type Config = LionConfig;

    fn new(mut groups: Vec<ParamGroup>, config: LionConfig) -> Result<Self> {
        let (beta1, beta2) = config.betas;
        check_beta("0", beta1)?;
        check_beta("1", beta2)?;
        for g in &mut groups {
            if let Some(lr) = config.lr {
                g.lr = lr * g.lr_mult;
            }
            if let Some(wd) = config.weight_decay {
                g.weight_decay = wd;
            }
            if !(g.lr >= 0.0 && g.weight_decay >= 0.0) {
                return Err(Error::config(
                    "optimizer",
                    format!(
                        "group `{}`: lr ({}) and weight_decay ({}) must be >= 0",
                        g.name, g.lr, g.weight_decay
                    ),
                ));
            }
        }
        Ok(Lion {
            groups,
            beta1,
            beta2,
            exp_avg: Default::default(),
            steps: 0,
        })
    }

    fn name(&self) -> &str {
        "lion"
    }

    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    fn groups_mut(&mut self) -> &mut [ParamGroup] {
        &mut self.groups
    }

    fn step(&mut self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let (b1, b2) = (self.beta1, self.beta2);
        for group in &mut self.groups {
            let (lr, wd) = (group.lr, group.weight_decay);
            for p in &mut group.params {
                let grad = p.tensor.grad();
                if !grad.defined() {
                    continue;
                }
                let ctx = |op: &str| format!("lion {op} `{}`", p.name);
                let m = match self.exp_avg.get(&p.name) {
                    Some(m) => m,
                    None => {
                        let z = p.tensor.f_zeros_like().ctx(ctx("state"))?;
                        self.exp_avg.entry(p.name.clone()).or_insert(z)
                    }
                };
                // c = β1 m + (1 − β1) g, direction sign(c)
                let c = m
                    .f_mul_scalar(b1)
                    .and_then(|a| a.f_add(&grad.f_mul_scalar(1.0 - b1)?))
                    .ctx(ctx("interpolation"))?;
                let update = c.f_sign().ctx(ctx("sign"))?;
                // θ = θ (1 − lr λ) − lr sign(c)
                if wd != 0.0 {
                    let _ = p
                        .tensor
                        .f_mul_scalar_(1.0 - lr * wd)
                        .ctx(ctx("weight decay"))?;
                }
                let _ = p
                    .tensor
                    .f_sub_(&update.f_mul_scalar(lr).ctx(ctx("update"))?)
                    .ctx(ctx("update"))?;
                // m = β2 m + (1 − β2) g
                let mut m = m.shallow_clone();
                let _ = m
                    .f_mul_scalar_(b2)
                    .and_then(|mut m| m.f_add_(&grad.f_mul_scalar(1.0 - b2)?))
                    .ctx(ctx("momentum"))?;
            }
        }
        self.steps += 1;
        Ok(())
    }

    fn state_dict(&self) -> Result<StateDict> {
        let mut sd = StateDict::default();
        for (name, m) in &self.exp_avg {
            let copy = m.f_detach_copy().ctx(format!("lion state_dict `{name}`"))?;
            sd.tensors.insert(format!("exp_avg.{name}"), copy);
        }
        sd.scalars.insert("steps".into(), self.steps as f64);
        Ok(sd)
    }

    fn load_state_dict(&mut self, state: &StateDict) -> Result<()> {
        let mut exp_avg = std::collections::BTreeMap::new();
        for group in &self.groups {
            for p in &group.params {
                let Some(m) = state.tensors.get(&format!("exp_avg.{}", p.name)) else {
                    continue;
                };
                if m.size() != p.tensor.size() {
                    return Err(Error::State {
                        owner: "lion".into(),
                        msg: format!(
                            "`exp_avg.{}` has shape {:?}, the parameter {:?}",
                            p.name,
                            m.size(),
                            p.tensor.size()
                        ),
                    });
                }
                let m = m
                    .f_to_device(p.tensor.device())
                    .and_then(|m| m.f_to_kind(p.tensor.kind()))
                    .and_then(|m| m.f_detach_copy())
                    .ctx(format!("lion load_state_dict `{}`", p.name))?;
                exp_avg.insert(p.name.clone(), m);
            }
        }
        let known = exp_avg.len();
        let stored = state
            .tensors
            .keys()
            .filter(|k| k.starts_with("exp_avg."))
            .count();
        if known != stored {
            return Err(Error::State {
                owner: "lion".into(),
                msg: format!(
                    "{stored} momentum tensors are stored, but only {known} match this \
                     optimizer's parameters"
                ),
            });
        }
        self.exp_avg = exp_avg;
        self.steps = state.scalars.get("steps").copied().unwrap_or(0.0) as u64;
        Ok(())
    }
}

fn register(r: &mut PluginRegistrar) -> Result<()> {
    r.register_optimizer("lion", volttrain::plugin::optimizer_factory::<Lion>);
    Ok(())
}

volttrain::declare_plugin!(register);
