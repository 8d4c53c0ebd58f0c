//! Evaluation: [`Trainer::evaluate`] during a run, and [`evaluate_model`] /
//! [`evaluate_model_in`] without a trainer (what `volttrain eval` prints).

use std::collections::BTreeMap;

use tch::Device;

use super::{BatchSource, Hook, Precision, Trainer, preference, step};
use crate::amp::Autocast;
use crate::callback::EvalMetrics;
use crate::error::{Error, Result};
use crate::model::CausalLm;

impl Trainer {
    /// Mean loss over all label tokens of the eval data (all ranks).
    pub fn evaluate(&mut self) -> Result<EvalMetrics> {
        let Some(eval) = self.eval.as_mut() else {
            return Err(Error::invalid("evaluate: no eval data was given"));
        };
        let amp = self.amp;
        let model = self.model.as_ref();
        let (mut sums, mut extra) = match self.preference.as_mut() {
            // Loss summed over pairs, label tokens, and the metric sums (last: the pairs).
            Some(o) => preference::eval_sums(o, model, eval.as_mut(), self.device, amp)?,
            None => {
                let s = eval_sums(model, eval.as_mut(), self.device, amp)?;
                (vec![s[0], s[1]], Vec::new())
            }
        };
        if let Some(c) = self.collective.as_mut() {
            sums = c.all_reduce_f64(&sums)?;
            if !extra.is_empty() {
                extra = c.all_reduce_f64(&extra)?;
            }
        }
        if sums[1] == 0.0 {
            return Err(Error::invalid("evaluate: the eval data has no label token"));
        }
        // The loss is a mean over pairs for preference objectives, over label tokens otherwise.
        let denom = extra.last().copied().unwrap_or(sums[1]);
        Ok(EvalMetrics {
            step: self.state.step,
            epoch: self.state.epoch,
            eval_loss: sums[0] / denom,
            tokens: sums[1] as u64,
            extra: preference::metrics_from_sums(&extra),
        })
    }

    pub(super) fn run_eval(&mut self, stop: &mut Option<String>) -> Result<f64> {
        let m = self.evaluate()?;
        tracing::info!(
            step = m.step,
            eval_loss = m.eval_loss,
            tokens = m.tokens,
            "eval"
        );
        self.call(Hook::Eval(&m), stop)?;
        Ok(m.eval_loss)
    }
}

fn eval_sums(
    model: &dyn CausalLm,
    data: &mut dyn BatchSource,
    device: Device,
    amp: Autocast,
) -> Result<[f64; 2]> {
    let mut sums = [0.0, 0.0];
    for i in 0..data.num_batches(0) {
        let b = data.batch(0, i)?;
        let p = step::prepare(&b, device)?;
        sums[0] += step::eval_loss(model, &p, amp)?;
        sums[1] += p.n_labels as f64;
    }
    Ok(sums)
}

/// Mean loss over all label tokens of `data` (epoch 0), without a trainer: what
/// `volttrain eval` prints. `precision: auto`: bf16 autocast on CUDA devices with native bf16,
/// fp32 elsewhere.
pub fn evaluate_model(
    model: &dyn CausalLm,
    data: &mut dyn BatchSource,
    device: Device,
) -> Result<EvalMetrics> {
    evaluate_model_in(model, data, device, Precision::Auto)
}

/// [`evaluate_model`] in `precision` (what `volttrain eval` runs with `training.precision`).
pub fn evaluate_model_in(
    model: &dyn CausalLm,
    data: &mut dyn BatchSource,
    device: Device,
    precision: Precision,
) -> Result<EvalMetrics> {
    let sums = eval_sums(model, data, device, Autocast::new(precision, device))?;
    if sums[1] == 0.0 {
        return Err(Error::invalid("evaluate: the eval data has no label token"));
    }
    Ok(EvalMetrics {
        step: 0,
        epoch: 0,
        eval_loss: sums[0] / sums[1],
        tokens: sums[1] as u64,
        extra: BTreeMap::new(),
    })
}
