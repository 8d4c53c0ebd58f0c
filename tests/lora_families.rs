//! LoRA, QLoRA and full training on Qwen3, Gemma 2, Gemma 3, Phi-3 and SmolLM3 (issue 16).
//!
//! - the `llama` preset adapts every attention and MLP projection whatever the family calls it
//!   (Phi-3's fused `qkv_proj` and `gate_up_proj`), and `all-linear` adapts exactly the modules
//!   PEFT's `all-linear` does;
//! - adapters VoltTrain saves load in PEFT with the same logits (1e-4 absolute, so the same
//!   loss), and adapters PEFT makes load in VoltTrain with PEFT's logits;
//! - the trainer's eval loss equals transformers' `outputs.loss`, and full, LoRA and QLoRA (NF4)
//!   training lower it.
//!
//! Base models come from `reference/make_model_fixtures.py`, adapters and PEFT's logits from
//! `reference/peft_families.py`, run live through `$VOLTTRAIN_PYTHON_REF`.

mod common;
use common::max_err;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use serde_json::json;
use tch::{Device, Kind, Tensor};
use volttrain::adapter::{
    AdapterInjector, LoraConfig, LoraInjector, Targets, load_peft_adapter, save_peft_adapter,
};
use volttrain::model::safetensors::load_safetensors;
use volttrain::model::{CausalLm, ForwardInput, LoadOptions, load_model};
use volttrain::quant::{FourBitQuantizer, FourBitType};
use volttrain::trainer::Trainer;

const TOL: f64 = 1e-4;
const FAMILIES: [&str; 5] = ["qwen3", "gemma2", "gemma3", "phi3", "smollm3"];

fn python() -> String {
    std::env::var("VOLTTRAIN_PYTHON_REF").unwrap_or_else(|_| "python3".to_string())
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run_py(args: &[&str]) -> String {
    let out = Command::new(python())
        .args(args)
        .output()
        .expect("run the reference python");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fixtures() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let script = root().join("reference/make_model_fixtures.py");
        let mut args = vec![
            script.to_str().unwrap().to_string(),
            dir.path().to_str().unwrap().to_string(),
        ];
        args.extend(FAMILIES.iter().map(|s| s.to_string()));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run_py(&a);
        dir
    })
    .path()
}

fn expected(dir: &Path) -> HashMap<String, Tensor> {
    load_safetensors(&dir.join("expected.safetensors")).unwrap()
}

fn compare(
    model: &dyn CausalLm,
    exp: &HashMap<String, Tensor>,
    want: &HashMap<String, Tensor>,
    what: &str,
) {
    for side in ["left", "right"] {
        let input = ForwardInput {
            input_ids: &exp[&format!("{side}_ids")],
            attention_mask: Some(&exp[&format!("{side}_mask")]),
            position_ids: None,
        };
        let got = tch::no_grad(|| model.forward(&input, false)).unwrap();
        let err = max_err(
            &got,
            &want[&format!("{side}_logits")],
            &exp[&format!("{side}_mask")],
        );
        println!("{what} {side}: max abs err {err:.3e}");
        assert!(err < TOL, "{what} {side}: {err}");
    }
}

fn adapted_modules(params: &[(String, Tensor)]) -> Vec<String> {
    let mut m: Vec<String> = params
        .iter()
        .filter_map(|(n, _)| n.strip_suffix(".lora_A.weight").map(String::from))
        .collect();
    m.sort();
    m
}

#[test]
fn llama_preset_adapts_every_projection_of_each_family() {
    for name in FAMILIES {
        let mut model = load_model(fixtures().join(name), &LoadOptions::default()).unwrap();
        let linears: Vec<String> = model
            .linears_mut()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n != "lm_head")
            .collect();
        let params = LoraInjector::new(LoraConfig::default())
            .inject(model.as_mut())
            .unwrap();
        let mut want = linears.clone();
        want.sort();
        assert_eq!(adapted_modules(&params), want, "{name}");
        let per_layer = if name == "phi3" { 4 } else { 7 };
        assert_eq!(want.len(), 2 * per_layer, "{name}");
        if name == "phi3" {
            assert!(want.iter().any(|m| m.ends_with("self_attn.qkv_proj")));
            assert!(want.iter().any(|m| m.ends_with("mlp.gate_up_proj")));
        }
    }
}

