//! The fused CPU ops (`volttrain::fused`) against the libtorch op chains they replace (the
//! chains transformers runs, which `model_parity` checks against transformers itself): values
//! and gradients, odd sizes that exercise the vector tails, and the errors on bad input.
//!
//! Every test skips itself, saying so, when the fused kernels are off in this process
//! (`VOLTTRAIN_FUSED_KERNELS=0`, or a CPU without AVX2/FMA).

use tch::{Device, Kind, Tensor};
use volttrain::fused;
use volttrain::nn::{apply_rope, rms_norm_composite, rope_tables};

const TOL: f64 = 2e-6;

fn on() -> bool {
    if !fused::enabled() {
        eprintln!("skipped: the fused CPU kernels are off in this process");
        return false;
    }
    true
}

fn randn(shape: &[i64], scale: f64) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu)) * scale
}

fn leaf(t: Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

/// max |a - b| / max(max |b|, 1e-12).
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    let diff = (a - b).abs().max().double_value(&[]);
    let scale = b.abs().max().double_value(&[]).max(1e-12);
    diff / scale
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    let e = rel_err(got, want);
    eprintln!("{what}: relative error {e:.2e}");
    assert!(e <= TOL, "{what}: relative error {e:.3e} > {TOL:e}");
}

fn grad(t: &Tensor) -> Tensor {
    let g = t.grad();
    assert!(g.defined(), "no gradient reached the input");
    g
}

#[test]
fn rms_norm_matches_composite_values_and_gradients() {
    if !on() {
        return;
    }
    tch::manual_seed(1);
    // 576 = SmolLM2's width; 37 exercises the scalar tails
    for (shape, weight_grad) in [(vec![3i64, 5, 576], true), (vec![7, 37], false)] {
        let h = *shape.last().unwrap();
        let x0 = randn(&shape, 3.0);
        let w0 = randn(&[h], 1.0) + 1.0;
        let up = randn(&shape, 1.0);
        let run = |fused_path: bool| {
            let x = leaf(x0.copy());
            let w = if weight_grad {
                leaf(w0.copy())
            } else {
                w0.copy()
            };
            let y = if fused_path {
                fused::rms_norm(&x, &w, 1e-5).unwrap()
            } else {
                rms_norm_composite(&x, &w, 1e-5).unwrap()
            };
            (&y * &up).sum(Kind::Float).backward();
            let gw = weight_grad.then(|| grad(&w));
            (y.detach(), grad(&x), gw)
        };
        let (y, gx, gw) = run(true);
        let (y_ref, gx_ref, gw_ref) = run(false);
        assert_close(&format!("rms_norm {shape:?} y"), &y, &y_ref);
        assert_close(&format!("rms_norm {shape:?} dx"), &gx, &gx_ref);
        if let (Some(a), Some(b)) = (gw, gw_ref) {
            assert_close(&format!("rms_norm {shape:?} dweight"), &a, &b);
        }
    }
}

#[test]
fn swiglu_matches_silu_times_up() {
    if !on() {
        return;
    }
    tch::manual_seed(2);
    // large magnitudes saturate the sigmoid on both sides
    for (shape, scale) in [(vec![2i64, 64, 1536], 4.0), (vec![3, 7, 19], 30.0)] {
        let g0 = randn(&shape, scale);
        let u0 = randn(&shape, 1.0);
        let up = randn(&shape, 1.0);
        let run = |fused_path: bool| {
            let (g, u) = (leaf(g0.copy()), leaf(u0.copy()));
            let y = if fused_path {
                fused::swiglu(&g, &u).unwrap()
            } else {
                g.silu() * &u
            };
            (&y * &up).sum(Kind::Float).backward();
            (y.detach(), grad(&g), grad(&u))
        };
        let (y, gg, gu) = run(true);
        let (y_ref, gg_ref, gu_ref) = run(false);
        assert_close(&format!("swiglu {shape:?} y"), &y, &y_ref);
        assert_close(&format!("swiglu {shape:?} dgate"), &gg, &gg_ref);
        assert_close(&format!("swiglu {shape:?} dup"), &gu, &gu_ref);
    }
}

