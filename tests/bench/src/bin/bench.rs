//! Benchmarks of the router.
//! `bench [datapath|control|l4|routing|canary|synflood|failover|report|all] [--quick] [--out DIR]`.
//!
//! Results go in `bench/` at the workspace root: each suite's page or raw
//! JSON, and `RESULTS.md` with SVG plots built from all of them. `--quick`
//! writes to `target/bench-quick/` instead, so smoke runs never overwrite
//! recorded results. The benchmarks assert nothing about speed: the exit
//! status is non-zero only on errors. Needs root (BPF, network namespaces)
//! and installs its peers (nginx, HAProxy, iptables, nftables) with apt-get
//! when they are missing.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use router_bench::{
    canary::{self, CanarySettings},
    control,
    datapath::{self, Settings},
    l4::{self, L4Settings},
    report,
    routing::{self, RoutingSettings},
};
use router_testkit::fixtures::workspace_root;
use serde_json::Value;

const USAGE: &str =
    "usage: bench [datapath|control|l4|routing|canary|synflood|failover|report|all] [--quick] [--out DIR]

  datapath   ns/packet of the XDP program through BPF_PROG_TEST_RUN, against XDP_PASS
  control    control plane: Maglev rebuild time, daemon CPU and RSS, reaction
  l4         connection rate and latency: direct, routed hop, router, iptables, nftables,
             HAProxy
  routing    routing quality with mock GPU replicas, steady and cold join, heavy-tailed
             lengths: round-robin, HAProxy leastconn, oracle, router telemetry weights
             (Maglev draw, least-loaded selection), polled least queue
  canary     a canary pool of 10% whose replica slows part-way, with and without its
             rollback guard: when the guard trips, and both pools' latency
  synflood   spoofed SYNs against a small connection table, paced and unpaced, while
             streams and new connections run (writes synflood.md; not part of all)
  failover   two LBs under ECMP with BGP and DSR, one killed or stopped under
             streams: withdrawal time, broken streams (writes failover.md; not part of all)
  report     rebuild RESULTS.md and the plots from the JSON already in the output directory
  all        every suite, then the report (default)
  --quick    short runs (a few minutes in all); results go in target/bench-quick/
  --out DIR  write the results to DIR instead
  --only K,K run only these L4 contenders (direct and routed always run) or routing policies,
             by the keys in the JSON (router, iptables, ..., round_robin, oracle,
             router_least_loaded, polled_least_queue, ...)

A contender that cannot run (a peer missing, a build without a feature) or fails is
recorded as skipped with the reason, and the closing line lists it.";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Suite {
    Datapath,
    Control,
    L4,
    Routing,
    Canary,
    Synflood,
    Failover,
    Report,
    All,
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The datapath suite pins the process to one CPU; everything after it
/// (load generators, peers, daemons inherit the mask) needs every CPU back.
fn with_affinity_restored<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the kernel fills it.
    let mut saved: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer and size describe `saved`.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut saved) };
    if rc != 0 {
        bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
    }
    let out = f();
    // SAFETY: restores the mask read above for this thread.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &saved) };
    out
}

fn timed<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let t = Instant::now();
    let r = f();
    eprintln!("bench: {name} took {:.0} s", t.elapsed().as_secs_f64());
    r
}

