//! Chat template and tokenizer parity with transformers' `apply_chat_template`, run live through
//! `reference/data_ref.py` on the bundled tokenizer and on a second fixture tokenizer.

use std::path::{Path, PathBuf};
use std::process::Command;

use volttrain::data::{Message, Tokenizer};

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

fn m(role: &str, content: &str) -> Message {
    Message::new(role, content)
}

fn cases() -> Vec<(Vec<Message>, bool)> {
    vec![
        (
            vec![m("user", "What is 2 + 3?"), m("assistant", "2 + 3 = 5.")],
            false,
        ),
        (
            vec![
                m("system", "You are VoltBot, a friendly tutor."),
                m("user", "Reverse the words: red fox owl"),
                m("assistant", "owl fox red"),
                m("user", "  Convert 3 km to meters.\n"),
                m("assistant", "3 km is 3000 meters."),
                m("user", "What is the capital of Zorvania?"),
            ],
            true,
        ),
        (
            vec![
                m("system", "Answer briefly."),
                m("user", "héllo wörld — ünïcode ✓ \"quotes\" <b>tags</b>"),
                m("assistant", "  spaced answer  "),
            ],
            false,
        ),
        (vec![m("user", "Uppercase this: cat dog")], true),
        // bad role order: the Llama-2 template raises, ChatML renders
        (
            vec![m("user", "a"), m("user", "b"), m("assistant", "c")],
            false,
        ),
    ]
}

fn check_parity(dir: &Path) {
    check_parity_with(dir, None);
}

fn check_parity_with(dir: &Path, template: Option<&Path>) {
    let mut tok = Tokenizer::from_dir(dir).unwrap();
    if let Some(t) = template {
        tok.set_chat_template(&std::fs::read_to_string(t).unwrap(), t)
            .unwrap();
    }
    let cases = cases();
    let json: Vec<serde_json::Value> = cases
        .iter()
        .map(|(msgs, g)| serde_json::json!({"messages": msgs, "add_generation_prompt": g}))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("cases.json");
    std::fs::write(&input, serde_json::to_string(&json).unwrap()).unwrap();
    let mut args = vec![
        "chat",
        "--tok",
        dir.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ];
    if let Some(t) = template {
        args.extend(["--template", t.to_str().unwrap()]);
    }
    let reference = data_ref(&args);
    let reference = reference.as_array().unwrap();
    assert_eq!(reference.len(), cases.len());
    let mut n_ok = 0;
    for (i, ((msgs, gen_prompt), r)) in cases.iter().zip(reference).enumerate() {
        let ours = tok.apply_chat_template(msgs, *gen_prompt);
        if let Some(err) = r.get("error") {
            let e = ours.expect_err(&format!("case {i}: transformers raised {err}, we rendered"));
            let err = err.as_str().unwrap();
            assert!(
                e.to_string().contains(err),
                "case {i}: error {e} lacks transformers' message {err:?}"
            );
            continue;
        }
        let text = ours.unwrap_or_else(|e| panic!("case {i}: {e}"));
        assert_eq!(text, r["text"].as_str().unwrap(), "case {i}: rendered text");
        let ids: Vec<u32> = r["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tok.chat_ids(msgs, *gen_prompt).unwrap(),
            ids,
            "case {i}: ids"
        );
        n_ok += 1;
    }
    assert!(n_ok >= 4, "only {n_ok} cases compared");
}

#[test]
fn chatml_asset_tokenizer_matches_transformers() {
    check_parity(&root().join("assets/tiny-llama"));
}

#[test]
fn llama2_fixture_tokenizer_matches_transformers() {
    check_parity(&root().join("tests/fixtures/data/llama2-tok"));
}

/// A template using namespace(), loop variables, filtered loops, slicing, `in`, `~`, string
/// methods, dict literals, `tojson` (with indent), `.items()`, `selectattr`/`map`, and printing
/// lists, floats, booleans and none the way Python's Jinja does.
#[test]
fn stress_template_matches_transformers() {
    check_parity_with(
        &root().join("assets/tiny-llama"),
        Some(&root().join("tests/fixtures/data/stress.jinja")),
    );
}

#[test]
fn special_tokens_and_pad_fallback() {
    let t = Tokenizer::from_dir(root().join("assets/tiny-llama")).unwrap();
    assert_eq!(t.bos().unwrap().content, "<|startoftext|>");
    assert_eq!(t.eos().unwrap().content, "<|endoftext|>");
    assert_eq!(t.pad().unwrap().content, "<|pad|>");
    assert!(!t.pad_is_eos_fallback());
    assert!(
        t.chat_template()
            .unwrap()
            .origin()
            .ends_with("chat_template.jinja")
    );
    // The fixture has no pad token (bos given as an AddedToken dict): pad falls back to eos.
    let t = Tokenizer::from_dir(root().join("tests/fixtures/data/llama2-tok")).unwrap();
    assert_eq!(t.bos().unwrap().content, "<s>");
    assert_eq!(t.pad(), t.eos());
    assert!(t.pad_is_eos_fallback());
    assert!(
        t.chat_template()
            .unwrap()
            .origin()
            .ends_with("tokenizer_config.json")
    );
}

