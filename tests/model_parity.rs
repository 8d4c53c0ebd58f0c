//! Parity of the Llama / Mistral / Qwen2 decoders with Hugging Face transformers.
//!
//! `reference/make_model_fixtures.py` makes tiny random models with transformers in a temporary
//! directory (run live through `$VOLTTRAIN_PYTHON_REF`) and writes transformers' fp32 logits for
//! a left-padded batch, a right-padded batch and a packed row. VoltTrain loads each directory and
//! must match over the non-pad positions to 1e-4 absolute.

mod common;
use common::max_err;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};
use volttrain::model::safetensors::{load_safetensors, save_safetensors};
use volttrain::model::{CausalLm, ForwardInput, LoadOptions, load_model, save_model};

const TOL: f64 = 1e-4;
const VARIANTS: [&str; 6] = [
    "llama",
    "llama3",
    "llama_tied",
    "mistral",
    "qwen2",
    "qwen2_swa",
];

fn python() -> String {
    std::env::var("VOLTTRAIN_PYTHON_REF").unwrap_or_else(|_| "python3".to_string())
}

/// Makes all fixtures once per test binary.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("reference/make_model_fixtures.py");
        let out = Command::new(python())
            .arg(&script)
            .arg(dir.path())
            .args(VARIANTS)
            .output()
            .expect("run the reference python");
        assert!(
            out.status.success(),
            "make_model_fixtures.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
    .path()
}

fn expected(dir: &Path) -> HashMap<String, Tensor> {
    load_safetensors(&dir.join("expected.safetensors")).unwrap()
}

/// Left and right padding, with position ids given and derived; returns the worst error.
fn check_padded(model: &dyn CausalLm, exp: &HashMap<String, Tensor>, name: &str) -> f64 {
    let mut worst: f64 = 0.0;
    for side in ["left", "right"] {
        let ids = &exp[&format!("{side}_ids")];
        let mask = &exp[&format!("{side}_mask")];
        let pos = &exp[&format!("{side}_pos")];
        let want = &exp[&format!("{side}_logits")];
        for explicit_pos in [true, false] {
            let input = ForwardInput {
                input_ids: ids,
                attention_mask: Some(mask),
                position_ids: explicit_pos.then_some(pos),
            };
            let got = tch::no_grad(|| model.forward(&input, false)).unwrap();
            assert_eq!(got.kind(), Kind::Float);
            let err = max_err(&got, want, mask);
            println!(
                "{name} {side} padding (explicit positions: {explicit_pos}): max abs err {err:.3e}"
            );
            assert!(err < TOL, "{name} {side}: {err}");
            assert!(
                !bool::try_from(got.isnan().any()).unwrap(),
                "{name} {side}: NaN logits"
            );
            worst = worst.max(err);
        }
    }
    worst
}

/// Block-diagonal causal 4-D mask from segment ids `[1, T]`.
fn packed_mask(seg: &Tensor) -> Tensor {
    let t = seg.size()[1];
    let same = seg.unsqueeze(-1).eq_tensor(&seg.unsqueeze(-2)); // [1, T, T]
    let causal = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).tril(0);
    same.logical_and(&causal).unsqueeze(1)
}

#[test]
fn logits_match_transformers_with_left_and_right_padding() {
    let root = fixtures();
    for name in VARIANTS {
        let dir = root.join(name);
        let model = load_model(&dir, &LoadOptions::default()).unwrap();
        let exp = expected(&dir);
        let worst = check_padded(model.as_ref(), &exp, name);
        println!("{name}: worst padded error {worst:.3e}");
    }
}

