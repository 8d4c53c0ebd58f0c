//! Live parity of AdamW, Muon and gradient clipping against PyTorch.
//!
//! Each test writes the initial parameters and a fixed sequence of gradients to a safetensors
//! file, runs `reference/optim_ref.py` under `$VOLTTRAIN_PYTHON_REF` (or `python3`) on it, runs
//! VoltTrain on the same inputs and compares the final parameters.
//!
//! Relative error of a tensor `a` against the reference `b` is
//! `max_i |a_i - b_i| / max(|b_i|, rms(b))`: elementwise relative, with the tensor's RMS as the
//! floor of the denominator so that entries crossing zero do not divide by ~0.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use tch::{Kind, Tensor};
use volttrain::optim::muon::{newton_schulz, newton_schulz_spectral};
use volttrain::optim::{
    AdamW, AdamWConfig, DynOptimizer, Muon, MuonConfig, MuonScale, NamedParam, NsMethod,
    NsPrecision, Optimizer, ParamGroup, clip_grad_norm_tensors,
};

fn python() -> PathBuf {
    std::env::var_os("VOLTTRAIN_PYTHON_REF")
        .map(PathBuf::from)
        .unwrap_or_else(|| "python3".into())
}

/// Runs `reference/optim_ref.py` with `args`, returns the JSON of its last stdout line.
fn run_ref(args: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("reference/optim_ref.py");
    let out = Command::new(python())
        .arg(&script)
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("running the python reference");
    assert!(
        out.status.success(),
        "optim_ref.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .expect("no output");
    serde_json::from_str(last).expect("reference JSON")
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let rms = b.square().mean(Kind::Double).sqrt().double_value(&[]);
    let denom = b.abs().clamp_min(rms.max(1e-30));
    ((&a - &b).abs() / denom).max().double_value(&[])
}

/// A problem: named initial parameters and `steps` gradients for some of them.
struct Problem {
    params: Vec<(String, Tensor)>,
    /// `grads[t]`: name -> gradient at step t (a parameter missing has no grad that step).
    grads: Vec<BTreeMap<String, Tensor>>,
}

impl Problem {
    fn new(shapes: &[(&str, &[i64])], steps: usize, no_grad: &[&str], seed: i64) -> Problem {
        tch::manual_seed(seed);
        let params: Vec<(String, Tensor)> = shapes
            .iter()
            .map(|(n, s)| {
                (
                    n.to_string(),
                    Tensor::randn(*s, (Kind::Float, tch::Device::Cpu)),
                )
            })
            .collect();
        let grads = (0..steps)
            .map(|_| {
                params
                    .iter()
                    .filter(|(n, _)| !no_grad.contains(&n.as_str()))
                    .map(|(n, p)| {
                        (
                            n.clone(),
                            Tensor::randn(p.size(), (Kind::Float, p.device())),
                        )
                    })
                    .collect()
            })
            .collect();
        Problem { params, grads }
    }

    fn write(&self, path: &Path) {
        let mut named: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|(n, t)| (format!("param.{n}"), t.shallow_clone()))
            .collect();
        for (t, gs) in self.grads.iter().enumerate() {
            for (n, g) in gs {
                named.push((format!("grad.{t}.{n}"), g.shallow_clone()));
            }
        }
        Tensor::write_safetensors(&named, path).expect("writing inputs");
    }

    /// Leaf copies of the initial parameters that require grad.
    fn leaves(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, t)| (n.clone(), t.copy().set_requires_grad(true)))
            .collect()
    }
}

/// Sets `p.grad` to exactly `g` (`d/dp sum(p * g) = g`, after zeroing).
fn set_grad(p: &mut Tensor, g: &Tensor) {
    p.zero_grad();
    (&*p * g).sum(Kind::Float).backward();
}

/// Runs `opt` over the problem (the optimizer holds shallow clones of `leaves`).
fn run_rust(
    opt: &mut dyn DynOptimizer,
    leaves: &mut [(String, Tensor)],
    prob: &Problem,
    lr_factors: Option<&[f64]>,
) {
    let base: Vec<f64> = opt.groups().iter().map(|g| g.lr).collect();
    for (t, gs) in prob.grads.iter().enumerate() {
        if let Some(f) = lr_factors {
            for (g, b) in opt.groups_mut().iter_mut().zip(&base) {
                g.lr = b * f[t];
            }
        }
        for (n, p) in leaves.iter_mut() {
            if let Some(g) = gs.get(n) {
                set_grad(p, g);
            }
        }
        opt.step().expect("step");
    }
}

