//! Parity of Qwen3, Gemma 2, Gemma 3, Phi-3 / Phi-4, SmolLM3 and the yarn / dynamic RoPE
//! types with Hugging Face transformers (issue 16).
//!
//! `reference/make_model_fixtures.py` makes the tiny random models live through
//! `$VOLTTRAIN_PYTHON_REF` (see `tests/model_parity.rs` for the Llama / Mistral / Qwen2 ones):
//! VoltTrain must match transformers' fp32 eager logits to 1e-4 absolute over the non-pad
//! positions of a left-padded and a right-padded batch and of a packed row, and the gradients of
//! every parameter to 1e-4 relative. `fused_kernels_off_match_too` runs the same checks again in
//! a child process with `VOLTTRAIN_FUSED_KERNELS=0` (the composite ops).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};
use volttrain::model::safetensors::load_safetensors;
use volttrain::model::{CausalLm, ForwardInput, LoadOptions, load_model};

const TOL: f64 = 1e-4;
const VARIANTS: [&str; 8] = [
    "qwen3",
    "gemma2",
    "gemma3",
    "phi3",
    "phi4",
    "smollm3",
    "llama_yarn",
    "llama_dynamic",
];
/// Set in the child process of [`fused_kernels_off_match_too`]: the fixtures' directory.
const FIXTURES_ENV: &str = "VOLTTRAIN_TEST_FAMILY_FIXTURES";

fn python() -> String {
    std::env::var("VOLTTRAIN_PYTHON_REF").unwrap_or_else(|_| "python3".to_string())
}

/// Makes all fixtures once per test binary (or reuses the parent's).
fn fixtures() -> PathBuf {
    if let Ok(d) = std::env::var(FIXTURES_ENV) {
        return PathBuf::from(d);
    }
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
    .to_path_buf()
}

fn expected(dir: &Path) -> HashMap<String, Tensor> {
    load_safetensors(&dir.join("expected.safetensors")).unwrap()
}

fn max_err(a: &Tensor, b: &Tensor, keep: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let keep = keep.ne(0).unsqueeze(-1).expand_as(a);
    (a - b).abs().masked_select(&keep).max().double_value(&[])
}

fn packed_mask(seg: &Tensor) -> Tensor {
    let t = seg.size()[1];
    let same = seg.unsqueeze(-1).eq_tensor(&seg.unsqueeze(-2));
    let causal = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).tril(0);
    same.logical_and(&causal).unsqueeze(1)
}

fn load(name: &str) -> (Box<dyn CausalLm>, HashMap<String, Tensor>) {
    let dir = fixtures().join(name);
    let model =
        load_model(&dir, &LoadOptions::default()).unwrap_or_else(|e| panic!("loading {name}: {e}"));
    (model, expected(&dir))
}

/// Logits with left and right padding (positions given and derived) and of a packed row.
fn check_logits(name: &str) {
    let (model, exp) = load(name);
    for side in ["left", "right"] {
        let mask = &exp[&format!("{side}_mask")];
        for explicit_pos in [true, false] {
            let input = ForwardInput {
                input_ids: &exp[&format!("{side}_ids")],
                attention_mask: Some(mask),
                position_ids: explicit_pos.then(|| &exp[&format!("{side}_pos")]),
            };
            let got = tch::no_grad(|| model.forward(&input, false)).unwrap();
            assert!(!bool::try_from(got.isnan().any()).unwrap(), "{name}: NaN");
            let err = max_err(&got, &exp[&format!("{side}_logits")], mask);
            println!("{name} {side} padding (explicit positions {explicit_pos}): {err:.3e}");
            assert!(err < TOL, "{name} {side}: max abs err {err}");
        }
    }
    let mask = packed_mask(&exp["packed_seg"]);
    let input = ForwardInput {
        input_ids: &exp["packed_ids"],
        attention_mask: Some(&mask),
        position_ids: Some(&exp["packed_pos"]),
    };
    let got = tch::no_grad(|| model.forward(&input, false)).unwrap();
    let err = max_err(
        &got,
        &exp["packed_logits"],
        &Tensor::ones_like(&exp["packed_ids"]),
    );
    println!("{name} packed: {err:.3e}");
    assert!(err < TOL, "{name} packed: max abs err {err}");
}

