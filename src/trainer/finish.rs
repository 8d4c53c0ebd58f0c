//! The end of a run, and the loss scaler's part of each step and of resume.
//!
//! However a run ends (the last epoch, `max_steps` in the middle of an epoch, a callback's stop,
//! an interrupt), the trainer evaluates once more after the last step unless it just did (the
//! summary's `final_eval_loss` is that evaluation), and the saver writes the final weights (the
//! PEFT adapter, or the full model) into `<output_dir>/final/` ([`FINAL_DIR`]), as the Hugging
//! Face Trainer evaluates and saves at the end of training. `final/` is written under a
//! temporary name and renamed into place; the previous one is replaced only once the new one is
//! complete.

use std::path::{Path, PathBuf};

use super::Trainer;
use crate::error::{Error, Result};

/// The directory under `output_dir` that holds the weights after the last step.
pub const FINAL_DIR: &str = "final";

/// `<output_dir>/final`.
pub fn final_dir(output_dir: &Path) -> PathBuf {
    output_dir.join(FINAL_DIR)
}

impl Trainer {
    /// Evaluates unless the last eval ran at this step (returns the new eval loss), and writes
    /// `final/` on the main process when the trainer has a saver.
    pub(super) fn finish(
        &mut self,
        evaluated_at: &mut Option<u64>,
        stop: &mut Option<String>,
    ) -> Result<Option<f64>> {
        let mut loss = None;
        if self.eval.is_some() && *evaluated_at != Some(self.state.step) {
            loss = Some(self.run_eval(stop)?);
            *evaluated_at = Some(self.state.step);
        }
        if self.save_final && self.is_main() && self.state.step > 0 {
            let d = write_final(self)?;
            tracing::info!(step = self.state.step, "saved {}", d.display());
        }
        Ok(loss)
    }

    /// The scaler's `update` after a step (`found_inf`: the step was skipped).
    pub(super) fn end_scaler_step(&mut self, found_inf: bool) -> Result<()> {
        match self.scaler.as_mut() {
            Some(s) => s.update(found_inf),
            None => Ok(()),
        }
    }

    /// Restores the loss scaler from the resumed state (a checkpoint without one, written by an
    /// fp32/bf16 run, starts the scaler afresh).
    pub(super) fn restore_scaler(&mut self) -> Result<()> {
        match (self.scaler.as_mut(), &self.state.loss_scaler) {
            (Some(s), Some(st)) => s
                .load_state(st)
                .map_err(|e| Error::checkpoint(super::last_dir(&self.output_dir), e.to_string())),
            (Some(s), None) => {
                tracing::warn!(
                    "the resume checkpoint has no loss scaler state; fp16 starts at scale {}",
                    s.config().init_scale
                );
                Ok(())
            }
            (None, _) => Ok(()),
        }
    }
}

fn write_final(t: &Trainer) -> Result<PathBuf> {
    let out = &t.output_dir;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".final.tmp-")
        .tempdir_in(out)
        .map_err(|e| Error::io(out, e))?;
    t.saver.save_to(t.model.as_ref(), tmp.path())?;
    let dst = final_dir(out);
    let kept = tmp.keep();
    crate::error::swap_dir_atomic(&kept, &dst)?;
    Ok(dst)
}
