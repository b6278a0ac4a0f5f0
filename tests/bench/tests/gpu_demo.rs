//! `cargo xtask demo`, non-interactively and for a bounded time, as a
//! newcomer would see it: the saturated replica's share of new connections
//! must fall and the cold replica must ramp in (the demo's `--check`); and
//! on a terminal, `router top` must own the screen.

use std::{
    io::Read as _,
    process::{Command, Stdio},
};

/// The counts of the demo's closing summary line
/// (`  completions N  errors M`, after `Summary`).
fn summary_counts(stdout: &str) -> Option<(u64, u64)> {
    let after = stdout.split("\nSummary\n").nth(1)?;
    let line = after.lines().next()?;
    let mut words = line.split_whitespace();
    let (Some("completions"), Some(done), Some("errors"), Some(errors)) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return None;
    };
    Some((done.parse().ok()?, errors.parse().ok()?))
}

#[test]
fn the_demo_shows_traffic_leaving_the_saturated_replica() {
    let out = Command::new(env!("CARGO_BIN_EXE_gpu_demo"))
        .args(["--plain", "--check", "--duration", "40s"])
        .output()
        .expect("running the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("gpu-0 saturates"), "{stdout}");
    assert!(stdout.contains("gpu-3 comes up cold"), "{stdout}");
    assert!(
        stdout.contains("TTFB P99"),
        "the backends table is printed: {stdout}"
    );
    assert!(stdout.contains("check passed"), "{stdout}");
    // The closing summary counts the whole run: an error at any time fails.
    let (done, errors) = summary_counts(&stdout).expect("the demo prints its summary");
    assert!(done > 0, "completions streamed: {stdout}");
    assert_eq!(errors, 0, "no failed completion in the whole run: {stdout}");
}

#[test]
fn summary_counts_read_the_closing_line_only() {
    let text = "t= 3.0s  completions 10  errors 0\n\nSummary\n  completions 480  errors 2\n";
    assert_eq!(summary_counts(text), Some((480, 2)));
    assert_eq!(summary_counts("t= 3.0s  completions 10  errors 0\n"), None);
}

/// What a person sees: the demo on a terminal (a pseudo-terminal made by
/// `script`, 160×45), with `router top` on screen. Nothing but the demo's
/// own lines and top's screen may reach it: no log line of the daemon or
/// the agent, which go to the log file the demo names at the end.
#[test]
fn on_a_terminal_the_demo_screen_holds_no_log_line() {
    let dir = std::env::temp_dir().join(format!("router-demo-pty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let typescript = dir.join("typescript");
    let demo = env!("CARGO_BIN_EXE_gpu_demo");
    // RUST_LOG=info: the daemon's default, stated so a caller's setting
    // cannot quieten the daemon and hide the fault.
    let inner = format!("stty cols 160 rows 45; RUST_LOG=info exec {demo} --duration 40s");
    let mut script = Command::new("script")
        .args(["--quiet", "--return", "--flush", "--command", &inner])
        .arg(&typescript)
        // Held open for the run: at end of input `script` would hand the
        // terminal an end-of-file.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running script(1)");
    let mut seen = Vec::new();
    script
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut seen)
        .unwrap();
    let status = script.wait().unwrap();
    let mut err = String::new();
    script
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let screen = String::from_utf8_lossy(&seen);
    let plain = strip_escapes(&screen);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(status.success(), "demo failed: {status}\n{plain}\n{err}");
    assert!(
        plain.contains("gpu-0") && plain.contains("gpu-3"),
        "router top was on screen: {plain}"
    );
    for marker in ["INFO", "WARN", "ERROR", "router::"] {
        assert!(
            !plain.contains(marker),
            "a log line ({marker}) reached the screen:\n{plain}"
        );
    }
    assert!(
        plain.contains("router-demo.log"),
        "the demo names its log: {plain}"
    );
}

/// `text` without ANSI escape sequences (CSI `ESC [ … final` and the
/// two-byte ones), so words split by colour codes read whole.
fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('[') => {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            Some(']') => {
                // OSC: up to BEL or ESC \.
                while let Some(c) = chars.next() {
                    if c == '\u{7}' || (c == '\u{1b}' && chars.peek() == Some(&'\\')) {
                        chars.next();
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    out
}
