//! Preference tuning against TRL (trl 1.16.0), live: `reference/dpo_ref.py` runs TRL's
//! DPOTrainer (sigmoid, ipo, hinge, robust) and ORPO code on the bundled tiny Llama with a fresh
//! LoRA adapter (ORPO: its loss functions in a plain AdamW loop), and VoltTrain runs the same
//! pairs with the same adapter.
//!
//! Checked: the collated rows (TRL's tokenization of string and conversational pairs); the loss
//! and TRL's six metrics of the first step to 1e-5 and of the later steps to 1e-4; the LoRA
//! parameters after three plain AdamW steps to 1e-4; the first loss of a fresh adapter is ln 2.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use tch::{Device, Kind, Tensor};
use volttrain::adapter::{AdaptersDisabled, load_peft_adapter};
use volttrain::callback::{Callback, Control, EvalMetrics, StepMetrics};
use volttrain::data::{
    Collator, DatasetConfig, LoaderOptions, PaddingSide, PreferenceDataset, PreferenceLoader,
    Tokenizer,
};
use volttrain::dpo::PreferenceSource;
use volttrain::model::safetensors::load_safetensors;
use volttrain::model::{CausalLm, ForwardInput, LoadOptions, load_model};
use volttrain::optim::{AdamW, AdamWConfig, DynOptimizer, NamedParam, Optimizer, ParamGroup};
use volttrain::trainer::{PreferenceConfig, PreferenceLoss, PreferenceObjective, Trainer};

const STEPS: usize = 3;
const LR: f64 = 1e-3;
const BETA: f64 = 0.1;
const KEYS: [&str; 6] = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
];

fn python() -> String {
    std::env::var("VOLTTRAIN_PYTHON_REF").unwrap_or_else(|_| "python3".to_string())
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model_dir() -> PathBuf {
    root().join("assets/tiny-llama")
}

/// Runs the reference once per data file; returns its output directory.
fn reference(data: &str, losses: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "volttrain-pref-ref-{}-{}",
        std::process::id(),
        data.replace(['/', '.'], "_")
    ));
    let out = Command::new(python())
        .arg(root().join("reference/dpo_ref.py"))
        .arg(model_dir())
        .arg(root().join(data))
        .arg(&dir)
        .args(["--steps", &STEPS.to_string()])
        .args(["--lr", &LR.to_string()])
        .args(["--beta", &BETA.to_string()])
        .args(["--losses", losses])
        .output()
        .expect("run reference/dpo_ref.py");
    assert!(
        out.status.success(),
        "dpo_ref.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

fn conv_ref() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        reference(
            "tests/fixtures/pref/conv.jsonl",
            "sigmoid,ipo,hinge,robust,orpo",
        )
    })
}

fn text_ref() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| reference("tests/fixtures/pref/text.jsonl", "sigmoid"))
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn loader(data: &str, batch: usize) -> PreferenceLoader {
    let tok = Tokenizer::from_dir(model_dir()).unwrap();
    let cfg = DatasetConfig {
        max_seq_len: 1024,
        cache: false,
        ..DatasetConfig::new(root().join(data))
    };
    let ds = PreferenceDataset::load(&cfg, &tok).unwrap();
    let pad = tok.pad().unwrap().id as i64;
    PreferenceLoader::new(
        Arc::new(ds),
        Collator::new(pad, PaddingSide::Right),
        LoaderOptions {
            batch_size: batch,
            shuffle: false,
            ..Default::default()
        },
    )
    .unwrap()
}

fn model_with_adapter(adapter: &Path) -> Box<dyn CausalLm> {
    let mut m = load_model(model_dir(), &LoadOptions::new(Kind::Float, Device::Cpu)).unwrap();
    m.freeze_base();
    load_peft_adapter(m.as_mut(), adapter).unwrap();
    m
}

fn adamw(model: &dyn CausalLm) -> Box<dyn DynOptimizer> {
    let params: Vec<NamedParam> = model
        .named_parameters()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(n, t)| NamedParam::new(n, &t))
        .collect();
    let cfg = AdamWConfig {
        weight_decay: 0.0,
        ..Default::default()
    };
    let g = ParamGroup::new("all", params, LR, 1.0, 0.0);
    Box::new(AdamW::new(vec![g], cfg).unwrap())
}

#[derive(Default, Clone)]
struct Collect {
    steps: Arc<Mutex<Vec<StepMetrics>>>,
    evals: Arc<Mutex<Vec<EvalMetrics>>>,
}