/// transformers < 5 wrote `rope_theta` and `rope_scaling` (with `type` or `rope_type`) at the
/// top level; the same weights must give the same logits.
#[test]
fn legacy_rope_scaling_config_form_matches() {
    let d = copy_dir(&fixtures().join("llama3"));
    let cfg_path = d.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let mut rope = cfg
        .as_object_mut()
        .unwrap()
        .remove("rope_parameters")
        .unwrap();
    let theta = rope.as_object_mut().unwrap().remove("rope_theta").unwrap();
    let ty = rope.as_object_mut().unwrap().remove("rope_type").unwrap();
    rope["type"] = ty;
    cfg["rope_theta"] = theta;
    cfg["rope_scaling"] = rope;
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let model = load_model(d.path(), &LoadOptions::default()).unwrap();
    check_padded(
        model.as_ref(),
        &expected(d.path()),
        "llama3 (legacy rope_scaling)",
    );

    // an unsupported rope type names the key (yarn is supported since issue 16; transformers'
    // `proportional` is not)
    cfg["rope_scaling"]["type"] = serde_json::json!("proportional");
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let msg = load_err(d.path());
    assert!(
        msg.contains("rope_scaling.rope_type") && msg.contains("proportional"),
        "{msg}"
    );
}

/// Training needs the backward pass to match too: gradients of `sum(logits * w)` over the
/// non-pad positions of the left-padded batch, for every parameter.
#[test]
fn gradients_match_transformers() {
    for name in VARIANTS {
        let dir = fixtures().join(name);
        let model = load_model(&dir, &LoadOptions::default()).unwrap();
        let exp = expected(&dir);
        let input = ForwardInput {
            input_ids: &exp["left_ids"],
            attention_mask: Some(&exp["left_mask"]),
            position_ids: None,
        };
        let loss = (model.forward(&input, false).unwrap() * &exp["left_gw"]).sum(Kind::Float);
        loss.backward();
        let mut worst: f64 = 0.0;
        let params = model.named_parameters();
        assert_eq!(
            params.len(),
            exp.keys().filter(|k| k.starts_with("grad.")).count()
        );
        for (n, p) in params {
            let want = &exp[&format!("grad.{n}")];
            let scale = want.abs().max().double_value(&[]).max(1.0);
            let err = (p.grad() - want).abs().max().double_value(&[]) / scale;
            assert!(err < TOL, "{name} {n}: relative grad error {err}");
            worst = worst.max(err);
        }
        println!("{name}: worst gradient error (relative to max(1, max|g|)) {worst:.3e}");
    }
}

#[test]
fn packed_rows_with_4d_mask_match_separate_sequences() {
    let root = fixtures();
    for name in VARIANTS {
        let dir = root.join(name);
        let model = load_model(&dir, &LoadOptions::default()).unwrap();
        let exp = expected(&dir);
        let mask = packed_mask(&exp["packed_seg"]);
        let input = ForwardInput {
            input_ids: &exp["packed_ids"],
            attention_mask: Some(&mask),
            position_ids: Some(&exp["packed_pos"]),
        };
        let got = tch::no_grad(|| model.forward(&input, false)).unwrap();
        let keep = Tensor::ones_like(&exp["packed_ids"]);
        let err = max_err(&got, &exp["packed_logits"], &keep);
        println!("{name} packed 4-D mask: max abs err {err:.3e}");
        assert!(err < TOL, "{name} packed: {err}");
        // a 4-D mask without position ids is refused
        let bad = ForwardInput {
            input_ids: &exp["packed_ids"],
            attention_mask: Some(&mask),
            position_ids: None,
        };
        assert!(model.forward(&bad, false).is_err());
        // an additive float mask is refused rather than misread
        let additive = mask.to_kind(Kind::Float);
        let bad = ForwardInput {
            input_ids: &exp["packed_ids"],
            attention_mask: Some(&additive),
            position_ids: Some(&exp["packed_pos"]),
        };
        assert!(model.forward(&bad, false).is_err());
    }
}

