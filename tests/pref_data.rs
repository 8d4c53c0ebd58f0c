//! Preference data: bad pairs get a `file:line` error, or are counted and skipped under
//! `skip_invalid`; the bundled pairs and config load and run through `volttrain dpo`.

use std::path::PathBuf;
use std::process::Command;

use volttrain::Error;
use volttrain::config::SftConfig;
use volttrain::data::{DatasetConfig, PreferenceDataset, Tokenizer};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tok() -> Tokenizer {
    Tokenizer::from_dir(root().join("assets/tiny-llama")).unwrap()
}

fn load(
    lines: &[&str],
    max_seq_len: usize,
    skip: bool,
) -> (volttrain::Result<PreferenceDataset>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pairs.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    let cfg = DatasetConfig {
        max_seq_len,
        skip_invalid: skip,
        cache: false,
        ..DatasetConfig::new(&path)
    };
    (PreferenceDataset::load(&cfg, &tok()), dir)
}

const GOOD: &str = r#"{"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"}"#;
const GOOD_CHAT: &str = r#"{"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}"#;
const NO_REJECTED: &str = r#"{"prompt": "Q: 3+3?\nA:", "chosen": " 6"}"#;
const SAME: &str = r#"{"prompt": "Q: 1+1?\nA:", "chosen": " 2", "rejected": " 2"}"#;
const MIXED: &str =
    r#"{"prompt": "Q", "chosen": [{"role": "assistant", "content": "4"}], "rejected": " 5"}"#;

fn data_err(e: Error) -> (usize, String) {
    match e {
        Error::Data { line, msg, path } => {
            assert!(path.ends_with("pairs.jsonl"), "{path:?}");
            (line, msg)
        }
        other => panic!("expected a data error, got {other}"),
    }
}

#[test]
fn missing_rejected_names_file_and_line() {
    let (r, _d) = load(&[GOOD, GOOD_CHAT, NO_REJECTED], 64, false);
    let (line, msg) = data_err(r.unwrap_err());
    assert_eq!(line, 3);
    assert!(msg.contains("no `rejected`"), "{msg}");
}

#[test]
fn identical_chosen_and_rejected_is_an_error() {
    let (r, _d) = load(&[SAME, GOOD], 64, false);
    let (line, msg) = data_err(r.unwrap_err());
    assert_eq!(line, 1);
    assert!(msg.contains("identical"), "{msg}");
}

#[test]
fn prompt_longer_than_max_seq_len_is_an_error() {
    let long = format!(
        r#"{{"prompt": "{}", "chosen": " yes", "rejected": " no"}}"#,
        "word ".repeat(40)
    );
    let (r, _d) = load(&[GOOD, &long], 16, false);
    let (line, msg) = data_err(r.unwrap_err());
    assert_eq!(line, 2);
    assert!(msg.contains("max_seq_len (16)"), "{msg}");
}

#[test]
fn skip_invalid_counts_every_bad_pair() {
    let long = format!(
        r#"{{"prompt": "{}", "chosen": " yes", "rejected": " no"}}"#,
        "word ".repeat(40)
    );
    let (r, _d) = load(
        &[GOOD, NO_REJECTED, SAME, &long, MIXED, GOOD_CHAT],
        16,
        true,
    );
    let ds = r.unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.skipped.len(), 4, "{:?}", ds.skipped);
    for (s, line) in ds.skipped.iter().zip([2, 3, 4, 5]) {
        assert!(s.contains(&format!("pairs.jsonl:{line}")), "{s}");
    }
    // Without skip_invalid the first of the four stops the load and the others are counted.
    let (r, _d) = load(
        &[GOOD, NO_REJECTED, SAME, &long, MIXED, GOOD_CHAT],
        16,
        false,
    );
    let (line, msg) = data_err(r.unwrap_err());
    assert_eq!(line, 2);
    assert!(msg.contains("3 more bad records"), "{msg}");
}

#[test]
fn string_pairs_get_eos_and_share_the_prompt() {
    let (r, _d) = load(&[GOOD], 64, false);
    let ds = r.unwrap();
    let t = tok();
    let eos = t.eos().unwrap().id as i64;
    let p = &ds.pairs[0];
    assert_eq!(*p.chosen.last().unwrap(), eos);
    assert_eq!(*p.rejected.last().unwrap(), eos);
    let row = p.chosen_row(64);
    assert_eq!(row.input_ids.len(), p.prompt.len() + p.chosen.len());
    assert_eq!(row.num_label_tokens(), p.chosen.len());
    // Cut at max_seq_len keeps the start.
    let cut = p.chosen_row(p.prompt.len() + 1);
    assert_eq!(cut.num_label_tokens(), 1);
}

#[test]
fn bad_preference_section_names_the_key() {
    let text = std::fs::read_to_string(root().join("config/dpo.yaml")).unwrap();
    let e = SftConfig::from_yaml_str(&text, None, &["preference.beta=0".into()]).unwrap_err();
    assert!(e.to_string().contains("preference.beta"), "{e}");
    let e = SftConfig::from_yaml_str(&text, None, &["preference.label_smoothing=0.1".into()])
        .unwrap_err();
    assert!(e.to_string().contains("preference.label_smoothing"), "{e}");
    let e =
        SftConfig::from_yaml_str(&text, None, &["preference.loss_type=kto".into()]).unwrap_err();
    assert!(e.to_string().contains("preference"), "{e}");
}

/// `volttrain dpo --config config/dpo.yaml` runs out of the box (on 4 of its pairs here: one
/// epoch of two steps), writes TRL's metric keys to metrics.jsonl (train and eval lines) and the
/// PEFT adapter of the epoch.
#[test]
fn dpo_cli_runs_the_bundled_config() {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_volttrain"))
        .current_dir(root())
        .args(["dpo", "--config", "config/dpo.yaml"])
        .arg("--set")
        .arg(format!("training.output_dir={}", out.path().display()))
        .args(["--set", "dataset.path=tests/fixtures/pref/conv.jsonl"])
        .args(["--set", "dataset.eval_path=tests/fixtures/pref/text.jsonl"])
        .args(["--set", "training.batch_size=2"])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let log = String::from_utf8_lossy(&status.stderr);
    assert!(log.contains("rewards/margins"), "progress line: {log}");
    let metrics = std::fs::read_to_string(out.path().join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for kind in ["train", "eval"] {
        let l = lines
            .iter()
            .find(|l| l["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} line in {metrics}"));
        for k in [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ] {
            assert!(l[k].is_f64(), "{kind} line has no {k}: {l}");
        }
    }
    let first = lines.iter().find(|l| l["kind"] == "train").unwrap();
    assert!((first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-7);
    assert!(out.path().join("tensorboard").exists());
    assert!(out.path().join("last").exists());
    let epoch = out.path().join("epoch-1");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
    ] {
        assert!(epoch.join(f).exists(), "{} has no {f}", epoch.display());
    }
}
