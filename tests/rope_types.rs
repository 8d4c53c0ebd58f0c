//! Each RoPE type against transformers' own init function (`modeling_rope_utils.py`
//! `ROPE_INIT_FUNCTIONS`, and `LlamaRotaryEmbedding.compute_default_rope_parameters` for
//! `default`), run live through `$VOLTTRAIN_PYTHON_REF`: the inverse frequencies (fp32) and the
//! attention factor, at the lengths the model calls them with (`seq_len = None` at build time;
//! `max(position_ids) + 1` for dynamic and longrope). The inverse frequencies must be equal bit for
//! bit.

use std::process::Command;

use volttrain::nn::{RopeConfig, RopeScaling};

struct Case {
    name: &'static str,
    rope: RopeConfig,
    seq_len: Option<i64>,
    /// Python: an expression building the config (`C` is the config class in `cls`).
    config: String,
    cls: &'static str,
    /// The transformers function: `default` or a `ROPE_INIT_FUNCTIONS` key.
    func: &'static str,
}

fn factors(n: usize, a: f64, b: f64) -> Vec<f64> {
    (0..n).map(|i| a + b * i as f64 / n as f64).collect()
}

fn list(xs: &[f64]) -> String {
    let v: Vec<String> = xs.iter().map(|x| format!("{x:?}")).collect();
    format!("[{}]", v.join(", "))
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let llama = |hd: i64, maxp: i64, rp: String| {
        format!(
            "C(hidden_size={h}, num_attention_heads=4, head_dim={hd}, max_position_embeddings={maxp}, rope_parameters={rp})",
            h = hd * 4
        )
    };
    for (theta, dim) in [(10000.0, 16), (1_000_000.0, 128), (500_000.0, 64)] {
        out.push(Case {
            name: "default",
            rope: RopeConfig {
                theta,
                dim,
                scaling: RopeScaling::Default,
            },
            seq_len: None,
            config: llama(
                dim,
                4096,
                format!("{{'rope_type': 'default', 'rope_theta': {theta:?}}}"),
            ),
            cls: "LlamaConfig",
            func: "default",
        });
    }
    out.push(Case {
        name: "linear",
        rope: RopeConfig {
            theta: 10000.0,
            dim: 64,
            scaling: RopeScaling::Linear { factor: 2.5 },
        },
        seq_len: None,
        config: llama(
            64,
            4096,
            "{'rope_type': 'linear', 'factor': 2.5, 'rope_theta': 10000.0}".into(),
        ),
        cls: "LlamaConfig",
        func: "linear",
    });
    out.push(Case {
        name: "llama3",
        rope: RopeConfig {
            theta: 500_000.0,
            dim: 128,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        },
        seq_len: None,
        config: llama(128, 131072, "{'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192, 'rope_theta': 500000.0}".into()),
        cls: "LlamaConfig",
        func: "llama3",
    });
    let yarn = |factor: f64,
                omax: f64,
                att: Option<f64>,
                ms: Option<(f64, f64)>,
                betas: (f64, f64),
                truncate: bool| RopeScaling::Yarn {
        factor,
        original_max_position_embeddings: omax,
        attention_factor: att,
        mscale: ms.map(|m| m.0),
        mscale_all_dim: ms.map(|m| m.1),
        beta_fast: betas.0,
        beta_slow: betas.1,
        truncate,
    };
    out.push(Case {
        name: "yarn (Qwen3 style)",
        rope: RopeConfig {
            theta: 1_000_000.0,
            dim: 128,
            scaling: yarn(4.0, 32768.0, None, None, (32.0, 1.0), true),
        },
        seq_len: None,
        config: llama(128, 131072, "{'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 32768, 'rope_theta': 1000000.0}".into()),
        cls: "LlamaConfig",
        func: "yarn",
    });
    out.push(Case {
        name: "yarn (mscale, betas, no truncation)",
        rope: RopeConfig {
            theta: 10000.0,
            dim: 64,
            scaling: yarn(40.0, 4096.0, None, Some((0.707, 1.0)), (16.0, 2.0), false),
        },
        seq_len: None,
        config: llama(64, 163840, "{'rope_type': 'yarn', 'factor': 40.0, 'original_max_position_embeddings': 4096, 'mscale': 0.707, 'mscale_all_dim': 1.0, 'beta_fast': 16.0, 'beta_slow': 2.0, 'truncate': False, 'rope_theta': 10000.0}".into()),
        cls: "LlamaConfig",
        func: "yarn",
    });
    out.push(Case {
        name: "yarn (explicit attention_factor)",
        rope: RopeConfig {
            theta: 10000.0,
            dim: 32,
            scaling: yarn(2.0, 2048.0, Some(1.25), None, (32.0, 1.0), true),
        },
        seq_len: None,
        config: llama(32, 4096, "{'rope_type': 'yarn', 'factor': 2.0, 'original_max_position_embeddings': 2048, 'attention_factor': 1.25, 'rope_theta': 10000.0}".into()),
        cls: "LlamaConfig",
        func: "yarn",
    });
    // LongRoPE, Phi-3.5 style (full rotary, head_dim 96) and Phi-4-mini style (partial 0.75 of
    // head_dim 128), short and long factors
    for (hd, partial, seq) in [
        (96, 1.0, None),
        (96, 1.0, Some(4097)),
        (128, 0.75, None),
        (128, 0.75, Some(5000)),
    ] {
        let dim = (hd as f64 * partial) as i64;
        let short = factors(dim as usize / 2, 1.0, 0.9);
        let long = factors(dim as usize / 2, 1.0, 30.0);
        out.push(Case {
            name: "longrope",
            rope: RopeConfig {
                theta: 10000.0,
                dim,
                scaling: RopeScaling::LongRope {
                    short_factor: short.clone(),
                    long_factor: long.clone(),
                    original_max_position_embeddings: 4096.0,
                    factor: 131072.0 / 4096.0,
                    attention_factor: None,
                },
            },
            seq_len: seq,
            config: format!(
                "C(hidden_size={h}, num_attention_heads=4, max_position_embeddings=131072, original_max_position_embeddings=4096, rope_parameters={{'rope_type': 'longrope', 'rope_theta': 10000.0, 'partial_rotary_factor': {partial:?}, 'short_factor': {s}, 'long_factor': {l}}})",
                h = hd * 4,
                s = list(&short),
                l = list(&long)
            ),
            cls: "Phi3Config",
            func: "longrope",
        });
    }
    for seq in [None, Some(2048), Some(5000)] {
        out.push(Case {
            name: "dynamic",
            rope: RopeConfig {
                theta: 10000.0,
                dim: 64,
                scaling: RopeScaling::Dynamic {
                    factor: 2.0,
                    max_position_embeddings: 2048,
                },
            },
            seq_len: seq,
            config: llama(
                64,
                2048,
                "{'rope_type': 'dynamic', 'factor': 2.0, 'rope_theta': 10000.0}".into(),
            ),
            cls: "LlamaConfig",
            func: "dynamic",
        });
    }
    out
}