#[test]
fn rope_matches_composite_with_per_batch_and_shared_positions() {
    if !on() {
        return;
    }
    tch::manual_seed(3);
    let (b, t, n, d) = (2i64, 5, 3, 64);
    let inv_freq = Tensor::arange_start_step(0, d, 2, (Kind::Float, Device::Cpu))
        .divide_scalar(d as f64)
        .multiply_scalar(-(10000f64.ln()))
        .exp();
    // per-row positions (left padding shifts the second row) and one shared row
    let per_batch = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 0, 0, 0, 1, 2]).view([b, t]);
    let shared = Tensor::arange(t, (Kind::Int64, Device::Cpu)).view([1, t]);
    for pos in [per_batch, shared] {
        let (cos, sin) = rope_tables(&inv_freq, &pos, Kind::Float).unwrap();
        let x0 = randn(&[b, t, n, d], 1.0);
        let up = randn(&[b, t, n, d], 1.0);
        let run = |fused_path: bool| {
            let x = leaf(x0.copy());
            let y = if fused_path {
                fused::rope(&x, &cos, &sin).unwrap()
            } else {
                apply_rope(&x.transpose(1, 2), &cos, &sin)
                    .unwrap()
                    .transpose(1, 2)
            };
            (&y * &up).sum(Kind::Float).backward();
            (y.detach(), grad(&x))
        };
        let (y, gx) = run(true);
        let (y_ref, gx_ref) = run(false);
        assert_close(&format!("rope cos {:?} y", cos.size()), &y, &y_ref);
        assert_close(&format!("rope cos {:?} dx", cos.size()), &gx, &gx_ref);
    }
}

/// Reference: logits = h W^T, cross_entropy(sum, ignore -100) * scale, through autograd.
fn ce_reference(h0: &Tensor, w0: &Tensor, targets: &Tensor, scale: f64) -> (f64, Tensor, Tensor) {
    ce_reference_capped(h0, w0, targets, scale, None)
}

/// [`ce_reference`] with the logits soft-capped first, `cap * tanh(logits / cap)` (transformers'
/// Gemma 2 head).
fn ce_reference_capped(
    h0: &Tensor,
    w0: &Tensor,
    targets: &Tensor,
    scale: f64,
    cap: Option<f64>,
) -> (f64, Tensor, Tensor) {
    let (h, w) = (leaf(h0.copy()), leaf(w0.copy()));
    let mut logits = h.matmul(&w.tr());
    if let Some(c) = cap {
        logits = (logits / c).tanh() * c;
    }
    let loss = logits.cross_entropy_loss::<&Tensor>(targets, None, tch::Reduction::Sum, -100, 0.0);
    let value = loss.double_value(&[]);
    (loss * scale).backward();
    (value, grad(&h), grad(&w))
}

#[test]
fn linear_cross_entropy_matches_linear_then_cross_entropy() {
    if !on() {
        return;
    }
    tch::manual_seed(4);
    // vocab 1003: not a multiple of the vector width; two rows ignored
    let (n, k, v) = (37i64, 24, 1003);
    let h0 = randn(&[n, k], 1.0);
    let w0 = randn(&[v, k], 0.5);
    let targets = Tensor::randint(v, [n], (Kind::Int64, Device::Cpu));
    let _ = targets.narrow(0, 3, 1).fill_(-100);
    let _ = targets.narrow(0, 20, 1).fill_(-100);
    let scale = 0.25;

    let (value_ref, gh_ref, gw_ref) = ce_reference(&h0, &w0, &targets, scale);
    let (h, w) = (leaf(h0.copy()), leaf(w0.copy()));
    let (loss, value) = fused::linear_cross_entropy(&h, &w, &targets, -100, scale).unwrap();
    let rel = (value - value_ref).abs() / value_ref.abs();
    eprintln!("cross-entropy sum {value} vs {value_ref}: relative {rel:.2e}");
    assert!(rel < 1e-6, "loss sum {value} vs reference {value_ref}");
    let scaled = loss.double_value(&[]);
    assert!((scaled - value * scale).abs() <= 1e-6 * scaled.abs());
    loss.backward();
    assert_close("cross-entropy dhidden", &grad(&h), &gh_ref);
    assert_close("cross-entropy dweight", &grad(&w), &gw_ref);
    // an ignored row gets no gradient
    assert_eq!(
        grad(&h)
            .narrow(0, 3, 1)
            .abs()
            .sum(Kind::Float)
            .double_value(&[]),
        0.0
    );
}