#[test]
fn stages_compose_to_forward_and_params_use_hf_names() {
    let dir = fixtures().join("qwen2");
    let model = load_model(&dir, &LoadOptions::default()).unwrap();
    let exp = expected(&dir);
    let input = ForwardInput {
        input_ids: &exp["left_ids"],
        attention_mask: Some(&exp["left_mask"]),
        position_ids: None,
    };
    let (staged, full) = tch::no_grad(|| {
        let ctx = model.prepare(&input).unwrap();
        let mut h = model.embed(input.input_ids).unwrap();
        for i in 0..model.num_layers() {
            h = model.layer(i, &h, &ctx, false).unwrap();
        }
        (
            model.head(&h).unwrap(),
            model.forward(&input, false).unwrap(),
        )
    });
    assert_eq!(f64::try_from((&staged - &full).abs().max()).unwrap(), 0.0);
    assert!(
        model
            .layer(99, &staged, &model.prepare(&input).unwrap(), false)
            .is_err()
    );

    // names and shapes are exactly those of the checkpoint files
    let mut names: Vec<String> = model
        .named_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    names.sort();
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let mut want: Vec<String> = index["weight_map"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    want.sort();
    assert_eq!(names, want);
    assert!(
        model
            .named_parameters()
            .iter()
            .all(|(_, t)| t.requires_grad())
    );
    assert_eq!(model.architecture(), "Qwen2ForCausalLM");
    assert_eq!(model.lm_head_param(), "lm_head.weight");

    let tied = load_model(fixtures().join("llama_tied"), &LoadOptions::default()).unwrap();
    assert_eq!(tied.lm_head_param(), "model.embed_tokens.weight");
    assert!(
        !tied
            .named_parameters()
            .iter()
            .any(|(n, _)| n.starts_with("lm_head"))
    );
}

#[test]
fn qwen2_sliding_window_applies_to_late_layers_only() {
    let (p, v) = volttrain::model::read_config(&fixtures().join("qwen2_swa")).unwrap();
    let cfg = volttrain::model::decoder_config(&p, &v).unwrap();
    assert_eq!(cfg.sliding_windows, vec![None, Some(4)]);
}

#[test]
fn loads_into_bf16_when_asked() {
    let dir = fixtures().join("llama");
    let model = load_model(&dir, &LoadOptions::new(Kind::BFloat16, Device::Cpu)).unwrap();
    assert!(
        model
            .named_parameters()
            .iter()
            .all(|(_, t)| t.kind() == Kind::BFloat16)
    );
    let exp = expected(&dir);
    let input = ForwardInput {
        input_ids: &exp["right_ids"],
        attention_mask: Some(&exp["right_mask"]),
        position_ids: None,
    };
    let got = tch::no_grad(|| model.forward(&input, false)).unwrap();
    assert_eq!(got.kind(), Kind::BFloat16);
    // bf16 keeps 8 bits of mantissa: the logits (|x| ~ 1) stay within a few 1e-2 of fp32
    let err = max_err(
        &got.to_kind(Kind::Float),
        &exp["right_logits"],
        &exp["right_mask"],
    );
    println!("bf16 load: max abs err vs transformers fp32 {err:.3e}");
    assert!(err < 0.1, "{err}");
}

#[test]
fn freeze_base_stops_gradients() {
    let mut model = load_model(fixtures().join("llama"), &LoadOptions::default()).unwrap();
    model.freeze_base();
    assert!(
        model
            .named_parameters()
            .iter()
            .all(|(_, t)| !t.requires_grad())
    );
}

#[test]
fn save_model_round_trips_through_transformers_names() {
    let src = fixtures().join("llama3");
    let model = load_model(&src, &LoadOptions::default()).unwrap();
    let out = tempfile::tempdir().unwrap();
    save_model(model.as_ref(), out.path()).unwrap();
    let again = load_model(out.path(), &LoadOptions::default()).unwrap();
    // the source was bf16 on disk; the saved config names the kind we wrote
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(saved["dtype"], "float32");
    assert_eq!(saved["rope_parameters"]["rope_type"], "llama3");
    let a = model.named_parameters();
    let b: HashMap<String, Tensor> = again.named_parameters().into_iter().collect();
    assert_eq!(a.len(), b.len());
    for (n, t) in &a {
        assert!(t.equal(&b[n]), "{n} differs after save/load");
    }
    // and transformers reads what we wrote, giving the reference logits
    let exp = expected(&src);
    save_safetensors(
        &out.path().join("inputs.safetensors"),
        &[
            ("ids".to_string(), exp["left_ids"].shallow_clone()),
            ("mask".to_string(), exp["left_mask"].shallow_clone()),
            ("pos".to_string(), exp["left_pos"].shallow_clone()),
        ],
        None,
    )
    .unwrap();
    let code = r#"
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
d = sys.argv[1]
x = load_file(d + "/inputs.safetensors")
m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
with torch.no_grad():
    y = m(input_ids=x["ids"], attention_mask=x["mask"], position_ids=x["pos"]).logits
save_file({"logits": y.contiguous()}, d + "/out.safetensors")
"#;
    let st = Command::new(python())
        .arg("-c")
        .arg(code)
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let got = load_safetensors(&out.path().join("out.safetensors")).unwrap();
    let err = max_err(&got["logits"], &exp["left_logits"], &exp["left_mask"]);
    println!("transformers on VoltTrain-saved llama3: max abs err {err:.3e}");
    assert!(err < TOL);
}

// ---------- error cases ----------

fn copy_dir(src: &Path) -> tempfile::TempDir {
    let dst = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.path().join(e.file_name())).unwrap();
    }
    dst
}

