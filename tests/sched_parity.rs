//! Schedules against `transformers` (run live through `reference/optim_ref.py sched`) and
//! against the published cosine and WSD formulas.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::{Value, json};
use volttrain::sched::{SchedulerConfig, WsdDecay};

fn python() -> PathBuf {
    std::env::var_os("VOLTTRAIN_PYTHON_REF")
        .map(PathBuf::from)
        .unwrap_or_else(|| "python3".into())
}

const STEPS: usize = 130;

/// The `transformers` schedules compared here: (function, kwargs).
fn cases() -> Vec<(&'static str, Value)> {
    vec![
        (
            "get_cosine_schedule_with_warmup",
            json!({"num_warmup_steps": 10, "num_training_steps": 100}),
        ),
        (
            "get_cosine_with_min_lr_schedule_with_warmup",
            json!({"num_warmup_steps": 7, "num_training_steps": 90, "min_lr_rate": 0.1}),
        ),
        ("get_constant_schedule", json!({})),
        (
            "get_constant_schedule_with_warmup",
            json!({"num_warmup_steps": 12}),
        ),
        (
            "get_linear_schedule_with_warmup",
            json!({"num_warmup_steps": 5, "num_training_steps": 100}),
        ),
        ("get_wsd_schedule", wsd_kwargs("linear")),
        ("get_wsd_schedule", wsd_kwargs("cosine")),
        ("get_wsd_schedule", wsd_kwargs("1-sqrt")),
    ]
}

fn wsd_kwargs(decay: &str) -> Value {
    json!({"num_warmup_steps": 10, "num_decay_steps": 30, "num_training_steps": 100,
           "decay_type": decay, "min_lr_ratio": 0.05})
}

/// Factors of every case for steps `0..STEPS`, from one run of the reference (importing
/// transformers takes seconds).
fn transformers_factors() -> &'static Vec<Vec<f64>> {
    static FACTORS: OnceLock<Vec<Vec<f64>>> = OnceLock::new();
    FACTORS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("sched.json");
        let cases: Vec<Value> = cases()
            .into_iter()
            .map(|(n, k)| json!({"name": n, "kwargs": k}))
            .collect();
        std::fs::write(&cfg, json!({"cases": cases, "steps": STEPS}).to_string()).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("reference/optim_ref.py");
        let out = Command::new(python())
            .arg(&script)
            .arg("sched")
            .arg(&cfg)
            .output()
            .expect("running the python reference");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        v["factors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                c.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect()
    })
}

fn check(cfg: SchedulerConfig, name: &str, kwargs: Value) {
    let index = cases()
        .iter()
        .position(|(n, k)| *n == name && *k == kwargs)
        .expect("case listed in cases()");
    let want = &transformers_factors()[index];
    assert_eq!(want.len(), STEPS);
    let s = cfg.build().unwrap();
    for (t, w) in want.iter().enumerate() {
        let got = s.factor(t as u64);
        assert!(
            (got - w).abs() < 1e-12,
            "{name} step {t}: {got} vs transformers {w}"
        );
    }
}

#[test]
fn cosine_equals_get_cosine_schedule_with_warmup() {
    check(
        SchedulerConfig::Cosine {
            warmup_steps: 10,
            total_steps: 100,
            min_lr_ratio: 0.0,
            num_cycles: 0.5,
        },
        "get_cosine_schedule_with_warmup",
        json!({"num_warmup_steps": 10, "num_training_steps": 100}),
    );
}

#[test]
fn cosine_with_floor_equals_get_cosine_with_min_lr_schedule_with_warmup() {
    check(
        SchedulerConfig::Cosine {
            warmup_steps: 7,
            total_steps: 90,
            min_lr_ratio: 0.1,
            num_cycles: 0.5,
        },
        "get_cosine_with_min_lr_schedule_with_warmup",
        json!({"num_warmup_steps": 7, "num_training_steps": 90, "min_lr_rate": 0.1}),
    );
}