/// The logits are formed a chunk of rows at a time: chunks that do not divide the rows (and a
/// bad target in a later chunk) give the reference's loss and gradients and the row's number.
#[test]
fn linear_cross_entropy_in_chunks_matches_the_reference() {
    if !on() {
        return;
    }
    tch::manual_seed(7);
    let (n, k, v) = (37i64, 24, 1003);
    let h0 = randn(&[n, k], 1.0);
    let w0 = randn(&[v, k], 0.5);
    let targets = Tensor::randint(v, [n], (Kind::Int64, Device::Cpu));
    let _ = targets.narrow(0, 11, 1).fill_(-100);
    let (value_ref, gh_ref, gw_ref) = ce_reference(&h0, &w0, &targets, 0.5);
    for chunk in [1i64, 5, 16, 36, 37, 100] {
        let (h, w) = (leaf(h0.copy()), leaf(w0.copy()));
        let (loss, value) =
            fused::linear_cross_entropy_chunked(&h, &w, &targets, -100, 0.5, None, chunk).unwrap();
        let rel = (value - value_ref).abs() / value_ref.abs();
        assert!(
            rel < 1e-6,
            "chunks of {chunk}: loss sum {value} vs {value_ref}"
        );
        loss.backward();
        assert_close(&format!("chunks of {chunk}: dhidden"), &grad(&h), &gh_ref);
        assert_close(&format!("chunks of {chunk}: dweight"), &grad(&w), &gw_ref);
    }
    let bad = targets.copy();
    let _ = bad.narrow(0, 30, 1).fill_(v);
    let e = fused::linear_cross_entropy_chunked(&leaf(h0.copy()), &w0, &bad, -100, 1.0, None, 8)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("target {v} at row 30 is outside the vocabulary")),
        "{e}"
    );
}

/// Gemma 2's soft-capped head: `cap * tanh(h W^T / cap)` then the cross-entropy, the cap
/// applied inside each chunk, equals the composite chain in loss and gradients (logits large
/// enough that the cap bends them), with chunks that do not divide the rows, a frozen weight,
/// and without grad mode.
#[test]
fn softcapped_linear_cross_entropy_matches_tanh_then_cross_entropy() {
    if !on() {
        return;
    }
    tch::manual_seed(8);
    let (n, k, v) = (37i64, 24, 1003);
    let h0 = randn(&[n, k], 1.0);
    // logits of a few units, against a cap of 3: well into tanh's bend
    let w0 = randn(&[v, k], 1.0);
    let targets = Tensor::randint(v, [n], (Kind::Int64, Device::Cpu));
    let _ = targets.narrow(0, 11, 1).fill_(-100);
    let cap = 3.0;
    let (value_ref, gh_ref, gw_ref) = ce_reference_capped(&h0, &w0, &targets, 0.5, Some(cap));
    let (plain, _, _) = ce_reference(&h0, &w0, &targets, 0.5);
    assert!(
        (plain - value_ref).abs() > 0.1 * value_ref.abs(),
        "the cap changes the loss"
    );
    for chunk in [0i64, 5, 37] {
        let (h, w) = (leaf(h0.copy()), leaf(w0.copy()));
        let (loss, value) =
            fused::linear_cross_entropy_chunked(&h, &w, &targets, -100, 0.5, Some(cap), chunk)
                .unwrap();
        let rel = (value - value_ref).abs() / value_ref.abs();
        eprintln!("soft-capped sum {value} vs {value_ref}: relative {rel:.2e}");
        assert!(
            rel < 1e-6,
            "chunks of {chunk}: loss sum {value} vs {value_ref}"
        );
        loss.backward();
        assert_close(
            &format!("capped, chunks of {chunk}: dhidden"),
            &grad(&h),
            &gh_ref,
        );
        assert_close(
            &format!("capped, chunks of {chunk}: dweight"),
            &grad(&w),
            &gw_ref,
        );
        assert_eq!(
            grad(&h)
                .narrow(0, 11, 1)
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
    }
    // a frozen (tied) head under LoRA: only the hidden states get a gradient
    let h = leaf(h0.copy());
    let (loss, _) =
        fused::linear_cross_entropy_softcapped(&h, &w0, &targets, -100, 0.5, cap).unwrap();
    loss.backward();
    assert_close("capped, frozen head: dhidden", &grad(&h), &gh_ref);
    assert!(!w0.grad().defined(), "a frozen weight got a gradient");
    // evaluation: the loss alone
    let _g = tch::no_grad_guard();
    let (loss, value) =
        fused::linear_cross_entropy_softcapped(&h0, &w0, &targets, -100, 2.0, cap).unwrap();
    assert!((value - value_ref).abs() <= 1e-6 * value_ref.abs());
    assert!((loss.double_value(&[]) - 2.0 * value).abs() <= 1e-5 * value.abs());
    // a cap that is not a positive number is an error naming it
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let e = fused::linear_cross_entropy_softcapped(&h0, &w0, &targets, -100, 1.0, bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("soft-cap must be a finite number > 0"), "{e}");
    }
}