fn load_err(dir: &Path) -> String {
    match load_model(dir, &LoadOptions::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites `model.safetensors` of a copied fixture through `edit`.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    let path = dir.join("model.safetensors");
    let mut t = load_safetensors(&path).unwrap();
    edit(&mut t);
    let v: Vec<(String, Tensor)> = t.into_iter().collect();
    save_safetensors(&path, &v, None).unwrap();
    path
}

#[test]
fn unsupported_architecture_is_an_error_naming_the_file() {
    let d = copy_dir(&fixtures().join("llama"));
    let cfg = d.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("LlamaForCausalLM", "GPT2LMHeadModel");
    std::fs::write(&cfg, text).unwrap();
    let msg = load_err(d.path());
    println!("{msg}");
    assert!(
        msg.contains("config.json")
            && msg.contains("GPT2LMHeadModel")
            && msg.contains("LlamaForCausalLM")
    );
}

#[test]
fn missing_tensor_is_an_error_naming_it() {
    let d = copy_dir(&fixtures().join("llama"));
    edit_weights(d.path(), |t| {
        t.remove("model.layers.1.mlp.up_proj.weight");
        t.remove("model.norm.weight");
    });
    let msg = load_err(d.path());
    println!("{msg}");
    assert!(msg.contains(&d.path().join("model.safetensors").display().to_string()));
    assert!(
        msg.contains("missing tensors")
            && msg.contains("model.layers.1.mlp.up_proj.weight")
            && msg.contains("model.norm.weight")
    );
}

#[test]
fn unexpected_tensor_is_an_error_naming_it_and_its_file() {
    let d = copy_dir(&fixtures().join("llama"));
    let path = edit_weights(d.path(), |t| {
        t.insert(
            "model.layers.0.mlp.extra.weight".into(),
            Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)),
        );
    });
    let msg = load_err(d.path());
    println!("{msg}");
    assert!(msg.contains("unexpected tensors") && msg.contains("model.layers.0.mlp.extra.weight"));
    assert!(msg.contains(&path.display().to_string()));
}

#[test]
fn shape_mismatch_is_an_error_naming_tensor_file_and_shapes() {
    let d = copy_dir(&fixtures().join("llama"));
    let path = edit_weights(d.path(), |t| {
        t.insert(
            "model.layers.0.self_attn.k_proj.weight".into(),
            Tensor::zeros([64, 64], (Kind::Float, Device::Cpu)),
        );
    });
    let msg = load_err(d.path());
    println!("{msg}");
    assert!(
        msg.contains("shape mismatch") && msg.contains("model.layers.0.self_attn.k_proj.weight")
    );
    assert!(msg.contains("[32, 64]") && msg.contains("[64, 64]"));
    assert!(msg.contains(&path.display().to_string()));
}

#[test]
fn corrupt_files_are_errors_not_panics() {
    let d = copy_dir(&fixtures().join("llama"));
    std::fs::write(
        d.path().join("model.safetensors"),
        b"\x10\0\0\0\0\0\0\0{not json}",
    )
    .unwrap();
    assert!(load_err(d.path()).contains("model.safetensors"));
    std::fs::write(d.path().join("config.json"), b"{").unwrap();
    assert!(load_err(d.path()).contains("config.json"));
    std::fs::write(
        d.path().join("config.json"),
        br#"{"architectures":["LlamaForCausalLM"],"hidden_size":"x"}"#,
    )
    .unwrap();
    let msg = load_err(d.path());
    assert!(msg.contains("hidden_size"), "{msg}");
    let empty = tempfile::tempdir().unwrap();
    assert!(load_err(empty.path()).contains("config.json"));
}

