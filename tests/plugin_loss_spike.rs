//! The loss-spike callback plugin (`plugins/loss-spike`): built, loaded as a dylib, built by
//! name from YAML, driven with step metrics as the trainer would, and checked to ask for a stop
//! exactly at the step its rule names.

mod plugin_support;

use volttrain::callback::StepMetrics;
use volttrain::plugin::{self, CallbackCtx};

fn load() {
    let lib = plugin_support::plugin_library("volttrain-loss-spike");
    plugin::load_plugin(&lib).unwrap();
}

fn metrics(losses: &[f64], grad_norms: &[f64]) -> Vec<StepMetrics> {
    losses
        .iter()
        .zip(grad_norms)
        .enumerate()
        .map(|(i, (&loss, &grad_norm))| StepMetrics {
            step: i as u64 + 1,
            loss,
            grad_norm,
            ..Default::default()
        })
        .collect()
}

/// A decaying, noisy loss curve: `3 exp(-t/30) + 1 + 0.1 sin(t)`.
fn smooth(n: usize) -> Vec<f64> {
    (0..n)
        .map(|t| 3.0 * (-(t as f64) / 30.0).exp() + 1.0 + 0.1 * (t as f64).sin())
        .collect()
}

fn run(
    yaml: &str,
    losses: &[f64],
    grad_norms: &[f64],
) -> (Option<(u64, String)>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
    let ctx = CallbackCtx {
        output_dir: dir.path().into(),
    };
    let mut cb = plugin::build_callback("loss_spike", &cfg, &ctx).unwrap();
    assert_eq!(cb.name(), "loss_spike");
    let stopped =
        plugin_support::drive_steps(cb.as_mut(), dir.path(), &metrics(losses, grad_norms)).unwrap();
    (stopped, dir)
}