#[test]
fn linear_cross_entropy_backward_scales_by_the_incoming_gradient() {
    if !on() {
        return;
    }
    tch::manual_seed(5);
    let (n, k, v) = (9i64, 16, 300);
    let h0 = randn(&[n, k], 1.0);
    let w0 = randn(&[v, k], 0.5);
    let targets = Tensor::randint(v, [n], (Kind::Int64, Device::Cpu));
    // only the hidden states train (a frozen, tied LM head under LoRA)
    let (_, gh_ref, _) = ce_reference(&h0, &w0, &targets, 3.0);
    let h = leaf(h0.copy());
    let (loss, _) = fused::linear_cross_entropy(&h, &w0, &targets, -100, 1.0).unwrap();
    (loss * 3.0).backward();
    assert_close("cross-entropy dhidden x3", &grad(&h), &gh_ref);
    assert!(!w0.grad().defined(), "a frozen weight got a gradient");
}

#[test]
fn linear_cross_entropy_without_grad_mode_only_computes_the_loss() {
    if !on() {
        return;
    }
    tch::manual_seed(6);
    let h = leaf(randn(&[5, 8], 1.0));
    let w = randn(&[50, 8], 1.0);
    let targets = Tensor::from_slice(&[1i64, 49, 0, -100, 7]);
    let (value_ref, _, _) = ce_reference(&h, &w, &targets, 1.0);
    let _g = tch::no_grad_guard();
    let (loss, value) = fused::linear_cross_entropy(&h, &w, &targets, -100, 2.0).unwrap();
    assert!((value - value_ref).abs() <= 1e-6 * value_ref.abs());
    assert!((loss.double_value(&[]) - 2.0 * value).abs() <= 1e-5 * value.abs());
    assert!(!loss.requires_grad());
}