/// Runs the reference, returns its output tensors by name.
fn run_python(cmd: &str, prob: &Problem, cfg: &Value) -> BTreeMap<String, Tensor> {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let config = dir.path().join("cfg.json");
    let output = dir.path().join("out.safetensors");
    prob.write(&input);
    std::fs::write(&config, cfg.to_string()).unwrap();
    run_ref(&[
        cmd,
        input.to_str().unwrap(),
        config.to_str().unwrap(),
        output.to_str().unwrap(),
    ]);
    Tensor::read_safetensors(&output)
        .unwrap()
        .into_iter()
        .collect()
}

/// Groups over `leaves`: `(group name, member names, lr, weight decay)`.
fn groups(leaves: &[(String, Tensor)], spec: &[(&str, &[&str], f64, f64)]) -> Vec<ParamGroup> {
    spec.iter()
        .map(|(name, members, lr, wd)| ParamGroup {
            name: name.to_string(),
            params: members
                .iter()
                .map(|m| {
                    let (_, t) = leaves.iter().find(|(n, _)| n == m).unwrap();
                    NamedParam::new(*m, t)
                })
                .collect(),
            lr: *lr,
            lr_mult: 1.0,
            weight_decay: *wd,
        })
        .collect()
}

fn groups_json(spec: &[(&str, &[&str], f64, f64)]) -> Value {
    Value::Array(
        spec.iter()
            .map(|(_, members, lr, wd)| json!({"params": members, "lr": lr, "weight_decay": wd}))
            .collect(),
    )
}

/// Compares every parameter; returns the worst relative error.
fn compare(
    leaves: &[(String, Tensor)],
    reference: &BTreeMap<String, Tensor>,
    tol: f64,
    what: &str,
) -> f64 {
    let mut worst: f64 = 0.0;
    for (n, p) in leaves {
        let r = &reference[&format!("param.{n}")];
        let e = rel_err(&p.detach(), r);
        assert!(
            e <= tol,
            "{what}: `{n}` differs from PyTorch by {e:e} relative (tolerance {tol:e})"
        );
        worst = worst.max(e);
    }
    eprintln!("{what}: worst relative error {worst:e}");
    worst
}

fn adamw_case(what: &str, cfg: AdamWConfig, lr_factors: Option<Vec<f64>>) {
    let shapes: &[(&str, &[i64])] = &[
        ("layer.weight", &[32, 40]),
        ("layer.bias", &[40]),
        ("emb", &[50, 16]),
        ("big", &[70_001]),
        ("unused", &[7, 3]),
    ];
    let steps = 100;
    let prob = Problem::new(shapes, steps, &["unused"], 11);
    let spec: &[(&str, &[&str], f64, f64)] = &[
        (
            "decay",
            &["layer.weight", "emb", "big"],
            1e-2,
            cfg.weight_decay,
        ),
        ("no_decay", &["layer.bias", "unused"], 3e-3, 0.0),
    ];
    let mut leaves = prob.leaves();
    let mut opt = AdamW::new(groups(&leaves, spec), cfg.clone()).unwrap();
    run_rust(&mut opt, &mut leaves, &prob, lr_factors.as_deref());
    let mut j = json!({
        "steps": steps,
        "groups": groups_json(spec),
        "betas": [cfg.betas.0, cfg.betas.1],
        "eps": cfg.eps,
        "amsgrad": cfg.amsgrad,
    });
    if let Some(f) = &lr_factors {
        j["lr_factors"] = json!(f);
    }
    let reference = run_python("adamw", &prob, &j);
    compare(&leaves, &reference, 1e-6, what);
    // the parameter without grads never moved
    let (_, unused) = leaves.iter().find(|(n, _)| n == "unused").unwrap();
    assert!(unused.detach().equal(&prob.params[4].1));
    // state matches too (moments)
    let state = Optimizer::state_dict(&opt).unwrap();
    for (n, _) in &leaves {
        if n == "unused" {
            continue;
        }
        for buf in ["exp_avg", "exp_avg_sq"] {
            let e = rel_err(
                &state.tensors[&format!("{n}.{buf}")],
                &reference[&format!("state.{n}.{buf}")],
            );
            assert!(e <= 1e-6, "{what}: state `{n}.{buf}` differs by {e:e}");
        }
        assert_eq!(state.scalars[&format!("{n}.step")], steps as f64);
    }
}

