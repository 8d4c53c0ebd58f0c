//! Getting the model out: `merge` against PEFT, GGUF against the `gguf` package, and
//! `lora.init_from`.
//!
//! - A merged directory (sharded, fp32) has the eval loss of base + adapter under PEFT to 1e-4,
//!   both computed by `reference/peft_eval.py` with transformers; a one-file merge (bf16) has
//!   `model.safetensors.index.json` too and transformers loads it (eval loss within 2e-3 of the
//!   fp32 merge's). A quantized base (NF4 with double quantization, int8) is dequantized and
//!   merged exactly as PEFT's `merge_and_unload` does on a bitsandbytes-quantized base on the CPU
//!   (`reference/merge_bnb_ref.py`: the dense `dequantize_bnb_weight(W) + delta` PEFT computes,
//!   to 1e-6 relative in fp32; measured equal), written in fp32 and bf16. An adapter for another
//!   base is an error naming the tensor.
//! - A GGUF export equals, key by key and tensor by tensor (name, type, shape, bytes: q8_0 blocks
//!   byte for byte), the file llama.cpp's own `convert_hf_to_gguf.py` writes for the same model
//!   directory, read back with the `gguf` package it ships with (`reference/gguf_convert.py`; the
//!   converter comes from the llama-cpp-python 0.3.36 sdist, fetched and sha256-checked by
//!   `tools/provision.sh --reference`), for the bundled llama model and a tiny random model of
//!   every family exported; its dequantized tensors equal the converter's f32 ones. The converter
//!   runs as shipped except `get_vocab_base_pre`, which refuses the bundled test tokenizer
//!   (unknown pre-tokenizer hash): there it answers `gpt2`. Left out of the comparison: the
//!   model-card naming keys (`general.name`, ...) the converter derives from the directory name.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use tch::{Kind, Tensor};
use volttrain::adapter::{
    AdapterInjector, LoraConfig, LoraInjector, Targets, inject_lora, save_peft_adapter,
};
use volttrain::export::gguf::{GgufType, export_gguf};
use volttrain::export::{MergeOptions, SaveDtype, merge_to_dir};
use volttrain::model::{CausalLm, ForwardInput, LoadOptions, load_model};
use volttrain::nn::LinearWeight;
use volttrain::quant::{FourBitQuantizer, FourBitType};

fn python() -> String {
    std::env::var("VOLTTRAIN_PYTHON_REF").unwrap_or_else(|_| "python3".to_string())
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny() -> PathBuf {
    root().join("assets/tiny-llama")
}

fn run_py(args: &[&str]) -> serde_json::Value {
    let out = Command::new(python())
        .args(args)
        .output()
        .expect("run the reference python");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

fn load(dir: &Path) -> Box<dyn CausalLm> {
    load_model(dir, &LoadOptions::new(Kind::Float, tch::Device::Cpu)).unwrap()
}

/// Deterministic values in (-scale, scale).
fn fill(t: &Tensor, seed: u64, scale: f64) {
    let n = t.numel();
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(3);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((x >> 40) as f64 / (1u64 << 24) as f64) * 2.0 - 1.0) as f32 * scale as f32
        })
        .collect();
    let _g = tch::no_grad_guard();
    let mut t = t.shallow_clone();
    t.copy_(&Tensor::from_slice(&v).view(t.size().as_slice()));
}

/// A LoRA adapter with non-zero A and B on every linear of the model in `base`, saved in
/// `dir` (PEFT format, without tokenizer files).
fn make_adapter(base: &Path, dir: &Path, seed: u64) -> LoraConfig {
    let mut model = load(base);
    model.freeze_base();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target: Targets::AllLinear,
        ..LoraConfig::default()
    };
    let params = LoraInjector::new(cfg.clone())
        .inject(model.as_mut())
        .unwrap();
    for (i, (_, t)) in params.iter().enumerate() {
        fill(t, seed + i as u64, 0.08);
    }
    save_peft_adapter(model.as_ref(), &cfg, dir).unwrap();
    cfg
}

