//! Running external commands: every step prints what it runs, and a failure
//! names the command and carries its exit status so `main` can propagate it.

use std::{
    ffi::{OsStr, OsString},
    fmt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

/// A child command exited unsuccessfully. Kept as a typed error so `main` can
/// exit with the same code (CI and callers see the real failure status).
#[derive(Debug)]
pub struct Failed {
    pub command: String,
    pub code: Option<i32>,
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "`{}` exited with status {code}", self.command),
            None => write!(f, "`{}` was terminated by a signal", self.command),
        }
    }
}

impl std::error::Error for Failed {}

/// Renders a command the way a user would type it, for logs and errors.
pub fn display(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| v.map(|v| format!("{}={}", k.to_string_lossy(), v.to_string_lossy())))
        .collect();
    parts.push(cmd.get_program().to_string_lossy().into_owned());
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Runs `cmd` with inherited stdio, printing it first.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    eprintln!("xtask: running `{shown}`");
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{shown}`"))?;
    if status.success() {
        Ok(())
    } else {
        Err(Failed {
            command: shown,
            code: status.code(),
        }
        .into())
    }
}

/// Runs `cmd` quietly and returns its stdout; stderr is included in the error.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = display(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("failed to start `{shown}`"))?;
    if !out.status.success() {
        return Err(anyhow::Error::new(Failed {
            command: shown.clone(),
            code: out.status.code(),
        })
        .context(format!(
            "`{shown}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{shown}` printed non-UTF-8 output"))
}

/// The cargo that launched xtask (set by `cargo run`), so nested builds use
/// the same toolchain without going through another rustup resolution.
pub fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    Command::new(program)
}

/// Looks `name` up on PATH without spawning anything.
pub fn which(name: impl AsRef<OsStr>) -> Option<PathBuf> {
    let name = name.as_ref();
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Totals of libtest's `test result:` lines.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TestTally {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl TestTally {
    /// Adds one `test result: ok. 9 passed; 0 failed; …` line, if it is one.
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match label {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Runs a `cargo test` command, echoing its stdout while tallying results.
pub fn run_tests(cmd: &mut Command) -> Result<TestTally> {
    use std::io::{BufRead, BufReader};
    let shown = display(cmd);
    eprintln!("xtask: running `{shown}`");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start `{shown}`"))?;
    let mut tally = TestTally::default();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line.context("reading test output")?;
            println!("{line}");
            tally.add_line(&line);
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    if !status.success() {
        // With --no-fail-fast every binary ran; the tally says how many failed.
        eprintln!(
            "xtask: tests: {} passed, {} failed, {} ignored",
            tally.passed, tally.failed, tally.ignored
        );
        return Err(Failed {
            command: shown,
            code: status.code(),
        }
        .into());
    }
    Ok(tally)
}

#[cfg(test)]
mod tally_tests {
    use super::TestTally;

    #[test]
    fn sums_libtest_result_lines() {
        let mut t = TestTally::default();
        t.add_line("test result: ok. 9 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 3.14s");
        t.add_line("test result: FAILED. 2 passed; 1 failed; 2 ignored");
        t.add_line("running 3 tests");
        assert_eq!(
            t,
            TestTally {
                passed: 11,
                failed: 1,
                ignored: 2,
            }
        );
    }
}