fn perturb(params: &[(String, Tensor)]) {
    let _g = tch::no_grad_guard();
    tch::manual_seed(7);
    for (_, p) in params {
        let mut p = p.shallow_clone();
        let _ = p.f_add_(&(p.randn_like() * 0.1)).unwrap();
    }
}

/// Both directions and PEFT's `all-linear`, every family, in two Python runs.
#[test]
fn peft_round_trips_and_all_linear_match_per_family() {
    let work = tempfile::tempdir().unwrap();
    // 1. PEFT makes adapters and lists its all-linear modules
    let mut jobs = Vec::new();
    for name in FAMILIES {
        let base = fixtures().join(name);
        jobs.push(
            json!({"op": "make", "base": base, "adapter": work.path().join(format!("peft_{name}")),
            "config": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}}),
        );
        jobs.push(json!({"op": "all_linear", "base": base, "out": work.path().join(format!("all_linear_{name}.json"))}));
    }
    let jobs_file = work.path().join("jobs1.json");
    std::fs::write(&jobs_file, serde_json::to_string(&jobs).unwrap()).unwrap();
    let script = root().join("reference/peft_families.py");
    run_py(&[script.to_str().unwrap(), jobs_file.to_str().unwrap()]);

    // 2. VoltTrain: PEFT's adapters load with PEFT's logits; ours are saved for PEFT
    let mut jobs = Vec::new();
    let mut ours = Vec::new();
    for name in FAMILIES {
        let base = fixtures().join(name);
        let exp = expected(&base);

        let peft_dir = work.path().join(format!("peft_{name}"));
        let mut model = load_model(&base, &LoadOptions::default()).unwrap();
        let (_, params) = load_peft_adapter(model.as_mut(), &peft_dir).unwrap();
        let want = load_safetensors(&peft_dir.join("peft_logits.safetensors")).unwrap();
        compare(
            model.as_ref(),
            &exp,
            &want,
            &format!("peft -> volttrain {name}"),
        );

        // all-linear: the same modules as PEFT's
        let peft_all: Vec<String> = serde_json::from_str(
            &std::fs::read_to_string(work.path().join(format!("all_linear_{name}.json"))).unwrap(),
        )
        .unwrap();
        let mut m2 = load_model(&base, &LoadOptions::default()).unwrap();
        let cfg = LoraConfig {
            target: Targets::AllLinear,
            ..Default::default()
        };
        let all = LoraInjector::new(cfg).inject(m2.as_mut()).unwrap();
        assert_eq!(adapted_modules(&all), peft_all, "{name}: all-linear");
        assert_eq!(adapted_modules(&params), peft_all, "{name}: PEFT's adapter");

        // ours, `llama` preset, random B so the adapter matters
        let cfg = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            ..Default::default()
        };
        let mut model = load_model(&base, &LoadOptions::default()).unwrap();
        let params = LoraInjector::new(cfg.clone())
            .inject(model.as_mut())
            .unwrap();
        perturb(&params);
        let dir = work.path().join(format!("ours_{name}"));
        save_peft_adapter(model.as_mut(), &cfg, &dir).unwrap();
        let out = work.path().join(format!("ours_{name}.safetensors"));
        jobs.push(json!({"op": "eval", "base": base, "adapter": dir, "out": out}));
        ours.push((name, model, out));
    }
    let jobs_file = work.path().join("jobs2.json");
    std::fs::write(&jobs_file, serde_json::to_string(&jobs).unwrap()).unwrap();
    run_py(&[script.to_str().unwrap(), jobs_file.to_str().unwrap()]);
    for (name, model, out) in ours {
        let exp = expected(&fixtures().join(name));
        let want = load_safetensors(&out).unwrap();
        compare(
            model.as_ref(),
            &exp,
            &want,
            &format!("volttrain -> peft {name}"),
        );
    }
}

