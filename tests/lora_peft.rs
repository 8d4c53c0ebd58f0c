//! LoRA against PEFT: adapters made by Python `peft` load in VoltTrain with the same logits, and
//! adapters saved by VoltTrain load in `peft` with the same logits (fp32, 1e-4 absolute, over
//! non-pad positions). Base models come from `reference/make_model_fixtures.py`, adapters and
//! reference logits from `reference/peft_ref.py`, both run live through `$VOLTTRAIN_PYTHON_REF`.

mod common;
use common::max_err;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::json;
use tch::{Kind, Tensor};
use volttrain::adapter::{
    AdapterInjector, LoraConfig, LoraInjector, Targets, load_peft_adapter, merge_adapters,
    read_peft_config, save_peft_adapter, unmerge_adapters,
};
use volttrain::model::safetensors::load_safetensors;
use volttrain::model::{CausalLm, ForwardInput, LoadOptions, load_model};
use volttrain::nn::LinearWeight;

const TOL: f64 = 1e-4;

fn python() -> String {
    std::env::var("VOLTTRAIN_PYTHON_REF").unwrap_or_else(|_| "python3".to_string())
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run_py(args: &[&str]) {
    let out = Command::new(python())
        .args(args)
        .output()
        .expect("run the reference python");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fixtures() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let script = root().join("reference/make_model_fixtures.py");
        run_py(&[
            script.to_str().unwrap(),
            dir.path().to_str().unwrap(),
            "llama",
            "llama_tied",
            "qwen2",
            "mistral",
        ]);
        dir
    })
    .path()
}

fn expected(dir: &Path) -> HashMap<String, Tensor> {
    load_safetensors(&dir.join("expected.safetensors")).unwrap()
}

fn logits(model: &dyn CausalLm, exp: &HashMap<String, Tensor>, side: &str) -> Tensor {
    let input = ForwardInput {
        input_ids: &exp[&format!("{side}_ids")],
        attention_mask: Some(&exp[&format!("{side}_mask")]),
        position_ids: None,
    };
    tch::no_grad(|| model.forward(&input, false)).unwrap()
}

/// Worst error of `model` against `want` (`{side}_logits`) on both batches.
fn compare(
    model: &dyn CausalLm,
    exp: &HashMap<String, Tensor>,
    want: &HashMap<String, Tensor>,
    what: &str,
) -> f64 {
    let mut worst: f64 = 0.0;
    for side in ["left", "right"] {
        let err = max_err(
            &logits(model, exp, side),
            &want[&format!("{side}_logits")],
            &exp[&format!("{side}_mask")],
        );
        println!("{what} {side}: max abs err {err:.3e}");
        assert!(err < TOL, "{what} {side}: {err}");
        worst = worst.max(err);
    }
    worst
}

#[test]
fn peft_made_adapters_load_with_the_same_logits() {
    let cases = [
        (
            "llama",
            json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                   "use_rslora": true, "modules_to_save": ["lm_head"]}),
        ),
        (
            "qwen2",
            json!({"r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
                   "target_modules": r"model\.layers\.1\..*_proj"}),
        ),
        (
            "mistral",
            json!({"r": 2, "lora_alpha": 5, "target_modules": "all-linear"}),
        ),
        (
            "llama_tied",
            json!({"r": 4, "lora_alpha": 4, "target_modules": ["self_attn.o_proj", "up_proj"]}),
        ),
    ];
    for (name, cfg) in cases {
        let base = fixtures().join(name);
        let adapter = tempfile::tempdir().unwrap();
        run_py(&[
            root().join("reference/peft_ref.py").to_str().unwrap(),
            "make",
            base.to_str().unwrap(),
            adapter.path().to_str().unwrap(),
            &cfg.to_string(),
        ]);
        let mut model = load_model(&base, &LoadOptions::default()).unwrap();
        let exp = expected(&base);
        let plain = logits(model.as_ref(), &exp, "right");
        let (lcfg, params) = load_peft_adapter(model.as_mut(), adapter.path()).unwrap();
        assert!(!params.is_empty());
        let want = load_safetensors(&adapter.path().join("peft_logits.safetensors")).unwrap();
        compare(
            model.as_ref(),
            &exp,
            &want,
            &format!("peft -> volttrain {name}"),
        );
        // the adapter really changes the outputs
        let adapted = logits(model.as_ref(), &exp, "right");
        assert!(max_err(&adapted, &plain, &exp["right_mask"]) > 1e-3);
        if name == "llama" {
            assert!(lcfg.use_rslora);
            assert!((lcfg.scaling() - 8.0 / 2.0).abs() < 1e-12);
            assert!(params.iter().any(|(n, _)| n == "lm_head.weight"));
        }
    }
}

