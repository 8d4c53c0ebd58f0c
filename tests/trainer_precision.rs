//! Issue #14 in the training loop: fp16's loss scaler lives in `last/` and resume restores it;
//! bf16 runs on the CPU with fp32 parameters and optimizer state; the end of a run (max_steps
//! mid-epoch, an interrupt) evaluates once more and writes the final weights to `final/`.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::{Sgd, SgdConfig, ToyLm, VecSource, max_abs_diff, one_group};
use tch::{Kind, Tensor};
use volttrain::Error;
use volttrain::amp::{LossScalerConfig, Precision};
use volttrain::callback::{Callback, Control, EvalMetrics, ModelSaver, StepMetrics};
use volttrain::model::CausalLm;
use volttrain::optim::{DynOptimizer, Optimizer};
use volttrain::trainer::{FINAL_DIR, Trainer, TrainerBuilder};

fn sgd(model: &dyn CausalLm, lr: f64, momentum: f64) -> Box<dyn DynOptimizer> {
    Box::new(Sgd::new(one_group(model, lr), SgdConfig { momentum }).unwrap())
}

fn params(m: &dyn CausalLm) -> Vec<(String, Tensor)> {
    m.named_parameters()
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy()))
        .collect()
}

fn base(model: ToyLm, src: VecSource, lr: f64) -> TrainerBuilder {
    let opt = sgd(&model, lr, 0.9);
    Trainer::builder()
        .model(Box::new(model))
        .train_data(Box::new(src))
        .optimizer(opt)
        .base_lr(lr)
}

/// Records step losses and eval steps; sets `flag` after the `at`-th recorded step.
#[derive(Clone, Default)]
struct Record {
    steps: Arc<Mutex<Vec<(u64, f64)>>>,
    evals: Arc<Mutex<Vec<(u64, f64)>>>,
    stop_after: Option<(usize, Arc<AtomicBool>)>,
}

impl Callback for Record {
    fn on_step_end(&mut self, _: &mut Control<'_>, m: &StepMetrics) -> volttrain::Result<()> {
        let mut s = self.steps.lock().unwrap();
        s.push((m.step, m.loss));
        if let Some((n, flag)) = &self.stop_after
            && s.len() == *n
        {
            flag.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
    fn on_eval_end(&mut self, _: &mut Control<'_>, m: &EvalMetrics) -> volttrain::Result<()> {
        self.evals.lock().unwrap().push((m.step, m.eval_loss));
        Ok(())
    }
}

fn trainer_state(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("last/trainer_state.json")).unwrap()).unwrap()
}

