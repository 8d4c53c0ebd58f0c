//! Raw records: reading JSONL / JSON files and checking each record's shape.

use std::path::Path;

use super::template::{KNOWN_ROLES, Message};
use crate::error::{Error, Result};

/// One training record, before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A chat (`{"messages": [{"role", "content"}, ...]}`, or a conversational
    /// `prompt`/`completion` pair of message lists). Assistant turns at index `first_trainable`
    /// or later carry labels (0 for `messages`; the prompt's length for prompt/completion, so
    /// assistant turns inside the prompt are context only, as in TRL).
    Chat {
        /// The turns, in order.
        messages: Vec<Message>,
        /// Index of the first turn that may carry labels.
        first_trainable: usize,
    },
    /// `{"prompt": "...", "completion": "..."}`: loss on the completion only (TRL's
    /// prompt-completion format).
    PromptCompletion {
        /// The prompt text (no loss).
        prompt: String,
        /// The completion text (the loss applies).
        completion: String,
    },
    /// `{"text": "..."}`: plain language modeling.
    Text(String),
}

/// A record and where it came from (1-based line of a JSONL / JSON file, or Parquet row).
#[derive(Debug, Clone)]
pub struct Located<T> {
    /// 1-based line (JSONL / JSON) or row (Parquet) of the record.
    pub line: usize,
    /// The record.
    pub value: T,
}

/// What `read_*` found: the good records and the errors (file:line + message) of the bad ones.
#[derive(Debug, Default)]
pub struct ReadOutcome {
    /// The records that parsed, in file order.
    pub records: Vec<Located<Record>>,
    /// One [`Error::Data`] per bad record (path, line, what is wrong).
    pub errors: Vec<Error>,
}

fn bad(path: &Path, line: usize, msg: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        line,
        msg: msg.into(),
    }
}

pub(crate) fn messages_from(
    v: &serde_json::Value,
    key: &str,
) -> std::result::Result<Vec<Message>, String> {
    let arr = v
        .as_array()
        .ok_or_else(|| format!("`{key}` must be a list of {{role, content}} messages"))?;
    let mut out = Vec::with_capacity(arr.len());
    for (i, m) in arr.iter().enumerate() {
        let obj = m
            .as_object()
            .ok_or_else(|| format!("`{key}[{i}]` must be an object with `role` and `content`"))?;
        let role = obj
            .get("role")
            .and_then(|r| r.as_str())
            .ok_or_else(|| format!("`{key}[{i}].role` is missing or not a string"))?;
        if !KNOWN_ROLES.contains(&role) {
            return Err(format!(
                "`{key}[{i}].role` is unknown role {role:?}; expected one of {}",
                KNOWN_ROLES.join(", ")
            ));
        }
        let content = match obj.get("content") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Null) | None => {
                return Err(format!("`{key}[{i}].content` is missing"));
            }
            Some(other) => {
                return Err(format!(
                    "`{key}[{i}].content` must be a string, found {}",
                    kind(other)
                ));
            }
        };
        out.push(Message::new(role, content));
    }
    Ok(out)
}

pub(crate) fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

fn check_chat(msgs: Vec<Message>, first_trainable: usize) -> std::result::Result<Record, String> {
    if msgs.is_empty() {
        return Err("empty conversation: `messages` has no messages".into());
    }
    if !msgs.iter().any(|m| m.role == "assistant") {
        return Err("conversation has no assistant turn, so nothing to train on".into());
    }
    Ok(Record::Chat {
        messages: msgs,
        first_trainable,
    })
}