impl Callback for Collect {
    fn on_step_end(&mut self, _: &mut Control<'_>, m: &StepMetrics) -> volttrain::Result<()> {
        self.steps.lock().unwrap().push(m.clone());
        Ok(())
    }
    fn on_eval_end(&mut self, _: &mut Control<'_>, m: &EvalMetrics) -> volttrain::Result<()> {
        self.evals.lock().unwrap().push(m.clone());
        Ok(())
    }
}

fn pref_cfg(loss: PreferenceLoss) -> PreferenceConfig {
    PreferenceConfig {
        loss_type: loss,
        beta: BETA,
        label_smoothing: if loss == PreferenceLoss::Robust {
            0.1
        } else {
            0.0
        },
        ..Default::default()
    }
}

/// Trains `steps` steps on the 4 pairs of `data` (one batch) and returns the step metrics and
/// the trained model.
fn train(
    data: &str,
    adapter: &Path,
    loss: PreferenceLoss,
    steps: usize,
) -> (Vec<StepMetrics>, Box<dyn CausalLm>) {
    let model = model_with_adapter(adapter);
    let opt = adamw(model.as_ref());
    let col = Collect::default();
    let out = tempfile::tempdir().unwrap();
    let mut t = Trainer::builder()
        .model(model)
        .train_data(Box::new(PreferenceSource::new(loader(data, 4))))
        .preference(PreferenceObjective::new(pref_cfg(loss)).unwrap())
        .optimizer(opt)
        .base_lr(LR)
        .epochs(steps)
        .clip_norm(None)
        .keep_freed_memory(false)
        .output_dir(out.path())
        .callback(Box::new(col.clone()))
        .build()
        .unwrap();
    t.fit().unwrap();
    let steps = col.steps.lock().unwrap().clone();
    (steps, t.into_model())
}

fn close(what: &str, got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol,
        "{what}: VoltTrain {got}, TRL {want} (|diff| {} > {tol})",
        (got - want).abs()
    );
}

fn check_metrics(step: usize, m: &StepMetrics, want: &serde_json::Value, loss: f64, tol: f64) {
    close(&format!("step {step} loss"), m.loss, loss, tol);
    for k in KEYS {
        let w = want[k].as_f64().unwrap_or_else(|| panic!("TRL has no {k}"));
        let g = *m
            .extra
            .get(k)
            .unwrap_or_else(|| panic!("VoltTrain logs no {k}"));
        close(&format!("step {step} {k}"), g, w, tol);
    }
}

fn ids_of(v: &serde_json::Value) -> Vec<Vec<i64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect()
}

fn rows_of(t: &Tensor) -> Vec<Vec<i64>> {
    let s = t.size();
    let flat: Vec<i64> = Vec::try_from(t.reshape([-1])).unwrap();
    flat.chunks(s[1] as usize).map(|c| c.to_vec()).collect()
}

/// The collated batch equals TRL's: same ids, mask, and labels on exactly its completion tokens.
fn check_batch(data: &str, reference: &Path) {
    let want = read_json(&reference.join("sigmoid.json"));
    let b = loader(data, 4).collate(&[0, 1, 2, 3]).unwrap();
    let ids = ids_of(&want["input_ids"]);
    let mask = ids_of(&want["attention_mask"]);
    let comp = ids_of(&want["completion_mask"]);
    assert_eq!(
        rows_of(&b.input_ids),
        ids,
        "{data}: input_ids differ from TRL's"
    );
    assert_eq!(
        rows_of(&b.attention_mask),
        mask,
        "{data}: attention_mask differs"
    );
    let labels: Vec<Vec<i64>> = ids
        .iter()
        .zip(&comp)
        .map(|(r, c)| {
            r.iter()
                .zip(c)
                .map(|(&i, &m)| if m == 1 { i } else { -100 })
                .collect()
        })
        .collect();
    assert_eq!(
        rows_of(&b.labels),
        labels,
        "{data}: completion tokens differ"
    );
}

#[test]
fn conversational_pairs_collate_as_trl() {
    check_batch("tests/fixtures/pref/conv.jsonl", conv_ref());
}

#[test]
fn string_pairs_collate_as_trl_and_train_alike() {
    let r = text_ref();
    check_batch("tests/fixtures/pref/text.jsonl", r);
    let want = read_json(&r.join("sigmoid.json"));
    let (steps, model) = train(
        "tests/fixtures/pref/text.jsonl",
        &r.join("init_adapter"),
        PreferenceLoss::Sigmoid,
        STEPS,
    );
    check_metrics(
        1,
        &steps[0],
        &want["metrics"],
        want["loss"].as_f64().unwrap(),
        1e-5,
    );
    check_params(model.as_ref(), &r.join("sigmoid_final.safetensors"));
}