/// Gradients of `sum(logits * w)` over the left-padded batch for every parameter.
fn check_grads(name: &str) {
    let (model, exp) = load(name);
    let input = ForwardInput {
        input_ids: &exp["left_ids"],
        attention_mask: Some(&exp["left_mask"]),
        position_ids: None,
    };
    let loss = (model.forward(&input, false).unwrap() * &exp["left_gw"]).sum(Kind::Float);
    loss.backward();
    let params = model.named_parameters();
    assert_eq!(
        params.len(),
        exp.keys().filter(|k| k.starts_with("grad.")).count(),
        "{name}: parameter count differs from transformers'"
    );
    let mut worst: f64 = 0.0;
    for (n, p) in params {
        let want = exp
            .get(&format!("grad.{n}"))
            .unwrap_or_else(|| panic!("{name}: transformers has no parameter {n}"));
        let scale = want.abs().max().double_value(&[]).max(1.0);
        let err = (p.grad() - want).abs().max().double_value(&[]) / scale;
        assert!(err < TOL, "{name} {n}: relative grad error {err}");
        worst = worst.max(err);
    }
    println!("{name}: worst relative gradient error {worst:.3e}");
}

#[test]
fn logits_match_transformers() {
    for name in VARIANTS {
        check_logits(name);
    }
}

#[test]
fn gradients_match_transformers() {
    for name in VARIANTS {
        check_grads(name);
    }
}

/// The same checks through the composite ops (`VOLTTRAIN_FUSED_KERNELS=0`, read once per
/// process, hence a child process running this binary's two parity tests).
#[test]
fn fused_kernels_off_match_too() {
    if std::env::var(FIXTURES_ENV).is_ok() {
        // in the child: say which path ran
        assert!(!volttrain::fused::enabled());
        return;
    }
    if !volttrain::fused::enabled() {
        println!("skipped: the fused kernels are off in this process already");
        return;
    }
    let root = fixtures();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "logits_match_transformers",
            "gradients_match_transformers",
            "fused_kernels_off_match_too",
            "--test-threads=1",
            "--nocapture",
        ])
        .env("VOLTTRAIN_FUSED_KERNELS", "0")
        .env(FIXTURES_ENV, &root)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "composite-op run failed:\n{text}");
    assert!(text.contains("3 passed"), "{text}");
}

#[test]
fn family_configs_are_read_as_transformers_reads_them() {
    use volttrain::model::{Activation, LayerRope, decoder_config, read_config};
    let cfg = |name: &str| {
        let (p, v) = read_config(&fixtures().join(name)).unwrap();
        decoder_config(&p, &v).unwrap()
    };
    let q = cfg("qwen3");
    assert!(q.qk_norm && !q.qkv_bias);
    assert_eq!(q.sliding_windows, vec![None, Some(4)]);
    let g2 = cfg("gemma2");
    assert_eq!(g2.hidden_act, Activation::GeluTanh);
    assert_eq!((g2.attn_softcap, g2.final_softcap), (Some(2.0), Some(3.0)));
    assert_eq!(g2.attn_scale, 24f64.powf(-0.5));
    assert_eq!(g2.sliding_windows, vec![Some(4), None]);
    assert!(g2.norm_plus_one && g2.sandwich_norms && g2.tie_word_embeddings);
    let g3 = cfg("gemma3");
    assert_eq!(g3.layer_rope, vec![LayerRope::Local, LayerRope::Global]);
    assert_eq!(g3.rope_local.as_ref().unwrap().theta, 10000.0);
    assert_eq!(g3.rope.theta, 1_000_000.0);
    assert_eq!(g3.attn_softcap, None);
    let p = cfg("phi3");
    assert!(p.fused_projections);
    assert_eq!((p.head_dim, p.rope.dim), (16, 8));
    assert_eq!(p.sliding_windows, vec![Some(5), Some(5)]);
    let s = cfg("smollm3");
    assert_eq!(s.layer_rope, vec![LayerRope::Global, LayerRope::None]);
}