// ---------- quantize-while-loading hook ----------

/// A test-only quantizer: stores the weight in bf16 (what the quantizer helpers' formats do in
/// spirit: a packed copy that dequantizes on use).
#[derive(Debug)]
struct Bf16Store;

#[derive(Debug)]
struct Bf16Tensor(Tensor);

impl volttrain::quant::QuantizedTensor for Bf16Tensor {
    fn format(&self) -> &str {
        "bf16_test"
    }
    fn shape(&self) -> (i64, i64) {
        let s = self.0.size();
        (s[0], s[1])
    }
    fn dequantize(&self, kind: Kind) -> volttrain::Result<Tensor> {
        Ok(self.0.to_kind(kind))
    }
    fn storage_bytes(&self) -> usize {
        self.0.numel() * 2
    }
    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        vec![("weight".into(), self.0.shallow_clone())]
    }
}

impl volttrain::quant::Quantizer for Bf16Store {
    fn name(&self) -> &str {
        "bf16_test"
    }
    fn quantize(
        &self,
        w: &Tensor,
    ) -> volttrain::Result<Box<dyn volttrain::quant::QuantizedTensor>> {
        Ok(Box::new(Bf16Tensor(w.to_kind(Kind::BFloat16))))
    }
}

#[test]
fn load_time_quantizer_converts_decoder_linears_only() {
    use std::sync::Arc;
    use volttrain::nn::LinearWeight;
    let dir = fixtures().join("qwen2");
    let exp = expected(&dir);
    let input = ForwardInput {
        input_ids: &exp["right_ids"],
        attention_mask: Some(&exp["right_mask"]),
        position_ids: None,
    };
    for (regex, quantized_count) in [(None, 14usize), (Some(r"\.mlp\."), 6)] {
        let mut opts = LoadOptions::default().with_quantizer(Arc::new(Bf16Store));
        if let Some(r) = regex {
            opts = opts.with_quantize_regex(r).unwrap();
        }
        let mut q = load_model(&dir, &opts).unwrap();
        // the reference: the fp32 model with the same weights rounded through bf16 by hand
        let mut r = load_model(&dir, &LoadOptions::default()).unwrap();
        let mut n = 0;
        for ((name, lq), (_, lr)) in q.linears_mut().into_iter().zip(r.linears_mut()) {
            let is_q = matches!(lq.weight, LinearWeight::Quantized(_));
            let want = name.starts_with("model.layers.")
                && regex.is_none_or(|re| regex::Regex::new(re).unwrap().is_match(&name));
            assert_eq!(is_q, want, "{name}");
            if is_q {
                n += 1;
                let LinearWeight::Dense(w) = &lr.weight else {
                    unreachable!()
                };
                lr.weight = LinearWeight::Dense(w.to_kind(Kind::BFloat16).to_kind(Kind::Float));
            }
        }
        assert_eq!(n, quantized_count);
        let (a, b) = tch::no_grad(|| {
            (
                q.forward(&input, false).unwrap(),
                r.forward(&input, false).unwrap(),
            )
        });
        let err = max_err(&a, &b, &exp["right_mask"]);
        assert!(err < 1e-6, "{err}");
        // and the rounding was real: the quantized model differs from the fp32 one
        let fp32 = load_model(&dir, &LoadOptions::default()).unwrap();
        let c = tch::no_grad(|| fp32.forward(&input, false).unwrap());
        assert!(max_err(&a, &c, &exp["right_mask"]) > 1e-5);
        // quantized weights are not parameters, but their biases still are
        let names: Vec<String> = q.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert!(
            !names
                .iter()
                .any(|n| n == "model.layers.0.mlp.up_proj.weight")
        );
        assert!(
            names
                .iter()
                .any(|n| n == "model.layers.0.self_attn.q_proj.bias")
        );
    }
}
