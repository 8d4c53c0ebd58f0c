//! Chat templates: Jinja rendered by minijinja with Hugging Face semantics.
//!
//! transformers compiles chat templates in an `ImmutableSandboxedEnvironment` with
//! `trim_blocks=True, lstrip_blocks=True`, the `loopcontrols` extension, a `raise_exception`
//! global, and a `tojson` filter that is Python's `json.dumps` (no HTML escaping,
//! `ensure_ascii=False`) (`transformers/utils/chat_template_utils.py`,
//! `_cached_compile_jinja_template`). This module sets up minijinja the same way, plus the
//! `minijinja-contrib` Python-compatibility methods (`.strip()`, `.startswith()`, `.items()`…).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};

use crate::error::{Error, Result};

/// One chat message. `role` is `system`, `user`, `assistant` or `tool`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The turn's text.
    pub content: String,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A ChatML template (`<|im_start|>role\ncontent<|im_end|>\n`), the custom template for models
/// that ship none (the reference system's `build_custom_chat_template()`); `chat_template: chatml`
/// in the dataset config selects it. The tokenizer should know `<|im_start|>`/`<|im_end|>` as
/// added tokens.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] \
    + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}\
    {{ '<|im_start|>assistant\n' }}{% endif %}";

/// The roles a conversation may use.
pub const KNOWN_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// Where the template came from (for error messages).
    origin: PathBuf,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("len", &self.source.len())
            .finish()
    }
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`. `origin` names the file (or config key) it came from in errors.
    pub fn new(source: impl Into<String>, origin: impl Into<PathBuf>) -> Result<Self> {
        let source = source.into();
        let origin = origin.into();
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| Error::Tokenizer {
                path: origin.clone(),
                msg: format!("chat template syntax config: {e}"),
            })?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("generation", |body: String| body);
        env.add_template_owned(NAME, generation_as_filter(&source).into_owned())
            .map_err(|e| Error::Tokenizer {
                path: origin.clone(),
                msg: format!("chat template does not compile: {}", describe(&e)),
            })?;
        Ok(ChatTemplate {
            env,
            source,
            origin,
        })
    }

    /// Reads a template from a `.jinja` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::new(s, path)
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// Renders `messages` as transformers' `apply_chat_template(tokenize=False)` does.
    /// `special` are the special tokens (`bos_token`, `eos_token`, …) given to the template.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        special: &[(&str, &str)],
    ) -> Result<String> {
        self.render_with(messages, add_generation_prompt, special, &[])
    }

    /// [`ChatTemplate::render`] with extra template variables, as the keyword arguments of
    /// `apply_chat_template(..., **kwargs)` (Qwen3's `enable_thinking=False`).
    pub fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        special: &[(&str, &str)],
        kwargs: &[(String, serde_json::Value)],
    ) -> Result<String> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        let mut ctx: Vec<(&str, Value)> =
            special.iter().map(|(k, v)| (*k, Value::from(*v))).collect();
        ctx.push(("messages", Value::from(msgs)));
        ctx.push(("add_generation_prompt", Value::from(add_generation_prompt)));
        ctx.push(("tools", Value::from(())));
        ctx.push(("documents", Value::from(())));
        for (k, v) in kwargs {
            ctx.push((k.as_str(), json_to_value(v)));
        }
        let tmpl = self.env.get_template(NAME).map_err(|e| self.err(&e))?;
        tmpl.render(Value::from_pairs(ctx))
            .map_err(|e| self.err(&e))
    }

    fn err(&self, e: &minijinja::Error) -> Error {
        Error::Tokenizer {
            path: self.origin.clone(),
            msg: format!("chat template: {}", describe(e)),
        }
    }
}

/// transformers' `{% generation %}…{% endgeneration %}` (its `AssistantTracker` extension, which
/// records where assistant output is and renders the body unchanged; SmolLM3's template and TRL's
/// training templates use it) as a `{% filter generation %}…{% endfilter %}` block over the
/// identity filter `generation`: a block tag either way, so whitespace control and
/// `trim_blocks`/`lstrip_blocks` act on it the same. minijinja has no `generation` tag.
fn generation_as_filter(source: &str) -> std::borrow::Cow<'_, str> {
    static TAG: std::sync::OnceLock<Option<regex::Regex>> = std::sync::OnceLock::new();
    // a constant pattern: it compiles (were it not to, the template compiles unchanged and an
    // unknown `generation` tag is reported)
    let Some(re) =
        TAG.get_or_init(|| regex::Regex::new(r"\{%([-+]?)\s*(end)?generation\s*([-+]?)%\}").ok())
    else {
        return std::borrow::Cow::Borrowed(source);
    };
    re.replace_all(source, |c: &regex::Captures<'_>| {
        let tag = if c.get(2).is_some() {
            "endfilter"
        } else {
            "filter generation"
        };
        format!("{{%{} {tag} {}%}}", &c[1], &c[3])
    })
}

/// A JSON value (template keyword arguments) as a template value.
fn json_to_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::from(i),
            None => Value::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(a) => Value::from(a.iter().map(json_to_value).collect::<Vec<_>>()),
        serde_json::Value::Object(o) => {
            Value::from_pairs(o.iter().map(|(k, v)| (k.as_str(), json_to_value(v))))
        }
    }
}

fn describe(e: &minijinja::Error) -> String {
    let mut s = match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(d)) => d.to_string(),
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        let _ = write!(s, " (template line {line})");
    }
    s
}

/// `raise_exception(msg)`: the template rejects its input.
fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(format)`: the current UTC time formatted as Python's `datetime.strftime`
/// (Llama 3 templates print today's date with it).
fn strftime_now(format: String) -> std::result::Result<Value, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(strftime(secs, &format)))
}