fn check_params(model: &dyn CausalLm, file: &Path) {
    let want: HashMap<String, Tensor> = load_safetensors(file).unwrap().into_iter().collect();
    let got: BTreeMap<String, Tensor> = model
        .named_parameters()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    assert_eq!(got.len(), want.len(), "trainable parameter count");
    let mut worst = 0.0f64;
    for (n, t) in &got {
        let w = want.get(n).unwrap_or_else(|| panic!("TRL has no {n}"));
        let d = (t - w).abs().max().double_value(&[]);
        worst = worst.max(d);
        assert!(
            d <= 1e-4,
            "{n}: max |VoltTrain - TRL| = {d} after {STEPS} steps"
        );
    }
    // The steps moved the adapter (B starts at zero): the comparison is not vacuous.
    let moved = got
        .iter()
        .filter(|(n, _)| n.contains("lora_B"))
        .map(|(_, t)| t.abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert!(
        moved > 1e-4,
        "lora_B did not move ({moved}); worst diff {worst}"
    );
}

fn check_loss_type(name: &str, loss: PreferenceLoss) {
    let r = conv_ref();
    let want = read_json(&r.join(format!("{name}.json")));
    let (steps, model) = train(
        "tests/fixtures/pref/conv.jsonl",
        &r.join("init_adapter"),
        loss,
        STEPS,
    );
    assert_eq!(steps.len(), STEPS);
    check_metrics(
        1,
        &steps[0],
        &want["metrics"],
        want["loss"].as_f64().unwrap(),
        1e-5,
    );
    let logged = want["steps"].as_array().unwrap();
    assert_eq!(logged.len(), STEPS, "TRL logged {} steps", logged.len());
    for (i, (m, w)) in steps.iter().zip(logged).enumerate() {
        check_metrics(i + 1, m, w, w["loss"].as_f64().unwrap(), 1e-4);
    }
    check_params(model.as_ref(), &r.join(format!("{name}_final.safetensors")));
}

#[test]
fn sigmoid_matches_trl_over_three_steps() {
    check_loss_type("sigmoid", PreferenceLoss::Sigmoid);
}

#[test]
fn ipo_matches_trl_over_three_steps() {
    check_loss_type("ipo", PreferenceLoss::Ipo);
}

#[test]
fn hinge_matches_trl_over_three_steps() {
    check_loss_type("hinge", PreferenceLoss::Hinge);
}

#[test]
fn robust_label_smoothing_matches_trl_over_three_steps() {
    check_loss_type("robust", PreferenceLoss::Robust);
}

#[test]
fn orpo_matches_trl_odds_ratio_loss_over_three_steps() {
    let r = conv_ref();
    let want = read_json(&r.join("orpo.json"));
    let (steps, model) = train(
        "tests/fixtures/pref/conv.jsonl",
        &r.join("init_adapter"),
        PreferenceLoss::Orpo,
        STEPS,
    );
    assert_eq!(steps.len(), STEPS);
    check_metrics(
        1,
        &steps[0],
        &want["metrics"],
        want["loss"].as_f64().unwrap(),
        1e-5,
    );
    let logged = want["steps"].as_array().unwrap();
    assert_eq!(
        logged.len(),
        STEPS,
        "the reference took {} steps",
        logged.len()
    );
    for (i, (m, w)) in steps.iter().zip(logged).enumerate() {
        check_metrics(i + 1, m, w, w["loss"].as_f64().unwrap(), 1e-4);
    }
    check_params(model.as_ref(), &r.join("orpo_final.safetensors"));
}

/// A fresh adapter (B = 0) leaves the policy equal to the reference: the first sigmoid loss is
/// ln 2 (to fp32 rounding), every reward 0; the eval before training reports the same keys.
#[test]
fn fresh_lora_first_loss_is_ln2_and_eval_reports_trl_keys() {
    let mut model = load_model(model_dir(), &LoadOptions::new(Kind::Float, Device::Cpu)).unwrap();
    model.freeze_base();
    tch::manual_seed(7);
    let lora = volttrain::adapter::LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.05,
        ..Default::default()
    };
    use volttrain::adapter::AdapterInjector;
    volttrain::adapter::LoraInjector::new(lora)
        .inject(model.as_mut())
        .unwrap();
    let opt = adamw(model.as_ref());
    let col = Collect::default();
    let out = tempfile::tempdir().unwrap();
    let data = "assets/data/pref_train.jsonl";
    let mut t = Trainer::builder()
        .model(model)
        .train_data(Box::new(PreferenceSource::new(loader(data, 4))))
        .eval_data(Box::new(PreferenceSource::new(loader(
            "assets/data/pref_eval.jsonl",
            8,
        ))))
        .preference(PreferenceObjective::new(PreferenceConfig::default()).unwrap())
        .optimizer(opt)
        .base_lr(LR)
        .max_steps(Some(2))
        .output_dir(out.path())
        .keep_freed_memory(false)
        .callback(Box::new(col.clone()))
        .build()
        .unwrap();
    t.fit().unwrap();
    let steps = col.steps.lock().unwrap().clone();
    let ln2 = std::f64::consts::LN_2;
    assert!(
        (steps[0].loss - ln2).abs() < 1e-7,
        "first loss {} is not ln 2",
        steps[0].loss
    );
    for k in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
    ] {
        assert_eq!(steps[0].extra[k], 0.0, "{k} at step 1");
    }
    // After one update the policy differs from the reference.
    assert!(
        steps[1].extra["rewards/margins"] != 0.0,
        "step 2: no reward margin"
    );
    let evals = col.evals.lock().unwrap().clone();
    assert!(!evals.is_empty());
    assert!(
        (evals[0].eval_loss - ln2).abs() < 1e-6,
        "eval before training: {}",
        evals[0].eval_loss
    );
    for k in KEYS {
        assert!(evals[0].extra.contains_key(k), "eval has no {k}");
    }
    // The adapters are back on after the reference passes: the trained model differs from the
    // base, and switching them off gives the base again.
    let m = t.model();
    let ids = Tensor::from_slice(&[3i64, 272, 203, 281, 273]).reshape([1, 5]);
    let input = ForwardInput {
        input_ids: &ids,
        attention_mask: None,
        position_ids: None,
    };
    let on = m.forward(&input, false).unwrap();
    let off = {
        let _g = AdaptersDisabled::new(m);
        m.forward(&input, false).unwrap()
    };
    let base = load_model(model_dir(), &LoadOptions::new(Kind::Float, Device::Cpu))
        .unwrap()
        .forward(&input, false)
        .unwrap();
    assert_eq!((&off - &base).abs().max().double_value(&[]), 0.0);
    assert!((&on - &base).abs().max().double_value(&[]) > 0.0);
    assert_eq!(
        (&m.forward(&input, false).unwrap() - &on)
            .abs()
            .max()
            .double_value(&[]),
        0.0,
        "adapters not re-enabled"
    );
}

