//! Property tests over every reader of user input: the config reader, JSONL / JSON / Parquet
//! records, safetensors headers, `adapter_config.json` and a resume checkpoint's
//! `trainer_state.json` (plugin declarations are fuzzed inside the crate, where the checker
//! lives: `src/plugin/declaration_fuzz.rs`).
//!
//! Each property starts from a valid input and applies random byte- and token-level mutations
//! (flips, inserted JSON/YAML tokens, deletions, truncation): thousands of cases per reader,
//! seeded by proptest (a failure prints the minimal mutation list, and `proptest-regressions/`
//! keeps it). Every case must return `Ok` or an error that names its source (the file); a panic
//! anywhere fails the test.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use volttrain::config::SftConfig;
use volttrain::data::records::{read_json_array, read_jsonl};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Cases per reader.
const CASES: u32 = 2000;

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    })
}

/// Tokens that make parsers take their rarer paths.
const TOKENS: &[&str] = &[
    "\"",
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "null",
    "-1",
    "0",
    "1e309",
    "-9223372036854775809",
    "18446744073709551616",
    "NaN",
    "true",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "\n",
    "  ",
    "~",
    "&a ",
    "*a",
    "<<: ",
    "!!binary ",
    "- ",
    "? ",
    "|\n",
    "#",
    "\u{feff}",
    "\u{10ffff}",
    "\t",
    "\\",
    "\"role\"",
    "\"content\"",
    "\"messages\"",
    "\"assistant\"",
    "\"text\"",
    "\"prompt\"",
    "\"completion\"",
    "r: ",
    "lr: ",
    "dataset:",
    "training:",
    "lora:",
];

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, &'static str),
    InsertBytes(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), proptest::sample::select(TOKENS))
            .prop_map(|(i, t)| Mutation::Insert(i, t)),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Mutation::InsertBytes(i, b)),
        (any::<usize>(), 1usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(mutation(), 1..6)
}

/// Applies `muts` to `seed`; positions wrap around the current length.
fn mutate(seed: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for m in muts {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % (len + 1) };
        match m {
            Mutation::Flip(i, x) if !b.is_empty() => {
                let n = b.len();
                b[i % n] ^= x;
            }
            Mutation::Set(i, v) if !b.is_empty() => {
                let n = b.len();
                b[i % n] = *v;
            }
            Mutation::Insert(i, t) => {
                let p = at(*i, b.len());
                b.splice(p..p, t.bytes());
            }
            Mutation::InsertBytes(i, x) => {
                let p = at(*i, b.len());
                b.splice(p..p, x.iter().copied());
            }
            Mutation::Delete(i, n) if !b.is_empty() => {
                let p = i % b.len();
                let e = (p + n).min(b.len());
                b.drain(p..e);
            }
            Mutation::Truncate(i) => {
                let p = at(*i, b.len());
                b.truncate(p);
            }
            _ => {}
        }
    }
    b
}

