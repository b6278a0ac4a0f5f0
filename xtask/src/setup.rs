//! `cargo xtask setup`: everything a fresh machine needs before the eBPF
//! object can be built and the kernel tests can run. Idempotent: each step
//! checks first and says whether it did something or skipped.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{self, output, run, which};

/// Pinned so every machine links the eBPF object with the same linker.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Used when the nightly's libLLVM file name cannot be parsed.
const FALLBACK_LLVM_MAJOR: u32 = 22;

pub fn setup() -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    system_tools()?;
    eprintln!("xtask: setup complete");
    Ok(())
}

/// Building for bpfel-unknown-none uses `-Z build-std=core`, which needs the
/// nightly's standard library sources.
fn rust_src() -> Result<()> {
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .context("installing rust-src for the nightly toolchain")
}

/// Where the libLLVM symlinks and the stamp live; outside the workspace so
/// `cargo clean` does not force a two-minute linker rebuild.
fn cache_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let home =
                std::env::var_os("HOME").context("neither XDG_CACHE_HOME nor HOME is set")?;
            PathBuf::from(home).join(".cache")
        }
    };
    Ok(base.join("router"))
}

/// bpf-linker must be built against the same LLVM that the nightly rustc
/// emits bitcode with; an older LLVM cannot read newer bitcode. The nightly
/// ships its LLVM as a shared library, so we link bpf-linker against exactly
/// that file and record which nightly it was built for. A new nightly (new
/// `rustc -vV` output) means a rebuild.
fn bpf_linker() -> Result<()> {
    let rustc_vv =
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--version", "--verbose"]))
            .context("querying the nightly rustc version (is the nightly toolchain installed?)")?;
    let stamp_contents = format!("bpf-linker {BPF_LINKER_VERSION}\n{rustc_vv}");
    let cache = cache_dir()?;
    let stamp = cache.join("bpf-linker.stamp");

    if let Some(linker) = which("bpf-linker") {
        let stamp_matches = fs::read_to_string(&stamp).is_ok_and(|s| s == stamp_contents);
        // The binary's RUNPATH points at a symlink into the nightly sysroot; a
        // removed toolchain leaves it dangling, so also check that it runs.
        let runs = Command::new(&linker)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if stamp_matches && runs {
            eprintln!(
                "xtask: bpf-linker at {} is up to date for this nightly; skipping rebuild",
                linker.display()
            );
            return Ok(());
        }
        eprintln!("xtask: bpf-linker is stale for this nightly (or broken); rebuilding");
    } else {
        eprintln!("xtask: bpf-linker not found on PATH; building it");
    }

    let sysroot =
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
            .context("querying the nightly sysroot")?;
    let sys_lib = Path::new(sysroot.trim()).join("lib");
    let libllvm = find_libllvm(&sys_lib)?;
    let file_name = libllvm
        .file_name()
        .and_then(|n| n.to_str())
        .context("libLLVM file name is not UTF-8")?
        .to_owned();
    let major = llvm_major(&file_name).unwrap_or_else(|| {
        eprintln!("xtask: cannot parse the LLVM major version from {file_name}; assuming {FALLBACK_LLVM_MAJOR}");
        FALLBACK_LLVM_MAJOR
    });

    let prefix = cache.join(format!("llvm{major}"));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    // Drop links to previous nightlies so the linker can only pick this one.
    for entry in
        fs::read_dir(&prefix_lib).with_context(|| format!("reading {}", prefix_lib.display()))?
    {
        let entry = entry.with_context(|| format!("reading {}", prefix_lib.display()))?;
        let is_llvm = entry.file_name().to_string_lossy().starts_with("libLLVM");
        if is_llvm && entry.file_type().is_ok_and(|t| t.is_symlink()) {
            fs::remove_file(entry.path())
                .with_context(|| format!("removing stale {}", entry.path().display()))?;
        }
    }
    symlink(&libllvm, &prefix_lib.join(&file_name))?;
    symlink(&libllvm, &prefix_lib.join("libLLVM.so"))?;

    run(cmd::cargo()
        .env("LLVM_PREFIX", &prefix)
        .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}")])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        // Without --force, cargo skips an installed bpf-linker of the same
        // version even though it was linked against a previous nightly.
        .arg("--force"))
    .context("building bpf-linker")?;

    fs::write(&stamp, stamp_contents).with_context(|| format!("writing {}", stamp.display()))?;
    eprintln!(
        "xtask: bpf-linker built against {}; stamp written to {}",
        libllvm.display(),
        stamp.display()
    );
    Ok(())
}