#[test]
fn fused_ops_reject_bad_input_with_the_reason() {
    if !on() {
        return;
    }
    let h = randn(&[4, 8], 1.0);
    let w = randn(&[10, 8], 1.0);
    let bad_target = Tensor::from_slice(&[1i64, 2, 10, 3]);
    let e = fused::linear_cross_entropy(&h, &w, &bad_target, -100, 1.0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("target 10 at row 2 is outside the vocabulary [0, 10)"),
        "{e}"
    );

    let x64 = Tensor::randn([2, 8], (Kind::Double, Device::Cpu));
    let e = fused::rms_norm(&x64, &randn(&[8], 1.0), 1e-5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("x must be float32"), "{e}");

    let e = fused::rms_norm(&randn(&[2, 8], 1.0), &randn(&[7], 1.0), 1e-5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not match the last dimension"), "{e}");

    let e = fused::swiglu(&randn(&[2, 8], 1.0), &randn(&[2, 9], 1.0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("differ"), "{e}");

    let cos = randn(&[1, 5, 6], 1.0);
    let e = fused::rope(&randn(&[2, 4, 3, 6], 1.0), &cos, &cos)
        .unwrap_err()
        .to_string();
    assert!(e.contains("do not fit"), "{e}");
}

fn train_losses(out: &std::path::Path, fused_off: bool) -> (Vec<f64>, f64) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_volttrain"));
    cmd.current_dir(root)
        .args(["sft", "--config", "config/sft.yaml"])
        .args([
            "--set",
            "training.max_steps=4",
            "--set",
            "training.epochs=1",
            "--set",
            "training.eval_every=4",
        ])
        .arg("--set")
        .arg(format!("training.output_dir={}", out.display()))
        .env_remove("VOLTTRAIN_FUSED_KERNELS");
    if fused_off {
        cmd.env("VOLTTRAIN_FUSED_KERNELS", "0");
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let losses = rows
        .iter()
        .filter_map(|v| v.get("loss").and_then(|x| x.as_f64()))
        .collect();
    // the eval after the 4th step (the one at step 0 comes first)
    let eval = rows
        .iter()
        .filter(|v| v["kind"] == "eval" && v["step"] == 4)
        .find_map(|v| v["eval_loss"].as_f64())
        .expect("no eval at step 4");
    (losses, eval)
}

/// The main job (LoRA, Muon + AdamW on the bundled tiny Llama) with the fused ops and with
/// `VOLTTRAIN_FUSED_KERNELS=0`: the switch works and both paths train alike (per-step losses
/// and the eval loss after them to 1e-5; the two differ only by fp32 rounding, about 1e-7 per step).
#[test]
fn training_with_and_without_fused_ops_gives_the_same_losses() {
    if !on() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (fused_losses, fused_eval) = train_losses(&dir.path().join("fused"), false);
    let (plain_losses, plain_eval) = train_losses(&dir.path().join("plain"), true);
    assert_eq!(fused_losses.len(), 4, "{fused_losses:?}");
    assert_eq!(fused_losses.len(), plain_losses.len());
    for (i, (a, b)) in fused_losses.iter().zip(&plain_losses).enumerate() {
        let rel = (a - b).abs() / b.abs();
        eprintln!("step {}: loss {a} vs {b} (relative {rel:.1e})", i + 1);
        assert!(rel < 1e-5, "step {}: fused {a} vs composite {b}", i + 1);
    }
    // the switch took effect: the two paths round differently (sums in another order), so
    // bit-identical losses would mean both runs took the same path
    assert_ne!(
        fused_losses, plain_losses,
        "VOLTTRAIN_FUSED_KERNELS=0 changed nothing"
    );
    let rel = (fused_eval - plain_eval).abs() / plain_eval.abs();
    eprintln!("eval loss {fused_eval} vs {plain_eval} (relative {rel:.1e})");
    assert!(
        rel < 1e-5,
        "eval loss: fused {fused_eval} vs composite {plain_eval}"
    );
}

/// The backward passes are not themselves differentiable: backward with `create_graph` is an
/// error that says so, not a silently wrong second-order gradient.
#[test]
fn fused_ops_refuse_higher_order_gradients() {
    if !on() {
        return;
    }
    let g = leaf(randn(&[4, 8], 1.0));
    let u = randn(&[4, 8], 1.0);
    let y = fused::swiglu(&g, &u).unwrap().sum(Kind::Float);
    let e = Tensor::f_run_backward(&[&y], &[&g], true, true)
        .expect_err("create_graph backward must fail")
        .to_string();
    assert!(e.contains("higher-order gradients"), "{e}");
    // a plain backward of the same graph still works
    let grads = Tensor::f_run_backward(&[&y], &[&g], false, false).unwrap();
    assert_eq!(grads[0].size(), vec![4, 8]);
}
