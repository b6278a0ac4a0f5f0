use std::collections::BTreeMap;

use super::*;

mod backend;
mod bgp;
mod discovery;
mod dsr;
mod examples;
mod host;
mod ipv6;
mod policy;
mod pools;
mod semantic;
mod syntax;

/// Minimal valid config; tests edit single lines so line numbers stay known.
const BASE: &str = r#"[daemon]
interface = "eth0"

[[service]]
name = "llama"
vip = "198.18.100.1:8000"
snat = "198.18.0.1"

[[service.backend]]
name = "gpu-0"
address = "198.18.0.11:8000"

[[service.backend]]
name = "gpu-1"
address = "198.18.0.12:8000"
"#;

const EXAMPLE: &str = include_str!("../../../../examples/router.toml");
const TWO_ARM_EXAMPLE: &str = include_str!("../../../../examples/two-arm.toml");
const AGENTS_EXAMPLE: &str = include_str!("../../../../examples/agents.toml");

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "t.toml")
}

/// BASE with 1-based line `n` replaced by `new` (a single line).
fn replace_line(n: usize, new: &str) -> String {
    let mut lines: Vec<&str> = BASE.lines().collect();
    lines[n - 1] = new;
    lines.join("\n") + "\n"
}

/// BASE with `text` inserted after line `n`.
fn insert_after(n: usize, text: &str) -> String {
    let mut lines: Vec<&str> = BASE.lines().collect();
    lines.insert(n, text);
    lines.join("\n") + "\n"
}

#[track_caller]
fn assert_err(text: &str, line: usize, key: &str, fragment: &str) {
    let err = match parse(text) {
        Ok(_) => panic!("expected an error at {key}, config parsed:\n{text}"),
        Err(e) => e,
    };
    let shown = err.to_string();
    assert_eq!(err.line(), Some(line), "wrong line in: {shown}");
    assert_eq!(err.key(), Some(key), "wrong key in: {shown}");
    assert!(
        shown.starts_with(&format!("t.toml:{line}: {key}: ")),
        "bad prefix: {shown}"
    );
    assert!(shown.contains(fragment), "{shown:?} lacks {fragment:?}");
}

/// BASE with `text` added to backend gpu-0 (after its address, line 11).
fn with_backend0(text: &str) -> String {
    insert_after(11, text)
}
