//! Progress display: an indicatif bar when stderr is a terminal, plain log lines otherwise.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use crate::callback::{Callback, Control, EvalMetrics, StepMetrics};
use crate::error::Result;

/// Shows loss, lr and tokens/s. `total_steps` sizes the bar; `log_every` spaces the plain lines.
pub struct Progress {
    bar: Option<ProgressBar>,
    total_steps: u64,
    log_every: u64,
}

impl Progress {
    /// A progress display for a run of `total_steps` steps, logging a plain line every `log_every`
    /// steps when stderr is not a terminal.
    pub fn new(total_steps: u64, log_every: u64) -> Self {
        Progress {
            bar: None,
            total_steps,
            log_every: log_every.max(1),
        }
    }
}

impl Callback for Progress {
    fn name(&self) -> &str {
        "progress"
    }
    fn on_fit_start(&mut self, ctl: &mut Control<'_>) -> Result<()> {
        if ctl.is_main && std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(self.total_steps);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_position(ctl.step);
            self.bar = Some(bar);
        }
        Ok(())
    }
    fn on_step_end(&mut self, ctl: &mut Control<'_>, m: &StepMetrics) -> Result<()> {
        if !ctl.is_main {
            return Ok(());
        }
        let lr = m.lr.values().next().copied().unwrap_or(0.0);
        match &self.bar {
            Some(bar) => {
                bar.set_position(m.step);
                bar.set_message(format!(
                    "loss {:.4} lr {:.2e} {:.0} tok/s{}",
                    m.loss,
                    lr,
                    m.tokens_per_sec,
                    extra_text(&m.extra)
                ));
            }
            None => {
                if m.step.is_multiple_of(self.log_every) || m.step == self.total_steps {
                    tracing::info!(
                        "step {}/{} epoch {} loss {:.4} lr {:.3e} grad_norm {:.3} {:.0} tok/s{}",
                        m.step,
                        self.total_steps,
                        m.epoch + 1,
                        m.loss,
                        lr,
                        m.grad_norm,
                        m.tokens_per_sec,
                        extra_text(&m.extra)
                    );
                }
            }
        }
        Ok(())
    }
    fn on_eval_end(&mut self, _ctl: &mut Control<'_>, m: &EvalMetrics) -> Result<()> {
        if let Some(bar) = &self.bar {
            bar.println(format!(
                "step {}: eval_loss {:.4}{}",
                m.step,
                m.eval_loss,
                extra_text(&m.extra)
            ));
        }
        Ok(())
    }
    fn on_fit_end(&mut self, _ctl: &mut Control<'_>) -> Result<()> {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
        Ok(())
    }
}

/// ` key value` for each objective metric (preference tuning: `rewards/margins 0.0123 ...`).
fn extra_text(extra: &std::collections::BTreeMap<String, f64>) -> String {
    extra.iter().map(|(k, v)| format!(" {k} {v:.4}")).collect()
}