fn perturb_adapters(params: &[(String, Tensor)]) {
    let _g = tch::no_grad_guard();
    tch::manual_seed(99);
    for (_, p) in params {
        let mut p = p.shallow_clone();
        let _ = p.f_add_(&(p.randn_like() * 0.1)).unwrap();
    }
}

#[test]
fn volttrain_saved_adapters_load_in_peft_with_the_same_logits() {
    let cases = [
        (
            "llama",
            LoraConfig {
                r: 4,
                alpha: 8.0,
                dropout: 0.0,
                use_rslora: true,
                target: Targets::Preset("llama".into()),
                modules_to_save: vec!["lm_head".into()],
                ..Default::default()
            },
        ),
        (
            "qwen2",
            LoraConfig {
                r: 3,
                alpha: 6.0,
                target: Targets::Names(vec![
                    "model.layers.0.self_attn.k_proj".into(),
                    "gate_proj".into(),
                ]),
                dropout: 0.05,
                ..Default::default()
            },
        ),
        (
            "mistral",
            LoraConfig {
                r: 2,
                alpha: 16.0,
                target: Targets::Regex(r".*\.(q|v)_proj".into()),
                dropout: 0.05,
                ..Default::default()
            },
        ),
        (
            "llama_tied",
            LoraConfig {
                target: Targets::AllLinear,
                ..Default::default()
            },
        ),
    ];
    for (name, cfg) in cases {
        let base = fixtures().join(name);
        let mut model = load_model(&base, &LoadOptions::default()).unwrap();
        let params = LoraInjector::new(cfg.clone())
            .inject(model.as_mut())
            .unwrap();
        perturb_adapters(&params);
        let exp = expected(&base);
        let dir = tempfile::tempdir().unwrap();
        save_peft_adapter(model.as_mut(), &cfg, dir.path()).unwrap();
        let out = dir.path().join("peft_eval.safetensors");
        run_py(&[
            root().join("reference/peft_ref.py").to_str().unwrap(),
            "eval",
            base.to_str().unwrap(),
            dir.path().to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        let want = load_safetensors(&out).unwrap();
        compare(
            model.as_ref(),
            &exp,
            &want,
            &format!("volttrain -> peft {name}"),
        );

        // and it reads back into VoltTrain with identical parameters
        let mut again = load_model(&base, &LoadOptions::default()).unwrap();
        let (cfg2, params2) = load_peft_adapter(again.as_mut(), dir.path()).unwrap();
        assert_eq!(cfg2.r, cfg.r);
        assert_eq!(cfg2.use_rslora, cfg.use_rslora);
        assert_eq!(params2.len(), params.len());
        let p2: HashMap<String, Tensor> = params2.into_iter().collect();
        for (n, t) in &params {
            assert!(t.equal(&p2[n]), "{name}: {n} differs after save/load");
        }
    }
}

#[test]
fn injection_freezes_base_and_starts_as_identity() {
    let base = fixtures().join("llama");
    let mut model = load_model(&base, &LoadOptions::default()).unwrap();
    let exp = expected(&base);
    let before = logits(model.as_ref(), &exp, "left");
    let cfg = LoraConfig {
        r: 16,
        modules_to_save: vec!["model.norm".into()],
        alpha: 16.0,
        dropout: 0.05,
        ..Default::default()
    };
    let params = LoraInjector::new(cfg).inject(model.as_mut()).unwrap();
    // 2 layers x 7 projections x (A, B) + the final norm
    assert_eq!(params.len(), 2 * 7 * 2 + 1);
    let trainable: Vec<String> = model
        .named_parameters()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(n, _)| n)
        .collect();
    let mut returned: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
    returned.sort();
    let mut trainable_sorted = trainable.clone();
    trainable_sorted.sort();
    assert_eq!(trainable_sorted, returned);
    assert!(trainable.contains(&"model.layers.0.self_attn.q_proj.lora_A.weight".to_string()));
    assert!(trainable.contains(&"model.norm.weight".to_string()));
    // PEFT initialisation: B = 0 (so the model is unchanged), A ~ U(-1/sqrt(in), 1/sqrt(in))
    let after = logits(model.as_ref(), &exp, "left");
    assert_eq!(max_err(&after, &before, &exp["left_mask"]), 0.0);
    for (n, t) in &params {
        if n.ends_with("lora_B.weight") {
            assert_eq!(t.abs().max().double_value(&[]), 0.0, "{n}");
        } else if n.ends_with("lora_A.weight") {
            let fan_in = t.size()[1] as f64;
            let bound = 1.0 / fan_in.sqrt();
            let m = t.abs().max().double_value(&[]);
            assert!(
                m <= bound && m > 0.8 * bound,
                "{n}: max |A| {m}, bound {bound}"
            );
            // the variance of U(-b, b) is b^2 / 3
            let var = t.var(true).double_value(&[]);
            assert!(
                (var / (bound * bound / 3.0) - 1.0).abs() < 0.25,
                "{n}: var {var}"
            );
        }
    }
    // gradients flow to the adapters only
    let l = model
        .forward(
            &ForwardInput {
                input_ids: &exp["left_ids"],
                attention_mask: Some(&exp["left_mask"]),
                position_ids: None,
            },
            true,
        )
        .unwrap()
        .square()
        .mean(Kind::Float);
    l.backward();
    let b_grad = &params
        .iter()
        .find(|(n, _)| n.ends_with("q_proj.lora_B.weight"))
        .unwrap()
        .1;
    assert!(b_grad.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    let (_, w) = model
        .named_parameters()
        .into_iter()
        .find(|(n, _)| n == "model.layers.0.mlp.up_proj.weight")
        .unwrap();
    assert!(!w.grad().defined());
}

#[test]
fn merge_and_unmerge_keep_logits_and_restore_weights() {
    let base = fixtures().join("qwen2");
    let mut model = load_model(&base, &LoadOptions::default()).unwrap();
    let exp = expected(&base);
    let w0 = model
        .named_parameters()
        .into_iter()
        .find(|(n, _)| n == "model.layers.1.mlp.down_proj.weight")
        .unwrap()
        .1
        .copy();
    let cfg = LoraConfig {
        r: 4,
        target: Targets::Preset("mlp_only".into()),
        alpha: 16.0,
        dropout: 0.05,
        ..Default::default()
    };
    let params = LoraInjector::new(cfg).inject(model.as_mut()).unwrap();
    perturb_adapters(&params);
    let unmerged = logits(model.as_ref(), &exp, "right");
    merge_adapters(model.as_mut()).unwrap();
    let w_merged = model
        .named_parameters()
        .into_iter()
        .find(|(n, _)| n == "model.layers.1.mlp.down_proj.weight")
        .unwrap()
        .1;
    assert!((&w_merged - &w0).abs().max().double_value(&[]) > 1e-4);
    let merged = logits(model.as_ref(), &exp, "right");
    let err = max_err(&merged, &unmerged, &exp["right_mask"]);
    println!("merged vs unmerged: max abs err {err:.3e}");
    assert!(err < 1e-5);
    unmerge_adapters(model.as_mut()).unwrap();
    let w1 = model
        .named_parameters()
        .into_iter()
        .find(|(n, _)| n == "model.layers.1.mlp.down_proj.weight")
        .unwrap()
        .1;
    assert!((&w1 - &w0).abs().max().double_value(&[]) < 1e-6);
    let again = logits(model.as_ref(), &exp, "right");
    assert!(max_err(&again, &unmerged, &exp["right_mask"]) < 1e-5);
    // merged adapters are not saved by mistake
    merge_adapters(model.as_mut()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    assert!(save_peft_adapter(model.as_mut(), &LoraConfig::default(), dir.path()).is_err());
}

#[test]
fn target_sets_that_match_nothing_are_errors() {
    let base = fixtures().join("llama");
    for target in [
        Targets::Names(vec!["query_key_value".into()]),
        Targets::Regex("q_proj".into()), // must match the whole name
        Targets::Names(vec!["proj".into()]), // suffixes are whole name components
    ] {
        let mut model = load_model(&base, &LoadOptions::default()).unwrap();
        let cfg = LoraConfig {
            target: target.clone(),
            ..Default::default()
        };
        let err = LoraInjector::new(cfg)
            .inject(model.as_mut())
            .unwrap_err()
            .to_string();
        println!("{err}");
        assert!(
            err.contains("matches no linear module"),
            "{target:?}: {err}"
        );
    }
    let mut model = load_model(&base, &LoadOptions::default()).unwrap();
    let cfg = LoraConfig {
        target: Targets::Preset("attention".into()),
        ..Default::default()
    };
    let err = LoraInjector::new(cfg)
        .inject(model.as_mut())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mlp_only") && err.contains("attn_mlp_ssm"),
        "{err}"
    );
    // presets naming Mamba projections are errors on a pure transformer (issue 17: before,
    // `attn_mlp_ssm` silently equalled `llama` and `mlp_mamba` equalled `mlp_only`)
    for preset in ["mamba_only", "mlp_mamba", "attn_mlp_ssm"] {
        let cfg = LoraConfig {
            target: Targets::Preset(preset.into()),
            ..Default::default()
        };
        let err = LoraInjector::new(cfg)
            .inject(model.as_mut())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(preset) && err.contains("Mamba mixer") && err.contains("LlamaForCausalLM"),
            "{err}"
        );
    }
    let cfg = LoraConfig {
        target: Targets::Preset("llama".into()),
        ..Default::default()
    };
    assert_eq!(
        LoraInjector::new(cfg).inject(model.as_mut()).unwrap().len(),
        2 * 7 * 2
    );
    // all-linear leaves the LM head alone
    let mut model = load_model(&base, &LoadOptions::default()).unwrap();
    let cfg = LoraConfig {
        target: Targets::AllLinear,
        ..Default::default()
    };
    let p = LoraInjector::new(cfg).inject(model.as_mut()).unwrap();
    assert!(p.iter().all(|(n, _)| !n.starts_with("lm_head")));
    assert_eq!(p.len(), 2 * 7 * 2);
}

#[test]
fn lora_on_a_quantized_base_trains_and_cannot_merge() {
    #[derive(Debug)]
    struct Half;
    #[derive(Debug)]
    struct HalfT(Tensor);
    impl volttrain::quant::QuantizedTensor for HalfT {
        fn format(&self) -> &str {
            "f16_test"
        }
        fn shape(&self) -> (i64, i64) {
            (self.0.size()[0], self.0.size()[1])
        }
        fn dequantize(&self, kind: Kind) -> volttrain::Result<Tensor> {
            Ok(self.0.to_kind(kind))
        }
        fn storage_bytes(&self) -> usize {
            self.0.numel() * 2
        }
        fn named_tensors(&self) -> Vec<(String, Tensor)> {
            vec![]
        }
    }
    impl volttrain::quant::Quantizer for Half {
        fn name(&self) -> &str {
            "f16_test"
        }
        fn quantize(
            &self,
            w: &Tensor,
        ) -> volttrain::Result<Box<dyn volttrain::quant::QuantizedTensor>> {
            Ok(Box::new(HalfT(w.to_kind(Kind::Half))))
        }
    }
    let base = fixtures().join("llama");
    let opts = LoadOptions::default().with_quantizer(std::sync::Arc::new(Half));
    let mut model = load_model(&base, &opts).unwrap();
    assert!(
        model
            .linears_mut()
            .iter()
            .any(|(_, l)| matches!(l.weight, LinearWeight::Quantized(_)))
    );
    let params = LoraInjector::new(LoraConfig::default())
        .inject(model.as_mut())
        .unwrap();
    assert_eq!(params.len(), 2 * 7 * 2);
    let exp = expected(&base);
    let loss = model
        .forward(
            &ForwardInput {
                input_ids: &exp["right_ids"],
                attention_mask: Some(&exp["right_mask"]),
                position_ids: None,
            },
            true,
        )
        .unwrap()
        .square()
        .mean(Kind::Float);
    loss.backward();
    for (n, p) in &params {
        if n.ends_with("lora_B.weight") {
            assert!(
                p.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0,
                "{n}"
            );
        }
    }
    assert!(merge_adapters(model.as_mut()).is_err());
}

#[test]
fn peft_config_errors_name_file_and_key() {
    let base = fixtures().join("llama");
    let dir = tempfile::tempdir().unwrap();
    let mut model = load_model(&base, &LoadOptions::default()).unwrap();
    let cfg = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.05,
        target: Targets::Names(vec!["q_proj".into()]),
        ..Default::default()
    };
    LoraInjector::new(cfg.clone())
        .inject(model.as_mut())
        .unwrap();
    save_peft_adapter(model.as_mut(), &cfg, dir.path()).unwrap();
    let written: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(written["peft_type"], "LORA");
    assert_eq!(written["task_type"], "CAUSAL_LM");
    assert_eq!(written["target_modules"], json!(["q_proj"]));
    assert_eq!(read_peft_config(dir.path()).unwrap().r, 8);

    let cfg_path = dir.path().join("adapter_config.json");
    let mut bad = written.clone();
    bad["use_dora"] = json!(true);
    std::fs::write(&cfg_path, bad.to_string()).unwrap();
    let msg = read_peft_config(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("adapter_config.json") && msg.contains("use_dora"),
        "{msg}"
    );

    // a tensor of the file that fits nowhere is named
    std::fs::write(&cfg_path, written.to_string()).unwrap();
    let w = dir.path().join("adapter_model.safetensors");
    let mut t: Vec<(String, Tensor)> = load_safetensors(&w).unwrap().into_iter().collect();
    t.push((
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight".into(),
        Tensor::zeros([8, 64], (Kind::Float, tch::Device::Cpu)),
    ));
    volttrain::model::safetensors::save_safetensors(&w, &t, None).unwrap();
    let mut fresh = load_model(&base, &LoadOptions::default()).unwrap();
    let msg = load_peft_adapter(fresh.as_mut(), dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("adapter_model.safetensors") && msg.contains("mlp.up_proj.lora_A.weight"),
        "{msg}"
    );
}
