//! Parity of Qwen3, Gemma 2, Gemma 3, Phi-3 / Phi-4, SmolLM3 and the yarn / dynamic RoPE
//! types with Hugging Face transformers (issue 16).
//!
//! `reference/make_model_fixtures.py` makes the tiny random models live through
//! `$VOLTTRAIN_PYTHON_REF` (see `tests/model_parity.rs` for the Llama / Mistral / Qwen2 ones):
//! VoltTrain must match transformers' fp32 eager logits to 1e-4 absolute over the non-pad
//! positions of a left-padded and a right-padded batch and of a packed row, and the gradients of
//! every parameter to 1e-4 relative; the trainer's training loss (through the fused LM head +
//! loss, soft-capped for Gemma) equals transformers' `outputs.loss` and its gradients.
//! `fused_kernels_off_match_too` runs the same checks again in a child process with
//! `VOLTTRAIN_FUSED_KERNELS=0` (the composite ops).

mod common;
use common::max_err;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};
use volttrain::model::safetensors::load_safetensors;
use volttrain::model::{CausalLm, ForwardInput, LoadOptions, load_model};
use volttrain::trainer::Trainer;

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

// ---------- the training loss ----------

/// Families whose training loss is checked: Gemma 2 and 3 soft-cap their logits (the fused
/// head + loss caps each chunk), Qwen3 does not.
const LOSS_VARIANTS: [&str; 3] = ["gemma2", "gemma3", "qwen3"];

/// transformers' `outputs.loss` on [`common::padded_prompt_batch`] and its gradients, per family:
/// `<name>/loss` and `<name>/grad/<parameter>`.
fn transformers_loss_and_grads() -> HashMap<String, Tensor> {
    let dir = tempfile::tempdir().unwrap();
    let batch = common::write_padded_prompt_batch(dir.path());
    let script = r#"
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
t = load_file(sys.argv[1])
out = {}
for name in sys.argv[4:]:
    m = AutoModelForCausalLM.from_pretrained(sys.argv[2] + "/" + name, dtype=torch.float32, attn_implementation="eager")
    loss = m(input_ids=t["ids"], attention_mask=t["mask"], labels=t["labels"]).loss
    loss.backward()
    out[name + "/loss"] = loss.detach().reshape(1)
    for n, p in m.named_parameters():
        out[name + "/grad/" + n] = p.grad.contiguous()
save_file(out, sys.argv[3])
"#;
    let file = dir.path().join("grads.safetensors");
    let out = Command::new(python())
        .args(["-c", script])
        .arg(&batch)
        .arg(fixtures())
        .arg(&file)
        .args(LOSS_VARIANTS)
        .output()
        .expect("run the reference python");
    assert!(
        out.status.success(),
        "transformers' loss and gradients: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    load_safetensors(&file).unwrap()
}

/// One trainer step of SGD with learning rate 1 (no momentum, decay or clipping) on
/// [`common::padded_prompt_batch`]: the training loss, and each parameter's change, which is its gradient.
fn trainer_loss_and_grads(name: &str) -> (f64, Vec<(String, Tensor)>) {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = load(name);
    let params = model.named_parameters();
    let before: Vec<Tensor> = params.iter().map(|(_, t)| t.detach().copy()).collect();
    let opt = <common::Sgd as volttrain::optim::Optimizer>::new(
        common::one_group(model.as_ref(), 1.0),
        common::SgdConfig { momentum: 0.0 },
    )
    .unwrap();
    let mut tr = Trainer::builder()
        .model(model)
        .train_data(Box::new(common::PaddedPromptSource))
        .optimizer(Box::new(opt))
        .base_lr(1.0)
        .max_steps(Some(1))
        .output_dir(dir.path().join("out"))
        .build()
        .unwrap();
    let loss = tr.fit().unwrap().final_train_loss.unwrap();
    let grads = params
        .iter()
        .zip(before)
        .map(|((n, p), b)| (n.clone(), b - p.detach()))
        .collect();
    (loss, grads)
}

/// The trainer's training loss and its gradients (the fused LM head + loss on the CPU, soft-capped
/// for Gemma; the composite ops in the child process of [`fused_kernels_off_match_too`]) equal
/// transformers' `outputs.loss` (1e-5 relative) and its gradients (1e-4 relative to each
/// parameter's largest gradient).
#[test]
fn training_loss_and_gradients_match_transformers() {
    let theirs = transformers_loss_and_grads();
    for name in LOSS_VARIANTS {
        let (loss, grads) = trainer_loss_and_grads(name);
        let want = theirs[&format!("{name}/loss")].double_value(&[0]);
        println!("{name}: training loss volttrain {loss} transformers {want}");
        assert!(
            (loss - want).abs() < 1e-5 * want.abs().max(1.0),
            "{name}: loss {loss} vs {want}"
        );
        assert_eq!(
            grads.len(),
            theirs
                .keys()
                .filter(|k| k.starts_with(&format!("{name}/grad/")))
                .count(),
            "{name}: parameter count differs from transformers'"
        );
        let mut worst: f64 = 0.0;
        for (n, g) in grads {
            let want = theirs
                .get(&format!("{name}/grad/{n}"))
                .unwrap_or_else(|| panic!("{name}: transformers has no parameter {n}"));
            // relative to the parameter's largest gradient (these are small: no floor at 1)
            let scale = want.abs().max().double_value(&[]).max(1e-12);
            let err = (&g - want).abs().max().double_value(&[]) / scale;
            assert!(err < TOL, "{name} {n}: relative grad error {err}");
            worst = worst.max(err);
        }
        println!("{name}: worst relative gradient error of the training loss {worst:.3e}");
    }
}

/// The same checks through the composite ops (`VOLTTRAIN_FUSED_KERNELS=0`, read once per
/// process, hence a child process running this binary's three parity tests).
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
            "training_loss_and_gradients_match_transformers",
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
    assert!(text.contains("4 passed"), "{text}");
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
    // Gemma's head is soft-capped: handed to the fused head + loss with its cap
    let (gemma, _) = load("gemma2");
    assert!(gemma.head_weight().is_some());
    assert_eq!(gemma.head_softcap(), Some(3.0));
    let (qwen, _) = load("qwen3");
    assert!(qwen.head_weight().is_some());
    assert_eq!(qwen.head_softcap(), None);
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