#[test]
fn adamw_matches_torch_after_100_steps() {
    adamw_case("adamw default", AdamWConfig::default(), None);
}

#[test]
fn adamw_amsgrad_matches_torch() {
    adamw_case(
        "adamw amsgrad",
        AdamWConfig {
            amsgrad: true,
            ..Default::default()
        },
        None,
    );
}

#[test]
fn adamw_weight_decay_small_blocks_and_lr_schedule_match_torch() {
    // strong decay, blocks smaller than most parameters, and a schedule that starts at lr = 0
    let factors: Vec<f64> = (0..100).map(|t| (t as f64 / 10.0).min(1.0)).collect();
    adamw_case(
        "adamw wd=0.1 block=1000 warmup",
        AdamWConfig {
            weight_decay: 0.1,
            betas: (0.8, 0.99),
            eps: 1e-6,
            block_size: 1000,
            ..Default::default()
        },
        Some(factors),
    );
}

fn muon_case(what: &str, cfg: MuonConfig) {
    let shapes: &[(&str, &[i64])] = &[
        ("q", &[24, 24]),
        ("k", &[8, 24]),
        ("v", &[8, 24]),
        ("up", &[40, 24]),
        ("gate", &[40, 24]),
        ("down", &[24, 40]),
        ("conv", &[6, 4, 3]),
    ];
    muon_case_with(what, cfg, shapes);
}

/// `shapes` must name q, k, v, up, gate, down and conv (the groups below), with k/v, up/gate
/// sharing shapes.
fn muon_case_with(what: &str, cfg: MuonConfig, shapes: &[(&str, &[i64])]) {
    let steps = 20;
    let prob = Problem::new(shapes, steps, &[], 5);
    // k and v share a shape but not a group: one batch with two learning rates
    let spec: &[(&str, &[&str], f64, f64)] = &[
        (
            "a",
            &["q", "k", "up", "gate", "conv"],
            0.02,
            cfg.weight_decay,
        ),
        ("b", &["v", "down"], 0.005, 0.0),
    ];
    let mut leaves = prob.leaves();
    let mut opt = Muon::new(groups(&leaves, spec), cfg.clone()).unwrap();
    // q | k,v | up,gate | down | conv
    assert_eq!(opt.num_batches(), 5, "same-shape matrices are batched");
    run_rust(&mut opt, &mut leaves, &prob, None);
    let j = json!({
        "steps": steps,
        "groups": groups_json(spec),
        "momentum": cfg.momentum,
        "nesterov": cfg.nesterov,
        "ns_steps": cfg.ns_steps,
        "ns_coefficients": [cfg.ns_coefficients.0, cfg.ns_coefficients.1, cfg.ns_coefficients.2],
        "ns_eps": cfg.ns_eps,
        "scale": match cfg.scale { MuonScale::Original => "original", MuonScale::MatchAdamw => "match_adamw" },
    });
    let reference = run_python("muon", &prob, &j);
    compare(&leaves, &reference, 1e-5, what);
    let state = Optimizer::state_dict(&opt).unwrap();
    for (n, _) in &leaves {
        let key = format!("{n}.momentum_buffer");
        let e = rel_err(&state.tensors[&key], &reference[&format!("state.{key}")]);
        assert!(e <= 1e-5, "{what}: `{key}` differs by {e:e}");
    }
}

#[test]
fn muon_original_scale_nesterov_matches_reference() {
    muon_case(
        "muon original nesterov wd=0.1",
        MuonConfig {
            scale: MuonScale::Original,
            ns_precision: NsPrecision::Fp32,
            weight_decay: 0.1,
            ..Default::default()
        },
    );
}

#[test]
fn muon_match_adamw_scale_matches_reference() {
    muon_case(
        "muon match_adamw nesterov",
        MuonConfig {
            scale: MuonScale::MatchAdamw,
            ..Default::default()
        },
    );
}

