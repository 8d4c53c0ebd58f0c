//! The training loop: accumulation, gradient checkpointing, resume, non-finite handling, and the
//! order of callback and optimizer calls (mockall).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::{Sgd, SgdConfig, ToyLm, VecSource, max_abs_diff, one_group};
use mockall::{Sequence, mock};
use tch::Tensor;
use volttrain::Error;
use volttrain::callback::{Callback, Control, EvalMetrics, StepMetrics};
use volttrain::model::CausalLm;
use volttrain::optim::{DynOptimizer, Optimizer, ParamGroup, StateDict};
use volttrain::trainer::{NonFinitePolicy, Trainer, TrainerBuilder};

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

/// Two micro-batches of 2 rows accumulated == one batch of the same 4 rows: the loss is
/// normalised by the label tokens of the whole step, not averaged per micro-batch.
#[test]
fn accumulation_equals_one_large_batch() {
    let _rng = common::GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let src = VecSource::random(2, 2, 12, 50, 1);
    // the same rows as one 4-row batch (both batches have the same length)
    let (mut ids, mut labels) = (Vec::new(), Vec::new());
    for (i, l, _, _) in &src.batches {
        ids.extend_from_slice(i);
        labels.extend_from_slice(l);
    }
    let big = VecSource {
        batches: vec![(ids, labels, 4, 12)],
        seed: 0,
        shuffle: false,
    };
    let small = VecSource {
        shuffle: false,
        ..src
    };

    let dir = tempfile::tempdir().unwrap();
    let mut a = base(ToyLm::new(50, 16, 2, 0.0, 7), small, 0.1)
        .grad_accum(2)
        .max_steps(Some(1))
        .output_dir(dir.path().join("a"))
        .build()
        .unwrap();
    let sa = a.fit().unwrap();
    let mut b = base(ToyLm::new(50, 16, 2, 0.0, 7), big, 0.1)
        .max_steps(Some(1))
        .output_dir(dir.path().join("b"))
        .build()
        .unwrap();
    let sb = b.fit().unwrap();
    assert_eq!(sa.tokens, sb.tokens);
    let (la, lb) = (sa.final_train_loss.unwrap(), sb.final_train_loss.unwrap());
    assert!((la - lb).abs() < 1e-5, "loss {la} vs {lb}");
    for ((n, x), (_, y)) in params(a.model()).iter().zip(params(b.model()).iter()) {
        let d = max_abs_diff(x, y);
        assert!(d < 1e-5, "{n}: {d}");
    }
}

/// Gradient checkpointing recomputes each layer in backward (dropout masks replayed) and gives
/// the same loss and the same update.
#[test]
fn gradient_checkpointing_same_loss_and_update() {
    let _rng = common::GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let run = |ckpt: bool| {
        let dir = tempfile::tempdir().unwrap();
        let mut t = base(
            ToyLm::new(40, 16, 3, 0.1, 3),
            VecSource::random(3, 2, 10, 40, 5),
            0.05,
        )
        .gradient_checkpointing(ckpt)
        .max_steps(Some(3))
        .output_dir(dir.path())
        .build()
        .unwrap();
        let s = t.fit().unwrap();
        (s.final_train_loss.unwrap(), params(t.model()))
    };
    let (l0, p0) = run(false);
    let (l1, p1) = run(true);
    assert!((l0 - l1).abs() < 1e-5, "loss {l0} vs {l1}");
    for ((n, x), (_, y)) in p0.iter().zip(p1.iter()) {
        let d = max_abs_diff(x, y);
        assert!(d < 1e-5, "{n}: {d}");
    }
}

