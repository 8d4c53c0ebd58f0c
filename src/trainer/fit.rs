//! The loop: [`Trainer::fit`] runs epochs of optimizer steps, each one
//! [`Trainer::train_step`], with the hooks, evaluations, checkpoints and the interrupt check
//! between them.

use std::sync::atomic::Ordering;
use std::time::Instant;

use tch::Tensor;

use super::{
    FitSummary, Hook, NonFinitePolicy, PreferenceObjective, Trainer, last_dir, preference, step,
};
use crate::callback::StepMetrics;
use crate::error::{Error, Result};

impl Trainer {
    /// Runs the training. On error every callback's `on_error` is called first.
    pub fn fit(&mut self) -> Result<FitSummary> {
        match self.fit_inner() {
            Ok(s) => Ok(s),
            Err(e) => {
                for cb in self.callbacks.iter_mut() {
                    cb.on_error(&e);
                }
                Err(e)
            }
        }
    }

    fn fit_inner(&mut self) -> Result<FitSummary> {
        let start = Instant::now();
        self.prepare_fit()?;
        let mut stop: Option<String> = None;
        let mut last_loss = None;
        let mut last_eval = None;
        let input_tokens_at_start = self.state.input_tokens;
        let mut saved_at: Option<u64> = None;
        let mut evaluated_at: Option<u64> = None;
        self.call(Hook::FitStart, &mut stop)?;
        if self.eval.is_some() && self.state.step == 0 {
            // The starting point, so the log shows how far training moved the eval loss.
            last_eval = Some(self.run_eval(&mut stop)?);
            evaluated_at = Some(0);
        }

        'epochs: while self.state.epoch < self.epochs && self.state.step < self.total_steps {
            let epoch = self.state.epoch;
            let n_batches = self.train.num_batches(epoch);
            if self.state.batch_in_epoch == 0 {
                self.call(Hook::EpochStart, &mut stop)?;
            }
            while self.state.batch_in_epoch < n_batches && self.state.step < self.total_steps {
                let Some(metrics) = self.train_step(epoch, n_batches)? else {
                    // skipped (fp16 overflow, or a non-finite step under `on_nonfinite: skip`)
                    continue;
                };
                let step_no = metrics.step;
                last_loss = Some(metrics.loss);
                self.call(Hook::Step(&metrics), &mut stop)?;
                if let Some(n) = self.eval_every
                    && n > 0
                    && step_no.is_multiple_of(n)
                {
                    last_eval = Some(self.run_eval(&mut stop)?);
                    evaluated_at = Some(step_no);
                }
                if let Some(n) = self.checkpoint_every
                    && n > 0
                    && step_no.is_multiple_of(n)
                    && self.is_main()
                {
                    let d = self.save_resume()?;
                    saved_at = Some(self.state.step);
                    self.call(Hook::Save(&d), &mut stop)?;
                }
                if self.interrupted()? {
                    return Err(self.interrupt_run(&mut evaluated_at, &mut stop)?);
                }
                if stop.is_some() {
                    break 'epochs;
                }
            }
            if self.state.batch_in_epoch >= n_batches {
                if self.eval.is_some() {
                    last_eval = Some(self.run_eval(&mut stop)?);
                    evaluated_at = Some(self.state.step);
                }
                self.call(Hook::EpochEnd, &mut stop)?;
                self.state.epoch += 1;
                self.state.batch_in_epoch = 0;
                if self.is_main() {
                    let d = self.save_resume()?;
                    saved_at = Some(self.state.step);
                    self.call(Hook::Save(&d), &mut stop)?;
                }
                if stop.is_some() {
                    break;
                }
            }
        }
        // The end of the run (also mid-epoch: max_steps, a callback's stop): eval after the last
        // step unless it just ran, and the final weights in `final/`.
        if let Some(l) = self.finish(&mut evaluated_at, &mut stop)? {
            last_eval = Some(l);
        }
        // A run that ends mid-epoch (max_steps, a callback's stop) still leaves `last/`.
        if self.is_main() && self.state.step > 0 && saved_at != Some(self.state.step) {
            let d = self.save_resume()?;
            self.call(Hook::Save(&d), &mut stop)?;
        }
        let train_secs = start.elapsed().as_secs_f64();
        self.call(Hook::FitEnd, &mut stop)?;
        if let Some(reason) = &stop {
            tracing::info!("stopped early: {reason}");
        }
        let elapsed = start.elapsed().as_secs_f64();
        Ok(FitSummary {
            steps: self.state.step,
            tokens: self.state.label_tokens,
            input_tokens: self.state.input_tokens,
            final_train_loss: last_loss,
            final_eval_loss: last_eval,
            tokens_per_sec: (self.state.input_tokens - input_tokens_at_start) as f64
                / train_secs.max(1e-9),
            skipped_steps: self.state.skipped_steps,
            train_secs,
            elapsed_secs: elapsed,
            stopped_by: stop,
            callbacks: self
                .callbacks
                .iter()
                .filter_map(|c| c.summary().map(|s| (c.name().to_string(), s)))
                .collect(),
        })
    }

    /// Before the first step: the malloc setting, a preference objective's reference pass,
    /// resume, and in data parallel rank 0's weights everywhere and the gradient buckets.
    fn prepare_fit(&mut self) -> Result<()> {
        match self.keep_freed_memory {
            Some(true) => crate::malloc::keep_freed_memory(),
            Some(false) => crate::malloc::return_freed_memory(),
            None => {}
        }
        if let Some(o) = self.preference.as_mut() {
            // Before `restore`: the reference is the model as it was given.
            preference::precompute_if_asked(
                o,
                self.model.as_ref(),
                self.train.as_mut(),
                self.eval.as_mut(),
                self.device,
            )?;
        }
        if self.resume {
            self.restore()?;
        }
        if let Some(c) = self.collective.as_mut() {
            c.broadcast_params(&self.model.named_parameters())?;
            let trainable: Vec<(String, Tensor)> = self
                .optimizer
                .groups()
                .iter()
                .flat_map(|g| {
                    g.params
                        .iter()
                        .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
                })
                .collect();
            c.prepare_grads(&trainable)?;
        }
        Ok(())
    }

    /// Whether the run was interrupted (Ctrl-C) during the last step, on any rank.
    fn interrupted(&mut self) -> Result<bool> {
        let mut interrupted = self
            .interrupt
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst));
        if let Some(c) = self.collective.as_mut() {
            // Ranks see a Ctrl-C at different moments: stop every rank after the same
            // step when any rank saw it.
            let r = c.all_reduce_f64(&[f64::from(u8::from(interrupted))])?;
            interrupted = r[0] > 0.0;
        }
        Ok(interrupted)
    }

    /// Ends an interrupted run: `last/`, one more eval and `final/` (as at `max_steps`); the
    /// error to return, [`Error::Interrupted`].
    fn interrupt_run(
        &mut self,
        evaluated_at: &mut Option<u64>,
        stop: &mut Option<String>,
    ) -> Result<Error> {
        let dir = if self.is_main() {
            self.save_resume()?
        } else {
            last_dir(&self.output_dir)
        };
        self.finish(evaluated_at, stop)?;
        if let Some(c) = self.collective.as_mut() {
            // No rank exits before rank 0 has written `last/`: a launcher stops
            // the other ranks as soon as one exits with an error.
            c.all_reduce_f64(&[0.0])?;
        }
        Ok(Error::Interrupted {
            step: self.state.step,
            dir,
        })
    }

    /// One optimizer step over the next `grad_accum` micro-batches of `epoch` (of `n_batches`):
    /// forward and backward of each (the loss scaled by the step's label tokens, or pairs, on
    /// all ranks, and by fp16's loss scale), the gradient average over ranks, unscaling,
    /// clipping, the non-finite check, the schedule, the optimizer step, and the position
    /// moved on. Returns the step's metrics, or `None` when the step was skipped (fp16
    /// overflow, or a non-finite value under [`NonFinitePolicy::Skip`]).
    fn train_step(&mut self, epoch: usize, n_batches: usize) -> Result<Option<StepMetrics>> {
        let t0 = Instant::now();
        let first = self.state.batch_in_epoch;
        let last = (first + self.grad_accum).min(n_batches);
        let mut prepared = Vec::with_capacity(last - first);
        for i in first..last {
            let b = self.train.batch(epoch, i)?;
            prepared.push(step::prepare(&b, self.device)?);
        }
        let counts = self.step_counts(&prepared)?;
        let n_labels = counts[0];
        let n_units = counts[2];
        // Gradients are averaged over ranks afterwards, so each rank scales its summed
        // loss by world / (units of the step on all ranks).
        let world = self.collective.as_ref().map_or(1, |c| c.world_size()) as f64;
        let scale = if n_units > 0.0 { world / n_units } else { 0.0 };
        // fp16: the loss times the loss scale (exact: a power of two)
        let scale = match &self.scaler {
            Some(s) => scale * s.scale()?,
            None => scale,
        };
        let mut loss_sum = self.backward_micro_batches(&prepared, scale)?;
        let mut params: Vec<Tensor> = Vec::new();
        for g in self.optimizer.groups() {
            for p in &g.params {
                params.push(p.tensor.shallow_clone());
            }
        }
        let mut extra_sums = self.preference.as_mut().map(|o| o.take_sums().to_vec());
        if let Some(c) = self.collective.as_mut() {
            c.average_grads()?;
            let r = c.all_reduce_f64(&[loss_sum])?;
            loss_sum = r[0];
            if let Some(s) = extra_sums.as_mut() {
                *s = c.all_reduce_f64(s)?;
            }
        }
        let loss = if n_units > 0.0 {
            loss_sum / n_units
        } else {
            0.0
        };
        // fp16: gradients unscaled before clipping; inf/NaN ones skip the step
        let found_inf = match self.scaler.as_mut() {
            Some(s) => s.unscale(&params)?,
            None => false,
        };
        let grad_norm = crate::optim::grad_norm_clipped(&params, self.clip_norm)?;
        let step_no = self.state.step + 1;
        if found_inf && loss.is_finite() {
            tracing::info!(
                "step {step_no}: fp16 gradients overflowed; step skipped, loss scale lowered"
            );
            return self.skip_step(last);
        }
        if !loss.is_finite() || !grad_norm.is_finite() {
            let what = if loss.is_finite() {
                format!("gradient norm ({grad_norm})")
            } else {
                format!("loss ({loss})")
            };
            match self.on_nonfinite {
                NonFinitePolicy::Stop => {
                    self.optimizer.zero_grad();
                    return Err(Error::NonFinite {
                        step: step_no,
                        what,
                    });
                }
                NonFinitePolicy::Skip => {
                    tracing::warn!("step {step_no}: non-finite {what}; step skipped");
                    return self.skip_step(last);
                }
            }
        }
        crate::sched::apply(
            self.scheduler.as_ref(),
            self.optimizer.as_mut(),
            self.base_lr,
            self.state.step,
        );
        self.optimizer.step()?;
        self.optimizer.zero_grad();
        self.end_scaler_step(false)?;
        self.state.step = step_no;
        self.state.batch_in_epoch = last;
        self.state.label_tokens += n_labels as u64;
        self.state.input_tokens += counts[1] as u64;
        let dt = t0.elapsed().as_secs_f64();
        let metrics = StepMetrics {
            step: step_no,
            epoch,
            loss,
            lr: self
                .optimizer
                .groups()
                .iter()
                .map(|g| (g.name.clone(), g.lr))
                .collect(),
            grad_norm,
            tokens: n_labels as u64,
            tokens_per_sec: counts[1] / dt.max(1e-9),
            extra: extra_sums
                .map(|s| preference::metrics_from_sums(&s))
                .unwrap_or_default(),
        };
        Ok(Some(metrics))
    }

    /// Label tokens, input tokens and loss units (label tokens for SFT, pairs for preference
    /// objectives) of a step's micro-batches, summed over all ranks.
    fn step_counts(&mut self, prepared: &[step::Prepared]) -> Result<[f64; 3]> {
        let units = |p: &step::Prepared| match &self.preference {
            Some(_) => PreferenceObjective::units(p),
            None => p.n_labels as f64,
        };
        let mut counts = [
            prepared.iter().map(|p| p.n_labels as f64).sum::<f64>(),
            prepared.iter().map(|p| p.n_inputs as f64).sum::<f64>(),
            prepared.iter().map(units).sum::<f64>(),
        ];
        if let Some(c) = self.collective.as_mut() {
            let r = c.all_reduce_f64(&counts)?;
            counts = [r[0], r[1], r[2]];
        }
        Ok(counts)
    }

    /// Forward and backward of each micro-batch of a step, the loss times `scale`; the summed
    /// unscaled loss of this rank.
    fn backward_micro_batches(&mut self, prepared: &[step::Prepared], scale: f64) -> Result<f64> {
        let mut loss_sum = 0.0;
        let amp = self.amp;
        let n_micro = prepared.len();
        for (micro, p) in prepared.iter().enumerate() {
            if let Some(c) = self.collective.as_mut() {
                // With checkpointing a parameter's gradient can arrive in several
                // backward calls (tied embeddings), so buckets are reduced after it.
                c.sync_in_backward(micro + 1 == n_micro && !self.gradient_checkpointing);
            }
            let model = self.model.as_ref();
            let ckpt = self.gradient_checkpointing;
            let seed = (self.state.seed, self.state.step, micro);
            loss_sum += match self.preference.as_mut() {
                Some(o) => o.forward_backward(model, p, scale, ckpt, seed, amp)?,
                None => step::forward_backward(model, p, scale, ckpt, seed, amp)?,
            };
        }
        Ok(loss_sum)
    }

    /// Drops a step's gradients and counts it as skipped; the position moves past its
    /// micro-batches (up to `last`), as a step would.
    fn skip_step(&mut self, last: usize) -> Result<Option<StepMetrics>> {
        self.optimizer.zero_grad();
        self.end_scaler_step(true)?;
        self.state.skipped_steps += 1;
        self.state.batch_in_epoch = last;
        self.state.step += 1;
        Ok(None)
    }
}