#[test]
fn phi3_modules_are_fused_and_named_as_in_transformers() {
    let (mut model, _) = load("phi3");
    let names: Vec<String> = model.linears_mut().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names[..4],
        [
            "model.layers.0.self_attn.qkv_proj",
            "model.layers.0.self_attn.o_proj",
            "model.layers.0.mlp.gate_up_proj",
            "model.layers.0.mlp.down_proj"
        ]
    );
    // Gemma's head is soft-capped: never handed to the fused head + loss
    let (gemma, _) = load("gemma2");
    assert!(gemma.head_weight().is_none());
    let (qwen, _) = load("qwen3");
    assert!(qwen.head_weight().is_some());
}

// ---------- clear errors ----------

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

#[test]
fn bin_only_checkpoint_says_how_to_convert() {
    let d = copy_dir(&fixtures().join("qwen3"));
    std::fs::rename(
        d.path().join("model.safetensors"),
        d.path().join("pytorch_model.bin"),
    )
    .unwrap();
    let msg = load_err(d.path());
    println!("{msg}");
    assert!(msg.contains("pytorch_model.bin"), "{msg}");
    let cmd = format!(
        "python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('{0}', dtype='auto').save_pretrained('{0}')\"",
        d.path().display()
    );
    assert!(msg.contains(&cmd), "{msg}");
}

/// The conversion command the message gives works: transformers writes safetensors we load.
#[test]
fn bin_conversion_command_produces_a_loadable_checkpoint() {
    let d = copy_dir(&fixtures().join("phi4"));
    // a real `.bin` checkpoint, written by transformers itself
    let code = r#"
import sys, os, torch
from transformers import AutoModelForCausalLM
d = sys.argv[1]
m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
torch.save(m.state_dict(), os.path.join(d, "pytorch_model.bin"))
os.remove(os.path.join(d, "model.safetensors"))
"#;
    let st = Command::new(python())
        .args(["-c", code])
        .arg(d.path())
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let msg = load_err(d.path());
    let start = msg.find("python -c \"").unwrap() + "python -c \"".len();
    let end = msg.rfind('"').unwrap();
    let st = Command::new(python())
        .args(["-c", &msg[start..end]])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let model = load_model(d.path(), &LoadOptions::default()).unwrap();
    assert_eq!(model.architecture(), "Phi3ForCausalLM");
}

#[test]
fn unsupported_config_values_name_key_and_value() {
    let d = copy_dir(&fixtures().join("gemma2"));
    let cfg_path = d.path().join("config.json");
    let orig: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let cases: [(&str, serde_json::Value, &str); 4] = [
        ("hidden_activation", serde_json::json!("relu2"), "relu2"),
        (
            "layer_types",
            serde_json::json!(["sliding_attention", "chunked_attention"]),
            "chunked_attention",
        ),
        (
            "use_bidirectional_attention",
            serde_json::json!(true),
            "true",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "mrope", "rope_theta": 10000.0}),
            "mrope",
        ),
    ];
    for (key, value, shown) in cases {
        let mut cfg = orig.clone();
        cfg[key] = value;
        std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
        let msg = load_err(d.path());
        println!("{msg}");
        assert!(
            msg.contains(key) && msg.contains(shown) && msg.contains("config.json"),
            "{key}: {msg}"
        );
    }
    // partial rotary on a family that has none
    let mut cfg = orig.clone();
    cfg["rope_parameters"]["partial_rotary_factor"] = serde_json::json!(0.5);
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let msg = load_err(d.path());
    assert!(
        msg.contains("rope_parameters.partial_rotary_factor") && msg.contains("0.5"),
        "{msg}"
    );
}
