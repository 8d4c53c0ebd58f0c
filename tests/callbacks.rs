//! Callbacks: the TensorBoard writer read back by Python `tensorboard`, metrics.jsonl, and the
//! epoch saver's atomic writes and retention.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Sgd, SgdConfig, ToyLm, VecSource, one_group};
use volttrain::callback::{
    EpochSaver, MetricsJsonl, ModelSaver, TensorBoard, TensorBoardWriter, epoch_dirs,
};
use volttrain::model::CausalLm;
use volttrain::optim::Optimizer;
use volttrain::trainer::{Trainer, TrainerBuilder};

fn python() -> String {
    std::env::var("VOLTTRAIN_PYTHON_REF").unwrap_or_else(|_| "python3".into())
}

#[test]
fn tensorboard_event_file_reads_back_in_python() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = TensorBoardWriter::create(dir.path()).unwrap();
    for step in 1..=5i64 {
        w.scalars(
            step,
            &[
                ("train/loss", 1.0 / step as f64),
                ("lr/muon", 0.01 * step as f64),
            ],
        )
        .unwrap();
    }
    let script = r#"
import sys, json
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1]); ea.Reload()
out = {t: [[e.step, e.value] for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
print(json.dumps(out))
"#;
    let out = Command::new(python())
        .args(["-c", script, dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    let loss = v["train/loss"].as_array().unwrap();
    assert_eq!(loss.len(), 5);
    for (i, e) in loss.iter().enumerate() {
        let step = (i + 1) as f64;
        assert_eq!(e[0].as_f64().unwrap(), step);
        assert!((e[1].as_f64().unwrap() - 1.0 / step).abs() < 1e-6);
    }
    assert!((v["lr/muon"][4][1].as_f64().unwrap() - 0.05).abs() < 1e-7);
}

/// Writes every parameter's name into a file: enough to check what the saver received.
struct NamesSaver;
impl ModelSaver for NamesSaver {
    fn save_to(&self, model: &dyn CausalLm, dir: &Path) -> volttrain::Result<()> {
        let names: Vec<String> = model
            .named_parameters()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        std::fs::write(dir.join("names.txt"), names.join("\n")).unwrap();
        Ok(())
    }
}

/// A saver that fails half-way, as a crash would.
struct FailingSaver;
impl ModelSaver for FailingSaver {
    fn save_to(&self, _: &dyn CausalLm, dir: &Path) -> volttrain::Result<()> {
        std::fs::write(dir.join("adapter_model.safetensors"), b"partial").unwrap();
        Err(volttrain::Error::invalid("disk full"))
    }
}

/// The toy trainer these tests share: a one-layer [`ToyLm`] (vocabulary 20, hidden 8) trained
/// by SGD at lr 0.1 on `batches` random batches, writing into `dir`.
fn toy_builder(dir: &Path, batches: usize) -> TrainerBuilder {
    let model = ToyLm::new(20, 8, 1, 0.0, 2);
    let opt = Box::new(Sgd::new(one_group(&model, 0.1), SgdConfig::default()).unwrap());
    Trainer::builder()
        .model(Box::new(model))
        .train_data(Box::new(VecSource::random(batches, 1, 6, 20, 1)))
        .optimizer(opt)
        .base_lr(0.1)
        .output_dir(dir)
}

#[test]
fn epoch_saver_keeps_last_n_and_metrics_are_logged() {
    let dir = tempfile::tempdir().unwrap();
    let s = toy_builder(dir.path(), 2)
        .eval_data(Box::new(VecSource::random(1, 1, 6, 20, 2)))
        .epochs(4)
        .saver(Box::new(NamesSaver))
        .callback(Box::new(EpochSaver {
            keep_last: 2,
            every: 1,
        }))
        .callback(Box::new(MetricsJsonl::new(
            dir.path().join("metrics.jsonl"),
        )))
        .callback(Box::new(TensorBoard::new(dir.path().join("tb"))))
        .build()
        .unwrap()
        .fit()
        .unwrap();
    assert_eq!(s.steps, 8);
    let kept: Vec<usize> = epoch_dirs(dir.path())
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(kept, vec![3, 4]);
    let names = std::fs::read_to_string(dir.path().join("epoch-4/names.txt")).unwrap();
    assert!(names.contains("model.embed_tokens.weight"));
    // no temporary directories left
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let n = e.unwrap().file_name().into_string().unwrap();
        assert!(!n.starts_with('.'), "leftover {n}");
    }
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train: Vec<_> = lines.iter().filter(|v| v["kind"] == "train").collect();
    let eval: Vec<_> = lines.iter().filter(|v| v["kind"] == "eval").collect();
    assert_eq!(train.len(), 8);
    assert_eq!(eval.len(), 5); // before training and after each of the 4 epochs
    assert_eq!(train[7]["step"], 8);
    assert!(train[0]["lr"]["all"].as_f64().unwrap() > 0.0);
}

#[test]
fn failed_epoch_save_leaves_no_complete_looking_directory() {
    let dir = tempfile::tempdir().unwrap();
    let err = toy_builder(dir.path(), 1)
        .saver(Box::new(FailingSaver))
        .callback(Box::new(EpochSaver::default()))
        .build()
        .unwrap()
        .fit()
        .unwrap_err();
    assert!(err.to_string().contains("disk full"), "{err}");
    assert!(epoch_dirs(dir.path()).unwrap().is_empty());
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(left.iter().all(|n| !n.starts_with("epoch-")), "{left:?}");
}

/// A callback whose step hook fails with a config error.
struct BadConfigCallback;
impl volttrain::callback::Callback for BadConfigCallback {
    fn name(&self) -> &str {
        "bad_config"
    }
    fn on_step_end(
        &mut self,
        _: &mut volttrain::callback::Control<'_>,
        _: &volttrain::callback::StepMetrics,
    ) -> volttrain::Result<()> {
        Err(volttrain::Error::config(
            "callbacks.bad_config.every",
            "must be >= 1",
        ))
    }
}

#[test]
fn a_callback_error_keeps_its_variant() {
    let dir = tempfile::tempdir().unwrap();
    let err = toy_builder(dir.path(), 1)
        .callback(Box::new(BadConfigCallback))
        .build()
        .unwrap()
        .fit()
        .unwrap_err();
    match &err {
        volttrain::Error::Config { key, msg, .. } => {
            assert_eq!(key, "callbacks.bad_config.every");
            assert_eq!(msg, "must be >= 1");
        }
        other => panic!("expected Error::Config, got {other:?}"),
    }
}