#[test]
fn save_to_round_trips_and_transformers_loads_it() {
    let mut t = Tokenizer::from_dir(root().join("tests/fixtures/data/llama2-tok")).unwrap();
    let custom =
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}\n{% endfor %}";
    t.set_chat_template(custom, "custom").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    t.save_to(tmp.path()).unwrap();
    let back = Tokenizer::from_dir(tmp.path()).unwrap();
    let msgs = vec![m("user", "hi"), m("assistant", "hello")];
    assert_eq!(
        back.apply_chat_template(&msgs, false).unwrap(),
        t.apply_chat_template(&msgs, false).unwrap()
    );
    // transformers reads the saved directory (chat_template.jinja wins over the config's).
    let json = serde_json::json!([{"messages": msgs, "add_generation_prompt": false}]);
    let input = tmp.path().join("cases.json");
    std::fs::write(&input, json.to_string()).unwrap();
    let r = data_ref(&[
        "chat",
        "--tok",
        tmp.path().to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert_eq!(
        r[0]["text"].as_str().unwrap(),
        "<user>hi</s>\n<assistant>hello</s>\n"
    );
    assert_eq!(
        back.apply_chat_template(&msgs, false).unwrap(),
        r[0]["text"].as_str().unwrap()
    );
}

#[test]
fn missing_and_broken_tokenizer_files_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let e = Tokenizer::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    std::fs::copy(
        root().join("assets/tiny-llama/tokenizer.json"),
        tmp.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        r#"{"eos_token": "<|nope|>"}"#,
    )
    .unwrap();
    let e = Tokenizer::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("eos_token") && e.contains("<|nope|>"), "{e}");
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        r#"{"eos_token": "<|endoftext|>", "chat_template": "{% for m in messages %}"}"#,
    )
    .unwrap();
    let e = Tokenizer::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("does not compile"), "{e}");
}

#[test]
fn strftime_matches_python() {
    let fmt = "%Y-%m-%d %H:%M:%S %y %e %I %p %j %a %A %b %B %h %% %d %b %Y";
    let stamps = [
        0i64,
        951_782_400,
        1_709_210_096,
        1_735_689_599,
        4_102_444_800,
        1_000_000_000,
    ];
    let code = format!(
        "import json, datetime as d; print(json.dumps([d.datetime.fromtimestamp(t, \
         d.timezone.utc).strftime({fmt:?}) for t in {stamps:?}]))"
    );
    let out = Command::new(python()).args(["-c", &code]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    for (t, w) in stamps.iter().zip(want) {
        assert_eq!(volttrain::data::template::strftime(*t, fmt), w, "t = {t}");
    }
}

#[test]
fn dataset_config_custom_template_inline_file_and_chatml() {
    use volttrain::data::DatasetConfig;
    let dir = root().join("tests/fixtures/data/llama2-tok");
    let msgs = vec![m("user", "hi"), m("assistant", "yo")];
    let mut c = DatasetConfig::new("x.jsonl");
    // inline text
    c.chat_template =
        Some("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}".into());
    let mut t = Tokenizer::from_dir(&dir).unwrap();
    c.apply_chat_template(&mut t).unwrap();
    assert_eq!(
        t.apply_chat_template(&msgs, false).unwrap(),
        "[user]hi[assistant]yo"
    );
    // a file: the stress template, checked against transformers elsewhere
    let f = root().join("tests/fixtures/data/stress.jinja");
    c.chat_template = Some(f.to_str().unwrap().into());
    let mut t = Tokenizer::from_dir(&dir).unwrap();
    c.apply_chat_template(&mut t).unwrap();
    assert_eq!(
        t.chat_template().unwrap().source(),
        std::fs::read_to_string(&f).unwrap()
    );
    // built-in ChatML equals the asset tokenizer's template output
    c.chat_template = Some("chatml".into());
    let mut t = Tokenizer::from_dir(root().join("assets/tiny-llama")).unwrap();
    let want = t.apply_chat_template(&msgs, true).unwrap();
    c.apply_chat_template(&mut t).unwrap();
    assert_eq!(t.apply_chat_template(&msgs, true).unwrap(), want);
    // a missing file names it
    c.chat_template = Some("/no/such/template.jinja".into());
    let e = c.apply_chat_template(&mut t).unwrap_err().to_string();
    assert!(e.contains("/no/such/template.jinja"), "{e}");
}
