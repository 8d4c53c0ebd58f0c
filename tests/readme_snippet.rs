//! The README's "Library use" snippet is `examples/library_use.rs` between its `README:begin` and
//! `README:end` marks, byte for byte, so the README shows code that compiles and runs (the
//! example's own test runs it under `cargo test`).

const README: &str = include_str!("../README.md");
const EXAMPLE: &str = include_str!("../examples/library_use.rs");

fn between<'a>(text: &'a str, begin: &str, end: &str) -> &'a str {
    let start = text
        .find(begin)
        .unwrap_or_else(|| panic!("`{begin}` not found"))
        + begin.len();
    let len = text[start..]
        .find(end)
        .unwrap_or_else(|| panic!("`{end}` not found after `{begin}`"));
    &text[start..start + len]
}

#[test]
fn readme_library_snippet_is_the_example_verbatim() {
    let section = between(README, "## Library use\n", "\n## ");
    let snippet = between(section, "```rust\n", "```\n");
    let marked = between(EXAMPLE, "// README:begin\n", "// README:end\n");
    assert!(marked.contains("Trainer::builder()"), "{marked}");
    assert_eq!(
        snippet, marked,
        "README.md's Library use snippet differs from examples/library_use.rs (copy the marked \
         region into the README)"
    );
}