// ---------- training ----------

/// transformers' `outputs.loss` of each family on [`common::padded_prompt_batch`].
fn transformers_losses() -> HashMap<String, f64> {
    let dir = tempfile::tempdir().unwrap();
    let file = common::write_padded_prompt_batch(dir.path());
    let script = r#"
import json, sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
t = load_file(sys.argv[1])
out = {}
for name in sys.argv[3:]:
    m = AutoModelForCausalLM.from_pretrained(sys.argv[2] + "/" + name, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        out[name] = m(input_ids=t["ids"], attention_mask=t["mask"], labels=t["labels"]).loss.item()
print(json.dumps(out))
"#;
    let mut args = vec![
        "-c".to_string(),
        script.to_string(),
        file.to_str().unwrap().to_string(),
        fixtures().to_str().unwrap().to_string(),
    ];
    args.extend(FAMILIES.iter().map(|s| s.to_string()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let text = run_py(&a);
    serde_json::from_str(text.trim().lines().last().unwrap()).unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Full,
    Lora,
    Qlora,
}

/// Eval loss before and after 4 steps of `mode` on the one batch.
fn train(name: &str, mode: Mode) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = LoadOptions::new(Kind::Float, Device::Cpu);
    if let Mode::Qlora = mode {
        opts = opts.with_quantizer(Arc::new(
            FourBitQuantizer::new(FourBitType::Nf4, 64, true).unwrap(),
        ));
    }
    let mut model = load_model(fixtures().join(name), &opts).unwrap();
    if !matches!(mode, Mode::Full) {
        let cfg = LoraConfig {
            dropout: 0.0,
            r: 8,
            alpha: 16.0,
            ..Default::default()
        };
        model.freeze_base();
        LoraInjector::new(cfg).inject(model.as_mut()).unwrap();
    }
    let lr = if matches!(mode, Mode::Full) {
        0.05
    } else {
        0.5
    };
    let opt = <common::Sgd as volttrain::optim::Optimizer>::new(
        common::one_group(model.as_ref(), lr),
        common::SgdConfig { momentum: 0.0 },
    )
    .unwrap();
    let mut tr = Trainer::builder()
        .model(model)
        .train_data(Box::new(common::PaddedPromptSource))
        .eval_data(Box::new(common::PaddedPromptSource))
        .optimizer(Box::new(opt))
        .base_lr(lr)
        .max_steps(Some(4))
        .output_dir(dir.path().join("out"))
        .build()
        .unwrap();
    let before = tr.evaluate().unwrap().eval_loss;
    tr.fit().unwrap();
    let after = tr.evaluate().unwrap().eval_loss;
    println!("{name} {mode:?}: eval loss {before:.5} -> {after:.5}");
    (before, after)
}

#[test]
fn eval_loss_matches_transformers_and_full_lora_qlora_training_lower_it() {
    let theirs = transformers_losses();
    for name in FAMILIES {
        let (before, after) = train(name, Mode::Full);
        let want = theirs[name];
        println!("{name}: eval loss volttrain {before} transformers {want}");
        assert!(
            (before - want).abs() < 1e-5 * want.abs().max(1.0),
            "{name}: {before} vs {want}"
        );
        assert!(after < before, "{name} full: {before} -> {after}");
        let (b, a) = train(name, Mode::Lora);
        assert!(
            (b - want).abs() < 1e-5 * want.abs().max(1.0),
            "{name} lora start"
        );
        assert!(a < b, "{name} lora: {b} -> {a}");
        let (b, a) = train(name, Mode::Qlora);
        // NF4 rounds the base weights: the start is near, not equal
        assert!(
            (b - want).abs() < 0.05 * want.abs(),
            "{name} qlora start {b} vs {want}"
        );
        assert!(a < b, "{name} qlora: {b} -> {a}");
    }
}
