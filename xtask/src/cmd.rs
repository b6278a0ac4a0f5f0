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
