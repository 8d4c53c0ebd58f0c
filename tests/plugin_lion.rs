//! The Lion plugin (`plugins/lion`): built, loaded as a dylib, built by name from YAML, and
//! checked against the PyTorch implementation of the published rule (`reference/lion_ref.py`).

mod plugin_support;

use std::path::PathBuf;

use tch::{Kind, Tensor};
use volttrain::optim::{DynOptimizer, NamedParam, ParamGroup};
use volttrain::plugin;

const STEPS: usize = 20;

fn load_lion() -> PathBuf {
    let lib = plugin_support::plugin_library("volttrain-lion");
    let info = plugin::load_plugin(&lib).expect("load the lion plugin");
    assert_eq!(info.name, "volttrain-lion");
    lib
}

fn yaml(s: &str) -> serde_yaml::Value {
    serde_yaml::from_str(s).expect("test yaml")
}

/// A least-squares problem: parameters `w [4,3]`, `b [4]` and per-step inputs.
struct Problem {
    w0: Tensor,
    b0: Tensor,
    xs: Vec<Tensor>,
    ys: Vec<Tensor>,
}

fn problem(seed: i64) -> Problem {
    tch::manual_seed(seed);
    let opts = (Kind::Float, tch::Device::Cpu);
    Problem {
        w0: Tensor::randn([4, 3], opts),
        b0: Tensor::randn([4], opts),
        xs: (0..STEPS).map(|_| Tensor::randn([8, 3], opts)).collect(),
        ys: (0..STEPS).map(|_| Tensor::randn([8, 4], opts)).collect(),
    }
}

/// Two groups: the matrix with weight decay, the bias at half the lr without.
fn groups(w: &Tensor, b: &Tensor) -> Vec<ParamGroup> {
    let one = |name: &str, t: &Tensor, lr: f64, lr_mult: f64, wd: f64| ParamGroup {
        name: name.into(),
        params: vec![NamedParam {
            name: name.into(),
            tensor: t.shallow_clone(),
        }],
        lr,
        lr_mult,
        weight_decay: wd,
    };
    vec![one("w", w, 0.02, 1.0, 0.1), one("b", b, 0.01, 0.5, 0.0)]
}

/// Runs steps `range` of the problem, returning `(w, b)` after each.
fn run(
    opt: &mut dyn DynOptimizer,
    p: &Problem,
    w: &Tensor,
    b: &Tensor,
    range: std::ops::Range<usize>,
) -> Vec<(Tensor, Tensor)> {
    let mut out = Vec::new();
    for t in range {
        opt.zero_grad();
        let pred = p.xs[t].matmul(&w.tr()) + b;
        let loss = (pred - &p.ys[t]).pow_tensor_scalar(2).mean(Kind::Float);
        loss.backward();
        opt.step().expect("lion step");
        out.push((w.detach().copy(), b.detach().copy()));
    }
    out
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn lion_matches_pytorch_reference_over_20_steps() {
    load_lion();
    let p = problem(11);
    let w = p.w0.copy().set_requires_grad(true);
    let b = p.b0.copy().set_requires_grad(true);
    let cfg = yaml("{name: lion, betas: [0.9, 0.99]}");
    let mut opt = plugin::build_optimizer("lion", groups(&w, &b), &cfg).expect("build lion");
    assert_eq!(opt.name(), "lion");
    let ours = run(opt.as_mut(), &p, &w, &b, 0..STEPS);

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let spec = dir.path().join("spec.json");
    let output = dir.path().join("out.safetensors");
    let mut tensors = vec![
        ("param.w".to_string(), p.w0.shallow_clone()),
        ("param.b".to_string(), p.b0.shallow_clone()),
    ];
    for t in 0..STEPS {
        tensors.push((format!("x.{t}"), p.xs[t].shallow_clone()));
        tensors.push((format!("y.{t}"), p.ys[t].shallow_clone()));
    }
    Tensor::write_safetensors(&tensors, &input).unwrap();
    let spec_json = serde_json::json!({
        "steps": STEPS,
        "betas": [0.9, 0.99],
        "groups": [
            {"params": ["w"], "lr": 0.02, "weight_decay": 0.1},
            {"params": ["b"], "lr": 0.01, "weight_decay": 0.0},
        ],
    });
    std::fs::write(&spec, spec_json.to_string()).unwrap();
    plugin_support::run_reference(
        "lion_ref.py",
        &[
            input.to_str().unwrap(),
            spec.to_str().unwrap(),
            output.to_str().unwrap(),
        ],
    );
    let reference: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&output)
        .unwrap()
        .into_iter()
        .collect();

    let mut worst = 0f64;
    for (t, (w_t, b_t)) in ours.iter().enumerate() {
        let rw = &reference[&format!("w.{}", t + 1)];
        let rb = &reference[&format!("b.{}", t + 1)];
        worst = worst.max(max_abs_diff(w_t, rw)).max(max_abs_diff(b_t, rb));
    }
    eprintln!("lion vs pytorch reference, max |diff| over {STEPS} steps: {worst:e}");
    assert!(worst <= 1e-6, "max |diff| {worst:e} > 1e-6");
    // The parameters moved: lr-sized sign steps, not a no-op.
    assert!(max_abs_diff(&ours[STEPS - 1].0, &p.w0) > 0.1);
}

