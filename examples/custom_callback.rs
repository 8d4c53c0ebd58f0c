//! Template: a custom callback, registered statically and built by name from YAML
//! (`callbacks: [{ name: plateau_stop, patience: 5 }]`).
//!
//! Run: `./dev cargo run --example custom_callback` (or `cargo run --example custom_callback`
//! with libtorch set up).
//!
//! `PlateauStop` writes every step's loss to `<output_dir>/losses.csv` and asks the trainer to
//! stop when the loss has not improved by `min_delta` for `patience` steps. Every `Callback`
//! hook has a no-op default, so a callback implements only the hooks it needs; its best loss
//! and count are its state (`state_dict` / `load_state_dict`), so a resumed run stops where the
//! uninterrupted one would. `main` runs a real fine-tuning job, LoRA on the bundled tiny Llama
//! and chat data (`assets/`), from a YAML document that names the callback, as
//! `volttrain sft --config job.yaml` would; with `Trainer::builder()` attach it with
//! `.callback(Box::new(...))` instead.

use std::io::Write;
use std::path::Path;

use volttrain::callback::{Callback, Control, StepMetrics};
use volttrain::config::SftConfig;
use volttrain::error::{Error, Result};
use volttrain::plugin::{CallbackCtx, parse_config};
use volttrain::sft::{RunOptions, run_sft};

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

    // What a resumed run (`volttrain sft --resume`) needs to go on as if never stopped: the
    // trainer keeps it in the resume checkpoint (`last/callbacks.json`, under this callback's
    // name) and hands it back before training continues.
    fn state_dict(&self) -> Result<Option<serde_json::Value>> {
        Ok(Some(serde_json::json!({
            // As a string: it comes back bit for bit, and `inf` (no best loss yet) too.
            "best": self.best.to_string(),
            "since_best": self.since_best,
        })))
    }

    fn load_state_dict(&mut self, state: serde_json::Value) -> Result<()> {
        let bad = || Error::invalid(format!("plateau_stop state: {state}"));
        let best = state["best"].as_str().ok_or_else(bad)?;
        self.best = best.parse().map_err(|_| bad())?;
        self.since_best = state["since_best"].as_u64().ok_or_else(bad)?;
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

/// A job on the bundled assets (`assets/` in the VoltTrain repository): in your application,
/// this is your YAML file with your model and data.
fn job_yaml(output_dir: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    format!(
        "model: {{ path: '{model}', device: cpu }}
lora: {{ rank: 8, alpha: 16 }}
dataset: {{ path: '{data}', max_seq_len: 256 }}
training:
  output_dir: '{out}'
  epochs: 1
  max_steps: 40
  batch_size: 4
  lr: 0.01
  warmup_steps: 0
  log_every: 5
scheduler: {{ name: constant }}
callbacks:
  - {{ name: plateau_stop, patience: 3, min_delta: 0.05 }}
",
        model = root.join("assets/tiny-llama").display(),
        data = root.join("assets/data/train.jsonl").display(),
        out = output_dir.display(),
    )
}

fn main() -> Result<()> {
    volttrain::plugin::check_registry()?;
    let out = std::env::temp_dir().join("volttrain-custom-callback");
    if out.exists() {
        // A fresh run each time (the trainer would otherwise append to metrics.jsonl).
        std::fs::remove_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    }
    let cfg = SftConfig::from_yaml_str(&job_yaml(&out), None, &[])?;
    let summary = run_sft(&cfg, RunOptions::default())?;
    println!(
        "{} steps, final train loss {:.4}",
        summary.steps,
        summary.final_train_loss.unwrap_or(f64::NAN)
    );
    match &summary.stopped_by {
        Some(reason) => println!("stopped early: {reason}"),
        None => println!("ran to max_steps without a plateau"),
    }
    println!("losses written to {}", out.join("losses.csv").display());
    Ok(())
}