/// fp16 on the CPU (the autocast code path CUDA runs): a scale of 2^22 overflows the toy
/// model's fp16 gradients, so steps are skipped while it backs off, and with a growth interval
/// of 2 it grows again. Interrupted after the second applied step and resumed, every applied
/// step's loss, the skipped-step count, the final weights and the saved scaler state equal the
/// uninterrupted run's: the scaler's state went through `last/`.
#[test]
fn fp16_loss_scaler_state_survives_resume() {
    let _rng = common::GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let scaler = LossScalerConfig {
        init_scale: 2f64.powi(22),
        growth_interval: 2,
        ..Default::default()
    };
    let make = |dir: &Path, rec: Record, resume: bool, flag: Option<Arc<AtomicBool>>| {
        let mut b = base(
            ToyLm::new(40, 16, 2, 0.0, 11),
            VecSource::random(3, 2, 10, 40, 9),
            0.05,
        )
        .precision(Precision::Fp16)
        .loss_scaler(scaler.clone())
        .epochs(4)
        .output_dir(dir)
        .resume(resume)
        .callback(Box::new(rec));
        if let Some(f) = flag {
            b = b.interrupt_flag(f);
        }
        b.build().unwrap()
    };
    let d1 = tempfile::tempdir().unwrap();
    let full = Record::default();
    let mut t = make(d1.path(), full.clone(), false, None);
    let s_full = t.fit().unwrap();
    let p_full = params(t.model());
    let full_steps = full.steps.lock().unwrap().clone();
    let st_full = trainer_state(d1.path());
    assert!(
        s_full.skipped_steps >= 1,
        "2^22 must overflow fp16 at first: {s_full:?}"
    );
    assert!(full_steps.len() >= 4, "applied steps: {full_steps:?}");
    // parameters stay fp32 under fp16 autocast
    for (n, p) in &p_full {
        assert_eq!(p.kind(), Kind::Float, "{n}");
    }

    let d2 = tempfile::tempdir().unwrap();
    let flag = Arc::new(AtomicBool::new(false));
    let first = Record {
        stop_after: Some((2, flag.clone())),
        ..Default::default()
    };
    let err = make(d2.path(), first.clone(), false, Some(flag))
        .fit()
        .unwrap_err();
    assert!(matches!(err, Error::Interrupted { .. }), "{err}");
    let mid = trainer_state(d2.path());
    assert!(
        mid["loss_scaler"]["scale"].as_f64().is_some(),
        "last/ holds the scaler: {mid}"
    );
    let second = Record::default();
    let mut t = make(d2.path(), second.clone(), true, None);
    let s_res = t.fit().unwrap();
    let mut got = first.steps.lock().unwrap().clone();
    got.extend(second.steps.lock().unwrap().iter().copied());
    assert_eq!(got, full_steps, "applied steps and their losses");
    assert_eq!(s_res.skipped_steps, s_full.skipped_steps);
    assert_eq!(
        trainer_state(d2.path())["loss_scaler"],
        st_full["loss_scaler"]
    );
    for ((n, x), (_, y)) in p_full.iter().zip(params(t.model()).iter()) {
        assert_eq!(max_abs_diff(x, y), 0.0, "{n}");
    }
}

/// bf16 on the CPU is allowed (slow on CPUs without bf16 instructions, the user's choice): the
/// model trains, parameters and momentum stay fp32.
#[test]
fn bf16_on_cpu_trains_with_fp32_params_and_state() {
    let _rng = common::GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let d = tempfile::tempdir().unwrap();
    let model = ToyLm::new(40, 16, 2, 0.0, 3);
    let before = params(&model);
    let mut t = base(model, VecSource::random(2, 2, 10, 40, 5), 0.05)
        .precision(Precision::Bf16)
        .epochs(1)
        .output_dir(d.path())
        .build()
        .unwrap();
    let s = t.fit().unwrap();
    assert_eq!(s.steps, 2);
    assert!(s.final_train_loss.unwrap().is_finite());
    for ((n, a), (_, b)) in before.iter().zip(params(t.model()).iter()) {
        assert_eq!(b.kind(), Kind::Float, "{n}");
        assert!(max_abs_diff(a, b) > 0.0, "{n} did not move");
    }
    let opt = Tensor::read_safetensors(d.path().join("last/optimizer.safetensors")).unwrap();
    assert!(!opt.is_empty());
    for (n, t) in opt {
        assert_eq!(t.kind(), Kind::Float, "optimizer state {n}");
    }
}

/// Writes the trainable parameters (what a PEFT adapter holds) and the step.
struct ParamSaver;
impl ModelSaver for ParamSaver {
    fn save_to(&self, model: &dyn CausalLm, dir: &Path) -> volttrain::Result<()> {
        let ps: Vec<(String, Tensor)> = model
            .named_parameters()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(n, t)| (n, t.detach().copy()))
            .collect();
        Tensor::write_safetensors(&ps, dir.join("weights.safetensors"))
            .map_err(|e| Error::invalid(e.to_string()))
    }
}

/// What one end-of-run case left.
struct Ended {
    dir: tempfile::TempDir,
    rec: Record,
    result: volttrain::Result<volttrain::trainer::FitSummary>,
    /// The model's trainable weights after `fit`.
    params: Vec<(String, Tensor)>,
    /// The eval loss of the final model, evaluated again after `fit`.
    fresh: f64,
}

