//! The chat templates of Qwen3, Gemma 2, Gemma 3, Phi-4-mini, Phi-3-mini and SmolLM3 (as the
//! models ship them, stored in `tests/fixtures/templates/`, sources in its README) render
//! byte-equal to transformers' `apply_chat_template`, Qwen3 and SmolLM3 with `enable_thinking` on
//! and off, Gemma 3 folding the system turn into the first user turn, and give the assistant-only
//! loss masks transformers + TRL's prefix rendering gives (`reference/data_ref.py`, run live
//! through `$VOLTTRAIN_PYTHON_REF`). Multi-turn Qwen3 and Phi-3 chats, which prefix rendering cannot
//! locate, get the input_ids and labels of TRL's `SFTTrainer` with `assistant_only_loss=True`.

use std::path::PathBuf;
use std::process::Command;

use volttrain::data::{DatasetConfig, Message, SftDataset, Tokenizer};

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

fn template(name: &str) -> PathBuf {
    root().join(format!("tests/fixtures/templates/{name}.jinja"))
}

fn tokenizer(name: &str, kwargs: &serde_json::Value) -> Tokenizer {
    let mut tok = Tokenizer::from_dir(root().join("assets/tiny-llama")).unwrap();
    let t = template(name);
    tok.set_chat_template(&std::fs::read_to_string(&t).unwrap(), &t)
        .unwrap();
    tok.set_chat_template_kwargs(
        kwargs
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    );
    tok
}

fn conversations() -> Vec<(Vec<Message>, bool)> {
    vec![
        (
            vec![m("user", "What is 2 + 3?"), m("assistant", "2 + 3 = 5.")],
            false,
        ),
        (vec![m("user", "What is 2 + 3?")], true),
        (
            vec![
                m("system", "You are VoltBot, a friendly tutor."),
                m("user", "Reverse the words: red fox owl"),
                m("assistant", "owl fox red"),
            ],
            false,
        ),
        (
            vec![
                m("system", "Answer briefly."),
                m("user", "  héllo wörld — ünïcode ✓ \"quotes\"\n"),
                m("assistant", "<think>\nThe user greets.\n</think>\n\nHello!"),
                m("user", "And again?"),
            ],
            true,
        ),
        (
            vec![
                m("user", "a"),
                m("assistant", "b"),
                m("user", "c"),
                m("assistant", "  d  "),
            ],
            false,
        ),
        // bad role order: the Gemma templates raise
        (vec![m("user", "a"), m("user", "b")], true),
    ]
}

