//! Training variants of chat templates that cannot locate assistant turns by prefix rendering.
//!
//! [`SftDataset`](super::SftDataset) finds an assistant turn's labels by rendering the
//! conversation up to it (see `dataset.rs`). That needs a *prefix-stable* template: rendering
//! more messages must not change how earlier ones render. Qwen3's template is not: it prints the
//! `<think>` block only for assistant turns after the last user query (`loop.index0 >
//! ns.last_query_index`), so a multi-turn chat renders its earlier assistant turns differently
//! from the prefix that ends on them, and their reasoning disappears from the text.
//!
//! TRL solves this for SFT with `assistant_only_loss=True`: when the tokenizer's template is
//! byte-equal to a known original, `SFTTrainer` swaps in a patched training template
//! (`trl/chat_template_utils.py`, `get_training_chat_template`; the edits are listed in
//! `trl/chat_templates/README.md`, "Training templates") and reads the assistant spans from its
//! `{% generation %}` markers. This module does the same for Qwen3 and Phi-3, deriving each variant
//! from the original by applying the documented edits to its text. For Qwen3:
//!
//! 1. the thinking block is always emitted (the `ns.last_query_index` / `loop.last` conditional
//!    is dropped), so every assistant turn renders the same wherever it stands;
//! 2. the assistant output after `<|im_start|>assistant\n` up to and including `<|im_end|>\n` is
//!    the generation span.
//!
//! For Phi-3 (whose template appends `eos_token` to every render, so no assistant turn but the
//! last renders as a prefix), the assistant content and `<|end|>\n` are the span, and the closing
//! `eos_token` joins it when the conversation ends on an assistant turn.
//!
//! TRL 1.16.0's `qwen3_training.jinja` makes exactly these two edits; its README also lists a
//! third (split the content on `</think>` only when `<think>` is present too), which the shipped
//! file does not make, so neither do we: the test checks our output against TRL live.
//!
//! minijinja has no `{% generation %}` tag; the variant prints two private-use characters where
//! the tags stand, and [`TrainingTemplate::render`] takes them out again and returns their
//! positions. A conversation that itself contains one of them is refused.

use sha2::{Digest, Sha256};

use super::template::{ChatTemplate, Message};
use super::tokenizer::{Tokenizer, hex};

/// Marks the start of a generation span in the variant's output (Unicode private use).
const GEN_START: char = '\u{F8F0}';
/// Marks the end of a generation span.
const GEN_END: char = '\u{F8F1}';

/// A known original template and the edits that make its training variant.
struct Known {
    /// Short name for logs.
    name: &'static str,
    /// SHA-256 of the original template text (byte-equal recognition, as TRL's `==`).
    sha256: &'static str,
    /// Where the original and the edits come from (for the log line).
    source: &'static str,
    /// `(old, new)` text replacements, each of which must match exactly once.
    edits: &'static [(&'static str, &'static str)],
}