fn end_of_run(max_steps: Option<u64>, interrupt_after: Option<usize>) -> Ended {
    let d = tempfile::tempdir().unwrap();
    let flag = Arc::new(AtomicBool::new(false));
    let rec = Record {
        stop_after: interrupt_after.map(|n| (n, flag.clone())),
        ..Default::default()
    };
    let mut b = base(
        ToyLm::new(40, 16, 2, 0.0, 21),
        VecSource::random(4, 2, 10, 40, 13),
        0.1,
    )
    .eval_data(Box::new(VecSource::random(2, 2, 10, 40, 14)))
    .saver(Box::new(ParamSaver))
    .epochs(1)
    .max_steps(max_steps)
    .output_dir(d.path())
    .callback(Box::new(rec.clone()));
    if interrupt_after.is_some() {
        b = b.interrupt_flag(flag);
    }
    let mut t = b.build().unwrap();
    let result = t.fit();
    let params = params(t.model());
    let fresh = t.evaluate().unwrap().eval_loss;
    Ended {
        dir: d,
        rec,
        result,
        params,
        fresh,
    }
}

fn check_final(dir: &Path, model_params: &[(String, Tensor)]) {
    let saved: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join(FINAL_DIR).join("weights.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(saved.len(), model_params.len());
    for (n, p) in model_params {
        assert!(
            saved[n].equal(p),
            "{n}: final/ is not the last step's weights"
        );
    }
    let names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(names.is_empty(), "temporary directories left: {names:?}");
}

/// `max_steps: 3` of a 4-step epoch: one eval after step 3 (besides step 0), the summary's
/// final_eval_loss is that eval (= evaluating the final model afresh), and `final/` holds the
/// weights of step 3.
#[test]
fn max_steps_mid_epoch_evaluates_and_saves_final() {
    let _rng = common::GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let Ended {
        dir: d,
        rec,
        result,
        params: p,
        fresh,
    } = end_of_run(Some(3), None);
    let s = result.unwrap();
    assert_eq!(s.steps, 3);
    let evals = rec.evals.lock().unwrap().clone();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), vec![0, 3]);
    assert_eq!(s.final_eval_loss, Some(evals[1].1));
    assert_eq!(s.final_eval_loss, Some(fresh));
    assert_ne!(
        evals[0].1, evals[1].1,
        "the step-0 eval is not the final one"
    );
    check_final(d.path(), &p);
    assert!(d.path().join("last/trainer_state.json").exists());
}

/// A run that completes its epochs also ends with `final/`, and evaluates once per epoch end
/// (no second eval at the same step).
#[test]
fn full_run_saves_final_without_a_second_eval() {
    let _rng = common::GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let Ended {
        dir: d,
        rec,
        result,
        params: p,
        fresh,
    } = end_of_run(None, None);
    let s = result.unwrap();
    assert_eq!(s.steps, 4);
    let evals = rec.evals.lock().unwrap().clone();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), vec![0, 4]);
    assert_eq!(s.final_eval_loss, Some(fresh));
    check_final(d.path(), &p);
}

/// An interrupt after step 2 writes `last/`, evaluates after step 2 and writes `final/`.
#[test]
fn interrupt_evaluates_and_saves_final() {
    let _rng = common::GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let Ended {
        dir: d,
        rec,
        result,
        params: p,
        fresh,
    } = end_of_run(None, Some(2));
    match result {
        Err(Error::Interrupted { step, .. }) => assert_eq!(step, 2),
        other => panic!("expected Interrupted, got {:?}", other.map(|s| s.steps)),
    }
    let evals = rec.evals.lock().unwrap().clone();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), vec![0, 2]);
    assert_eq!(evals[1].1, fresh);
    check_final(d.path(), &p);
    assert!(d.path().join("last/trainer_state.json").exists());
}