/// Every (template, kwargs) pair on every conversation, in one Python run; returns the number
/// of renders compared per pair.
fn check_render(pairs: &[(&str, serde_json::Value)]) -> Vec<usize> {
    let cases = conversations();
    let mut json = Vec::new();
    for (name, kwargs) in pairs {
        for (msgs, g) in &cases {
            json.push(
                serde_json::json!({"messages": msgs, "add_generation_prompt": g,
                "template": template(name), "kwargs": kwargs}),
            );
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("cases.json");
    std::fs::write(&input, serde_json::to_string(&json).unwrap()).unwrap();
    let reference = data_ref(&[
        "chat",
        "--tok",
        root().join("assets/tiny-llama").to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    let reference = reference.as_array().unwrap();
    assert_eq!(reference.len(), pairs.len() * cases.len());
    let mut counts = Vec::new();
    for (p, (name, kwargs)) in pairs.iter().enumerate() {
        let tok = tokenizer(name, kwargs);
        let mut rendered = 0;
        for (i, (msgs, gen_prompt)) in cases.iter().enumerate() {
            let r = &reference[p * cases.len() + i];
            let ours = tok.apply_chat_template(msgs, *gen_prompt);
            if let Some(err) = r.get("error") {
                let e = ours.expect_err(&format!("{name} case {i}: transformers raised {err}"));
                assert!(
                    e.to_string().contains(err.as_str().unwrap()),
                    "{name} case {i}: {e} vs {err}"
                );
                continue;
            }
            let text = ours.unwrap_or_else(|e| panic!("{name} case {i}: {e}"));
            assert_eq!(
                text,
                r["text"].as_str().unwrap(),
                "{name} {kwargs} case {i}"
            );
            rendered += 1;
        }
        counts.push(rendered);
    }
    counts
}

#[test]
fn family_templates_render_byte_equal_to_transformers() {
    let none = serde_json::json!({});
    let pairs = [
        ("qwen3", none.clone()),
        ("qwen3", serde_json::json!({"enable_thinking": false})),
        ("qwen3", serde_json::json!({"enable_thinking": true})),
        // Gemma 2 refuses a system turn (as transformers does); Gemma 3 folds it into the
        // first user turn
        ("gemma2", none.clone()),
        ("gemma3", none.clone()),
        ("phi4_mini", none.clone()),
        ("phi3_mini", none.clone()),
        // TRL's training templates: `{% generation %}` blocks render their body
        ("trl_qwen3_training", none.clone()),
        ("trl_phi3_training", none.clone()),
        // SmolLM3: reasoning mode from `enable_thinking` (default on) or from `/think` and
        // `/no_think` in the system turn; today's date in the system turn
        ("smollm3", none),
        ("smollm3", serde_json::json!({"enable_thinking": false})),
        ("smollm3", serde_json::json!({"enable_thinking": true})),
    ];
    let counts = check_render(&pairs);
    println!("renders compared per (template, kwargs): {counts:?}");
    assert_eq!(counts, [6, 6, 6, 3, 5, 6, 6, 6, 6, 6, 6, 6]);
}

#[test]
fn qwen3_enable_thinking_and_gemma3_system_folding_render_as_documented() {
    let msgs = vec![m("user", "hi")];
    let off = tokenizer("qwen3", &serde_json::json!({"enable_thinking": false}));
    assert_eq!(
        off.apply_chat_template(&msgs, true).unwrap(),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    );
    let on = tokenizer("qwen3", &serde_json::json!({}));
    assert_eq!(
        on.apply_chat_template(&msgs, true).unwrap(),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let g = tokenizer("gemma3", &serde_json::json!({}));
    let bos = g.bos().unwrap().content.clone();
    assert_eq!(
        g.apply_chat_template(&[m("system", "Be brief."), m("user", "hi")], true)
            .unwrap(),
        format!("{bos}<start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\n")
    );
}

/// Assistant-only labels equal the reference's, and the labelled text is exactly each assistant
/// turn's content and end-of-turn marker.
fn check_masks(name: &str, kwargs: serde_json::Value, records: &[Vec<Message>], turn_end: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("chats.jsonl");
    let lines: Vec<String> = records
        .iter()
        .map(|msgs| serde_json::json!({ "messages": msgs }).to_string())
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let tok = tokenizer(name, &kwargs);
    let cfg = DatasetConfig {
        cache: false,
        ..DatasetConfig::new(&data)
    };
    let ds = SftDataset::load(&cfg, &tok).unwrap_or_else(|e| panic!("{name}: {e}"));
    let t = template(name);
    let kw = kwargs.to_string();
    let r = data_ref(&[
        "sft",
        "--tok",
        root().join("assets/tiny-llama").to_str().unwrap(),
        "--input",
        data.to_str().unwrap(),
        "--template",
        t.to_str().unwrap(),
        "--kwargs",
        &kw,
    ]);
    let r = r.as_array().unwrap();
    assert_eq!(ds.len(), r.len());
    let ids = |v: &serde_json::Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    };
    for (i, (ex, want)) in ds.examples.iter().zip(r).enumerate() {
        assert_eq!(ex.input_ids, ids(&want["input_ids"]), "{name} {i} ids");
        assert_eq!(ex.labels, ids(&want["labels"]), "{name} {i} labels");
        // what carries a label, decoded: the assistant turns and their end markers (+ EOS)
        let labelled: Vec<u32> = ex
            .labels
            .iter()
            .filter(|&&l| l >= 0)
            .map(|&l| l as u32)
            .collect();
        let text = tok.decode(&labelled, false).unwrap();
        let eos = tok.eos().unwrap().content.clone();
        let want_text: String = records[i]
            .iter()
            .filter(|m| m.role == "assistant")
            .map(|m| format!("{}{turn_end}", m.content.trim()))
            .collect::<String>();
        let got = text.strip_suffix(&eos).unwrap_or(&text);
        assert_eq!(
            got.replace(' ', ""),
            want_text.replace(' ', ""),
            "{name} {i}: labelled text"
        );
    }
}

#[test]
fn assistant_only_masks_match_transformers_prefix_rendering() {
    let single = vec![
        vec![m("user", "What is 2 + 3?"), m("assistant", "5")],
        vec![
            m("system", "Be brief."),
            m("user", "Name a color."),
            m("assistant", "Blue"),
        ],
    ];
    // Gemma 3: system folded into the first user turn; multi-turn
    let mut gemma = single.clone();
    gemma.push(vec![
        m("user", "a"),
        m("assistant", "b"),
        m("user", "c"),
        m("assistant", "d"),
    ]);
    check_masks("gemma3", serde_json::json!({}), &gemma, "<end_of_turn>\n");
    // Qwen3 with thinking off: the empty think block is part of the prompt, not of the labels
    check_masks(
        "qwen3",
        serde_json::json!({"enable_thinking": false}),
        &single,
        "<|im_end|>\n",
    );
    // Phi-3-mini: the template renders the EOS itself, after the assistant turn
    check_masks("phi3_mini", serde_json::json!({}), &single, "<|end|>\n");
    // SmolLM3, multi-turn, both reasoning modes: with thinking off the empty think block is part
    // of the prompt (the generation prompt renders it), not of the labels; `/no_think` in the
    // system turn switches it off too
    let mut smol = single.clone();
    smol.push(vec![
        m("user", "a"),
        m("assistant", "<think>\nb?\n</think>\nb"),
        m("user", "c"),
        m("assistant", "d"),
    ]);
    smol.push(vec![
        m("system", "Be brief. /no_think"),
        m("user", "Name a color."),
        m("assistant", "Blue"),
    ]);
    for kwargs in [
        serde_json::json!({}),
        serde_json::json!({"enable_thinking": false}),
    ] {
        check_masks("smollm3", kwargs, &smol, "<|im_end|>\n");
    }
}

/// SmolLM3's reasoning modes as its template documents them: `enable_thinking` (default on)
/// picks the system turn's `Reasoning Mode`, its default instructions and whether the assistant
/// turn opens with an empty think block; `/think` or `/no_think` in the system turn overrides it
/// and is removed from the instructions.
#[test]
fn smollm3_reasoning_modes_render_as_documented() {
    let on = tokenizer("smollm3", &serde_json::json!({}));
    let off = tokenizer("smollm3", &serde_json::json!({"enable_thinking": false}));
    let hi = [m("user", "hi")];
    let text = on.apply_chat_template(&hi, true).unwrap();
    assert!(text.contains("Reasoning Mode: /think\n"), "{text}");
    assert!(text.contains("systematic thinking process"), "{text}");
    assert!(text.ends_with("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"));
    let text = off.apply_chat_template(&hi, true).unwrap();
    assert!(text.contains("Reasoning Mode: /no_think\n"), "{text}");
    assert!(text.contains("named SmolLM, trained by Hugging Face.\n\n<|im_start|>user"));
    assert!(text.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n"));
    let sys = [m("system", "Be brief. /no_think"), m("user", "hi")];
    let text = on.apply_chat_template(&sys, true).unwrap();
    assert!(text.contains("Reasoning Mode: /no_think\n"), "{text}");
    assert!(text.contains("## Custom Instructions\n\nBe brief.\n\n<|im_start|>user"));
    assert!(text.ends_with("<think>\n\n</think>\n"));
}

#[test]
fn template_kwargs_come_from_the_dataset_config() {
    let yaml = format!(
        "path: x.jsonl\nchat_template: {}\nchat_template_kwargs: {{enable_thinking: false}}\n",
        template("qwen3").display()
    );
    let cfg: DatasetConfig = serde_yaml::from_str(&yaml).unwrap();
    let mut tok = Tokenizer::from_dir(root().join("assets/tiny-llama")).unwrap();
    let before = tok.fingerprint();
    cfg.apply_chat_template(&mut tok).unwrap();
    assert_eq!(
        tok.chat_template_kwargs(),
        [("enable_thinking".to_string(), serde_json::json!(false))]
    );
    assert!(
        tok.apply_chat_template(&[m("user", "hi")], true)
            .unwrap()
            .ends_with("<think>\n\n</think>\n\n")
    );
    // the dataset cache keys on the kwargs too
    assert_ne!(tok.fingerprint(), before);
}

/// One chat compared with TRL's `SFTTrainer`: ours, and TRL's input_ids and labels.
struct TrlCase {
    ours: volttrain::data::Example,
    ids: Vec<i64>,
    labels: Vec<i64>,
}

/// Loads `chats` with template `name` under each of `kwargs`, and tokenizes them with TRL's
/// `SFTTrainer(assistant_only_loss=True)` (one Python run): per kwargs, per chat, both results.
/// Asserts that TRL swapped in its training template for `name`.
fn with_trl(name: &str, kwargs: &[serde_json::Value], chats: &[Vec<Message>]) -> Vec<Vec<TrlCase>> {
    let tmp = tempfile::tempdir().unwrap();
    let groups: Vec<serde_json::Value> = kwargs
        .iter()
        .map(|k| serde_json::json!({"conversations": chats, "kwargs": k}))
        .collect();
    let input = tmp.path().join("groups.json");
    std::fs::write(&input, serde_json::to_string(&groups).unwrap()).unwrap();
    let t = template(name);
    let r = data_ref(&[
        "trl-sft",
        "--tok",
        root().join("assets/tiny-llama").to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--template",
        t.to_str().unwrap(),
    ]);
    let ids = |v: &serde_json::Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    };
    let data = tmp.path().join("chats.jsonl");
    let lines: Vec<String> = chats
        .iter()
        .map(|msgs| serde_json::json!({ "messages": msgs }).to_string())
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let cfg = DatasetConfig {
        cache: false,
        ..DatasetConfig::new(&data)
    };
    let mut out = Vec::new();
    for (g, kw) in kwargs.iter().enumerate() {
        let group = &r.as_array().unwrap()[g];
        assert_eq!(
            group["swapped"], true,
            "TRL swapped in its {name} training template"
        );
        let trl = group["records"].as_array().unwrap();
        let ds = SftDataset::load(&cfg, &tokenizer(name, kw)).unwrap();
        assert_eq!(ds.len(), chats.len());
        assert_eq!(trl.len(), chats.len());
        out.push(
            ds.examples
                .into_iter()
                .zip(trl)
                .map(|(ours, want)| TrlCase {
                    ours,
                    ids: ids(&want["input_ids"]),
                    labels: ids(&want["labels"]),
                })
                .collect(),
        );
    }
    out
}

/// Multi-turn Qwen3 chats, which prefix rendering cannot locate (the template drops the `<think>`
/// block of earlier assistant turns), get the input_ids and labels of TRL's `SFTTrainer` with
/// `assistant_only_loss=True` (its Qwen3 training template, read live from its tokenized
/// dataset), plus VoltTrain's appended EOS; single-turn chats keep prefix rendering.
#[test]
fn qwen3_multi_turn_masks_equal_trl_sft_trainer() {
    let multi = [
        vec![
            m("user", "a"),
            m("assistant", "b"),
            m("user", "c"),
            m("assistant", "d"),
        ],
        vec![
            m("system", "Be brief."),
            m("user", "What is 2 + 3?"),
            m("assistant", "<think>\nAdd them.\n</think>\n\n5"),
            m("user", "And 3 + 4?"),
            m("assistant", "<think>\nAgain.\n</think>\n\n7"),
        ],
        // reasoning in an earlier turn only; a `</think>` without `<think>`; ends on a user turn
        vec![
            m("user", "Name a color."),
            m("assistant", "<think>pick one</think>Blue"),
            m("user", "Another?"),
            m("assistant", "guess</think>\n\nRed"),
            m("user", "Thanks"),
        ],
        // a tool result between two assistant turns
        vec![
            m("user", "Weather in Paris?"),
            m("assistant", "Let me check."),
            m("tool", "{\"temp\": 18}"),
            m("assistant", "18 degrees."),
        ],
    ];
    let single = vec![
        vec![m("user", "What is 2 + 3?"), m("assistant", "5")],
        vec![
            m("system", "Answer briefly."),
            m("user", "  héllo wörld ✓"),
            m("assistant", "<think>\nGreeting.\n</think>\n\nHello!"),
        ],
    ];
    let all: Vec<Vec<Message>> = multi.iter().chain(&single).cloned().collect();
    let kwargs = [
        serde_json::json!({}),
        serde_json::json!({"enable_thinking": false}),
    ];
    let results = with_trl("qwen3", &kwargs, &all);
    let mut compared = 0;
    for (kw, cases) in kwargs.iter().zip(&results) {
        let tok = tokenizer("qwen3", kw);
        let eos = tok.eos().unwrap().id as i64;
        for (i, c) in cases.iter().enumerate() {
            let (ex, n) = (&c.ours, c.ids.len());
            // TRL appends no EOS to conversational records; VoltTrain does, labelled after an
            // assistant turn
            assert_eq!(ex.input_ids[..n], c.ids[..], "{kw} chat {i}: input_ids");
            assert_eq!(ex.input_ids[n..], [eos], "{kw} chat {i}: appended EOS");
            let ends_with_assistant = all[i].last().unwrap().role == "assistant";
            assert_eq!(
                ex.labels[n],
                if ends_with_assistant { eos } else { -100 },
                "{kw} chat {i}: EOS label"
            );
            // prefix rendering locates single-turn chats, except with enable_thinking=false one
            // whose answer has reasoning (the generation prompt's empty think block is not a
            // prefix of it): that one goes through the training variant too
            let reasoning = all[i].iter().any(|m| m.content.contains("</think>"));
            let single_no_think = i >= multi.len() && kw["enable_thinking"] == false && !reasoning;
            if !single_no_think {
                assert_eq!(ex.labels[..n], c.labels[..], "{kw} chat {i}: labels");
            } else {
                // with enable_thinking=false the empty think block is part of the generation
                // prompt, so prefix rendering gives it no label; TRL's generation span includes
                // it. Everything else agrees.
                let differ: Vec<u32> = (0..n)
                    .filter(|&j| ex.labels[j] != c.labels[j])
                    .map(|j| {
                        assert_eq!(ex.labels[j], -100, "{kw} chat {i} token {j}");
                        ex.input_ids[j] as u32
                    })
                    .collect();
                assert_eq!(
                    tok.decode(&differ, false).unwrap().replace(' ', ""),
                    "<think>\n\n</think>\n\n",
                    "{kw} chat {i}: only the empty think block differs"
                );
            }
            compared += 1;
        }
    }
    println!("chats compared with TRL's SFTTrainer: {compared}");
    assert_eq!(compared, 12);
}

/// Phi-3-mini's template ends every render with `eos_token`, so multi-turn chats cannot be
/// located by prefix rendering either; they get TRL's Phi-3 training-template masks, and
/// single-turn chats (prefix rendering) agree with TRL too.
#[test]
fn phi3_masks_equal_trl_sft_trainer() {
    let chats = vec![
        vec![m("user", "What is 2 + 3?"), m("assistant", "5")],
        vec![
            m("system", "Be brief."),
            m("user", "Name a color."),
            m("assistant", "Blue"),
        ],
        vec![
            m("user", "a"),
            m("assistant", "b"),
            m("user", "c"),
            m("assistant", "  d  "),
        ],
        vec![
            m("system", "You are VoltBot."),
            m("user", "Reverse: red fox"),
            m("assistant", "fox red"),
            m("user", "Thanks"),
        ],
    ];
    let results = with_trl("phi3_mini", &[serde_json::json!({})], &chats);
    let tok = tokenizer("phi3_mini", &serde_json::json!({}));
    let eos = tok.eos().unwrap().id as i64;
    for (i, c) in results[0].iter().enumerate() {
        // the template renders the EOS itself, so nothing is appended
        assert_eq!(c.ids.last(), Some(&eos), "chat {i}");
        assert_eq!(c.ours.input_ids, c.ids, "chat {i}: input_ids");
        assert_eq!(c.ours.labels, c.labels, "chat {i}: labels");
        assert!(c.ours.num_label_tokens() > 0, "chat {i}");
    }
}

#[test]
fn other_non_prefix_stable_templates_keep_the_error() {
    // Qwen3's template with a comment added: it renders the same, but it is not byte-equal to
    // the original, so VoltTrain (like TRL) does not know its training variant
    let src = std::fs::read_to_string(template("qwen3")).unwrap() + "{#- edited #}";
    let mut tok = Tokenizer::from_dir(root().join("assets/tiny-llama")).unwrap();
    tok.set_chat_template(&src, "edited.jinja").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("chats.jsonl");
    let multi = [
        m("user", "a"),
        m("assistant", "b"),
        m("user", "c"),
        m("assistant", "d"),
    ];
    std::fs::write(&data, serde_json::json!({ "messages": multi }).to_string()).unwrap();
    let cfg = DatasetConfig {
        cache: false,
        ..DatasetConfig::new(&data)
    };
    let e = SftDataset::load(&cfg, &tok).unwrap_err().to_string();
    assert!(e.contains("chat template is not prefix-stable"), "{e}");
    assert!(e.contains("chats.jsonl"), "{e}");
    // the real template locates the same chat
    let tok = tokenizer("qwen3", &serde_json::json!({}));
    let ds = SftDataset::load(&cfg, &tok).unwrap();
    assert!(ds.examples[0].num_label_tokens() > 0);
}