fn logits(model: &dyn CausalLm) -> Tensor {
    let ids = Tensor::from_slice(&[1i64, 44, 386, 80, 83, 270, 76, 262, 73, 5]).view([1, 10]);
    tch::no_grad(|| {
        model.forward(
            &ForwardInput {
                input_ids: &ids,
                attention_mask: None,
                position_ids: None,
            },
            false,
        )
    })
    .unwrap()
}

#[test]
fn merged_model_has_the_peft_eval_loss() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    make_adapter(&tiny(), &adapter, 11);
    let out = dir.path().join("merged");
    let opts = MergeOptions {
        // small shards so that the index is written and read
        max_shard_bytes: 1_000_000,
        ..Default::default()
    };
    let r = merge_to_dir(&tiny(), &adapter, &out, &opts, None).unwrap();
    assert_eq!(r.merged_modules, 4 * 7);
    assert!(r.dequantized.is_empty());
    for f in [
        "model.safetensors.index.json",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let shards = r.files.iter().filter(|f| f.starts_with("model-")).count();
    assert!(shards > 1, "{:?}", r.files);
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert!(index["weight_map"]["model.layers.0.self_attn.q_proj.weight"].is_string());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "float32");
    // no staging directory is left behind
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // VoltTrain: merged logits = base + adapter logits
    let mut with_adapter = load(&tiny());
    volttrain::adapter::load_peft_adapter(with_adapter.as_mut(), &adapter).unwrap();
    let merged = load(&out);
    let err = (logits(merged.as_ref()) - logits(with_adapter.as_ref()))
        .abs()
        .max()
        .double_value(&[]);
    println!("merged vs adapter logits: max abs err {err:.3e}");
    assert!(err < 1e-4, "{err}");

    // transformers + PEFT: eval loss of base + adapter = eval loss of the merged directory
    let script = root().join("reference/peft_eval.py");
    let eval = root().join("assets/data/eval.jsonl");
    let peft = run_py(&[
        script.to_str().unwrap(),
        tiny().to_str().unwrap(),
        adapter.to_str().unwrap(),
        eval.to_str().unwrap(),
        "256",
    ]);
    let hf = run_py(&[
        script.to_str().unwrap(),
        out.to_str().unwrap(),
        "-",
        eval.to_str().unwrap(),
        "256",
    ]);
    let (a, b) = (
        peft["eval_loss"].as_f64().unwrap(),
        hf["eval_loss"].as_f64().unwrap(),
    );
    println!("eval loss: base+adapter under PEFT {a:.6}, merged under transformers {b:.6}");
    assert_eq!(peft["tokens"], hf["tokens"]);
    assert!((a - b).abs() < 1e-4, "{a} vs {b}");

    // bf16: the config says so and the weights are bf16
    let out16 = dir.path().join("merged-bf16");
    let opts = MergeOptions {
        dtype: SaveDtype::Bf16,
        ..Default::default()
    };
    merge_to_dir(&tiny(), &adapter, &out16, &opts, None).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out16.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "bfloat16");
    let f = volttrain::model::safetensors::SafetensorsFile::open(&out16.join("model.safetensors"))
        .unwrap();
    let t = f
        .tensor("model.layers.0.mlp.up_proj.weight", None, tch::Device::Cpu)
        .unwrap();
    assert_eq!(t.kind(), Kind::BFloat16);
    // one shard: model.safetensors, and the index all the same, naming it for every tensor
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out16.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let names: Vec<&str> = f.names().collect();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), names.len());
    for n in &names {
        assert_eq!(map[*n], "model.safetensors", "{n}");
    }
    let bytes: u64 =
        volttrain::model::safetensors::load_safetensors(&out16.join("model.safetensors"))
            .unwrap()
            .values()
            .map(|t| (t.numel() * 2) as u64)
            .sum();
    assert_eq!(index["metadata"]["total_size"], bytes);
    // transformers loads it: the eval loss of the bf16 merge is the fp32 merge's up to bf16
    // rounding
    let hf16 = run_py(&[
        script.to_str().unwrap(),
        out16.to_str().unwrap(),
        "-",
        eval.to_str().unwrap(),
        "256",
    ]);
    let c = hf16["eval_loss"].as_f64().unwrap();
    println!("eval loss: merged bf16 under transformers {c:.6}");
    assert_eq!(hf16["tokens"], hf["tokens"]);
    assert!((c - b).abs() < 2e-3, "{c} vs {b}");
    // the output exists now: a second merge into it is refused
    let e = merge_to_dir(&tiny(), &adapter, &out16, &opts, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not empty"), "{e}");
}

