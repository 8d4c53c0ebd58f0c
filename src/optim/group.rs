//! The reference parameter grouping and the exactly-one-group check.
//!
//! The rules (those of the system VoltTrain replaces), in order of precedence:
//!
//! 1. the token embedding ([`ParamRole::Embedding`], also the LM head when tied: one parameter,
//!    one group) goes to AdamW at `embed_lr_mult` (2x) the base lr, group `adamw_embed`;
//! 2. the untied LM head ([`ParamRole::LmHead`]) goes to AdamW at `head_lr_mult` (0.1x), group
//!    `adamw_head`;
//! 3. every parameter of fewer than two dimensions (norms, biases; Mamba's `D` and the dt bias
//!    `dt_proj.bias`) and Mamba's `A_log` (2-D `[d_inner, d_state]`, but a table of per-channel
//!    decay rates, not a linear map; `mamba_ssm` also keeps it out of weight decay) goes to AdamW
//!    at 1x without weight decay, group `adamw_no_decay`;
//! 4. depthwise convolution kernels, shape `[channels, 1, kernel...]` (Mamba's `conv1d.weight`
//!    `[d_inner, 1, d_conv]`: one independent filter per channel, no matrix to orthogonalize),
//!    go to AdamW at 1x with weight decay, group `adamw`;
//! 5. every other parameter (hidden matrices, LoRA A/B, and tensors of more than two dimensions
//!    that mix their inputs, flattened to `[out, in * kernel]` by Muon) goes to Muon at 1x,
//!    group `muon`; with `use_muon: false` to AdamW at 1x, group `adamw`.
//!
//! So Muon only sees parameters that are matrices as linear maps: never norms, biases, `D`, the
//! dt bias, `A_log` or depthwise kernels.
//!
//! Empty groups are left out.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{GroupSpec, ParamGrouper, ParamInfo, ParamRole};
use crate::error::{Error, Result};

/// Settings of [`ReferenceGrouper`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReferenceGrouperConfig {
    /// Muon for hidden matrices; `false` sends them to AdamW. Default `true`.
    pub use_muon: bool,
    /// lr multiplier of the token embedding. Default `2.0` (the reference system).
    pub embed_lr_mult: f64,
    /// lr multiplier of the untied LM head. Default `0.1` (the reference system).
    pub head_lr_mult: f64,
}

impl Default for ReferenceGrouperConfig {
    fn default() -> Self {
        ReferenceGrouperConfig {
            use_muon: true,
            embed_lr_mult: 2.0,
            head_lr_mult: 0.1,
        }
    }
}

/// The reference grouping; see the module documentation for the rules.
#[derive(Debug, Clone, Default)]
pub struct ReferenceGrouper {
    /// Learning-rate multipliers and switches of the grouping.
    pub config: ReferenceGrouperConfig,
}

impl ReferenceGrouper {
    /// A grouper with `config` (`ReferenceGrouperConfig::default()`: the reference system's).
    pub fn new(config: ReferenceGrouperConfig) -> Self {
        ReferenceGrouper { config }
    }
}

impl ParamGrouper for ReferenceGrouper {
    fn name(&self) -> &str {
        "reference"
    }

    fn group(&self, params: &[ParamInfo]) -> Result<Vec<GroupSpec>> {
        let c = &self.config;
        let hidden = if c.use_muon {
            ("muon", "muon")
        } else {
            ("adamw", "adamw")
        };
        // (name, optimizer, lr_mult, weight_decay), in output order
        let layout: [(&str, &str, f64, Option<f64>); 5] = [
            (hidden.0, hidden.1, 1.0, None),
            ("adamw_embed", "adamw", c.embed_lr_mult, None),
            ("adamw_head", "adamw", c.head_lr_mult, None),
            ("adamw_no_decay", "adamw", 1.0, Some(0.0)),
            ("adamw", "adamw", 1.0, None),
        ];
        let mut members: [Vec<String>; 5] = Default::default();
        for p in params {
            let slot = match p.role {
                ParamRole::Embedding => 1,
                ParamRole::LmHead => 2,
                ParamRole::Other if p.shape.len() < 2 || is_a_log(&p.name) => 3,
                // with `use_muon: false` the hidden group is this same AdamW group
                ParamRole::Other if p.shape.len() > 2 && p.shape[1] == 1 => {
                    if c.use_muon {
                        4
                    } else {
                        0
                    }
                }
                ParamRole::Other => 0,
            };
            members[slot].push(p.name.clone());
        }
        let groups: Vec<GroupSpec> = layout
            .iter()
            .zip(members)
            .filter(|(_, m)| !m.is_empty())
            .map(|(&(name, opt, lr_mult, wd), params)| GroupSpec {
                name: name.into(),
                optimizer: opt.into(),
                lr_mult,
                weight_decay: wd,
                params,
            })
            .collect();
        let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
        validate_groups(&names, &groups)?;
        Ok(groups)
    }
}

/// Mamba's `A_log` (`...mixer.A_log`, Jamba's `...mamba.A_log`).
fn is_a_log(name: &str) -> bool {
    name == "A_log" || name.ends_with(".A_log")
}

/// Checks that every name in `params` is in exactly one of `groups` and that the groups name no
/// other parameter. The error names every offending parameter and its groups.
pub fn validate_groups(params: &[&str], groups: &[GroupSpec]) -> Result<()> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for p in params {
        if seen.insert(p, 0).is_some() {
            return Err(Error::ParamGroups(format!(
                "parameter `{p}` is listed twice among the trainable parameters"
            )));
        }
    }
    let mut homes: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut unknown = Vec::new();
    for g in groups {
        if !(g.lr_mult.is_finite() && g.lr_mult >= 0.0) {
            return Err(Error::ParamGroups(format!(
                "group `{}`: lr_mult must be finite and >= 0, got {}",
                g.name, g.lr_mult
            )));
        }
        for p in &g.params {
            match seen.get_mut(p.as_str()) {
                Some(n) => {
                    *n += 1;
                    homes.entry(p.as_str()).or_default().push(&g.name);
                }
                None => unknown.push(format!("`{p}` (group `{}`)", g.name)),
            }
        }
    }
    let mut problems = Vec::new();
    let missing: Vec<String> = params
        .iter()
        .filter(|p| seen.get(*p) == Some(&0))
        .map(|p| format!("`{p}`"))
        .collect();
    if !missing.is_empty() {
        problems.push(format!("in no group: {}", missing.join(", ")));
    }
    let mut twice: Vec<String> = homes
        .iter()
        .filter(|(_, gs)| gs.len() > 1)
        .map(|(p, gs)| format!("`{p}` (groups {})", gs.join(", ")))
        .collect();
    twice.sort();
    if !twice.is_empty() {
        problems.push(format!("in more than one group: {}", twice.join(", ")));
    }
    if !unknown.is_empty() {
        problems.push(format!("not a trainable parameter: {}", unknown.join(", ")));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::ParamGroups(format!(
            "every trainable parameter must be in exactly one group; {}",
            problems.join("; ")
        )))
    }
}