#[test]
fn stops_at_the_first_loss_above_factor_times_window_mean() {
    load();
    let mut losses = smooth(60);
    // Step 41 (index 40) jumps to 2.5x the running mean: a spike for factor 2, not for 3.
    let window: Vec<f64> = losses[35..40].to_vec();
    let mean = window.iter().sum::<f64>() / 5.0;
    losses[40] = 2.5 * mean;
    let norms = vec![1.0; 60];

    let (stopped, dir) = run(
        "{name: loss_spike, window: 5, factor: 2.0}",
        &losses,
        &norms,
    );
    let (step, reason) = stopped.expect("a stop request");
    assert_eq!(step, 41, "{reason}");
    assert!(
        reason.contains("x the mean") && reason.contains("step 41"),
        "{reason}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("loss_spike.json")).unwrap())
            .unwrap();
    assert_eq!(report["step"], 41);
    assert!(
        (report["baseline"].as_f64().unwrap() - mean).abs() < 1e-12,
        "{report}"
    );
    assert!((report["loss"].as_f64().unwrap() - 2.5 * mean).abs() < 1e-12);

    // With factor 3 the same curve runs to the end, and no report is written.
    let (stopped, dir) = run("{window: 5, factor: 3.0}", &losses, &norms);
    assert_eq!(stopped, None);
    assert!(!dir.path().join("loss_spike.json").exists());
}

/// 40 steps of [`smooth`] with an isolated spike at step 16 (tolerated with patience 2) and
/// spikes at steps 26 and 27 against the clean baseline of steps 21-25 (window 5, factor 3),
/// returned with it. Step 27 is one only because step 26 stayed out of the baseline: with it in,
/// the mean would be ~1.6x higher.
fn spikes_for_patience_2() -> (Vec<f64>, f64) {
    let mut losses = smooth(40);
    let mean = |r: std::ops::Range<usize>, l: &[f64]| l[r].iter().sum::<f64>() / 5.0;
    losses[15] = 4.0 * mean(10..15, &losses);
    let base = mean(20..25, &losses);
    losses[25] = 4.0 * base;
    losses[26] = 3.5 * base;
    (losses, base)
}

#[test]
fn patience_needs_consecutive_spikes_and_spikes_stay_out_of_the_baseline() {
    load();
    let (losses, base) = spikes_for_patience_2();
    let norms = vec![1.0; 40];
    let (stopped, _dir) = run("{window: 5, factor: 3.0, patience: 2}", &losses, &norms);
    let (step, reason) = stopped.expect("a stop request");
    assert_eq!(step, 27, "{reason}");
    assert!(
        reason.contains(&format!("the mean {base} of the last 5 steps")),
        "{reason}"
    );
    assert!(reason.contains("2 spikes in a row"), "{reason}");
}

#[test]
fn gradient_norm_and_non_finite_loss_stop_the_run() {
    load();
    let losses = smooth(20);
    let mut norms = vec![2.0; 20];
    norms[6] = 12.5;
    let (stopped, _dir) = run("{max_grad_norm: 10.0}", &losses, &norms);
    let (step, reason) = stopped.expect("a stop request");
    assert_eq!(step, 7);
    assert!(
        reason.contains("gradient norm 12.5 > max_grad_norm 10"),
        "{reason}"
    );

    let mut losses = smooth(20);
    losses[2] = f64::NAN;
    let (stopped, _dir) = run("{}", &losses, &[1.0; 20]);
    let (step, reason) = stopped.expect("a stop request");
    assert_eq!(step, 3);
    assert!(reason.contains("non-finite loss NaN"), "{reason}");
}

#[test]
fn bad_settings_are_config_errors() {
    load();
    let ctx = CallbackCtx::default();
    for (yaml, key) in [
        ("{factor: 0.5}", "callbacks.loss_spike.factor"),
        ("{window: 0}", "callbacks.loss_spike.window"),
        ("{patience: 0}", "callbacks.loss_spike.patience"),
        (
            "{max_grad_norm: -1.0}",
            "callbacks.loss_spike.max_grad_norm",
        ),
        ("{windw: 3}", "windw"),
    ] {
        let cfg: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        let e = plugin::build_callback("loss_spike", &cfg, &ctx)
            .err()
            .expect(yaml)
            .to_string();
        assert!(e.contains(key), "{yaml}: {e}");
    }
}

/// Stops a run at `split`, writes the callback's state as the trainer does (JSON, through the
/// dylib's guard), builds a fresh callback as a resumed run would, gives it the state, and
/// drives the rest: the stop is the uninterrupted run's, at the same step, for the same reason.
#[test]
fn window_and_spike_count_survive_resume() {
    load();
    let (losses, _) = spikes_for_patience_2();
    let norms = vec![1.0; 40];
    let all = metrics(&losses, &norms);
    let yaml = "{window: 5, factor: 3.0, patience: 2}";
    let (full, _dir) = run(yaml, &losses, &norms);
    let full = full.expect("a stop request");
    assert_eq!(full.0, 27);

    let dir = tempfile::tempdir().unwrap();
    let cfg: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
    let ctx = CallbackCtx {
        output_dir: dir.path().into(),
    };
    // Every split point, among them 26: between the two spikes in a row (the count matters)
    // and 3 (a window still filling).
    for split in [3, 10, 16, 20, 26] {
        let mut first = plugin::build_callback("loss_spike", &cfg, &ctx).unwrap();
        let stopped = plugin_support::drive_steps(first.as_mut(), dir.path(), &all[..split]);
        assert_eq!(stopped.unwrap(), None, "split {split}");
        let state = first.state_dict().unwrap().expect("loss_spike has state");
        let json = serde_json::to_string(&state).unwrap();
        let mut resumed = plugin::build_callback("loss_spike", &cfg, &ctx).unwrap();
        resumed
            .load_state_dict(serde_json::from_str(&json).unwrap())
            .unwrap();
        assert_eq!(resumed.state_dict().unwrap(), Some(state), "split {split}");
        let stopped = plugin_support::drive_steps(resumed.as_mut(), dir.path(), &all[split..]);
        assert_eq!(stopped.unwrap().as_ref(), Some(&full), "split {split}");
    }
    // Without the state the resumed callback misses the stop at step 27: its window refills.
    let mut fresh = plugin::build_callback("loss_spike", &cfg, &ctx).unwrap();
    let stopped = plugin_support::drive_steps(fresh.as_mut(), dir.path(), &all[26..]).unwrap();
    assert_eq!(stopped, None);

    // A NaN loss in the window (stop_on_non_finite off) is kept as "NaN" and comes back.
    let cfg: serde_yaml::Value =
        serde_yaml::from_str("{window: 3, stop_on_non_finite: false}").unwrap();
    let mut cb = plugin::build_callback("loss_spike", &cfg, &ctx).unwrap();
    let mut l = smooth(3);
    l[1] = f64::NAN;
    plugin_support::drive_steps(cb.as_mut(), dir.path(), &metrics(&l, &[1.0; 3])).unwrap();
    let state = cb.state_dict().unwrap().unwrap();
    assert_eq!(state["recent"][1], "NaN", "{state}");
    let mut back = plugin::build_callback("loss_spike", &cfg, &ctx).unwrap();
    back.load_state_dict(state.clone()).unwrap();
    assert_eq!(back.state_dict().unwrap(), Some(state));
    // A state that is not the plugin's: a clear error.
    let e = back
        .load_state_dict(serde_json::json!({"recent": [1.0], "count": 2}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("loss_spike state"), "{e}");
}
