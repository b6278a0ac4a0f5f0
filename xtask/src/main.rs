//! Developer workflows for the router workspace (`cargo xtask --help`).
//!
//! Deliberately depends only on anyhow and clap: it has to build on a fresh
//! machine before any eBPF toolchain (nightly rust-src, bpf-linker) exists,
//! because installing that toolchain is its first job.

mod cmd;
mod setup;

use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

use crate::cmd::{Failed, cargo, run};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, test, run and benchmark the XDP router",
    long_about = "Build, test, run and benchmark the XDP router.\n\n\
        Every workflow runs `setup` first, so a fresh machine needs only rustup \
        (stable + nightly) and root."
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain (nightly rust-src, bpf-linker built against
    /// the nightly's LLVM) and the test tools (iproute2, python3, linux-perf). Idempotent.
    Setup,
    /// Build the release `router` binary, including the eBPF object.
    Build,
    /// Check formatting, run clippy, run every test one at a time, then the quick benchmarks (needs root).
    Test,
    /// Build, then run the GPU demo: four mock GPU replicas behind the router,
    /// one saturating and one starting cold, watched in `router top` (needs root).
    Demo {
        /// Arguments passed through to the demo (--plain, --check, --duration 45s).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Build, then run the weighted-split demo: static weights, a reload, a pinned stream (needs root).
    Run {
        /// Arguments passed through to the demo binary.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run the benchmarks: results, bench/RESULTS.md and plots go in bench/
    /// (with --quick in target/bench-quick/). Needs root; installs the peers
    /// (nginx, HAProxy, iptables, nftables) with apt-get when missing.
    Bench {
        /// Which benchmark suite to run; the bench binary's default when omitted.
        suite: Option<BenchSuite>,
        /// Shorter runs, for a smoke check rather than numbers worth recording.
        #[arg(long)]
        quick: bool,
        /// Further arguments passed through to the bench binary (after `--`).
        #[arg(last = true)]
        extra: Vec<OsString>,
    },
    /// Build, then run the soak: weight churn every 100 ms, a flapping and a
    /// killed backend and daemon restarts under steady traffic. Fails unless
    /// no connection failed on a healthy backend (needs root).
    Soak {
        /// How long to run, in minutes (fractions allowed).
        #[arg(long, default_value_t = 2.0)]
        minutes: f64,
        /// Also write bench/soak.md and bench/soak.json.
        #[arg(long)]
        record: bool,
        /// Further arguments passed through to the soak binary (after `--`),
        /// e.g. `--seed N`, `--no-hard-flap`, `--reuse-ports`.
        #[arg(last = true)]
        extra: Vec<OsString>,
    },
    /// Format the whole workspace.
    Fmt,
    /// Run clippy on the whole workspace with warnings denied.
    Clippy,
}

#[derive(Clone, Copy, ValueEnum)]
enum BenchSuite {
    /// XDP datapath: ns per packet through BPF_PROG_TEST_RUN, against XDP_PASS.
    Datapath,
    /// Control plane: Maglev rebuild time, daemon CPU and RSS while polling.
    Control,
    /// L4 forwarding: connection rate and latency against direct, iptables, nftables, HAProxy.
    L4,
    /// Routing quality with mock GPU replicas: round-robin, leastconn, GPU-aware, oracle.
    Routing,
    /// A 10% canary pool whose replica slows, with and without its rollback guard.
    Canary,
    /// SYN flood against a small connection table (bench/synflood.md); not part of `all`.
    Synflood,
    /// Two LBs under ECMP, one killed or stopped under streams (bench/failover.md); not part of `all`.
    Failover,
    /// Rebuild RESULTS.md and the plots from the results already recorded.
    Report,
    /// Every suite, then the report.
    All,
}

impl BenchSuite {
    fn as_arg(self) -> &'static str {
        match self {
            BenchSuite::Datapath => "datapath",
            BenchSuite::Control => "control",
            BenchSuite::L4 => "l4",
            BenchSuite::Routing => "routing",
            BenchSuite::Canary => "canary",
            BenchSuite::Synflood => "synflood",
            BenchSuite::Failover => "failover",
            BenchSuite::Report => "report",
            BenchSuite::All => "all",
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            // Propagate the failing child's status so CI sees the real code.
            let code = err
                .chain()
                .find_map(|e| e.downcast_ref::<Failed>())
                .and_then(|f| f.code)
                .and_then(|c| u8::try_from(c).ok())
                .filter(|&c| c != 0)
                .unwrap_or(1);
            ExitCode::from(code)
        }
    }
}

fn dispatch(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup::setup(),
        Task::Build => {
            setup::setup()?;
            build()
        }
        Task::Test => test(),
        Task::Demo { args } => {
            require_root(
                "cargo xtask demo",
                "the demo creates network namespaces and attaches XDP programs",
            )?;
            setup::setup()?;
            build()?;
            // gpu-3's host reads its GPU through the fake libnvidia-ml.
            run(workspace_cargo().args(["build", "--release", "-p", "fake-nvml"]))
                .context("building the fake NVML library")?;
            run(workspace_cargo()
                .args([
                    "run",
                    "--release",
                    "-p",
                    "router-bench",
                    "--bin",
                    "gpu_demo",
                    "--",
                ])
                .args(args))
            .context("running the GPU demo")
        }
        Task::Run { args } => {
            require_root(
                "cargo xtask run",
                "the demo creates network namespaces and attaches XDP programs",
            )?;
            setup::setup()?;
            build()?;
            run(workspace_cargo()
                .args([
                    "run",
                    "--release",
                    "-p",
                    "router-bench",
                    "--bin",
                    "demo",
                    "--",
                ])
                .args(args))
            .context("running the demo")
        }
        Task::Bench {
            suite,
            quick,
            extra,
        } => {
            if !is_root()? {
                eprintln!(
                    "xtask: warning: not running as root; datapath benchmarks need CAP_NET_ADMIN and CAP_BPF"
                );
            }
            setup::setup()?;
            // The control-plane benchmarks run the real `router` daemon.
            build()?;
            bench(suite.map(BenchSuite::as_arg), quick, &extra)
        }
        Task::Soak {
            minutes,
            record,
            extra,
        } => {
            if !(minutes.is_finite() && minutes > 0.0) {
                bail!("--minutes {minutes} must be a positive number");
            }
            require_root(
                "cargo xtask soak",
                "the soak creates network namespaces and attaches XDP programs",
            )?;
            setup::setup()?;
            // The soak runs (and restarts) the real `router` daemon.
            build()?;
            let mut cmd = workspace_cargo();
            cmd.args([
                "run",
                "--release",
                "-p",
                "router-bench",
                "--bin",
                "soak",
                "--",
                "--minutes",
                &minutes.to_string(),
            ]);
            if record {
                cmd.arg("--record");
            }
            run(cmd.args(extra)).context("running the soak")
        }
        Task::Fmt => run(workspace_cargo().args(["fmt", "--all"])).context("formatting"),
        Task::Clippy => clippy(),
    }
}