#[test]
fn lion_state_dict_resumes_exactly() {
    load_lion();
    let p = problem(5);
    let cfg = yaml("{betas: [0.95, 0.98]}");

    let w = p.w0.copy().set_requires_grad(true);
    let b = p.b0.copy().set_requires_grad(true);
    let mut straight = plugin::build_optimizer("lion", groups(&w, &b), &cfg).unwrap();
    let full = run(straight.as_mut(), &p, &w, &b, 0..STEPS);

    let w2 = p.w0.copy().set_requires_grad(true);
    let b2 = p.b0.copy().set_requires_grad(true);
    let mut first = plugin::build_optimizer("lion", groups(&w2, &b2), &cfg).unwrap();
    run(first.as_mut(), &p, &w2, &b2, 0..10);
    let state = first.state_dict().unwrap();
    assert_eq!(state.scalars["steps"], 10.0);
    assert_eq!(state.tensors.len(), 2);
    drop(first);
    let mut resumed = plugin::build_optimizer("lion", groups(&w2, &b2), &cfg).unwrap();
    resumed.load_state_dict(&state).unwrap();
    let rest = run(resumed.as_mut(), &p, &w2, &b2, 10..STEPS);
    let (w_end, b_end) = rest.last().unwrap();
    assert_eq!(max_abs_diff(w_end, &full[STEPS - 1].0), 0.0);
    assert_eq!(max_abs_diff(b_end, &full[STEPS - 1].1), 0.0);

    // A state for other shapes is refused with the tensor's name.
    let mut other = state;
    other.tensors.insert(
        "exp_avg.w".into(),
        Tensor::zeros([2, 2], (Kind::Float, tch::Device::Cpu)),
    );
    let e = resumed.load_state_dict(&other).unwrap_err().to_string();
    assert!(e.contains("exp_avg.w") && e.contains("[2, 2]"), "{e}");
}

#[test]
fn lion_config_sets_group_lr_and_decay_and_rejects_bad_values() {
    load_lion();
    let p = problem(3);
    let cfg = yaml("{name: lion, lr: 0.001, weight_decay: 0.5}");
    let opt = plugin::build_optimizer("lion", groups(&p.w0, &p.b0), &cfg).unwrap();
    let got: Vec<(f64, f64)> = opt
        .groups()
        .iter()
        .map(|g| (g.lr, g.weight_decay))
        .collect();
    assert_eq!(got, vec![(0.001, 0.5), (0.0005, 0.5)]);

    let e = plugin::build_optimizer("lion", groups(&p.w0, &p.b0), &yaml("{betas: [1.5, 0.9]}"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("optimizer.betas.0") && e.contains("1.5"), "{e}");
    let e = plugin::build_optimizer("lion", groups(&p.w0, &p.b0), &yaml("{beta1: 0.9}"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("`optimizer`") && e.contains("beta1"), "{e}");
}