/// Formats `secs` since the Unix epoch (UTC) with the C/Python `strftime` directives
/// `%Y %y %m %d %e %H %I %M %S %p %j %a %A %b %B %h %%` (others are kept as written). Civil date
/// from days: Howard Hinnant's `civil_from_days`.
pub fn strftime(secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (h, mi, se) = (tod / 3600, (tod % 3600) / 60, tod % 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let d = doy_mar - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + (leap && m > 2) as i64;
    let wday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let mut out = String::new();
    let mut it = format.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(k) = it.next() else {
            out.push('%');
            break;
        };
        let _ = match k {
            'Y' => write!(out, "{y}"),
            'y' => write!(out, "{:02}", y.rem_euclid(100)),
            'm' => write!(out, "{m:02}"),
            'd' => write!(out, "{d:02}"),
            'e' => write!(out, "{d:>2}"),
            'H' => write!(out, "{h:02}"),
            'I' => write!(out, "{:02}", if h % 12 == 0 { 12 } else { h % 12 }),
            'M' => write!(out, "{mi:02}"),
            'S' => write!(out, "{se:02}"),
            'p' => write!(out, "{}", if h < 12 { "AM" } else { "PM" }),
            'j' => write!(out, "{yday:03}"),
            'a' => write!(out, "{}", &DAYS[wday][..3]),
            'A' => write!(out, "{}", DAYS[wday]),
            'b' | 'h' => write!(out, "{}", &MONTHS[(m - 1) as usize][..3]),
            'B' => write!(out, "{}", MONTHS[(m - 1) as usize]),
            '%' => write!(out, "%"),
            other => write!(out, "%{other}"),
        };
    }
    out
}