/// Records the loss of every step.
struct Record(Arc<Mutex<Vec<(u64, f64)>>>, Option<(u64, Arc<AtomicBool>)>);
impl Callback for Record {
    fn on_step_end(&mut self, _: &mut Control<'_>, m: &StepMetrics) -> volttrain::Result<()> {
        self.0.lock().unwrap().push((m.step, m.loss));
        if let Some((at, flag)) = &self.1
            && m.step == *at
        {
            flag.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// Interrupt at step 4 (as Ctrl-C does), resume: every later step's loss equals the
/// uninterrupted run's, across an epoch boundary, with dropout and momentum state.
#[test]
fn resume_continues_exactly() {
    let _rng = common::GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let make = |dir: &std::path::Path, rec: Record, resume: bool, flag: Option<Arc<AtomicBool>>| {
        let mut b = base(
            ToyLm::new(40, 16, 2, 0.1, 11),
            VecSource::random(3, 2, 10, 40, 9),
            0.05,
        )
        .epochs(3)
        .output_dir(dir)
        .resume(resume)
        .callback(Box::new(rec));
        if let Some(f) = flag {
            b = b.interrupt_flag(f);
        }
        b.build().unwrap()
    };
    let full = Arc::new(Mutex::new(Vec::new()));
    let d1 = tempfile::tempdir().unwrap();
    make(d1.path(), Record(full.clone(), None), false, None)
        .fit()
        .unwrap();
    let full = full.lock().unwrap().clone();
    assert_eq!(full.len(), 9);

    let d2 = tempfile::tempdir().unwrap();
    let flag = Arc::new(AtomicBool::new(false));
    let first = Arc::new(Mutex::new(Vec::new()));
    let err = make(
        d2.path(),
        Record(first.clone(), Some((4, flag.clone()))),
        false,
        Some(flag),
    )
    .fit()
    .unwrap_err();
    match err {
        Error::Interrupted { step, dir } => {
            assert_eq!(step, 4);
            assert!(dir.join("trainer_state.json").exists());
        }
        e => panic!("expected Interrupted, got {e}"),
    }
    let second = Arc::new(Mutex::new(Vec::new()));
    make(d2.path(), Record(second.clone(), None), true, None)
        .fit()
        .unwrap();
    let mut got = first.lock().unwrap().clone();
    got.extend(second.lock().unwrap().iter().copied());
    assert_eq!(got.len(), full.len());
    for ((s0, l0), (s1, l1)) in full.iter().zip(got.iter()) {
        assert_eq!(s0, s1);
        assert!(
            (l0 - l1).abs() <= 1e-9 * l0.abs().max(1.0),
            "step {s0}: {l0} vs {l1}"
        );
    }
}

#[test]
fn nonfinite_loss_stops_with_step_and_leaves_params() {
    let _rng = common::GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let model = ToyLm::new(30, 8, 1, 0.0, 1);
    {
        let _g = tch::no_grad_guard();
        let e = model.embed.shallow_clone();
        let _ = e.get(3).fill_(f64::NAN);
    }
    let src = VecSource::random(2, 2, 8, 30, 2);
    let has3 = src.batches.iter().any(|(ids, ..)| ids.contains(&3));
    assert!(has3, "fixture must use token 3");
    let dir = tempfile::tempdir().unwrap();
    let mut t = base(model, src, 0.1)
        .epochs(1)
        .output_dir(dir.path())
        .build()
        .unwrap();
    let before = params(t.model());
    match t.fit().unwrap_err() {
        Error::NonFinite { step, what } => {
            assert_eq!(step, 1);
            assert!(what.contains("loss"), "{what}");
        }
        e => panic!("expected NonFinite, got {e}"),
    }
    for ((n, x), (_, y)) in before.iter().zip(params(t.model()).iter()) {
        let same = x.isnan().eq_tensor(&y.isnan()).all().int64_value(&[]) == 1
            && x.nan_to_num(0.0, None, None)
                .equal(&y.nan_to_num(0.0, None, None));
        assert!(same, "{n} changed");
    }
    assert!(!dir.path().join("last").exists(), "nothing saved");

    // skip policy: the run goes on and counts the skipped steps
    let model = ToyLm::new(30, 8, 1, 0.0, 1);
    {
        let _g = tch::no_grad_guard();
        let _ = model.embed.get(3).fill_(f64::NAN);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut t = base(model, VecSource::random(2, 2, 8, 30, 2), 0.1)
        .on_nonfinite(NonFinitePolicy::Skip)
        .output_dir(dir.path())
        .build()
        .unwrap();
    let s = t.fit().unwrap();
    assert_eq!(s.skipped_steps, 2);
}

#[test]
fn build_rejects_bad_combinations() {
    let _rng = common::GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // eval cadence without eval data
    let e = base(
        ToyLm::new(10, 4, 1, 0.0, 1),
        VecSource::random(1, 1, 4, 10, 1),
        0.1,
    )
    .eval_every(Some(1))
    .output_dir(dir.path())
    .build()
    .err()
    .unwrap();
    assert!(e.to_string().contains("no eval data"), "{e}");
    // a trainable parameter the optimizer does not step
    let model = ToyLm::new(10, 4, 1, 0.0, 1);
    let mut groups = one_group(&model, 0.1);
    groups[0].params.retain(|p| !p.name.contains("down"));
    let opt = Box::new(Sgd::new(groups, SgdConfig::default()).unwrap());
    let e = Trainer::builder()
        .model(Box::new(model))
        .train_data(Box::new(VecSource::random(1, 1, 4, 10, 1)))
        .optimizer(opt)
        .base_lr(0.1)
        .build()
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("model.layers.0.down.weight"),
        "names the parameter: {e}"
    );
    // a device that is not there
    let e = base(
        ToyLm::new(10, 4, 1, 0.0, 1),
        VecSource::random(1, 1, 4, 10, 1),
        0.1,
    )
    .device(tch::Device::Cuda(7))
    .build()
    .err()
    .unwrap();
    assert!(e.to_string().contains("cuda:7"), "{e}");
}

mock! {
    pub Cb {}
    impl Callback for Cb {
        fn name(&self) -> &str;
        fn on_fit_start<'a>(&mut self, ctl: &mut Control<'a>) -> volttrain::Result<()>;
        fn on_fit_end<'a>(&mut self, ctl: &mut Control<'a>) -> volttrain::Result<()>;
        fn on_epoch_start<'a>(&mut self, ctl: &mut Control<'a>) -> volttrain::Result<()>;
        fn on_epoch_end<'a>(&mut self, ctl: &mut Control<'a>) -> volttrain::Result<()>;
        fn on_step_end<'a>(&mut self, ctl: &mut Control<'a>, metrics: &StepMetrics) -> volttrain::Result<()>;
        fn on_eval_end<'a>(&mut self, ctl: &mut Control<'a>, metrics: &EvalMetrics) -> volttrain::Result<()>;
        fn on_save<'a>(&mut self, ctl: &mut Control<'a>, dir: &std::path::Path) -> volttrain::Result<()>;
        fn on_error(&mut self, error: &Error);
    }
}

