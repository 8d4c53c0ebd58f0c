//! SFT datasets: ids and labels against a transformers reference (`reference/data_ref.py sft`),
//! bad input with file:line, skip_invalid counting, the cache, JSON arrays and Parquet.

use std::path::{Path, PathBuf};
use std::process::Command;

use volttrain::Error;
use volttrain::data::{DatasetConfig, Example, IGNORE_INDEX, SftDataset, Tokenizer};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> String {
    std::env::var("VOLTTRAIN_PYTHON_REF").unwrap_or_else(|_| "python3".into())
}

fn data_ref(args: &[&str]) -> serde_json::Value {
    let out = Command::new(python())
        .arg(root().join("reference/data_ref.py"))
        .args(args)
        .output()
        .expect("run reference/data_ref.py");
    assert!(
        out.status.success(),
        "data_ref.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(s.lines().last().unwrap()).unwrap()
}

fn asset_tok() -> Tokenizer {
    Tokenizer::from_dir(root().join("assets/tiny-llama")).unwrap()
}

fn cfg(path: &Path) -> DatasetConfig {
    DatasetConfig {
        cache: false,
        ..DatasetConfig::new(path)
    }
}

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn check_against_reference(tok_dir: &Path, data: &Path, all: bool, max_len: usize) {
    let tok = Tokenizer::from_dir(tok_dir).unwrap();
    let c = DatasetConfig {
        train_on_all_tokens: all,
        max_seq_len: max_len,
        ..cfg(data)
    };
    let ds = SftDataset::load(&c, &tok).unwrap();
    let ml = max_len.to_string();
    let mut args = vec![
        "sft",
        "--tok",
        tok_dir.to_str().unwrap(),
        "--input",
        data.to_str().unwrap(),
        "--max-len",
        &ml,
    ];
    if all {
        args.push("--all");
    }
    let r = data_ref(&args);
    let r = r.as_array().unwrap();
    assert_eq!(ds.len(), r.len());
    let mut labelled = 0;
    let mut masked = 0;
    for (i, (ex, want)) in ds.examples.iter().zip(r).enumerate() {
        assert_eq!(
            ex.input_ids,
            ids(&want["input_ids"]),
            "example {i} input_ids"
        );
        assert_eq!(ex.labels, ids(&want["labels"]), "example {i} labels");
        labelled += ex.num_label_tokens();
        masked += ex.len() - ex.num_label_tokens();
    }
    assert!(labelled > 0);
    if !all {
        assert!(masked > 0, "assistant-only mode masked nothing");
    } else {
        assert_eq!(masked, 0);
    }
}

#[test]
fn assistant_only_labels_match_reference_chatml() {
    let data = root().join("tests/fixtures/data/mixed.jsonl");
    check_against_reference(&root().join("assets/tiny-llama"), &data, false, 4096);
}

#[test]
fn assistant_only_labels_match_reference_llama2() {
    let data = root().join("tests/fixtures/data/mixed.jsonl");
    check_against_reference(
        &root().join("tests/fixtures/data/llama2-tok"),
        &data,
        false,
        4096,
    );
}

#[test]
fn all_token_labels_and_truncation_match_reference() {
    let data = root().join("tests/fixtures/data/mixed.jsonl");
    check_against_reference(&root().join("assets/tiny-llama"), &data, true, 4096);
    check_against_reference(&root().join("assets/tiny-llama"), &data, false, 24);
}

#[test]
fn bundled_train_set_matches_reference() {
    check_against_reference(
        &root().join("assets/tiny-llama"),
        &root().join("assets/data/eval.jsonl"),
        false,
        512,
    );
}

#[test]
fn eos_is_appended_once_and_labelled() {
    let tok = asset_tok();
    let eos = tok.eos().unwrap().id as i64;
    let ds = SftDataset::load(&cfg(&root().join("tests/fixtures/data/mixed.jsonl")), &tok).unwrap();
    for (i, e) in ds.examples.iter().enumerate() {
        assert_eq!(*e.input_ids.last().unwrap(), eos, "example {i}");
        assert_eq!(e.input_ids.iter().filter(|&&t| t == eos).count(), 1);
    }
    // The conversation that ends with a user turn: its EOS carries no label.
    assert_eq!(*ds.examples[3].labels.last().unwrap(), IGNORE_INDEX);
    assert_eq!(*ds.examples[0].labels.last().unwrap(), eos);
    // Llama-2 template already ends assistant turns with </s>: nothing appended.
    let t2 = Tokenizer::from_dir(root().join("tests/fixtures/data/llama2-tok")).unwrap();
    let ds2 = SftDataset::load(&cfg(&root().join("tests/fixtures/data/mixed.jsonl")), &t2).unwrap();
    let text = t2
        .decode(
            &ds2.examples[0]
                .input_ids
                .iter()
                .map(|&x| x as u32)
                .collect::<Vec<_>>(),
            false,
        )
        .unwrap();
    assert!(
        text.ends_with("</s>") && !text.ends_with("</s></s>"),
        "{text}"
    );
}

/// Writes `lines` to a JSONL file and loads it; returns the error text.
fn load_err(lines: &[&str], skip: bool) -> (Result<SftDataset, Error>, PathBuf, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    let c = DatasetConfig {
        skip_invalid: skip,
        ..cfg(&p)
    };
    (SftDataset::load(&c, &asset_tok()), p, tmp)
}

const GOOD: &str = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;

#[test]
fn bad_records_name_file_line_and_problem() {
    let cases: [(&str, &str); 7] = [
        (
            r#"{"messages": [{"role": "user", "content": "hi"}"#,
            "malformed JSON",
        ),
        (
            r#"{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}"#,
            "unknown role \"wizard\"",
        ),
        (r#"{"messages": []}"#, "empty conversation"),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
            "no assistant turn",
        ),
        (
            r#"{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}"#,
            "must be a string, found a number",
        ),
        (r#"{"prompt": "only a prompt"}"#, "no `completion`"),
        (r#"{"title": "x"}"#, "none of `messages`"),
    ];
    for (bad, want) in cases {
        let (r, p, _tmp) = load_err(&[GOOD, "", GOOD, bad, GOOD], false);
        let e = r.expect_err(bad);
        match &e {
            Error::Data { path, line, msg } => {
                assert_eq!(path, &p);
                assert_eq!(*line, 4, "{e}");
                assert!(msg.contains(want), "{e} lacks {want:?}");
            }
            other => panic!("expected a data error, got {other}"),
        }
        assert!(
            e.to_string().starts_with(&format!("{}:4: ", p.display())),
            "{e}"
        );
    }
}

#[test]
fn template_raise_exception_is_a_record_error() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("d.jsonl");
    let bad = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}"#;
    std::fs::write(&p, format!("{GOOD}\n{bad}\n")).unwrap();
    let t2 = Tokenizer::from_dir(root().join("tests/fixtures/data/llama2-tok")).unwrap();
    let e = SftDataset::load(&cfg(&p), &t2).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{}:2: ", p.display())) && e.contains("must alternate"),
        "{e}"
    );
}

