//! The generic adapter state file, what [`AdapterInjector::save`](super::AdapterInjector::save)
//! and [`load`](super::AdapterInjector::load) use unless an injector has a format of its own:
//! every trainable parameter of the model under its full name (`model.layers.0.mlp.up_proj.
//! scale`) in one safetensors file, [`ADAPTER_STATE_FILE`], with the adapter's name in the
//! file's metadata (`volttrain_adapter`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use tch::Tensor;

use crate::error::{Error, Result, TchResultExt};
use crate::model::CausalLm;
use crate::model::safetensors::{SafetensorsFile, save_safetensors};

/// The file [`save_adapter_state`] writes.
pub const ADAPTER_STATE_FILE: &str = "adapter_state.safetensors";

/// Writes every trainable (`requires_grad`) parameter of `model`, which after
/// [`AdapterInjector::inject`](super::AdapterInjector::inject) are the adapter's parameters,
/// into `dir/`[`ADAPTER_STATE_FILE`] (atomically; `dir` is created when missing). `adapter`
/// (the injector's name) goes into the file's metadata. Errors when nothing is trainable.
pub fn save_adapter_state(adapter: &str, model: &dyn CausalLm, dir: &Path) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = model
        .named_parameters()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    if tensors.is_empty() {
        return Err(Error::invalid(format!(
            "adapter `{adapter}`: the model has no trainable parameter to save into {}",
            dir.join(ADAPTER_STATE_FILE).display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("volttrain_adapter".to_string(), adapter.to_string()),
    ]);
    save_safetensors(&dir.join(ADAPTER_STATE_FILE), &tensors, Some(meta))
}

/// Fills `params` (the parameters an injector just created, by full name) from
/// `dir/`[`ADAPTER_STATE_FILE`]. Every parameter must be in the file with its shape, and every
/// tensor of the file must be one of `params`; errors name the file and the tensors. `adapter`
/// names the injector in messages.
pub fn load_adapter_state(adapter: &str, params: &[(String, Tensor)], dir: &Path) -> Result<()> {
    let path = dir.join(ADAPTER_STATE_FILE);
    if !path.is_file() {
        let peft = dir.join(super::peft::ADAPTER_CONFIG);
        let hint = if peft.is_file() {
            format!(
                "; {} is there: the directory holds a PEFT (LoRA) adapter",
                peft.display()
            )
        } else {
            String::new()
        };
        return Err(Error::checkpoint(
            &path,
            format!("missing: no saved state of adapter `{adapter}`{hint}"),
        ));
    }
    let file = SafetensorsFile::open(&path)?;
    let wanted: BTreeMap<&str, &Tensor> = params.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut names: Vec<&str> = file.names().collect();
    names.sort();
    let unexpected: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !wanted.contains_key(n))
        .collect();
    if !unexpected.is_empty() {
        return Err(Error::checkpoint(
            &path,
            format!(
                "tensors that are no parameter of adapter `{adapter}`: {}",
                unexpected.join(", ")
            ),
        ));
    }
    let missing: Vec<&str> = wanted
        .keys()
        .copied()
        .filter(|n| file.shape(n).is_none())
        .collect();
    if !missing.is_empty() {
        return Err(Error::checkpoint(
            &path,
            format!(
                "missing parameters of adapter `{adapter}`: {}",
                missing.join(", ")
            ),
        ));
    }
    let _g = tch::no_grad_guard();
    for (name, dst) in wanted {
        copy_checked(&file, name, dst)?;
    }
    Ok(())
}

/// Copies tensor `key` of `file` into `dst` (converted to its kind and device); a shape
/// mismatch is an error naming the file and the tensor. Runs under the caller's no-grad guard.
pub(crate) fn copy_checked(file: &SafetensorsFile, key: &str, dst: &Tensor) -> Result<()> {
    let src_shape = file.shape(key).unwrap_or_default();
    if src_shape != dst.size() {
        return Err(Error::checkpoint(
            file.path(),
            format!(
                "tensor `{key}`: expected shape {:?}, found {src_shape:?}",
                dst.size()
            ),
        ));
    }
    let src = file.tensor(key, Some(dst.kind()), dst.device())?;
    let mut dst = dst.shallow_clone();
    dst.f_copy_(&src)
        .ctx(format!("{}: copy `{key}`", file.path().display()))?;
    Ok(())
}