mock! {
    pub Opt {}
    impl DynOptimizer for Opt {
        fn name(&self) -> &str;
        fn groups(&self) -> &[ParamGroup];
        fn groups_mut(&mut self) -> &mut [ParamGroup];
        fn step(&mut self) -> volttrain::Result<()>;
        fn zero_grad(&mut self);
        fn state_dict(&self) -> volttrain::Result<StateDict>;
        fn load_state_dict(&mut self, state: &StateDict) -> volttrain::Result<()>;
    }
}

/// 2 epochs x 2 steps with eval (at the start and after each epoch): the hooks come in this order, and the optimizer is stepped
/// and zeroed once per step.
#[test]
fn callback_and_optimizer_call_order() {
    let _rng = common::GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let model = ToyLm::new(20, 8, 1, 0.0, 1);
    let mut seq = Sequence::new();
    let mut cb = MockCb::new();
    cb.expect_name().return_const("mock".to_string());
    cb.expect_on_fit_start()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(()));
    // the starting eval loss, before any step
    cb.expect_on_eval_end()
        .withf(|_, m| m.step == 0)
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Ok(()));
    for epoch in 0..2usize {
        cb.expect_on_epoch_start()
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_| Ok(()));
        for k in 1..=2u64 {
            let want = epoch as u64 * 2 + k;
            cb.expect_on_step_end()
                .withf(move |_, m| m.step == want && m.loss.is_finite())
                .times(1)
                .in_sequence(&mut seq)
                .returning(|_, _| Ok(()));
        }
        let at = (epoch as u64 + 1) * 2;
        cb.expect_on_eval_end()
            .withf(move |_, m| m.step == at)
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, _| Ok(()));
        cb.expect_on_epoch_end()
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_| Ok(()));
        cb.expect_on_save()
            .withf(|_, d| d.ends_with("last"))
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, _| Ok(()));
    }
    cb.expect_on_fit_end()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(()));
    cb.expect_on_error().times(0);

    let mut opt = MockOpt::new();
    opt.expect_name().return_const("mock".to_string());
    opt.expect_groups().return_const(one_group(&model, 0.1));
    // the schedule writes each group's lr through this
    opt.expect_groups_mut().return_var(Vec::new());
    opt.expect_step().times(4).returning(|| Ok(()));
    opt.expect_zero_grad().times(4).return_const(());
    opt.expect_state_dict()
        .times(2)
        .returning(|| Ok(StateDict::default()));
    opt.expect_load_state_dict().times(0);

    let dir = tempfile::tempdir().unwrap();
    let s = Trainer::builder()
        .model(Box::new(model))
        .train_data(Box::new(VecSource::random(2, 1, 6, 20, 3)))
        .eval_data(Box::new(VecSource::random(1, 1, 6, 20, 4)))
        .optimizer(Box::new(opt))
        .base_lr(0.1)
        .epochs(2)
        .output_dir(dir.path())
        .callback(Box::new(cb))
        .build()
        .unwrap()
        .fit()
        .unwrap();
    assert_eq!(s.steps, 4);
    assert!(s.final_eval_loss.unwrap().is_finite());
}