#[test]
fn muon_without_nesterov_matches_reference() {
    muon_case(
        "muon original plain momentum",
        MuonConfig {
            scale: MuonScale::Original,
            nesterov: false,
            momentum: 0.9,
            weight_decay: 0.0,
            ..Default::default()
        },
    );
}

#[test]
fn muon_batched_stacked_iteration_matches_reference() {
    // The CUDA layout (stacked same-shape matrices, one bmm per product), forced on the CPU.
    muon_case(
        "muon stacked batches",
        MuonConfig {
            ns_method: NsMethod::Iterative,
            batched: Some(true),
            ..Default::default()
        },
    );
}

#[test]
fn muon_spectral_matches_reference() {
    // Every matrix through the eigendecomposition of its Gram matrix, square, wide and tall.
    muon_case(
        "muon spectral",
        MuonConfig {
            ns_method: NsMethod::Spectral,
            ..Default::default()
        },
    );
}

#[test]
fn muon_auto_on_model_sized_wide_matrices_matches_reference() {
    // Shapes where `auto` picks the spectral path on the CPU (min >= 256, max >= 2 min) next to
    // ones where it iterates; the reference iterates for all of them.
    assert!(NsMethod::Auto.spectral_for(640, 256, Kind::Float, tch::Device::Cpu));
    assert!(NsMethod::Auto.spectral_for(256, 640, Kind::Float, tch::Device::Cpu));
    assert!(!NsMethod::Auto.spectral_for(300, 300, Kind::Float, tch::Device::Cpu));
    assert!(!NsMethod::Auto.spectral_for(96, 300, Kind::Float, tch::Device::Cpu));
    assert!(!NsMethod::Auto.spectral_for(256, 640, Kind::BFloat16, tch::Device::Cpu));
    assert!(!NsMethod::Auto.spectral_for(256, 640, Kind::Float, tch::Device::Cuda(0)));
    let shapes: &[(&str, &[i64])] = &[
        ("q", &[300, 300]),
        ("k", &[96, 300]),
        ("v", &[96, 300]),
        ("up", &[640, 256]),
        ("gate", &[640, 256]),
        ("down", &[256, 640]),
        ("conv", &[6, 4, 3]),
    ];
    muon_case_with("muon auto, model-sized", MuonConfig::default(), shapes);
}

/// `sigma_i = 10^(-6 i / (m - 1))`: singular values spread over six decades, the hard case for
/// anything that forms `X X^T` in fp32.
fn ill_conditioned(m: i64, n: i64) -> Tensor {
    tch::manual_seed(11);
    let opts = (Kind::Double, tch::Device::Cpu);
    let (u, _) = Tensor::linalg_qr(&Tensor::randn([m, m], opts), "reduced");
    let (v, _) = Tensor::linalg_qr(&Tensor::randn([n, m], opts), "reduced");
    let s = Tensor::logspace(0.0, -6.0, m, 10.0, opts);
    (u * s.unsqueeze(0)).mm(&v.tr())
}

