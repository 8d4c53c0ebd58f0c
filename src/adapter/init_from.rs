//! `lora.init_from`: a new run that starts from a saved adapter's weights (VoltTrain's or
//! PEFT's), with a fresh optimizer and schedule, unlike resuming a checkpoint.

use std::path::Path;

use tch::Tensor;

use super::AdapterInjector;
use super::lora::{LoraConfig, LoraInjector};
use super::peft::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::error::{Error, Result};
use crate::model::CausalLm;

/// Injects the run's LoRA adapters into `model` (its base frozen by the caller): fresh ones from
/// `cfg`, or with `init_from`, those of the PEFT adapter in that directory with its weights
/// loaded and every adapter parameter trainable ([`LoraInjector`]'s
/// [`AdapterInjector::load`]). Returns the adapter config the run trains and saves (the
/// directory's shape with `cfg`'s dropout and base model name) and the trainable parameters.
pub fn inject_lora(
    model: &mut dyn CausalLm,
    cfg: &LoraConfig,
    init_from: Option<&Path>,
) -> Result<(LoraConfig, Vec<(String, Tensor)>)> {
    let mut injector = LoraInjector::new(cfg.clone());
    let Some(dir) = init_from else {
        let params = injector.inject(model)?;
        return Ok((injector.config, params));
    };
    for f in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
        let p = dir.join(f);
        if !p.is_file() {
            return Err(Error::Config {
                file: Some(p),
                key: "lora.init_from".into(),
                msg: format!(
                    "`{}` is not a PEFT adapter directory: {f} is missing",
                    dir.display()
                ),
            });
        }
    }
    let params = injector
        .load(model, dir)
        .map_err(|e| Error::config("lora.init_from", format!("{}: {e}", dir.display())))?;
    let loaded = injector.config;
    if loaded.r != cfg.r || loaded.alpha != cfg.alpha || loaded.target != cfg.target {
        tracing::warn!(
            "lora.init_from: the adapter in {} has r={}, alpha={}, targets {:?}; those are used, \
             not the lora section's r={}, alpha={}, targets {:?}",
            dir.display(),
            loaded.r,
            loaded.alpha,
            loaded.target,
            cfg.r,
            cfg.alpha,
            cfg.target
        );
    }
    Ok((loaded, params))
}