/// Counts the steps it has seen; its count is its state.
struct Counter {
    name: &'static str,
    seen: u64,
    /// The count after `load_state_dict`, and after the run's last step.
    report: Arc<Mutex<(Option<u64>, u64)>>,
}
impl Callback for Counter {
    fn name(&self) -> &str {
        self.name
    }
    fn on_step_end(&mut self, _: &mut Control<'_>, _: &StepMetrics) -> volttrain::Result<()> {
        self.seen += 1;
        self.report.lock().unwrap().1 = self.seen;
        Ok(())
    }
    fn state_dict(&self) -> volttrain::Result<Option<serde_json::Value>> {
        Ok(Some(serde_json::json!({ "seen": self.seen })))
    }
    fn load_state_dict(&mut self, state: serde_json::Value) -> volttrain::Result<()> {
        self.seen = state["seen"]
            .as_u64()
            .ok_or_else(|| Error::invalid(format!("bad counter state {state}")))?;
        self.report.lock().unwrap().0 = Some(self.seen);
        Ok(())
    }
}

/// A callback without state, named as the test says.
struct Named(&'static str);
impl Callback for Named {
    fn name(&self) -> &str {
        self.0
    }
}

/// Callbacks' state goes into `last/callbacks.json` by name (`name#2` for a second one of the
/// same name) and comes back on resume whatever the callbacks' order; a saved state that no
/// callback of the resumed run takes is an error naming it.
#[test]
fn callback_state_survives_resume_matched_by_name() {
    let _rng = common::GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let counter = |name, report: &Arc<Mutex<(Option<u64>, u64)>>| -> Box<dyn Callback> {
        Box::new(Counter {
            name,
            seen: 0,
            report: report.clone(),
        })
    };
    let make = |steps: u64, resume: bool, cbs: Vec<Box<dyn Callback>>| {
        let mut b = base(
            ToyLm::new(40, 16, 2, 0.0, 11),
            VecSource::random(3, 2, 10, 40, 9),
            0.05,
        )
        .max_steps(Some(steps))
        .output_dir(dir.path())
        .resume(resume);
        for c in cbs {
            b = b.callback(c);
        }
        b.build().unwrap()
    };
    let (a, b) = (Arc::default(), Arc::default());
    make(
        3,
        false,
        vec![
            counter("counter", &a),
            Box::new(Named("plain")),
            counter("counter", &b),
        ],
    )
    .fit()
    .unwrap();
    let saved: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            dir.path()
                .join("last")
                .join(volttrain::trainer::CALLBACK_STATE),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        saved,
        serde_json::json!({ "counter": { "seen": 3 }, "counter#2": { "seen": 3 } })
    );

    // Resumed with the callbacks in another order: each counter goes on from 3.
    let (a2, b2) = (Arc::default(), Arc::default());
    make(
        5,
        true,
        vec![
            Box::new(Named("plain")),
            counter("counter", &a2),
            counter("counter", &b2),
        ],
    )
    .fit()
    .unwrap();
    for r in [&a2, &b2] {
        assert_eq!(*r.lock().unwrap(), (Some(3), 5));
    }

    // A resumed run without a callback whose state was saved: an error naming it.
    let e = make(7, true, vec![counter("counter", &Arc::default())])
        .fit()
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("counter#2") && msg.contains("callbacks.json"),
        "{msg}"
    );
}