/// Turns one JSON value into a [`Record`], or says what is wrong with it.
pub fn parse_record(v: &serde_json::Value) -> std::result::Result<Record, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| format!("a record must be a JSON object, found {}", kind(v)))?;
    if let Some(m) = obj.get("messages") {
        return check_chat(messages_from(m, "messages")?, 0);
    }
    match (obj.get("prompt"), obj.get("completion")) {
        (Some(serde_json::Value::String(p)), Some(serde_json::Value::String(c))) => {
            return Ok(Record::PromptCompletion {
                prompt: p.clone(),
                completion: c.clone(),
            });
        }
        (Some(p @ serde_json::Value::Array(_)), Some(c @ serde_json::Value::Array(_))) => {
            let mut msgs = messages_from(p, "prompt")?;
            let comp = messages_from(c, "completion")?;
            if !comp.iter().any(|m| m.role == "assistant") {
                return Err("`completion` has no assistant message".into());
            }
            let first = msgs.len();
            msgs.extend(comp);
            return check_chat(msgs, first);
        }
        (Some(p), Some(c)) => {
            return Err(format!(
                "`prompt` and `completion` must both be strings or both message lists, found {} \
                 and {}",
                kind(p),
                kind(c)
            ));
        }
        (Some(_), None) => return Err("record has `prompt` but no `completion`".into()),
        (None, Some(_)) => return Err("record has `completion` but no `prompt`".into()),
        (None, None) => {}
    }
    match obj.get("text") {
        Some(serde_json::Value::String(t)) => Ok(Record::Text(t.clone())),
        Some(other) => Err(format!("`text` must be a string, found {}", kind(other))),
        None => {
            let keys: Vec<&str> = obj.keys().map(|k| k.as_str()).collect();
            Err(format!(
                "record has none of `messages`, `prompt`/`completion`, `text` (keys: {})",
                keys.join(", ")
            ))
        }
    }
}

fn push(out: &mut ReadOutcome, path: &Path, line: usize, r: std::result::Result<Record, String>) {
    match r {
        Ok(value) => out.records.push(Located { line, value }),
        Err(msg) => out.errors.push(bad(path, line, msg)),
    }
}

/// Reads a JSONL file: one record per non-blank line.
pub fn read_jsonl(path: &Path, text: &str) -> ReadOutcome {
    let mut out = ReadOutcome::default();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let r = serde_json::from_str::<serde_json::Value>(line)
            .map_err(|e| format!("malformed JSON: {e}"))
            .and_then(|v| parse_record(&v));
        push(&mut out, path, n, r);
    }
    out
}

/// Reads a JSON file holding one array of records. A syntax error in the file stops reading
/// (the array cannot be split reliably past it); each element's errors carry its start line.
pub fn read_json_array(path: &Path, text: &str) -> Result<ReadOutcome> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        bad(
            path,
            e.line(),
            format!("malformed JSON: {e}; a .json dataset must be one array of records"),
        )
    })?;
    let arr = v.as_array().ok_or_else(|| {
        bad(
            path,
            1,
            format!(
                "a .json dataset must be an array of records, found {}; use .jsonl for one \
                 record per line",
                kind(&v)
            ),
        )
    })?;
    let lines = element_lines(text);
    let mut out = ReadOutcome::default();
    for (i, el) in arr.iter().enumerate() {
        let line = lines.get(i).copied().unwrap_or(1);
        push(&mut out, path, line, parse_record(el));
    }
    Ok(out)
}

/// The 1-based start line of each element of the top-level JSON array in `text` (valid JSON).
pub(crate) fn element_lines(text: &str) -> Vec<usize> {
    let mut lines = Vec::new();
    let (mut depth, mut in_str, mut esc, mut line) = (0usize, false, false, 1usize);
    let mut expect_el = false;
    for b in text.bytes() {
        if b == b'\n' {
            line += 1;
        }
        if in_str {
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        if expect_el && !b.is_ascii_whitespace() && b != b']' {
            lines.push(line);
            expect_el = false;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth == 1 {
                    expect_el = true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => expect_el = true,
            _ => {}
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_lines_of_pretty_array() {
        let t = "[\n  {\"text\": \"a,[\\\"\"},\n  {\"text\": \"b\"}\n,\n{\"x\": [1,2]}]";
        assert_eq!(element_lines(t), vec![2, 3, 5]);
    }
}