/// Runs `check` on `CASES` mutations of `seed`, then says how many came back `Ok`.
fn fuzz(name: &str, seed: &[u8], check: impl Fn(&[u8]) -> Result<bool, TestCaseError>) {
    let ok = std::cell::Cell::new(0u32);
    runner()
        .run(&mutations(), |muts| {
            let input = mutate(seed, &muts);
            if check(&input)? {
                ok.set(ok.get() + 1);
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!(
        "{name}: {CASES} mutated inputs, {} accepted, the rest clean errors",
        ok.get()
    );
    // The seed itself is valid: the property is not vacuous.
    assert!(
        check(seed).expect("the unmutated seed passes"),
        "{name}: seed rejected"
    );
}

/// The error's message names `source`.
fn names(e: &volttrain::Error, source: &Path) -> Result<(), TestCaseError> {
    let s = e.to_string();
    prop_assert!(
        s.contains(&source.display().to_string()),
        "error does not name {}: {s}",
        source.display()
    );
    Ok(())
}

#[test]
fn config_reader() {
    let file = root().join("config/sft.yaml");
    let seed = std::fs::read(&file).unwrap();
    fuzz("config/sft.yaml", &seed, |bytes| {
        let text = String::from_utf8_lossy(bytes);
        match SftConfig::from_yaml_str(&text, Some(&file), &[]) {
            Ok(c) => {
                // what the reader accepted also serializes and reads back
                let y = c
                    .to_yaml()
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let back = SftConfig::from_yaml_str(&y, Some(&file), &[])
                    .map_err(|e| TestCaseError::fail(format!("round trip: {e}\n{y}")))?;
                prop_assert_eq!(back, c);
                Ok(true)
            }
            Err(e) => names(&e, &file).map(|_| false),
        }
    });
    // `--set key=value` overrides, mutated the same way
    let seed = b"training.lr=1e-3";
    let text = std::fs::read_to_string(&file).unwrap();
    fuzz("--set overrides", seed, |bytes| {
        let set = String::from_utf8_lossy(bytes).into_owned();
        match SftConfig::from_yaml_str(&text, Some(&file), &[set]) {
            Ok(_) => Ok(true),
            Err(e) => names(&e, &file).map(|_| false),
        }
    });
}

fn eval_lines(n: usize) -> String {
    let t = std::fs::read_to_string(root().join("assets/data/eval.jsonl")).unwrap();
    t.lines().take(n).collect::<Vec<_>>().join("\n") + "\n"
}

#[test]
fn jsonl_and_json_records() {
    let path = PathBuf::from("/data/train.jsonl");
    let seed = format!(
        "{}{}\n{}\n",
        eval_lines(2),
        r#"{"prompt": "2+2?", "completion": " 4"}"#,
        r#"{"text": "plain text"}"#
    );
    fuzz("jsonl records", seed.as_bytes(), |bytes| {
        let text = String::from_utf8_lossy(bytes);
        let out = read_jsonl(&path, &text);
        for e in &out.errors {
            names(e, &path)?;
        }
        Ok(out.errors.is_empty())
    });

    let path = PathBuf::from("/data/train.json");
    let items: Vec<serde_json::Value> = seed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seed = serde_json::to_string_pretty(&items).unwrap();
    fuzz("json array records", seed.as_bytes(), |bytes| {
        let text = String::from_utf8_lossy(bytes);
        match read_json_array(&path, &text) {
            Ok(out) => {
                for e in &out.errors {
                    names(e, &path)?;
                }
                Ok(out.errors.is_empty())
            }
            Err(e) => names(&e, &path).map(|_| false),
        }
    });
}

/// A Parquet file with `prompt` and `completion` string columns, written with the `parquet`
/// crate (uncompressed or Snappy).
fn parquet_seed(snappy: bool) -> Vec<u8> {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use std::sync::Arc;

    let schema = Arc::new(
        parse_message_type(
            "message schema { REQUIRED BYTE_ARRAY prompt (UTF8); OPTIONAL BYTE_ARRAY completion (UTF8); }",
        )
        .unwrap(),
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(if snappy {
                Compression::SNAPPY
            } else {
                Compression::UNCOMPRESSED
            })
            .build(),
    );
    let mut buf = Vec::new();
    let mut w = SerializedFileWriter::new(&mut buf, schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let prompts: Vec<ByteArray> = ["2+2?", "Capital of France?", "Say hi"]
        .iter()
        .map(|s| ByteArray::from(*s))
        .collect();
    let completions: Vec<ByteArray> = [" 4", " Paris", " hi"]
        .iter()
        .map(|s| ByteArray::from(*s))
        .collect();
    for (i, vals) in [prompts, completions].into_iter().enumerate() {
        let mut col = rg.next_column().unwrap().unwrap();
        let defs = [1i16, 1, 1];
        col.typed::<ByteArrayType>()
            .write_batch(&vals, (i == 1).then_some(&defs[..]), None)
            .unwrap();
        col.close().unwrap();
    }
    rg.close().unwrap();
    w.close().unwrap();
    buf
}

#[test]
fn parquet_records() {
    let path = PathBuf::from("/data/train.parquet");
    for snappy in [false, true] {
        let seed = parquet_seed(snappy);
        let name = if snappy {
            "parquet (snappy)"
        } else {
            "parquet"
        };
        fuzz(
            name,
            &seed,
            |bytes| match volttrain::data::parquet::read_parquet(&path, bytes.to_vec()) {
                Ok(out) => {
                    for e in &out.errors {
                        names(e, &path)?;
                    }
                    Ok(out.errors.is_empty() && !out.records.is_empty())
                }
                Err(e) => names(&e, &path).map(|_| false),
            },
        );
    }
}

#[test]
fn safetensors_headers() {
    use volttrain::model::safetensors::{SafetensorsFile, to_safetensors_bytes};
    let tensors = vec![
        (
            "model.layers.0.mlp.up_proj.weight".to_string(),
            tch::Tensor::arange(12, (tch::Kind::Float, tch::Device::Cpu)).view([3, 4]),
        ),
        (
            "model.norm.weight".to_string(),
            tch::Tensor::ones([4], (tch::Kind::BFloat16, tch::Device::Cpu)),
        ),
    ];
    let seed = to_safetensors_bytes(&tensors, None).unwrap();
    let n = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    // Mutations go to the 8-byte length and the JSON header; the data stays as it was.
    let (head, data) = seed.split_at(8 + n);
    fuzz("safetensors header", head, |bytes| {
        let mut file = bytes.to_vec();
        file.extend_from_slice(data);
        std::fs::write(&path, &file).unwrap();
        match SafetensorsFile::open(&path) {
            Ok(f) => {
                let names: Vec<String> = f.names().map(String::from).collect();
                let mut all = true;
                for t in &names {
                    match f.tensor(t, None, tch::Device::Cpu) {
                        Ok(_) => {}
                        Err(e) => {
                            self::names(&e, &path)?;
                            all = false;
                        }
                    }
                }
                Ok(all)
            }
            Err(e) => names(&e, &path).map(|_| false),
        }
    });
}

#[test]
fn adapter_config_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adapter_config.json");
    let seed = serde_json::to_vec_pretty(&serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": null,
        "bias": "none",
        "use_rslora": false,
        "use_dora": false,
        "fan_in_fan_out": false,
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": "tiny-llama",
    }))
    .unwrap();
    fuzz("adapter_config.json", &seed, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        match volttrain::adapter::read_peft_config(dir.path()) {
            Ok(_) => Ok(true),
            Err(e) => names(&e, &path).map(|_| false),
        }
    });
}