fn real_main() -> Result<()> {
    // The daemons the suites start log every start and health change at
    // info; only warnings belong in a benchmark's output.
    if std::env::var_os("RUST_LOG").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("RUST_LOG", "warn") };
    }
    let mut suite = None;
    let mut quick = false;
    let mut out = None;
    let mut only: Option<Vec<String>> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let s = match a.as_str() {
            "datapath" => Some(Suite::Datapath),
            "control" => Some(Suite::Control),
            "l4" => Some(Suite::L4),
            "routing" => Some(Suite::Routing),
            "canary" => Some(Suite::Canary),
            "synflood" => Some(Suite::Synflood),
            "failover" => Some(Suite::Failover),
            "report" => Some(Suite::Report),
            "all" => Some(Suite::All),
            _ => None,
        };
        match (s, a.as_str()) {
            (Some(s), _) if suite.is_none() => suite = Some(s),
            (None, "--quick") => quick = true,
            (None, "--only") => match args.next() {
                Some(k) => only = Some(k.split(',').map(str::to_owned).collect::<Vec<_>>()),
                None => bail!("--only needs a list of names\n\n{USAGE}"),
            },
            (None, "--out") => match args.next() {
                Some(d) => out = Some(PathBuf::from(d)),
                None => bail!("--out needs a directory\n\n{USAGE}"),
            },
            (None, "-h" | "--help") => {
                println!("{USAGE}");
                return Ok(());
            }
            _ => bail!("unexpected argument {a:?}\n\n{USAGE}"),
        }
    }
    let out = out.unwrap_or_else(|| {
        let root = workspace_root();
        if quick {
            root.join("target").join("bench-quick")
        } else {
            root.join("bench")
        }
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let started = Instant::now();
    // Fixed now, while the tree is the one `cargo run` just built.
    let commit = report::source_commit();
    eprintln!("bench: measuring commit {commit}");
    let mut skipped = Vec::new();
    let suite = suite.unwrap_or(Suite::All);
    let wants = |s: Suite| suite == s || suite == Suite::All;
    if wants(Suite::Datapath) {
        let settings = if quick {
            Settings::quick(out.clone())
        } else {
            Settings::full(out.clone())
        };
        timed("datapath", || {
            with_affinity_restored(|| datapath::run_datapath(&settings))
        })?;
    }
    if wants(Suite::Control) {
        timed("control", || control::run_control(quick, &out))?;
    }
    if wants(Suite::L4) {
        let s = if quick {
            L4Settings::quick()
        } else {
            L4Settings::full()
        };
        let doc = timed("l4", || l4::run_l4(&s, &out, only.as_deref()))?;
        skipped.extend(skipped_in("l4", &doc));
    }
    if wants(Suite::Routing) {
        let s = if quick {
            RoutingSettings::quick()
        } else {
            RoutingSettings::full()
        };
        let doc = timed("routing", || {
            routing::run_routing(&s, &out, only.as_deref())
        })?;
        skipped.extend(skipped_in("routing", &doc));
    }
    if wants(Suite::Canary) {
        let s = if quick {
            CanarySettings::quick()
        } else {
            CanarySettings::full()
        };
        timed("canary", || canary::run_canary(&s, &out))?;
    }
    if suite == Suite::Failover {
        timed("failover", || {
            router_bench::failover::run_bench(quick, &out)
        })?;
    }
    if suite == Suite::Synflood {
        timed("synflood", || {
            router_bench::synflood::run_bench(quick, &out)
        })?;
    }
    report(&out, quick)?;
    // For `cargo xtask test`, whose closing line counts what was skipped.
    let listed = out.join("skipped.txt");
    let text: String = skipped.iter().map(|k| format!("{k}\n")).collect();
    std::fs::write(&listed, text).with_context(|| format!("writing {}", listed.display()))?;
    eprintln!(
        "bench: done in {:.0} s; results in {}; {}",
        started.elapsed().as_secs_f64(),
        out.display(),
        if skipped.is_empty() {
            "nothing skipped".to_owned()
        } else {
            format!("SKIPPED: {}", skipped.join(", "))
        }
    );
    Ok(())
}

/// `suite/contender` for each contender a suite's document records as
/// skipped, or `suite` when the whole suite was.
fn skipped_in(suite: &str, doc: &Value) -> Vec<String> {
    if doc["skipped"].is_string() {
        return vec![suite.to_owned()];
    }
    doc["contenders"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c.get("skipped").is_some())
        .map(|c| format!("{suite}/{}", c["contender"].as_str().unwrap_or("?")))
        .collect()
}

fn report(out: &Path, quick: bool) -> Result<()> {
    report::write_report(out, quick)
}
