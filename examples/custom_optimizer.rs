//! Template: a host application that adds its own optimizer to VoltTrain's registry, statically,
//! and builds it by name from a YAML section, exactly as a built-in (`optimizer: { name: ... }`).
//!
//! Run: `cargo run --example custom_optimizer`
//!
//! Copy this file into your application, replace `SgdMomentum` with your optimizer, and use its
//! name in the YAML file. (The trainer half, `Trainer::builder()` with this optimizer, comes with
//! the trainer.)

use tch::{Device, Kind, Tensor};
use volttrain::error::{Result, TchResultExt};
use volttrain::optim::{NamedParam, Optimizer, ParamGroup, StateDict};

/// The optimizer's settings: the YAML section minus `name`. `serde(default)` gives every field
/// its default when the YAML leaves it out; `deny_unknown_fields` turns typos into errors.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct SgdMomentumConfig {
    /// Base lr; each group gets `lr * lr_mult`. When absent the groups keep theirs.
    lr: Option<f64>,
    /// Heavy-ball momentum, as `torch.optim.SGD` (default 0.9 here).
    momentum: f64,
}

impl Default for SgdMomentumConfig {
    fn default() -> Self {
        SgdMomentumConfig {
            lr: None,
            momentum: 0.9,
        }
    }
}

/// SGD with momentum, as `torch.optim.SGD(momentum=m)`: `b = m b + g; p -= lr b`.
struct SgdMomentum {
    groups: Vec<ParamGroup>,
    momentum: f64,
    buffers: std::collections::BTreeMap<String, Tensor>,
}

impl Optimizer for SgdMomentum {
    type Config = SgdMomentumConfig;

    fn new(mut groups: Vec<ParamGroup>, config: SgdMomentumConfig) -> Result<Self> {
        if let Some(lr) = config.lr {
            groups.iter_mut().for_each(|g| g.lr = lr * g.lr_mult);
        }
        Ok(SgdMomentum {
            groups,
            momentum: config.momentum,
            buffers: Default::default(),
        })
    }

    fn name(&self) -> &str {
        "sgd_momentum"
    }

    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    fn groups_mut(&mut self) -> &mut [ParamGroup] {
        &mut self.groups
    }

    fn step(&mut self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for group in &mut self.groups {
            for p in &mut group.params {
                let grad = p.tensor.grad();
                if !grad.defined() {
                    continue;
                }
                let buf = match self.buffers.remove(&p.name) {
                    // torch.optim.SGD: the first buffer is the gradient itself.
                    None => grad.f_detach_copy(),
                    Some(b) => b.f_mul_scalar(self.momentum).and_then(|b| b.f_add(&grad)),
                }
                .ctx(format!("sgd_momentum buffer `{}`", p.name))?;
                let _ = p
                    .tensor
                    .f_sub_(&buf.f_mul_scalar(group.lr).ctx("sgd_momentum update")?)
                    .ctx(format!("sgd_momentum update `{}`", p.name))?;
                self.buffers.insert(p.name.clone(), buf);
            }
        }
        Ok(())
    }

    fn state_dict(&self) -> Result<StateDict> {
        let mut sd = StateDict::default();
        for (name, b) in &self.buffers {
            sd.tensors
                .insert(name.clone(), b.f_detach_copy().ctx("state_dict")?);
        }
        Ok(sd)
    }

    fn load_state_dict(&mut self, state: &StateDict) -> Result<()> {
        self.buffers = state
            .tensors
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.f_detach_copy().ctx("load_state_dict")?)))
            .collect::<Result<_>>()?;
        Ok(())
    }
}

// One line registers it: the name used in YAML, and a factory. `optimizer_factory` parses the
// section into `SgdMomentumConfig` and calls `SgdMomentum::new`. `volttrain plugins list`
// shows it as `host (<your crate>)`.
volttrain::register_optimizer!(
    "sgd_momentum",
    volttrain::plugin::optimizer_factory::<SgdMomentum>
);

fn main() -> Result<()> {
    volttrain::plugin::check_registry()?;
    print!("{}", volttrain::plugin::format_list());

    // Fit y = x W_true^T by least squares with the optimizer built by name.
    tch::manual_seed(0);
    let opts = (Kind::Float, Device::Cpu);
    let w_true = Tensor::randn([2, 4], opts);
    let x = Tensor::randn([64, 4], opts);
    let y = x.matmul(&w_true.tr());
    let w = Tensor::zeros([2, 4], opts).set_requires_grad(true);
    let group = ParamGroup {
        name: "all".into(),
        params: vec![NamedParam {
            name: "w".into(),
            tensor: w.shallow_clone(),
        }],
        lr: 0.0,
        lr_mult: 1.0,
        weight_decay: 0.0,
    };
    let section: serde_yaml::Value =
        serde_yaml::from_str("{ name: sgd_momentum, lr: 0.05, momentum: 0.9 }")
            .map_err(|e| volttrain::Error::config("optimizer", e.to_string()))?;
    let mut opt = volttrain::plugin::build_optimizer("sgd_momentum", vec![group], &section)?;

    for step in 0..100 {
        opt.zero_grad();
        let loss = (x.matmul(&w.tr()) - &y)
            .f_pow_tensor_scalar(2)
            .and_then(|d| d.f_mean(Kind::Float))
            .ctx("loss")?;
        loss.f_backward().ctx("backward")?;
        opt.step()?;
        if step % 20 == 0 || step == 99 {
            println!("step {step:3}  loss {:.6}", loss.double_value(&[]));
        }
    }
    let err = (&w - &w_true).abs().max().double_value(&[]);
    println!("max |w - w_true| = {err:.2e}");
    Ok(())
}