/// Qwen3's template as the Qwen3 checkpoints ship it (`Qwen/Qwen3-8B` `tokenizer_config.json`,
/// identical to TRL's `chat_templates/qwen3.jinja`; the test fixture
/// `tests/fixtures/templates/qwen3.jinja`).
const QWEN3: Known = Known {
    name: "Qwen3",
    sha256: "a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8",
    source: "TRL's qwen3_training.jinja edits: every assistant turn keeps its <think> block",
    edits: &[
        (
            r#"        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
"#,
            "        {{- '<|im_start|>' + message.role + '\\n' }}
        {{- '\u{F8F0}' }}
        {{- '<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
",
        ),
        (
            r#"        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}"#,
            "        {{- '<|im_end|>\\n' }}
        {{- '\u{F8F1}' }}
    {%- elif message.role == \"tool\" %}",
        ),
    ],
};

/// Phi-3's template as `microsoft/Phi-3-mini-4k-instruct` ships it (TRL's
/// `chat_templates/phi3.jinja`; the test fixture `tests/fixtures/templates/phi3_mini.jinja`). It
/// ends every render without a generation prompt with `eos_token`, so a conversation's earlier
/// assistant turns never render as a prefix of it. TRL's `phi3_training.jinja` marks each
/// assistant turn's content and `<|end|>\n`, and the closing `eos_token` when the conversation
/// ends on an assistant turn (adjacent spans are merged below).
const PHI3: Known = Known {
    name: "Phi-3",
    sha256: "dcaee66df77bfbb789ec541fe713218da30225a526f1db97138fc39ee6dc56aa",
    source: "TRL's phi3_training.jinja edits: the closing eos_token only after an assistant turn",
    edits: &[
        (
            "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + \
             '<|end|>\n'}}",
            "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + '\u{F8F0}' + \
             message['content'] + '<|end|>\n' + '\u{F8F1}'}}",
        ),
        (
            "{% else %}{{ eos_token }}{% endif %}",
            "{% elif messages[-1]['role'] == 'assistant' %}{{ '\u{F8F0}' + eos_token + \
             '\u{F8F1}' }}{% else %}{{ eos_token }}{% endif %}",
        ),
    ],
};

const KNOWN: [Known; 2] = [QWEN3, PHI3];

/// The training variant of a recognised chat template.
pub(crate) struct TrainingTemplate {
    /// Which original it was derived from ("Qwen3").
    pub name: &'static str,
    /// Where the edits come from.
    pub source: &'static str,
    template: ChatTemplate,
}

impl std::fmt::Debug for TrainingTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainingTemplate")
            .field("name", &self.name)
            .finish()
    }
}

impl TrainingTemplate {
    /// The training variant of `t` if `t` is byte-equal to a known original, else `None`.
    pub fn for_template(t: &ChatTemplate) -> crate::Result<Option<TrainingTemplate>> {
        let digest = hex(&Sha256::digest(t.source().as_bytes()));
        let Some(k) = KNOWN.iter().find(|k| k.sha256 == digest) else {
            return Ok(None);
        };
        let mut text = t.source().to_string();
        for (old, new) in k.edits {
            if text.matches(old).count() != 1 {
                return Err(crate::Error::Tokenizer {
                    path: t.origin().to_path_buf(),
                    msg: format!(
                        "internal: the {} training-template edit does not apply once",
                        k.name
                    ),
                });
            }
            text = text.replacen(old, new, 1);
        }
        let origin = format!("{} ({} training variant)", t.origin().display(), k.name);
        Ok(Some(TrainingTemplate {
            name: k.name,
            source: k.source,
            template: ChatTemplate::new(text, origin)?,
        }))
    }

    /// Renders `messages` (no generation prompt, `tok`'s special tokens and template kwargs)
    /// and returns the text with the byte spans of the assistant turns at index
    /// `first_trainable` or later.
    pub fn render(
        &self,
        messages: &[Message],
        first_trainable: usize,
        tok: &Tokenizer,
    ) -> std::result::Result<(String, Vec<(usize, usize)>), String> {
        if let Some(i) = messages
            .iter()
            .position(|m| m.content.contains([GEN_START, GEN_END]))
        {
            return Err(format!(
                "message {i} contains U+F8F0 or U+F8F1, which VoltTrain reserves to mark \
                 assistant spans in the {} training template",
                self.name
            ));
        }
        let marked = self
            .template
            .render_with(
                messages,
                false,
                &tok.template_vars(),
                tok.chat_template_kwargs(),
            )
            .map_err(|e| e.to_string())?;
        let mut text = String::with_capacity(marked.len());
        let mut blocks = Vec::new();
        let mut open: Option<usize> = None;
        for c in marked.chars() {
            match (c, open) {
                (GEN_START, None) => open = Some(text.len()),
                (GEN_END, Some(s)) => {
                    // a span right after the previous one continues it (Phi-3's closing EOS)
                    match blocks.last_mut() {
                        Some((_, e)) if *e == s => *e = text.len(),
                        _ => blocks.push((s, text.len())),
                    }
                    open = None;
                }
                (GEN_START | GEN_END, _) => {
                    return Err(format!(
                        "{} training template: unbalanced assistant span markers",
                        self.name
                    ));
                }
                _ => text.push(c),
            }
        }
        let assistant: Vec<usize> = messages
            .iter()
            .enumerate()
            .filter(|(_, m)| m.role == "assistant")
            .map(|(i, _)| i)
            .collect();
        if open.is_some() || blocks.len() != assistant.len() {
            return Err(format!(
                "{} training template: {} assistant span(s) for {} assistant turn(s)",
                self.name,
                blocks.len(),
                assistant.len()
            ));
        }
        let spans = blocks
            .into_iter()
            .zip(assistant)
            .filter(|&(_, i)| i >= first_trainable)
            .map(|(span, _)| span)
            .collect();
        Ok((text, spans))
    }
}