#[test]
fn skip_invalid_skips_counts_and_reports() {
    let (r, p, _tmp) = load_err(
        &[
            GOOD,
            "{not json",
            GOOD,
            r#"{"messages": []}"#,
            r#"{"text": 5}"#,
            GOOD,
        ],
        true,
    );
    let ds = r.unwrap();
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.skipped.len(), 3);
    assert!(ds.skipped[0].starts_with(&format!("{}:2:", p.display())));
    assert!(ds.skipped[1].contains(":4:") && ds.skipped[2].contains(":5:"));
    // Without skip_invalid the first error is reported with the count of the others.
    let (r, _p, _tmp) = load_err(&[GOOD, "{not json", r#"{"messages": []}"#], false);
    let e = r.unwrap_err().to_string();
    assert!(e.contains(":2:") && e.contains("1 more bad records"), "{e}");
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let e =
        SftDataset::load(&cfg(Path::new("/nonexistent/train.jsonl")), &asset_tok()).unwrap_err();
    assert!(matches!(e, Error::Io { .. }));
    assert!(e.to_string().contains("/nonexistent/train.jsonl"));
}

#[test]
fn json_array_matches_jsonl_and_reports_lines() {
    let tok = asset_tok();
    let jsonl = root().join("tests/fixtures/data/mixed.jsonl");
    let a = SftDataset::load(&cfg(&jsonl), &tok).unwrap();
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("d.json");
    std::fs::write(&p, serde_json::to_string_pretty(&records).unwrap()).unwrap();
    let b = SftDataset::load(&cfg(&p), &tok).unwrap();
    assert_eq!(a.examples, b.examples);
    // A bad element reports the line it starts on.
    std::fs::write(&p, "[\n  {\"text\": \"ok\"},\n\n  {\"messages\": []}\n]").unwrap();
    let e = SftDataset::load(&cfg(&p), &tok).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}:4:", p.display())), "{e}");
}