/// Python's `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`,
/// as transformers' `tojson` filter.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.kind() {
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            _ => Some(" ".repeat(v.as_i64().unwrap_or(0).max(0) as usize)),
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair (item, key)",
            ));
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let opts = JsonOpts {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    dump(value, &opts, 0, &mut out)?;
    Ok(Value::from(out))
}

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn dump(
    v: &Value,
    o: &JsonOpts,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = v.as_i64() {
                let _ = write!(out, "{i}");
            } else {
                let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                out.push_str(&py_float(f));
            }
        }
        ValueKind::String => json_str(v.as_str().unwrap_or_default(), o.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            container(out, o, depth, '[', ']', items.len(), |i, out| {
                dump(&items[i], o, depth + 1, out)
            })?;
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if o.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            container(out, o, depth, '{', '}', keys.len(), |i, out| {
                let k = &keys[i];
                match k.as_str() {
                    Some(s) => json_str(s, o.ensure_ascii, out),
                    None => json_str(&k.to_string(), o.ensure_ascii, out),
                }
                out.push_str(&o.key_sep);
                dump(&v.get_item(k)?, o, depth + 1, out)
            })?;
        }
        _ => json_str(&v.to_string(), o.ensure_ascii, out),
    }
    Ok(())
}

fn container(
    out: &mut String,
    o: &JsonOpts,
    depth: usize,
    open: char,
    close: char,
    n: usize,
    mut item: impl FnMut(usize, &mut String) -> std::result::Result<(), minijinja::Error>,
) -> std::result::Result<(), minijinja::Error> {
    out.push(open);
    if n == 0 {
        out.push(close);
        return Ok(());
    }
    for i in 0..n {
        if i > 0 {
            out.push_str(&o.item_sep);
        }
        if let Some(ind) = &o.indent {
            out.push('\n');
            out.push_str(&ind.repeat(depth + 1));
        }
        item(i, out)?;
    }
    if let Some(ind) = &o.indent {
        out.push('\n');
        out.push_str(&ind.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// Python's `repr(float)` for the common cases (`1.0`, `0.5`, `1e-05`, `inf` as `Infinity`).
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let a = f.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        // Python switches to exponent notation: 1e-05, 1e+16
        let s = format!("{f:e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = e.parse().unwrap_or(0);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{m}e{sign}{:02}", exp.abs());
    }
    let s = format!("{f}");
    if s.contains('.') { s } else { format!("{s}.0") }
}

fn json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{u:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, msgs: &[Message]) -> Result<String> {
        ChatTemplate::new(src, "test")?.render(msgs, false, &[("bos_token", "<s>")])
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        let src = "{% for m in messages %}\n  {{ m.role }}\n{% endfor %}";
        let out = render(
            src,
            &[Message::new("user", "a"), Message::new("assistant", "b")],
        );
        assert_eq!(out.unwrap(), "  user\n  assistant\n");
    }

    #[test]
    fn raise_exception_carries_message() {
        let src = "{{ raise_exception('roles must alternate') }}";
        let e = render(src, &[]).unwrap_err().to_string();
        assert!(e.contains("roles must alternate"), "{e}");
    }

    #[test]
    fn pycompat_methods_and_tojson() {
        let src = "{{ messages[0].content.strip() }}|{{ messages[0].role.startswith('us') }}|\
                   {{ messages[0] | tojson }}|{{ bos_token }}";
        let out = render(src, &[Message::new("user", "  hé \"x\" <b> ")]).unwrap();
        assert_eq!(
            out,
            "hé \"x\" <b>|True|{\"role\": \"user\", \"content\": \"  hé \\\"x\\\" <b> \"}|<s>"
        );
    }

    #[test]
    fn generation_blocks_render_their_body() {
        // expected: transformers 5.23.0 `apply_chat_template(tokenize=False)` on this template
        let src = "{% for m in messages %}\n  {%- if m.role == 'assistant' %}\n  {% generation %}\n  \
                   [{{ m.content }}]\n  {%- endgeneration %}\n  {% else %}({{ m.content }}){% endif %}\n\
                   {% endfor %}{%+ generation -%}  E {%- endgeneration +%}";
        let out = render(
            src,
            &[Message::new("user", "a"), Message::new("assistant", "b")],
        );
        assert_eq!(out.unwrap(), "(a)  [b]E");
    }

    #[test]
    fn py_float_repr() {
        assert_eq!(py_float(1.0), "1.0");
        assert_eq!(py_float(0.5), "0.5");
        assert_eq!(py_float(1e-5), "1e-05");
        assert_eq!(py_float(1e16), "1e+16");
    }
}