const SCRIPT: &str = r#"
import json, sys, torch
from transformers import LlamaConfig, Phi3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
out = []
for case in json.load(sys.stdin):
    C = {"LlamaConfig": LlamaConfig, "Phi3Config": Phi3Config}[case["cls"]]
    cfg = eval(case["config"])
    seq = case["seq_len"]
    if case["func"] == "default":
        inv, att = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        # the model's update passes `max(position_ids) + 1`, a tensor
        s = None if seq is None else torch.tensor(seq)
        inv, att = ROPE_INIT_FUNCTIONS[case["func"]](cfg, None, seq_len=s)
    out.append({"inv_freq": inv.float().tolist(), "attention_factor": float(att)})
print(json.dumps(out))
"#;

#[test]
fn every_rope_type_matches_transformers_init_function() {
    let cases = cases();
    let input: Vec<serde_json::Value> = cases
        .iter()
        .map(|c| {
            serde_json::json!({
                "config": c.config, "cls": c.cls, "func": c.func, "seq_len": c.seq_len,
            })
        })
        .collect();
    let python = std::env::var("VOLTTRAIN_PYTHON_REF").unwrap_or_else(|_| "python3".to_string());
    let mut child = Command::new(python)
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    serde_json::to_writer(child.stdin.take().unwrap(), &input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(want.len(), cases.len());
    for (c, w) in cases.iter().zip(&want) {
        let (got, att) = c.rope.inv_freq_values(c.seq_len).unwrap();
        let exp: Vec<f32> = w["inv_freq"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got.len(), exp.len(), "{}: length", c.name);
        let worst = got
            .iter()
            .zip(&exp)
            .map(|(a, b)| ((a - b).abs() / b.abs()) as f64)
            .fold(0.0, f64::max);
        let exact = got == exp;
        println!(
            "{} (seq_len {:?}): worst relative difference {worst:.2e}, bit-identical: {exact}",
            c.name, c.seq_len
        );
        // the same libtorch ops in the same order: equal bit for bit
        assert!(exact, "{}: {got:?} vs {exp:?}", c.name);
        let want_att = w["attention_factor"].as_f64().unwrap();
        assert!(
            (att - want_att).abs() <= 1e-12 * want_att.abs().max(1.0),
            "{}: attention factor {att} vs {want_att}",
            c.name
        );
    }
}