#[test]
fn cache_hit_on_second_load_and_miss_when_inputs_change() {
    let tok = asset_tok();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("d.jsonl");
    std::fs::copy(root().join("tests/fixtures/data/mixed.jsonl"), &p).unwrap();
    let c = DatasetConfig {
        cache: true,
        cache_dir: Some(tmp.path().join("cache")),
        ..DatasetConfig::new(&p)
    };
    let first = SftDataset::load(&c, &tok).unwrap();
    assert!(!first.from_cache);
    let second = SftDataset::load(&c, &tok).unwrap();
    assert!(second.from_cache);
    assert_eq!(first.examples, second.examples);
    assert_eq!(
        std::fs::read_dir(tmp.path().join("cache")).unwrap().count(),
        1
    );
    // Another option, another template or another file content: a miss.
    let all = DatasetConfig {
        train_on_all_tokens: true,
        ..c.clone()
    };
    assert!(!SftDataset::load(&all, &tok).unwrap().from_cache);
    let mut tok2 = asset_tok();
    tok2.set_chat_template(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
        "t",
    )
    .unwrap();
    assert!(!SftDataset::load(&c, &tok2).unwrap().from_cache);
    std::fs::write(&p, format!("{GOOD}\n")).unwrap();
    let changed = SftDataset::load(&c, &tok).unwrap();
    assert!(!changed.from_cache);
    assert_eq!(changed.len(), 1);
    // A corrupt cache file is a miss, not an error.
    for f in std::fs::read_dir(tmp.path().join("cache")).unwrap() {
        std::fs::write(f.unwrap().path(), b"garbage").unwrap();
    }
    assert!(!SftDataset::load(&c, &tok).unwrap().from_cache);
}

#[test]
fn skipped_count_survives_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("d.jsonl");
    std::fs::write(&p, format!("{GOOD}\n{{bad\n{GOOD}\n")).unwrap();
    let c = DatasetConfig {
        skip_invalid: true,
        cache_dir: Some(tmp.path().join("cache")),
        ..DatasetConfig::new(&p)
    };
    let a = SftDataset::load(&c, &asset_tok()).unwrap();
    let b = SftDataset::load(&c, &asset_tok()).unwrap();
    assert!(b.from_cache);
    assert_eq!(a.skipped, b.skipped);
    assert_eq!(b.skipped.len(), 1);
}

#[test]
fn parquet_matches_jsonl_and_wrong_type_names_row() {
    let tok = asset_tok();
    let jsonl = root().join("assets/data/eval.jsonl");
    let tmp = tempfile::tempdir().unwrap();
    let pq = tmp.path().join("eval.parquet");
    let r = data_ref(&[
        "parquet",
        "--input",
        jsonl.to_str().unwrap(),
        "--out",
        pq.to_str().unwrap(),
    ]);
    assert!(r["schema"].as_str().unwrap().contains("messages"));
    let a = SftDataset::load(&cfg(&jsonl), &tok).unwrap();
    let b = SftDataset::load(&cfg(&pq), &tok).unwrap();
    assert_eq!(a.len(), b.len());
    assert_eq!(a.examples, b.examples);

    let bad = tmp.path().join("bad.parquet");
    data_ref(&[
        "parquet",
        "--input",
        jsonl.to_str().unwrap(),
        "--out",
        bad.to_str().unwrap(),
        "--messages-as-string",
    ]);
    let e = SftDataset::load(&cfg(&bad), &tok).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{}:1:", bad.display()))
            && e.contains("row 1")
            && e.contains("`messages` must be a list"),
        "{e}"
    );
    // Uncompressed reads the same; an unsupported codec stops at row 1 with a clear message.
    for (codec, ok) in [("none", true), ("zstd", false)] {
        let f = tmp.path().join(format!("{codec}.parquet"));
        data_ref(&[
            "parquet",
            "--input",
            jsonl.to_str().unwrap(),
            "--out",
            f.to_str().unwrap(),
            "--compression",
            codec,
        ]);
        let skip = DatasetConfig {
            skip_invalid: true,
            ..cfg(&f)
        };
        match SftDataset::load(&skip, &tok) {
            Ok(d) => {
                assert!(ok, "{codec} should fail");
                assert_eq!(d.examples, a.examples);
            }
            Err(e) => {
                assert!(!ok, "{codec}: {e}");
                let e = e.to_string();
                assert!(e.contains(":1:") && e.contains("cannot decode"), "{e}");
            }
        }
    }
    // Not Parquet at all.
    let junk = tmp.path().join("junk.parquet");
    std::fs::write(&junk, b"not parquet").unwrap();
    let e = SftDataset::load(&cfg(&junk), &tok).unwrap_err().to_string();
    assert!(e.contains("not a readable Parquet file"), "{e}");
}

