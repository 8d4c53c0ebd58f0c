//! Template: a host application that adds its own optimizer to VoltTrain's registry, statically,
//! builds it by name from a YAML section, exactly as a built-in (`optimizer: { name: ... }`), and
//! trains LoRA on a model with it through `Trainer::builder()`.
//!
//! Run: `./dev cargo run --example custom_optimizer` (or `cargo run --example custom_optimizer`
//! with libtorch set up). It trains on the bundled tiny Llama and chat data (`assets/`).
//!
//! Copy this file into your application, replace `SgdMomentum` with your optimizer, and use its
//! name in the YAML file (`volttrain sft` finds it too when your binary calls
//! `volttrain::sft::run_sft`), or build the trainer yourself as `train_lora` does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::{Device, Kind, Tensor};
use volttrain::adapter::{AdapterInjector, LoraConfig, LoraInjector};
use volttrain::data::LoaderSource;
use volttrain::data::{Collator, DataLoader, LoaderOptions, SftDataset};
use volttrain::error::{Error, Result, TchResultExt};
use volttrain::optim::{NamedParam, Optimizer, ParamGroup, StateDict};
use volttrain::trainer::Trainer;

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

/// The `<what>` of the momentum buffers' state keys (`<param>.momentum_buffer`, as
/// `torch.optim.SGD` names it).
const BUFFER: &str = "momentum_buffer";

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

    // State keys are `<param>.<what>` (the rule on `Optimizer`): a composite optimizer splits
    // a checkpoint between its parts by the parameter name before the last dot.
    fn state_dict(&self) -> Result<StateDict> {
        let mut sd = StateDict::default();
        for (name, b) in &self.buffers {
            sd.tensors.insert(
                format!("{name}.{BUFFER}"),
                b.f_detach_copy().ctx("state_dict")?,
            );
        }
        Ok(sd)
    }

    fn load_state_dict(&mut self, state: &StateDict) -> Result<()> {
        self.buffers = state
            .tensors
            .iter()
            .map(|(k, v)| {
                let name = k
                    .strip_suffix(BUFFER)
                    .and_then(|n| n.strip_suffix('.'))
                    .ok_or_else(|| {
                        Error::invalid(format!("sgd_momentum state: unexpected key `{k}`"))
                    })?;
                Ok((name.to_string(), v.f_detach_copy().ctx("load_state_dict")?))
            })
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

/// The optimizer built by name on its own: fit `y = x W_true^T` by least squares.
fn least_squares() -> Result<()> {
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

/// A file of the bundled assets (`assets/` in the VoltTrain repository). In your application,
/// point these at your model directory and data.
fn bundled(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// LoRA on the bundled tiny Llama with `sgd_momentum`, through `Trainer::builder()`.
fn train_lora() -> Result<()> {
    let device = Device::Cpu;
    let model_dir = bundled("assets/tiny-llama");

    // The tokenizer (with the model's chat template) and the chat dataset, tokenized with it.
    let tok = volttrain::data::Tokenizer::from_dir(&model_dir)?;
    let data_section = format!(
        "{{ path: '{}', max_seq_len: 256 }}",
        bundled("assets/data/train.jsonl").display()
    );
    let dcfg: volttrain::data::DatasetConfig =
        serde_yaml::from_str(&data_section).map_err(|e| Error::config("dataset", e.to_string()))?;
    let dataset = SftDataset::load(&dcfg, &tok)?;
    let pad = tok.pad().or(tok.eos()).ok_or_else(|| Error::Tokenizer {
        path: model_dir.clone(),
        msg: "no pad and no eos token".into(),
    })?;
    let loader = DataLoader::new(
        Arc::new(dataset),
        Collator::new(pad.id as i64, dcfg.padding_side),
        LoaderOptions {
            batch_size: 4,
            seed: 0,
            ..LoaderOptions::default()
        },
    );

    // The model (fp32 on the CPU), its base frozen, LoRA r=8 on the Llama projections.
    let opts = volttrain::model::LoadOptions::new(Kind::Float, device);
    let mut model = volttrain::model::load_model(&model_dir, &opts)?;
    model.freeze_base();
    tch::manual_seed(0);
    let lora = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        ..LoraConfig::default()
    };
    let trainable = LoraInjector::new(lora).inject(model.as_mut())?;

    // One parameter group with every LoRA matrix, then the optimizer by name, as from YAML.
    let params = trainable
        .iter()
        .map(|(name, t)| NamedParam::new(name.clone(), t))
        .collect();
    let groups = vec![ParamGroup::new("lora", params, 0.0, 1.0, 0.0)];
    let section: serde_yaml::Value = serde_yaml::from_str("{ name: sgd_momentum, momentum: 0.9 }")
        .map_err(|e| Error::config("optimizer", e.to_string()))?;
    let optimizer = volttrain::plugin::build_optimizer("sgd_momentum", groups, &section)?;

    let output_dir = std::env::temp_dir().join("volttrain-custom-optimizer");
    let summary = Trainer::builder()
        .model(model)
        .train_data(Box::new(LoaderSource::new(loader)))
        .optimizer(optimizer)
        .base_lr(0.05) // each group: base_lr x lr_mult x the schedule (constant by default)
        .device(device)
        .max_steps(Some(6))
        .checkpoint_every(Some(6)) // writes the resume checkpoint `last/` after step 6
        .clip_norm(Some(1.0))
        .output_dir(&output_dir)
        .build()?
        .fit()?;
    println!(
        "\nLoRA with sgd_momentum: {} steps, {} label tokens, final train loss {:.4}, {:.0} tokens/s",
        summary.steps,
        summary.tokens,
        summary.final_train_loss.unwrap_or(f64::NAN),
        summary.tokens_per_sec
    );
    println!("resume checkpoint in {}", output_dir.join("last").display());
    Ok(())
}

fn main() -> Result<()> {
    volttrain::plugin::check_registry()?;
    print!("{}", volttrain::plugin::format_list());
    least_squares()?;
    train_lora()
}
