//! The trainer on a real Llama (made by transformers): gradient checkpointing gives the same
//! loss and gradients, and the loss matches transformers' own loss on the same batch.

mod common;

use std::path::Path;
use std::process::Command;

use tch::{Device, Kind, Tensor};
use volttrain::model::{CausalLm, LoadOptions, load_model};
use volttrain::trainer::Trainer;

fn python() -> String {
    std::env::var("VOLTTRAIN_PYTHON_REF").unwrap_or_else(|_| "python3".into())
}

fn tiny_llama(dir: &Path) -> Box<dyn CausalLm> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("reference/make_model_fixtures.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(dir)
        .arg("llama")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    load_model(
        dir.join("llama"),
        &LoadOptions::new(Kind::Float, Device::Cpu),
    )
    .unwrap()
}

fn grads_after_one_step(checkpointing: bool) -> (f64, Vec<(String, Tensor)>) {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama(dir.path());
    let names: Vec<(String, Tensor)> = model.named_parameters();
    // lr tiny and SGD without momentum: parameters change by lr * grad, so compare grads via the
    // parameter change
    let opt = Box::new(
        <common::Sgd as volttrain::optim::Optimizer>::new(
            common::one_group(model.as_ref(), 1.0),
            common::SgdConfig { momentum: 0.0 },
        )
        .unwrap(),
    );
    let before: Vec<Tensor> = names.iter().map(|(_, t)| t.detach().copy()).collect();
    let mut t = Trainer::builder()
        .model(model)
        .train_data(Box::new(common::PaddedPromptSource))
        .optimizer(opt)
        .base_lr(1.0)
        .max_steps(Some(1))
        .gradient_checkpointing(checkpointing)
        .output_dir(dir.path().join("out"))
        .build()
        .unwrap();
    let s = t.fit().unwrap();
    let deltas = names
        .iter()
        .zip(before)
        .map(|((n, p), b)| (n.clone(), &b - p.detach()))
        .collect();
    (s.final_train_loss.unwrap(), deltas)
}

#[test]
fn checkpointing_matches_plain_backward_on_llama() {
    let (l0, g0) = grads_after_one_step(false);
    let (l1, g1) = grads_after_one_step(true);
    assert!((l0 - l1).abs() < 1e-5, "loss {l0} vs {l1}");
    let mut worst = 0f64;
    for ((n, a), (_, b)) in g0.iter().zip(g1.iter()) {
        let d = common::max_abs_diff(a, b);
        worst = worst.max(d);
        assert!(d < 1e-5, "{n}: grad differs by {d}");
    }
    println!(
        "gradient checkpointing: loss diff {:.3e}, max grad diff {worst:.3e}",
        (l0 - l1).abs()
    );
}

/// The trainer's loss (label tokens only, shifted) equals transformers' `outputs.loss` on the
/// same model and batch.
#[test]
fn loss_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = tiny_llama(dir.path());
    // evaluation only: one trainable parameter so the trainer can be built
    model.freeze_base();
    let (name, p) = model.named_parameters().remove(0);
    let p = p.set_requires_grad(true);
    let opt = <common::Sgd as volttrain::optim::Optimizer>::new(
        vec![volttrain::optim::ParamGroup {
            name: "p".into(),
            params: vec![volttrain::optim::NamedParam { name, tensor: p }],
            lr: 0.0,
            lr_mult: 1.0,
            weight_decay: 0.0,
        }],
        common::SgdConfig::default(),
    )
    .unwrap();
    let mut tr = Trainer::builder()
        .model(model)
        .train_data(Box::new(common::PaddedPromptSource))
        .eval_data(Box::new(common::PaddedPromptSource))
        .optimizer(Box::new(opt))
        .base_lr(1.0)
        .output_dir(dir.path().join("out"))
        .build()
        .unwrap();
    let ours = tr.evaluate().unwrap();

    let file = common::write_padded_prompt_batch(dir.path());
    let script = r#"
import sys, torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM
t = load_file(sys.argv[2])
m = LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    out = m(input_ids=t["ids"], attention_mask=t["mask"], labels=t["labels"])
print(repr(out.loss.item()))
"#;
    let out = Command::new(python())
        .args(["-c", script])
        .arg(dir.path().join("llama"))
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    println!(
        "eval loss: volttrain {} transformers {theirs}",
        ours.eval_loss
    );
    assert!((ours.eval_loss - theirs).abs() < 1e-5 * theirs.abs().max(1.0));
    assert_eq!(ours.tokens, 13); // 8 + 5 label tokens (position 0 never has one)
}