#[test]
fn config_rejects_unknown_keys_and_guesses_format() {
    let y = "path: a.jsonl\nmax_seq_len: 128\nbogus: 1\n";
    let e = serde_yaml::from_str::<DatasetConfig>(y)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bogus"), "{e}");
    let c: DatasetConfig =
        serde_yaml::from_str("path: a.parquet\ntrain_on_all_tokens: true\n").unwrap();
    assert_eq!(
        c.format_of(&c.path).unwrap(),
        volttrain::data::DataFormat::Parquet
    );
    assert!(c.train_on_all_tokens && c.cache && !c.packing && c.max_seq_len == 1024);
    let c = DatasetConfig::new("a.txt");
    assert!(
        c.format_of(&c.path)
            .unwrap_err()
            .to_string()
            .contains("type")
    );
}

#[test]
fn truncation_keeps_the_first_tokens() {
    let tok = asset_tok();
    let p = root().join("tests/fixtures/data/mixed.jsonl");
    let full = SftDataset::load(&cfg(&p), &tok).unwrap();
    let c = DatasetConfig {
        max_seq_len: 10,
        ..cfg(&p)
    };
    let cut = SftDataset::load(&c, &tok).unwrap();
    for (a, b) in full.examples.iter().zip(&cut.examples) {
        let n = a.len().min(10);
        assert_eq!(
            b,
            &Example {
                input_ids: a.input_ids[..n].to_vec(),
                labels: a.labels[..n].to_vec()
            }
        );
    }
    assert!(cut.truncated > 0);
}

#[test]
fn conversational_prompt_completion_labels_only_the_completion() {
    let tok = asset_tok();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("pc.jsonl");
    let rec = serde_json::json!({
        "prompt": [
            {"role": "user", "content": "What is 1 + 1?"},
            {"role": "assistant", "content": "1 + 1 = 2."},
            {"role": "user", "content": "And 2 + 2?"}
        ],
        "completion": [{"role": "assistant", "content": "2 + 2 = 4."}]
    });
    std::fs::write(&p, format!("{rec}\n")).unwrap();
    let ds = SftDataset::load(&cfg(&p), &tok).unwrap();
    let e = &ds.examples[0];
    let labelled: Vec<u32> = e
        .labels
        .iter()
        .filter(|&&l| l != IGNORE_INDEX)
        .map(|&l| l as u32)
        .collect();
    // The completion turn as the template renders it, then the appended EOS.
    let want = tok.decode(&labelled, false).unwrap();
    assert_eq!(want, "2 + 2 = 4.<|im_end|>\n<|endoftext|>");
    // The same conversation as `messages` labels both assistant turns.
    let msgs = serde_json::json!({"messages": [
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "1 + 1 = 2."},
        {"role": "user", "content": "And 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."}
    ]});
    std::fs::write(&p, format!("{msgs}\n")).unwrap();
    let ds2 = SftDataset::load(&cfg(&p), &tok).unwrap();
    assert_eq!(ds2.examples[0].input_ids, e.input_ids);
    assert!(ds2.examples[0].num_label_tokens() > e.num_label_tokens());
}