#[test]
fn constant_linear_and_constant_with_warmup_equal_transformers() {
    check(
        SchedulerConfig::Constant,
        "get_constant_schedule",
        json!({}),
    );
    check(
        SchedulerConfig::ConstantWithWarmup { warmup_steps: 12 },
        "get_constant_schedule_with_warmup",
        json!({"num_warmup_steps": 12}),
    );
    check(
        SchedulerConfig::Linear {
            warmup_steps: 5,
            total_steps: 100,
        },
        "get_linear_schedule_with_warmup",
        json!({"num_warmup_steps": 5, "num_training_steps": 100}),
    );
}

#[test]
fn wsd_equals_get_wsd_schedule_for_every_decay_shape() {
    for (decay, name) in [
        (WsdDecay::Linear, "linear"),
        (WsdDecay::Cosine, "cosine"),
        (WsdDecay::OneMinusSqrt, "1-sqrt"),
    ] {
        check(
            SchedulerConfig::Wsd {
                warmup_steps: 10,
                decay_steps: 30,
                total_steps: 100,
                min_lr_ratio: 0.05,
                decay,
            },
            "get_wsd_schedule",
            wsd_kwargs(name),
        );
    }
}

#[test]
fn cosine_follows_the_sgdr_formula() {
    // Loshchilov & Hutter 2017 (SGDR), eq. 5: eta = eta_min + (eta_max - eta_min)(1 + cos(pi T_cur / T)) / 2
    let (w, total, r) = (20u64, 220u64, 0.2);
    let s = SchedulerConfig::Cosine {
        warmup_steps: w,
        total_steps: total,
        min_lr_ratio: r,
        num_cycles: 0.5,
    }
    .build()
    .unwrap();
    for t in w..=total {
        let tcur = (t - w) as f64 / (total - w) as f64;
        let want = r + (1.0 - r) * (1.0 + (std::f64::consts::PI * tcur).cos()) / 2.0;
        assert!((s.factor(t) - want).abs() < 1e-12, "step {t}");
    }
    // linear warmup: t / w
    assert_eq!(s.factor(0), 0.0);
    assert_eq!(s.factor(5), 0.25);
    assert_eq!(s.factor(total), r);
}

#[test]
fn wsd_phases_follow_hagele_et_al() {
    // Hägele et al. 2024: warmup, constant lr, then a cooldown of 1 - sqrt(progress)
    let s = SchedulerConfig::Wsd {
        warmup_steps: 4,
        decay_steps: 16,
        total_steps: 100,
        min_lr_ratio: 0.0,
        decay: WsdDecay::OneMinusSqrt,
    }
    .build()
    .unwrap();
    assert_eq!(s.factor(2), 0.5);
    for t in 4..84 {
        assert_eq!(s.factor(t), 1.0, "stable at step {t}");
    }
    assert_eq!(s.factor(88), 0.5); // progress 1/4, 1 - sqrt(1/4)
    assert_eq!(s.factor(100), 0.0);
}

#[test]
fn bad_schedules_are_config_errors() {
    let err = SchedulerConfig::Cosine {
        warmup_steps: 200,
        total_steps: 100,
        min_lr_ratio: 0.0,
        num_cycles: 0.5,
    }
    .build()
    .unwrap_err()
    .to_string();
    assert!(err.contains("scheduler.warmup_steps"), "{err}");
    let err = SchedulerConfig::Wsd {
        warmup_steps: 50,
        decay_steps: 60,
        total_steps: 100,
        min_lr_ratio: 0.0,
        decay: WsdDecay::Cosine,
    }
    .build()
    .unwrap_err()
    .to_string();
    assert!(err.contains("total_steps"), "{err}");
    let yaml = "type: cosine\nwarmup_steps: 10\ntotal_steps: 100\nmin_lr_ratio: 0.1\n";
    let cfg: SchedulerConfig = serde_yaml::from_str(yaml).unwrap();
    assert_eq!(
        cfg,
        SchedulerConfig::Cosine {
            warmup_steps: 10,
            total_steps: 100,
            min_lr_ratio: 0.1,
            num_cycles: 0.5
        }
    );
    assert!(serde_yaml::from_str::<SchedulerConfig>("type: cosine\nwarmup: 3\n").is_err());
}