#[test]
fn quantized_base_is_dequantized_then_merged() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    make_adapter(&tiny(), &adapter, 5);
    let q = Arc::new(FourBitQuantizer::new(FourBitType::Nf4, 64, true).unwrap());
    let out = dir.path().join("merged");
    let opts = MergeOptions {
        quantizer: Some(q.clone()),
        ..Default::default()
    };
    let r = merge_to_dir(&tiny(), &adapter, &out, &opts, None).unwrap();
    assert_eq!(r.dequantized.len(), 1, "{:?}", r.dequantized);
    // expected: dequantize(quantize(W)) + scaling * B A, module by module
    let mut qmodel = load_model(
        tiny(),
        &LoadOptions::new(Kind::Float, tch::Device::Cpu).with_quantizer(q),
    )
    .unwrap();
    let (_, _) = volttrain::adapter::load_peft_adapter(qmodel.as_mut(), &adapter).unwrap();
    let merged = load(&out);
    let got: std::collections::HashMap<String, Tensor> =
        merged.checkpoint_tensors().unwrap().into_iter().collect();
    let mut checked = 0;
    for (name, lin) in qmodel.linears() {
        let LinearWeight::Quantized(qw) = &lin.weight else {
            continue;
        };
        let want = qw.dequantize(Kind::Float).unwrap()
            + lin.adapter.as_ref().unwrap().delta_weight().unwrap();
        let err = (&got[&format!("{name}.weight")] - want)
            .abs()
            .max()
            .double_value(&[]);
        assert!(err < 1e-6, "{name}: {err}");
        checked += 1;
    }
    assert_eq!(checked, 4 * 7);
}

#[test]
fn quantized_base_merge_equals_peft_and_bitsandbytes() {
    // PEFT's merge_and_unload on a bitsandbytes-quantized base (CPU), the dense merged weight it
    // computes (dequantize_bnb_weight(W) + delta, reference/merge_bnb_ref.py) against VoltTrain's
    // merge of the same adapter into the same base quantized the same way, written in fp32 and
    // bf16. bitsandbytes' Int8Params quantizes the fp16 cast of the weights, VoltTrain's int8
    // quantizer the fp32 weights: the base here has fp16-representable weights, so that both
    // quantize the same values and what differs, if anything, is the merge.
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    std::fs::create_dir_all(&base).unwrap();
    for f in std::fs::read_dir(tiny()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, base.join(f.file_name().unwrap())).unwrap();
    }
    let weights = volttrain::model::safetensors::load_safetensors(&base.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.to_kind(Kind::Half).to_kind(Kind::Float)))
        .collect::<Vec<_>>();
    volttrain::model::safetensors::save_safetensors(
        &base.join("model.safetensors"),
        &weights,
        None,
    )
    .unwrap();
    let adapter = dir.path().join("adapter");
    make_adapter(&base, &adapter, 13);
    let nf4: Arc<dyn volttrain::quant::Quantizer> =
        Arc::new(FourBitQuantizer::new(FourBitType::Nf4, 64, true).unwrap());
    let int8: Arc<dyn volttrain::quant::Quantizer> =
        Arc::new(volttrain::quant::int8::Int8Quantizer);
    for (mode, q) in [("nf4", nf4), ("int8", int8)] {
        let reference = dir.path().join(format!("peft-{mode}.safetensors"));
        let r = run_py(&[
            root().join("reference/merge_bnb_ref.py").to_str().unwrap(),
            base.to_str().unwrap(),
            adapter.to_str().unwrap(),
            reference.to_str().unwrap(),
            mode,
        ]);
        assert_eq!(r["modules"], 4 * 7, "{mode}: {r}");
        let want = volttrain::model::safetensors::load_safetensors(&reference).unwrap();
        for dtype in [SaveDtype::F32, SaveDtype::Bf16] {
            let out = dir
                .path()
                .join(format!("merged-{mode}-{}", dtype.torch_name()));
            let opts = MergeOptions {
                quantizer: Some(q.clone()),
                dtype,
                ..Default::default()
            };
            let report = merge_to_dir(&base, &adapter, &out, &opts, None).unwrap();
            assert_eq!(report.dequantized.len(), 1, "{:?}", report.dequantized);
            let got =
                volttrain::model::safetensors::load_safetensors(&out.join("model.safetensors"))
                    .unwrap();
            let mut worst = 0f64;
            for (name, w) in &want {
                let g = &got[name];
                assert_eq!(g.kind(), dtype.kind(), "{name}");
                let expect = w.to_kind(dtype.kind()).to_kind(Kind::Float);
                let err = (g.to_kind(Kind::Float) - &expect)
                    .abs()
                    .max()
                    .double_value(&[]);
                let scale = expect.abs().max().double_value(&[]);
                worst = worst.max(err / scale);
            }
            println!(
                "{mode} {}: max error / max |w| {worst:.3e}",
                dtype.torch_name()
            );
            // fp32: the same arithmetic up to float rounding; bf16: both rounded to bf16 from
            // values that differ by that much at most one bf16 step apart
            let tol = match dtype {
                SaveDtype::F32 => 1e-6,
                _ => 2f64.powi(-7),
            };
            assert!(worst <= tol, "{mode} {}: {worst}", dtype.torch_name());
        }
    }
}

