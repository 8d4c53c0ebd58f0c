//! Generation with the KV cache against transformers.
//!
//! - The cached forward (prefill, then single tokens and a chunk) gives the logits of the full
//!   forward for every family whose RoPE does not depend on the sequence length (1e-4, fp32).
//! - Greedy decoding equals transformers `generate(do_sample=False)` token for token for the
//!   bundled `assets/tiny-llama` (text and chat prompts), a model with SmolLM2-135M's layer shape
//!   (`reference/generate_ref.py --make-smollm2`, 4 layers, vocabulary 4096) and the family
//!   fixtures of `reference/make_model_fixtures.py` (sliding windows, soft-capping, LongRoPE,
//!   dynamic NTK, layers without RoPE). The reference runs live through `$VOLTTRAIN_PYTHON_REF`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::{Value, json};
use tch::{Kind, Tensor};
use volttrain::data::Tokenizer;
use volttrain::generate::{
    FinishReason, Generate, GenerateConfig, eos_ids, generate_text, prompt_ids,
};
use volttrain::model::{CausalLm, ForwardInput, KvCache, LoadOptions, load_model};

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
    String::from_utf8(out.stdout).unwrap()
}

/// Families whose RoPE does not depend on the sequence length (the cached and the full forward
/// see the same tables).
const FIXED_ROPE: [&str; 8] = [
    "llama",
    "llama_tied",
    "mistral",
    "qwen2_swa",
    "qwen3",
    "gemma2",
    "gemma3",
    "smollm3",
];
/// Length-dependent RoPE: checked against transformers' generate only.
const LENGTH_ROPE: [&str; 2] = ["phi3", "llama_dynamic"];

fn fixtures() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let script = root().join("reference/make_model_fixtures.py");
        let mut args = vec![script.to_str().unwrap(), d];
        args.extend(FIXED_ROPE);
        args.extend(LENGTH_ROPE);
        run_py(&args);
        let smol = dir.path().join("smollm2");
        run_py(&[
            root().join("reference/generate_ref.py").to_str().unwrap(),
            "--make-smollm2",
            smol.to_str().unwrap(),
            "4",
            "4096",
        ]);
        dir
    })
    .path()
}

fn load(dir: &Path) -> Box<dyn CausalLm> {
    load_model(dir, &LoadOptions::new(Kind::Float, tch::Device::Cpu)).unwrap()
}

fn ids(seed: u64, n: usize, vocab: i64) -> Vec<i64> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(11);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as i64
        })
        .collect()
}

#[test]
fn cached_forward_equals_the_full_forward() {
    let _g = tch::no_grad_guard();
    for name in FIXED_ROPE {
        let model = load(&fixtures().join(name));
        let toks = ids(3, 12, model.vocab_size());
        let input = Tensor::from_slice(&toks).view([1, 12]);
        let full = model
            .forward(
                &ForwardInput {
                    input_ids: &input,
                    attention_mask: None,
                    position_ids: None,
                },
                false,
            )
            .unwrap();
        // prefill 5, one token, a chunk of 3 (queries after a non-empty cache), then singles
        let mut cache = KvCache::new(model.num_layers());
        let mut worst: f64 = 0.0;
        let mut at = 0;
        for chunk in [5, 1, 3, 1, 1, 1] {
            let piece = input.narrow(1, at, chunk);
            let got = model.forward_cached(&piece, &mut cache).unwrap();
            let want = full.get(0).get(at + chunk - 1).unsqueeze(0);
            let err = (got - want).abs().max().double_value(&[]);
            worst = worst.max(err);
            at += chunk;
        }
        assert_eq!(cache.len(), 12);
        println!("{name}: cached vs full forward max abs err {worst:.3e}");
        assert!(worst < 1e-4, "{name}: {worst}");
    }
}

/// Runs every job through `reference/generate_ref.py` in one process.
fn reference(jobs: &Value) -> Vec<Vec<Value>> {
    let out = run_py(&[
        root().join("reference/generate_ref.py").to_str().unwrap(),
        &jobs.to_string(),
    ]);
    let v: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    serde_json::from_value(v["jobs"].clone()).unwrap()
}