/// Full fine-tuning: a frozen reference copy and precomputed reference log-probs give the same
/// steps.
#[test]
fn full_finetuning_reference_copy_equals_precomputed() {
    let run = |precompute: bool| -> Vec<StepMetrics> {
        let model = load_model(model_dir(), &LoadOptions::new(Kind::Float, Device::Cpu)).unwrap();
        let opt = adamw(model.as_ref());
        let cfg = PreferenceConfig {
            precompute_ref_log_probs: precompute,
            ..Default::default()
        };
        let mut obj = PreferenceObjective::new(cfg).unwrap();
        if !precompute {
            let r = load_model(model_dir(), &LoadOptions::new(Kind::Float, Device::Cpu)).unwrap();
            obj = obj.with_reference_model(r);
        }
        let col = Collect::default();
        let out = tempfile::tempdir().unwrap();
        let mut t = Trainer::builder()
            .model(model)
            .train_data(Box::new(PreferenceSource::new(loader(
                "tests/fixtures/pref/conv.jsonl",
                2,
            ))))
            .preference(obj)
            .optimizer(opt)
            .base_lr(LR)
            .epochs(2)
            .output_dir(out.path())
            .keep_freed_memory(false)
            .callback(Box::new(col.clone()))
            .build()
            .unwrap();
        t.fit().unwrap();
        col.steps.lock().unwrap().clone()
    };
    let a = run(false);
    let b = run(true);
    assert_eq!(a.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        close("loss", x.loss, y.loss, 1e-6);
        for k in KEYS {
            close(k, x.extra[k], y.extra[k], 1e-6);
        }
    }
    // The model moved away from its reference after the first epoch.
    assert!(a[2].extra["rewards/margins"] != 0.0);

    // Without either, full fine-tuning has no reference: a clear error at build.
    let model = load_model(model_dir(), &LoadOptions::new(Kind::Float, Device::Cpu)).unwrap();
    let opt = adamw(model.as_ref());
    let e = Trainer::builder()
        .model(model)
        .train_data(Box::new(PreferenceSource::new(loader(
            "tests/fixtures/pref/conv.jsonl",
            2,
        ))))
        .preference(PreferenceObjective::new(PreferenceConfig::default()).unwrap())
        .optimizer(opt)
        .base_lr(LR)
        .build()
        .err()
        .expect("no reference");
    assert!(e.to_string().contains("precompute_ref_log_probs"), "{e}");
}