#[test]
fn newton_schulz_spectral_accuracy_against_fp64_iteration() {
    // Truth: the NS5 iteration in fp64. Measured errors (relative Frobenius) of the fp32
    // iteration, the fp32 spectral evaluation and the bf16 iteration that GPU Muon runs use.
    let coeffs = (3.4445, -4.7750, 2.0315);
    for (m, n) in [(256i64, 640i64), (640, 256), (128, 128)] {
        let (rows, cols) = if m <= n { (m, n) } else { (n, m) };
        let mut g = ill_conditioned(rows, cols);
        if m > n {
            g = g.tr().contiguous();
        }
        let truth = newton_schulz(&g.unsqueeze(0), 5, coeffs, 1e-7, Kind::Double)
            .unwrap()
            .squeeze_dim(0);
        let err = |x: &Tensor| {
            let x = x.to_kind(Kind::Double);
            (&x - &truth).norm().double_value(&[]) / truth.norm().double_value(&[])
        };
        let g32 = g.to_kind(Kind::Float);
        let iter32 = newton_schulz(&g32.unsqueeze(0), 5, coeffs, 1e-7, Kind::Float)
            .unwrap()
            .squeeze_dim(0);
        let spec32 = newton_schulz_spectral(&g32, 5, coeffs, 1e-7, 1.0).unwrap();
        let iter16 = newton_schulz(&g32.unsqueeze(0), 5, coeffs, 1e-7, Kind::BFloat16)
            .unwrap()
            .squeeze_dim(0);
        let (e_iter, e_spec, e_bf16) = (err(&iter32), err(&spec32), err(&iter16));
        eprintln!(
            "{m}x{n}: fp32 iteration {e_iter:.2e}, fp32 spectral {e_spec:.2e}, bf16 iteration \
             {e_bf16:.2e}"
        );
        assert!(e_iter < 1e-4, "{m}x{n}: fp32 iteration error {e_iter:e}");
        assert!(e_spec < 2e-3, "{m}x{n}: spectral error {e_spec:e}");
        assert!(
            e_spec * 5.0 < e_bf16,
            "{m}x{n}: spectral ({e_spec:e}) should be well inside the bf16 iteration's error \
             ({e_bf16:e})"
        );
        // and on a well-conditioned (Gaussian) matrix the two fp32 methods agree to ~1e-5
        tch::manual_seed(12);
        let gauss = Tensor::randn([m, n], (Kind::Float, tch::Device::Cpu));
        let a = newton_schulz(&gauss.unsqueeze(0), 5, coeffs, 1e-7, Kind::Float)
            .unwrap()
            .squeeze_dim(0);
        let b = newton_schulz_spectral(&gauss, 5, coeffs, 1e-7, 1.0).unwrap();
        let d = (&a - &b).norm().double_value(&[]) / a.norm().double_value(&[]);
        assert!(d < 5e-5, "{m}x{n}: gaussian, spectral vs iteration {d:e}");
    }
}

#[test]
fn muon_rejects_1d_parameter_and_points_to_adamw() {
    let b = Tensor::zeros([16], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let groups = vec![ParamGroup::new(
        "muon",
        vec![NamedParam::new("model.norm.weight", &b)],
        0.02,
        1.0,
        0.0,
    )];
    let err = Muon::new(groups, MuonConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.norm.weight"), "{err}");
    assert!(err.contains("AdamW"), "{err}");
}

fn clip_case(max_norm: f64) -> f64 {
    let shapes: &[(&str, &[i64])] = &[("a", &[30, 20]), ("b", &[20]), ("c", &[5, 4, 3])];
    let prob = Problem::new(shapes, 1, &[], 3);
    let mut leaves = prob.leaves();
    for (n, p) in leaves.iter_mut() {
        set_grad(p, &prob.grads[0][n]);
    }
    let params: Vec<Tensor> = leaves.iter().map(|(_, t)| t.shallow_clone()).collect();
    let total = clip_grad_norm_tensors(&params, max_norm).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (input, config, output) = (
        dir.path().join("in.safetensors"),
        dir.path().join("cfg.json"),
        dir.path().join("out.safetensors"),
    );
    let named: Vec<(String, Tensor)> = prob.grads[0]
        .iter()
        .map(|(n, g)| (format!("grad.{n}"), g.shallow_clone()))
        .collect();
    Tensor::write_safetensors(&named, &input).unwrap();
    std::fs::write(&config, json!({ "max_norm": max_norm }).to_string()).unwrap();
    let v = run_ref(&[
        "clip",
        input.to_str().unwrap(),
        config.to_str().unwrap(),
        output.to_str().unwrap(),
    ]);
    let ref_total = v["total_norm"].as_f64().unwrap();
    assert!(
        ((total - ref_total) / ref_total).abs() < 1e-6,
        "total norm {total} vs torch {ref_total}"
    );
    let reference: BTreeMap<String, Tensor> = Tensor::read_safetensors(&output)
        .unwrap()
        .into_iter()
        .collect();
    for (n, p) in &leaves {
        let e = rel_err(&p.grad(), &reference[&format!("grad.{n}")]);
        assert!(e <= 1e-6, "clipped grad of `{n}` differs by {e:e}");
    }
    total
}

#[test]
fn clip_matches_torch_clip_grad_norm_when_clipping() {
    let total = clip_case(1.0);
    assert!(total > 1.0, "the case must clip (norm {total})");
}

#[test]
fn clip_matches_torch_clip_grad_norm_when_not_clipping() {
    let total = clip_case(1e6);
    assert!(total < 1e6);
}