#[test]
fn trainer_state_json() {
    use volttrain::trainer::{TrainState, load_resume_checkpoint};
    let dir = tempfile::tempdir().unwrap();
    let last = volttrain::trainer::last_dir(dir.path());
    std::fs::create_dir_all(&last).unwrap();
    let w = vec![(
        "a.lora_A.weight".to_string(),
        tch::Tensor::from_slice(&[1f32, 2., 3.]),
    )];
    tch::Tensor::write_safetensors(&w, last.join("trainable.safetensors")).unwrap();
    std::fs::write(
        last.join("optimizer.json"),
        b"{\"a.lora_A.weight.step\": 3.0}",
    )
    .unwrap();
    let state = TrainState {
        step: 3,
        epoch: 1,
        batch_in_epoch: 2,
        label_tokens: 100,
        input_tokens: 300,
        skipped_steps: 0,
        seed: 7,
        world_size: 1,
        // Present, so the mutations reach the fp16 loss scaler's fields too.
        loss_scaler: Some(volttrain::amp::LossScalerState {
            scale: 65536.0,
            growth_tracker: 12,
        }),
    };
    let seed = serde_json::to_vec_pretty(&state).unwrap();
    let path = last.join("trainer_state.json");
    fuzz("trainer_state.json", &seed, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        match load_resume_checkpoint(dir.path()) {
            Ok(l) => {
                prop_assert_eq!(l.trainable.len(), 1);
                Ok(true)
            }
            Err(e) => names(&e, &path).map(|_| false),
        }
    });
}