#[test]
fn bad_adapters_are_errors_naming_the_file_or_tensor() {
    let dir = tempfile::tempdir().unwrap();
    // an adapter made for another base (hidden 64 instead of 128)
    let other = dir.path().join("other-base");
    run_py(&[
        root().join("reference/generate_ref.py").to_str().unwrap(),
        "--make-smollm2",
        other.to_str().unwrap(),
        "1",
        "256",
    ]);
    let adapter = dir.path().join("adapter");
    make_adapter(&other, &adapter, 3);
    let e = merge_to_dir(
        &tiny(),
        &adapter,
        &dir.path().join("m"),
        &MergeOptions::default(),
        None,
    )
    .unwrap_err()
    .to_string();
    println!("{e}");
    assert!(
        e.contains("base_model.model.model.layers.0.") && e.contains("expected shape"),
        "{e}"
    );
    assert!(!dir.path().join("m").exists());
    // a directory without the adapter files
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = merge_to_dir(
        &tiny(),
        &empty,
        &dir.path().join("m"),
        &MergeOptions::default(),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("adapter_config.json"), "{e}");
}

/// Our GGUF files of `model` at each of `types` against llama.cpp's converter on the same
/// directory (`reference/gguf_convert.py compare`): no metadata or tensor difference, and the
/// dequantized tensors equal the converter's f32 tensors (exactly for f32, within half a q8_0
/// step for q8_0). Returns the number of tensors.
fn assert_gguf_equals_converter(model: &Path, dir: &Path, arch: &str, types: &[&str]) -> u64 {
    let script = root().join("reference/gguf_convert.py");
    let mut args = vec![
        script.display().to_string(),
        "compare".into(),
        model.display().to_string(),
    ];
    let name = model.file_name().unwrap().to_string_lossy();
    for &ty in types {
        let out = dir.join(format!("{name}-{ty}.gguf"));
        let r = export_gguf(model, None, ty.parse().unwrap(), &out).unwrap();
        assert_eq!(r.architecture, arch, "{name}");
        args.push(format!("{ty}={}", out.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let all = run_py(&args);
    for &ty in types {
        let cmp = &all[ty];
        println!("{name} {ty}: {cmp}");
        assert_eq!(cmp["kv_mismatch"], serde_json::json!([]), "{name} {ty}");
        assert_eq!(cmp["tensor_mismatch"], serde_json::json!([]), "{name} {ty}");
        let err = cmp["dequant_max_abs_err"].as_f64().unwrap();
        match ty {
            "f32" => assert_eq!(err, 0.0, "{name}"),
            "q8_0" => {
                let over = cmp["q8_0_dequant_max_err_over_step"].as_f64().unwrap();
                // half a step, plus the f16 rounding of the scale (2^-11 relative) times 127
                assert!(
                    over <= 0.5 + 127.0 / 2048.0,
                    "{name}: q8_0 error {over} steps"
                );
            }
            _ => assert!(err < 1e-2, "{name} {ty}: {err}"),
        }
    }
    all["f32"]["tensors"].as_u64().unwrap()
}

#[test]
fn gguf_export_equals_llama_cpps_converter() {
    let dir = tempfile::tempdir().unwrap();
    let types = ["f32", "f16", "bf16", "q8_0"];
    assert_eq!(
        assert_gguf_equals_converter(&tiny(), dir.path(), "llama", &types),
        4 * 9 + 2
    );
}

#[test]
fn gguf_export_of_each_family_equals_llama_cpps_converter() {
    // tiny random models with the bundled tokenizer (reference/gguf_convert.py make)
    let families = [
        // Llama 3 RoPE (rope_freqs), q/k/v/o and MLP biases, bf16 on disk
        ("llama3", "llama"),
        ("llama_yarn", "llama"),
        ("llama_tied", "llama"),
        ("mistral", "llama"),
        ("qwen2", "qwen2"),
        ("qwen2_swa", "qwen2"),
        ("qwen3", "qwen3"),
        // a SentencePiece vocabulary (tokenizer.model)
        ("gemma2", "gemma2"),
        ("llama_spm", "llama"),
        ("qwen2_spm", "qwen2"),
        ("gemma3", "gemma3"),
        ("phi3", "phi3"),
        ("phi4", "phi3"),
        // Phi-3-mini's own SentencePiece path: added tokens of added_tokens.json,
        // tokenizer_config.json and tokenizer.json past the pieces, chat template
        ("phi3_spm", "phi3"),
        ("smollm3", "smollm3"),
        ("mamba", "mamba"),
        ("falcon_mamba", "mamba"),
        ("jamba", "jamba"),
        // float16 checkpoints: the converter adds Gemma's 1 and takes Mamba's -exp in float16
        ("gemma3_fp16", "gemma3"),
        ("mamba_fp16", "mamba"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    let mut args = vec![
        root()
            .join("reference/gguf_convert.py")
            .display()
            .to_string(),
        "make".into(),
        models.display().to_string(),
        tiny().display().to_string(),
    ];
    args.extend(families.iter().map(|(n, _)| n.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_py(&args);
    // f16 / bf16 encoding is the same code for every family (covered by the llama test)
    for (name, arch) in families {
        assert_gguf_equals_converter(&models.join(name), dir.path(), arch, &["f32", "q8_0"]);
    }
    // Phi-3 ids past config.json's vocab_size (which the converter fails on) are refused
    let phi3 = models.join("phi3_spm");
    let cfg_text = std::fs::read_to_string(phi3.join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
    for (size, file) in [(300, "tokenizer.model"), (403, "tokenizer_config.json")] {
        cfg["vocab_size"] = serde_json::json!(size);
        std::fs::write(phi3.join("config.json"), cfg.to_string()).unwrap();
        let e = export_gguf(&phi3, None, GgufType::F32, &dir.path().join("x.gguf"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("vocab_size {size}")) && e.contains(file),
            "{e}"
        );
    }
    std::fs::write(phi3.join("config.json"), cfg_text).unwrap();
    // Gemma 2, Jamba and Phi-3 (without Phi-4's GPT2Tokenizer) without a SentencePiece
    // tokenizer.model are refused, naming it
    for (name, family) in [
        ("gemma2", "Gemma 2"),
        ("jamba", "Jamba"),
        ("phi3_spm", "Phi-3"),
    ] {
        std::fs::remove_file(models.join(name).join("tokenizer.model")).unwrap();
        let e = export_gguf(
            &models.join(name),
            None,
            GgufType::F32,
            &dir.path().join("x.gguf"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tokenizer.model") && e.contains(family), "{e}");
    }
}

#[test]
fn gguf_with_an_adapter_equals_the_merged_model_and_bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    make_adapter(&tiny(), &adapter, 9);
    let merged = dir.path().join("merged");
    merge_to_dir(&tiny(), &adapter, &merged, &MergeOptions::default(), None).unwrap();
    let a = volttrain::export::gguf::build_gguf(&tiny(), Some(&adapter), GgufType::Q8_0)
        .unwrap()
        .0;
    let b = volttrain::export::gguf::build_gguf(&merged, None, GgufType::Q8_0)
        .unwrap()
        .0;
    assert_eq!(a.tensors().len(), b.tensors().len());
    for (x, y) in a.tensors().iter().zip(b.tensors()) {
        assert_eq!(x.name, y.name);
        assert_eq!(x.data, y.data, "{}", x.name);
    }
    // an architecture GGUF export does not handle is named
    let qwen = dir.path().join("qwen");
    std::fs::create_dir_all(&qwen).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny().join("config.json")).unwrap())
            .unwrap();
    cfg["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    std::fs::write(qwen.join("config.json"), cfg.to_string()).unwrap();
    let e = export_gguf(&qwen, None, GgufType::F16, &dir.path().join("x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("GPTNeoXForCausalLM") && e.contains("architectures"),
        "{e}"
    );
    assert!(!dir.path().join("x.gguf").exists());
    // a tokenizer.model (which the converter would read) that is not a SentencePiece model
    let spm = dir.path().join("spm");
    std::fs::create_dir_all(&spm).unwrap();
    for f in std::fs::read_dir(tiny()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, spm.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::write(spm.join("tokenizer.model"), b"not read").unwrap();
    let e = export_gguf(&spm, None, GgufType::F16, &dir.path().join("x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.model") && e.contains("SentencePiece"),
        "{e}"
    );
    // a RoPE type llama.cpp's converter would drop (dynamic NTK)
    std::fs::remove_file(spm.join("tokenizer.model")).unwrap();
    let mut dynamic = cfg.clone();
    dynamic["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    dynamic["rope_parameters"] =
        serde_json::json!({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0});
    std::fs::write(spm.join("config.json"), dynamic.to_string()).unwrap();
    let e = export_gguf(&spm, None, GgufType::F16, &dir.path().join("x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("dynamic") && e.contains("rope_type"), "{e}");
    // a tokenizer with ids past the model's vocabulary
    let mut small = cfg.clone();
    small["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    small["vocab_size"] = serde_json::json!(100);
    std::fs::write(spm.join("config.json"), small.to_string()).unwrap();
    let e = export_gguf(&spm, None, GgufType::F16, &dir.path().join("x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("vocab_size 100") && e.contains("tokenizer.json"),
        "{e}"
    );
    assert!(!dir.path().join("x.gguf").exists());
    let e = "q4_k".parse::<GgufType>().unwrap_err().to_string();
    assert!(e.contains("q4_k"), "{e}");
}

#[test]
fn init_from_starts_from_the_saved_adapter_weights() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    let saved_cfg = make_adapter(&tiny(), &adapter, 21);
    let saved =
        volttrain::model::safetensors::load_safetensors(&adapter.join("adapter_model.safetensors"))
            .unwrap();
    let mut model = load(&tiny());
    model.freeze_base();
    // the run's section asks for another rank and dropout: the adapter's shape wins, the
    // run's dropout is used
    let run_cfg = LoraConfig {
        r: 16,
        alpha: 32.0,
        dropout: 0.1,
        ..LoraConfig::default()
    };
    let (used, params) = inject_lora(model.as_mut(), &run_cfg, Some(&adapter)).unwrap();
    assert_eq!(used.r, saved_cfg.r);
    assert_eq!(used.alpha, saved_cfg.alpha);
    assert_eq!(used.dropout, 0.1);
    assert_eq!(params.len(), saved.len());
    for (name, t) in &params {
        assert!(t.requires_grad(), "{name}");
        let want = &saved[&format!("base_model.model.{name}")];
        assert!(t.equal(want), "{name} differs from the saved adapter");
    }
    // a missing directory names the key and the file
    let mut model = load(&tiny());
    let e = inject_lora(model.as_mut(), &run_cfg, Some(&dir.path().join("nope")))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lora.init_from") && e.contains("adapter_config.json"),
        "{e}"
    );
}
