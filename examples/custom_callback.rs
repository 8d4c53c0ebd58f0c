//! Template: a custom callback, registered statically and built by name from YAML
//! (`callbacks: [{ name: plateau_stop, patience: 5 }]`).
//!
//! Run: `cargo run --example custom_callback`
//!
//! `PlateauStop` writes every step's loss to `<output_dir>/losses.csv` and asks the trainer to
//! stop when the loss has not improved by `min_delta` for `patience` steps. Every `Callback`
//! hook has a no-op default, so a callback implements only the hooks it needs. Here `main`
//! plays the trainer, feeding it the metrics of a made-up run.

use std::io::Write;
use std::path::Path;

use volttrain::callback::{Callback, Control, ModelSaver, StepMetrics};
use volttrain::error::{Error, Result};
use volttrain::model::{CausalLm, ForwardInput, LayerCtx};
use volttrain::plugin::{CallbackCtx, parse_config};

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PlateauStopConfig {
    /// Steps without improvement before stopping.
    patience: u64,
    /// Smallest decrease of the best loss that counts as an improvement.
    min_delta: f64,
}

impl Default for PlateauStopConfig {
    fn default() -> Self {
        PlateauStopConfig {
            patience: 10,
            min_delta: 1e-3,
        }
    }
}

struct PlateauStop {
    config: PlateauStopConfig,
    best: f64,
    since_best: u64,
    csv: std::fs::File,
}

impl Callback for PlateauStop {
    fn name(&self) -> &str {
        "plateau_stop"
    }

    fn on_step_end(&mut self, ctl: &mut Control<'_>, m: &StepMetrics) -> Result<()> {
        writeln!(self.csv, "{},{}", m.step, m.loss)
            .map_err(|e| Error::io(ctl.output_dir.join("losses.csv"), e))?;
        if m.loss < self.best - self.config.min_delta {
            self.best = m.loss;
            self.since_best = 0;
        } else {
            self.since_best += 1;
            if self.since_best >= self.config.patience {
                ctl.request_stop(format!(
                    "plateau_stop: no improvement on {:.4} for {} steps",
                    self.best, self.since_best
                ));
            }
        }
        Ok(())
    }
}

fn plateau_stop(cfg: &serde_yaml::Value, ctx: &CallbackCtx) -> Result<Box<dyn Callback>> {
    let config: PlateauStopConfig = parse_config("callbacks.plateau_stop", cfg)?;
    let path = ctx.output_dir.join("losses.csv");
    let mut csv = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
    writeln!(csv, "step,loss").map_err(|e| Error::io(&path, e))?;
    Ok(Box::new(PlateauStop {
        config,
        best: f64::INFINITY,
        since_best: 0,
        csv,
    }))
}

volttrain::register_callback!("plateau_stop", plateau_stop);

// ---- the trainer's side, simulated ----------------------------------------------------------

/// The trainer hands callbacks the model being trained; this run has none.
struct NoModel(serde_json::Value);

fn no_model() -> Error {
    Error::invalid("this example has no model")
}

impl CausalLm for NoModel {
    fn architecture(&self) -> &str {
        "none"
    }
    fn hf_config(&self) -> &serde_json::Value {
        &self.0
    }
    fn num_layers(&self) -> usize {
        0
    }
    fn vocab_size(&self) -> i64 {
        0
    }
    fn device(&self) -> tch::Device {
        tch::Device::Cpu
    }
    fn kind(&self) -> tch::Kind {
        tch::Kind::Float
    }
    fn embed(&self, _: &tch::Tensor) -> Result<tch::Tensor> {
        Err(no_model())
    }
    fn prepare(&self, _: &ForwardInput<'_>) -> Result<LayerCtx> {
        Err(no_model())
    }
    fn layer(&self, _: usize, _: &tch::Tensor, _: &LayerCtx, _: bool) -> Result<tch::Tensor> {
        Err(no_model())
    }
    fn head(&self, _: &tch::Tensor) -> Result<tch::Tensor> {
        Err(no_model())
    }
    fn named_parameters(&self) -> Vec<(String, tch::Tensor)> {
        Vec::new()
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut volttrain::nn::Linear)> {
        Vec::new()
    }
    fn linears(&self) -> Vec<(String, &volttrain::nn::Linear)> {
        Vec::new()
    }
    fn lm_head_param(&self) -> &str {
        ""
    }
    fn embed_param(&self) -> &str {
        ""
    }
    fn freeze_base(&mut self) {}
    fn checkpoint_tensors(&self) -> volttrain::Result<Vec<(String, tch::Tensor)>> {
        Ok(Vec::new())
    }
}

struct NoSaver;

impl ModelSaver for NoSaver {
    fn save_to(&self, _: &dyn CausalLm, _: &Path) -> Result<()> {
        Ok(())
    }
}

fn main() -> Result<()> {
    let out = std::env::temp_dir().join("volttrain-custom-callback");
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    let section: serde_yaml::Value =
        serde_yaml::from_str("{ name: plateau_stop, patience: 5, min_delta: 0.01 }")
            .map_err(|e| Error::config("callbacks", e.to_string()))?;
    let ctx = CallbackCtx {
        output_dir: out.clone(),
    };
    let mut cb = volttrain::plugin::build_callback("plateau_stop", &section, &ctx)?;

    let (model, saver) = (NoModel(serde_json::json!({})), NoSaver);
    let mut stop = None;
    for step in 1..=100u64 {
        // A loss that falls, then flattens out at 0.5.
        let loss = 0.5 + 2.0 * (-(step as f64) / 8.0).exp();
        let metrics = StepMetrics {
            step,
            loss,
            ..Default::default()
        };
        let mut ctl = Control::new(step, 0, &model, &saver, &out, true, &mut stop);
        cb.on_step_end(&mut ctl, &metrics)?;
        if let Some(reason) = ctl.stop_requested() {
            println!("stopped at step {step}: {reason}");
            break;
        }
    }
    println!("losses written to {}", out.join("losses.csv").display());
    Ok(())
}