/// Finds `libLLVM.so.<version>` in the nightly's `lib` directory (the real
/// file; `libLLVM-<major>-rust-*.so` is an alias of it).
fn find_libllvm(sys_lib: &Path) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(sys_lib)
        .with_context(|| format!("reading {}", sys_lib.display()))?
        .filter_map(|entry| entry.ok())
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("libLLVM.so.")
        })
        .map(|entry| entry.path())
        .collect();
    found.sort();
    match found.pop() {
        Some(path) => Ok(path),
        None => bail!(
            "no libLLVM.so.* in {}; the nightly toolchain must ship LLVM as a shared library",
            sys_lib.display()
        ),
    }
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` -> 22.
fn llvm_major(file_name: &str) -> Option<u32> {
    let version = file_name.strip_prefix("libLLVM.so.")?;
    let end = version
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(version.len());
    version[..end].parse().ok()
}

/// `ln -sf target link`.
fn symlink(target: &Path, link: &Path) -> Result<()> {
    match fs::remove_file(link) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", link.display())),
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}

/// The tests create namespaces and veths with `ip` and serve HTTP from Python
/// backends; the datapath benchmark profiles with `perf`; the multi-node
/// tests run BIRD 2 as the upstream router and the daemon runs gobgpd
/// (`[bgp]`). Installs what is missing when apt-get is available.
fn system_tools() -> Result<()> {
    let runs = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // perf is checked by running it: a /usr/bin/perf wrapper can exist
    // without a perf that runs (Ubuntu's linux-tools-common, for one).
    let missing: Vec<&str> = [
        ("iproute2", which("ip").is_some()),
        ("python3", which("python3").is_some()),
        ("linux-perf", runs("perf")),
        (
            "gobgpd",
            which("gobgpd").is_some() && which("gobgp").is_some(),
        ),
        ("bird2", which("bird").is_some() && which("birdc").is_some()),
    ]
    .into_iter()
    .filter(|(_, present)| !present)
    .map(|(package, _)| package)
    .collect();
    if missing.is_empty() {
        eprintln!(
            "xtask: ip, python3, perf, gobgpd and bird are present; skipping package installation"
        );
        return Ok(());
    }
    if which("apt-get").is_none() {
        bail!("missing packages {missing:?} and apt-get is unavailable; install them manually");
    }
    eprintln!("xtask: installing missing packages {missing:?}");
    run(Command::new("apt-get").arg("update")).context("apt-get update")?;
    run(Command::new("apt-get")
        // CI runs without a terminal or stdin; never prompt.
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y"])
        .args(&missing))
    .with_context(|| format!("installing {missing:?}"))?;
    // The packages enable services of their own; the router runs gobgpd as
    // its child and the tests run BIRD in their namespaces, so neither
    // should listen on the host. Without systemd there is nothing to stop.
    if which("systemctl").is_some() {
        for unit in ["gobgpd", "bird"] {
            let _ = Command::new("systemctl")
                .args(["disable", "--now", unit])
                .output();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::llvm_major;

    #[test]
    fn parses_llvm_major() {
        assert_eq!(llvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"), Some(22));
        assert_eq!(llvm_major("libLLVM.so.19.1"), Some(19));
        assert_eq!(llvm_major("libLLVM.so.x"), None);
    }
}