fn as_ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn greedy_generation_equals_transformers() {
    let tiny = root().join("assets/tiny-llama");
    let smol = fixtures().join("smollm2");
    let mut jobs = vec![
        json!({"model": tiny, "max_new_tokens": 24, "prompts": [
            {"text": "What is 2+3?", "chat": true},
            {"text": "Reverse the words: red green blue"},
        ]}),
        json!({"model": smol, "max_new_tokens": 32, "prompts": [ids(1, 7, 4096), ids(2, 19, 4096)]}),
    ];
    let families: Vec<&str> = FIXED_ROPE.iter().chain(&LENGTH_ROPE).copied().collect();
    for name in &families {
        // 6-token prompts and 10 new tokens cross the sliding windows (3 to 5) and the
        // original contexts of LongRoPE and dynamic NTK (8)
        jobs.push(json!({"model": fixtures().join(name), "max_new_tokens": 10,
                         "prompts": [ids(5, 6, 97)]}));
    }
    let want = reference(&Value::Array(jobs.clone()));

    // the bundled model, through the tokenizer and the chat template
    let tok = Tokenizer::from_dir(&tiny).unwrap();
    let model = load(&tiny);
    let cfg = GenerateConfig {
        max_new_tokens: 24,
        eos_token_ids: eos_ids(&tiny, Some(&tok)).unwrap(),
        ..Default::default()
    };
    for (i, (text, chat)) in [
        ("What is 2+3?", true),
        ("Reverse the words: red green blue", false),
    ]
    .into_iter()
    .enumerate()
    {
        let p = prompt_ids(&tok, text, chat).unwrap();
        assert_eq!(p, as_ids(&want[0][i]["prompt"]), "tiny-llama prompt {i}");
        let mut streamed = String::new();
        let g = generate_text(model.as_ref(), &tok, &p, &cfg, &mut |s| {
            streamed.push_str(s);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            g.tokens,
            as_ids(&want[0][i]["tokens"]),
            "tiny-llama prompt {i}"
        );
        assert_eq!(g.text, want[0][i]["text"].as_str().unwrap());
        assert_eq!(streamed, g.text, "streamed text is the whole text");
    }

    let by_ids = |job: usize, dir: &Path, max_new: usize| {
        let model = load(dir);
        let cfg = GenerateConfig {
            max_new_tokens: max_new,
            eos_token_ids: eos_ids(dir, None).unwrap(),
            ..Default::default()
        };
        for (i, w) in want[job].iter().enumerate() {
            let g = model
                .generate(&as_ids(&w["prompt"]), &cfg, &mut |_| Ok(true))
                .unwrap();
            println!("{}: {:?} ({:?})", dir.display(), g.tokens, g.finish);
            assert_eq!(
                g.tokens,
                as_ids(&w["tokens"]),
                "{} prompt {i}",
                dir.display()
            );
        }
    };
    by_ids(1, &smol, 32);
    for (j, name) in families.iter().enumerate() {
        by_ids(2 + j, &fixtures().join(name), 10);
    }
}

#[test]
fn stop_strings_cut_the_text_and_end_generation() {
    let tiny = root().join("assets/tiny-llama");
    let tok = Tokenizer::from_dir(&tiny).unwrap();
    let model = load(&tiny);
    let p = prompt_ids(&tok, "Reverse the words: red green blue", false).unwrap();
    let base = GenerateConfig {
        max_new_tokens: 12,
        ..Default::default()
    };
    let full = generate_text(model.as_ref(), &tok, &p, &base, &mut |_| Ok(())).unwrap();
    assert_eq!(full.finish, FinishReason::Length);
    assert_eq!(full.tokens.len(), 12);
    // stop at the text of the third token onwards: generation ends there, the text before it
    let cut = tok.decode(&full.tokens[..2], true).unwrap();
    let stop = tok.decode(&full.tokens[2..4], true).unwrap();
    assert!(!stop.is_empty());
    let cfg = GenerateConfig {
        stop_strings: vec![stop.clone()],
        ..base.clone()
    };
    let mut streamed = String::new();
    let g = generate_text(model.as_ref(), &tok, &p, &cfg, &mut |s| {
        streamed.push_str(s);
        Ok(())
    })
    .unwrap();
    assert_eq!(g.finish, FinishReason::Stop);
    assert!(g.tokens.len() <= 4, "{:?}", g.tokens);
    assert_eq!(g.text, full.text[..full.text.find(&stop).unwrap()]);
    assert!(g.text.starts_with(&cut[..cut.len().min(g.text.len())]));
    assert_eq!(streamed, g.text);

    // an eos id ends generation with the id last and out of the text
    let eos = full.tokens[3];
    let cfg = GenerateConfig {
        eos_token_ids: vec![eos],
        ..base
    };
    let g = generate_text(model.as_ref(), &tok, &p, &cfg, &mut |_| Ok(())).unwrap();
    assert_eq!(g.finish, FinishReason::Eos);
    let first = full.tokens.iter().position(|&t| t == eos).unwrap();
    assert_eq!(g.tokens, full.tokens[..=first]);
}

#[test]
fn sampling_is_reproducible_by_seed_and_respects_top_k() {
    let tiny = root().join("assets/tiny-llama");
    let model = load(&tiny);
    let p = [1u32, 44, 386, 80];
    let cfg = GenerateConfig {
        max_new_tokens: 16,
        temperature: 1.5,
        top_k: 1,
        seed: 7,
        ..Default::default()
    };
    // top_k 1 is greedy whatever the temperature
    let greedy = GenerateConfig {
        max_new_tokens: 16,
        ..Default::default()
    };
    let a = model.generate(&p, &cfg, &mut |_| Ok(true)).unwrap();
    let g = model.generate(&p, &greedy, &mut |_| Ok(true)).unwrap();
    assert_eq!(a.tokens, g.tokens);
    let wide = GenerateConfig {
        top_k: 0,
        top_p: 0.95,
        ..cfg.clone()
    };
    let x = model.generate(&p, &wide, &mut |_| Ok(true)).unwrap();
    let y = model.generate(&p, &wide, &mut |_| Ok(true)).unwrap();
    assert_eq!(x.tokens, y.tokens, "same seed, same tokens");
    let z = model
        .generate(&p, &GenerateConfig { seed: 8, ..wide }, &mut |_| Ok(true))
        .unwrap();
    assert_ne!(x.tokens, z.tokens, "another seed, other tokens");
    // bad settings name the field
    let e = model
        .generate(
            &p,
            &GenerateConfig {
                top_p: 0.0,
                ..Default::default()
            },
            &mut |_| Ok(true),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("top_p"), "{e}");
}