fn bench(suite: Option<&str>, quick: bool, extra: &[OsString]) -> Result<()> {
    let mut cmd = workspace_cargo();
    cmd.args([
        "run",
        "--release",
        "-p",
        "router-bench",
        "--bin",
        "bench",
        "--",
    ]);
    if let Some(suite) = suite {
        cmd.arg(suite);
    }
    if quick {
        cmd.arg("--quick");
    }
    run(cmd.args(extra)).context("running the benchmarks")
}

fn build() -> Result<()> {
    // router-userspace's build.rs compiles the eBPF object through aya-build.
    run(workspace_cargo().args(["build", "--release", "-p", "router-userspace", "--bins"]))
        .context("building the router")
}

fn clippy() -> Result<()> {
    // router-ebpf only builds for the BPF target, so it is linted on its own,
    // with the nightly toolchain that builds it.
    run(workspace_cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "router-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy")?;
    let mut nightly = std::process::Command::new("rustup");
    nightly.current_dir(workspace_root());
    // The stable cargo's environment would pin the toolchain; let rustup pick nightly.
    nightly
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN");
    run(nightly.args([
        "run",
        "nightly",
        "cargo",
        "clippy",
        "-p",
        "router-ebpf",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy on the eBPF crate")
}

fn test() -> Result<()> {
    require_root(
        "cargo xtask test",
        "the kernel tests load XDP programs and create network namespaces (CAP_BPF, CAP_NET_ADMIN)",
    )?;
    setup::setup()?;
    run(workspace_cargo().args(["fmt", "--all", "--check"]))
        .context("formatting check (run `cargo xtask fmt`)")?;
    clippy()?;
    // The end-to-end tests run the real `router` binary as a daemon.
    build()?;
    // Kernel tests attach programs and create namespaces; one at a time keeps
    // them from fighting over shared kernel state. router-tests and
    // router-bench dev-depend on fake-nvml, so this also builds
    // libfake_nvml.so for the NVML tests and the demo's.
    let tally = cmd::run_tests(workspace_cargo().args([
        "test",
        "--workspace",
        "--exclude",
        "router-ebpf",
        "--release",
        // Every test binary runs even after one fails, so a failure never
        // hides another.
        "--no-fail-fast",
        "--",
        "--test-threads=1",
    ]))
    .context("tests")?;
    // The benchmarks in quick mode, so they never rot: every suite and every
    // peer runs for a moment (about 200 s in all). Results go in
    // target/bench-quick/, never over the recorded ones in bench/; nothing
    // about speed is asserted.
    let listed = workspace_root()
        .join("target")
        .join("bench-quick")
        .join("skipped.txt");
    // A stale list must not stand for this run's.
    let _ = std::fs::remove_file(&listed);
    bench(Some("all"), true, &[]).context("quick benchmarks (`cargo xtask bench --quick`)")?;
    let skipped: Vec<String> = std::fs::read_to_string(&listed)
        .with_context(|| format!("reading {} (the benchmarks' skips)", listed.display()))?
        .lines()
        .map(str::to_owned)
        .collect();
    if !skipped.is_empty() {
        eprintln!(
            "xtask: benchmark contenders skipped: {}",
            skipped.join(", ")
        );
        // Under CI a skip is a failure: setup installs every contender, so
        // one missing there is a broken setup, not a machine's choice.
        // Elsewhere it is named here and counted in the closing line.
        if std::env::var_os("CI").is_some() {
            bail!(
                "benchmark contenders skipped under CI ({}): `cargo xtask setup` should have installed them",
                skipped.join(", ")
            );
        }
    }
    eprintln!("xtask: all checks and tests passed");
    // The closing line CI reads.
    println!(
        "tests: {} passed, {} failed, {} ignored, {} skipped",
        tally.passed,
        tally.failed,
        tally.ignored,
        skipped.len()
    );
    Ok(())
}

/// Cargo with the workspace root as working directory, so xtask behaves the
/// same from any subdirectory.
fn workspace_cargo() -> std::process::Command {
    let mut cmd = cargo();
    cmd.current_dir(workspace_root());
    cmd
}

fn workspace_root() -> PathBuf {
    // xtask/ sits directly under the workspace root.
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}

fn require_root(what: &str, why: &str) -> Result<()> {
    if !is_root()? {
        bail!("{what} must run as root: {why}. Re-run it with sudo or as root.");
    }
    Ok(())
}

/// Effective uid from /proc, to avoid a libc dependency for one syscall.
fn is_root() -> Result<bool> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .context("no effective uid in /proc/self/status")?;
    Ok(euid == "0")
}
