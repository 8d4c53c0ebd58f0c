//! Test fixture for `tests/dist_trainer.rs`: callback `fixture_rank_params` (`{name:
//! fixture_rank_params, dir: <path>}`) writes the trainable parameters of its process to
//! `<dir>/rank-<RANK>.safetensors` when `fit` ends, on every rank (only rank 0 saves
//! otherwise), so the test can check that all data-parallel ranks ended with the same weights.
//! The rank is the launcher's `RANK` variable (0 without one).

use std::path::PathBuf;

use tch::{Device, Tensor};
use volttrain::callback::{Callback, Control};
use volttrain::plugin::{CallbackCtx, PluginRegistrar};

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RankParamsConfig {
    dir: PathBuf,
}

struct RankParams {
    dir: PathBuf,
}

impl Callback for RankParams {
    fn on_fit_end(&mut self, ctl: &mut Control<'_>) -> volttrain::Result<()> {
        let fail = |what: String| volttrain::Error::invalid(format!("fixture_rank_params: {what}"));
        std::fs::create_dir_all(&self.dir).map_err(|e| volttrain::Error::io(&self.dir, e))?;
        let rank = std::env::var("RANK").unwrap_or_else(|_| "0".into());
        let params: Vec<(String, Tensor)> = ctl
            .model
            .named_parameters()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(n, t)| {
                let cpu = t
                    .f_detach()
                    .and_then(|t| t.f_to(Device::Cpu))
                    .map_err(|e| fail(format!("copy {n} to the CPU: {e}")))?;
                Ok((n, cpu))
            })
            .collect::<volttrain::Result<_>>()?;
        let path = self.dir.join(format!("rank-{rank}.safetensors"));
        Tensor::write_safetensors(&params, &path)
            .map_err(|e| fail(format!("write {}: {e}", path.display())))
    }
}

fn rank_params(cfg: &serde_yaml::Value, _: &CallbackCtx) -> volttrain::Result<Box<dyn Callback>> {
    let c: RankParamsConfig = serde_yaml::from_value(cfg.clone())
        .map_err(|e| volttrain::Error::config("callbacks.fixture_rank_params", e.to_string()))?;
    Ok(Box::new(RankParams { dir: c.dir }))
}

fn register(r: &mut PluginRegistrar) -> volttrain::Result<()> {
    r.register_callback("fixture_rank_params", rank_params);
    Ok(())
}

volttrain::declare_plugin!(register);
