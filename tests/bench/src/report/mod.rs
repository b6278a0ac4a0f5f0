//! `bench report`: one page, `RESULTS.md`, from the suites' raw JSON
//! (datapath, control, l4, routing) in the output directory, with SVG plots
//! beside it. Also the machine description every suite records.
//!
//! The page only reads what the suites wrote, so it can be rebuilt without
//! measuring again (`bench report`). A suite that did not run, or a
//! contender that was skipped, is said so on the page.

use std::{collections::BTreeMap, fmt::Write as _, path::Path, process::Command};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

mod canary;
mod l4;
mod plot;
mod routing;

use canary::canary_section;
use l4::l4_section;
use routing::routing_section;

/// Median of the samples that are numbers (NaN ones, a run that measured
/// nothing, are left out); NaN when none is. The one median of every suite.
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => s[n / 2],
        _ => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Nearest-rank quantile `q` (0–1) of the samples that are numbers; NaN
/// when none is. Nearest rank, not interpolated: the figure is one that
/// was measured.
pub fn percentile(v: &[f64], q: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let rank = (q * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

fn first_line(cmd: &[&str]) -> String {
    Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "not installed".into())
}

/// The machine: kernel, CPU, cores, memory, distribution, virtualisation.
pub fn machine_json() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let vm = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"));
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0 / 1024.0);
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    // SAFETY: sysconf has no memory effects.
    let nproc = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    json!({
        "commit": source_commit(),
        "kernel": first_line(&["uname", "-r"]),
        "cpu_model": cpu,
        "cpus_online": nproc,
        "memory_gib": mem_gib,
        "virtual_machine": vm,
        "os": os,
    })
}

/// The commit the benchmark binary's tree is at, with `-dirty` when the
/// work tree has changes: which code a recorded figure belongs to. Read
/// once, at the first call (the bench binary makes it at its start, right
/// after `cargo run` built it from that tree): an edit made while an hour
/// of benchmarks runs does not change what they measured.
pub fn source_commit() -> String {
    static COMMIT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    COMMIT.get_or_init(read_source_commit).clone()
}

fn read_source_commit() -> String {
    let root = router_testkit::fixtures::workspace_root();
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(head) => {
            // Recorded results in bench/ are outputs, not the code they measure.
            let dirty = git(&[
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":!bench",
            ])
            .is_some_and(|s| !s.is_empty());
            if dirty { format!("{head}-dirty") } else { head }
        }
        None => "unknown".into(),
    }
}

/// Versions of the peers, as the binaries report them.
pub fn peer_versions() -> Value {
    json!({
        "nginx": first_line(&["nginx", "-v"]),
        "haproxy": first_line(&["haproxy", "-v"]),
        "iptables": first_line(&["iptables", "--version"]),
        "nft": first_line(&["nft", "--version"]),
        "wrk": first_line(&["wrk", "-v"]),
    })
}

fn read_json(dir: &Path, name: &str) -> Option<Value> {
    let text = std::fs::read_to_string(dir.join(name)).ok()?;
    serde_json::from_str(&text).ok()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

/// Code every suite's figures depend on: the packet path and the map
/// definitions.
const SHARED_CODE: [&str; 2] = ["router-ebpf", "router-common"];

/// A suite's own code besides `SHARED_CODE`: its benchmark and what of the
/// daemon it measures.
fn suite_code(suite: &str) -> &'static [&'static str] {
    match suite {
        "datapath" => &["tests/bench/src/datapath"],
        "l4" => &[
            "tests/bench/src/l4.rs",
            "tests/bench/src/l4",
            "tests/bench/src/netstat.rs",
            "tests/bench/src/loadgen.rs",
            "tests/bench/src/peers.rs",
        ],
        "routing" => &[
            "tests/bench/src/routing",
            "router-userspace/src/policy",
            "router-userspace/src/control_loop",
        ],
        "canary" => &[
            "tests/bench/src/canary",
            "tests/bench/src/loadgen.rs",
            "router-userspace/src/control_loop",
            "router-userspace/src/pools",
        ],
        "control" => &[
            "tests/bench/src/control.rs",
            "router-userspace/src/maglev.rs",
            "router-userspace/src/telemetry",
        ],
        _ => &[],
    }
}

/// Why figures recorded at `commit` no longer describe this tree: they were
/// recorded from uncommitted changes, or the code they depend on (`own`
/// and `SHARED_CODE`) changed since. None when they still do, or when no
/// commit was recorded (the section says so itself).
fn staleness(commit: Option<&str>, own: &[&str]) -> Option<String> {
    staleness_in(Path::new("."), commit, own)
}

/// `staleness` for the repository that holds `dir`.
fn staleness_in(dir: &Path, commit: Option<&str>, own: &[&str]) -> Option<String> {
    let commit = commit?;
    let (hash, dirty) = match commit.strip_suffix("-dirty") {
        Some(h) => (h, true),
        None => (commit, false),
    };
    // `:/` roots each path at the repository's top, wherever this runs.
    let out = Command::new("git")
        .current_dir(dir)
        .args(["diff", "--name-only", hash, "HEAD", "--"])
        .args(SHARED_CODE.iter().chain(own).map(|p| format!(":/{p}")))
        .output();
    let mut why = Vec::new();
    if dirty {
        why.push(format!(
            "recorded from a tree with uncommitted changes on `{hash}`"
        ));
    }
    match out {
        Ok(o) if o.status.success() => {
            let changed: Vec<String> = String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_owned)
                .collect();
            if let Some(first) = changed.first() {
                why.push(format!(
                    "{} file(s) it depends on changed since `{hash}` (`{first}`{})",
                    changed.len(),
                    if changed.len() > 1 { ", …" } else { "" }
                ));
            }
        }
        _ => why.push(format!(
            "`{hash}` cannot be compared with this checkout (git diff failed)"
        )),
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// Writes `RESULTS.md` and the plots into `dir` from the JSON there.
pub fn write_report(dir: &Path, quick: bool) -> Result<()> {
    let dp = read_json(dir, "datapath.json");
    let ctl = read_json(dir, "control.json");
    let l4 = read_json(dir, "l4.json");
    let rt = read_json(dir, "routing.json");
    let cn = read_json(dir, "canary.json");
    let mut md = String::new();
    let mut headline = String::new();
    writeln!(md, "# Benchmark results\n")?;
    writeln!(
        md,
        "Page built by `cargo xtask bench{}` on {} (UTC) from the suites' JSON in this \
         directory; a suite run on its own (`cargo xtask bench l4`) replaces only its own file, \
         so sections may come from different runs, but within a section every figure and its \
         reference come from one run. Every figure is the median of \
         repeated runs and is given as a ratio to its reference measured in the same run. \
         The raw numbers are in the JSON files beside this page; the plots are SVG files \
         beside it too.{}\n",
        if quick { " --quick" } else { "" },
        first_line(&["date", "-u", "+%Y-%m-%d %H:%M"]),
        if quick {
            " **Quick mode: runs far too short for the figures to mean anything; it only \
             shows that every benchmark still runs.**"
        } else {
            ""
        }
    )?;
    let m = machine_json();
    writeln!(md, "## Machine\n")?;
    // Which code each suite's figures belong to.
    let commits: Vec<String> = [
        ("datapath", dp.as_ref().map(|d| &d["commit"])),
        ("L4", l4.as_ref().map(|d| &d["machine"]["commit"])),
        ("routing", rt.as_ref().map(|d| &d["machine"]["commit"])),
        ("canary", cn.as_ref().map(|d| &d["machine"]["commit"])),
        ("control", ctl.as_ref().map(|d| &d["commit"])),
    ]
    .into_iter()
    .map(|(suite, c)| {
        format!(
            "{suite} `{}`",
            c.and_then(Value::as_str).unwrap_or("not recorded")
        )
    })
    .collect();
    writeln!(md, "- Recorded at commits: {}.", commits.join(", "))?;
    writeln!(
        md,
        "- {} · {} CPUs online{} · {:.0} GiB memory · kernel `{}` · {}",
        m["cpu_model"].as_str().unwrap_or("?"),
        m["cpus_online"],
        if m["virtual_machine"].as_bool() == Some(true) {
            " (virtual machine)"
        } else {
            ""
        },
        f(&m["memory_gib"]),
        m["kernel"].as_str().unwrap_or("?"),
        m["os"].as_str().unwrap_or("?"),
    )?;
    let pv = peer_versions();
    writeln!(
        md,
        "- Peers (Debian packages): {}; {}; {}; {}; {}.",
        pv["nginx"].as_str().unwrap_or("?"),
        pv["haproxy"].as_str().unwrap_or("?"),
        pv["iptables"].as_str().unwrap_or("?"),
        pv["nft"].as_str().unwrap_or("?"),
        pv["wrk"].as_str().unwrap_or("?"),
    )?;
    writeln!(
        md,
        "- Everything (load generator, balancer, backends, replicas) shares these cores, \
         as on a single test host; absolute figures are this machine's, the ratios are what \
         carries over.\n"
    )?;

    let mut body = String::new();
    datapath_section(&mut body, &mut headline, dp.as_ref())?;
    placement_cost_section(&mut body, &mut headline, dir)?;
    l4_section(&mut body, &mut headline, l4.as_ref(), dir)?;
    routing_section(&mut body, &mut headline, rt.as_ref(), dir)?;
    canary_section(&mut body, &mut headline, cn.as_ref())?;
    control_section(&mut body, &mut headline, ctl.as_ref())?;
    writeln!(md, "## Headline\n")?;
    writeln!(md, "| measure | result | target | |\n|---|---|---|---|")?;
    md.push_str(&headline);
    md.push('\n');
    // A section whose code changed since it was recorded says so at its
    // head: its figures describe other code.
    for (heading, suite, json, commit_at) in [
        ("## 1. Datapath\n", "datapath", &dp, "/commit"),
        ("## 2. L4 forwarding\n", "l4", &l4, "/machine/commit"),
        ("## 3. Routing quality\n", "routing", &rt, "/machine/commit"),
        ("## 3b. Canary rollback\n", "canary", &cn, "/machine/commit"),
        ("## 4. Control plane\n", "control", &ctl, "/commit"),
    ] {
        let commit = json
            .as_ref()
            .and_then(|j| j.pointer(commit_at))
            .and_then(Value::as_str);
        if let Some(why) = staleness(commit, suite_code(suite)) {
            body = body.replacen(
                heading,
                &format!(
                    "{heading}\n> **Stale:** {why}; re-record with `cargo xtask bench {suite}`.\n"
                ),
                1,
            );
        }
    }
    md.push_str(&body);
    std::fs::write(dir.join("RESULTS.md"), md).context("writing RESULTS.md")?;
    eprintln!("wrote {}", dir.join("RESULTS.md").display());
    Ok(())
}

fn datapath_section(md: &mut String, head: &mut String, dp: Option<&Value>) -> Result<()> {
    writeln!(md, "## 1. Datapath\n")?;
    let Some(dp) = dp else {
        writeln!(md, "Not run (no `datapath.json`).\n")?;
        return Ok(());
    };
    writeln!(
        md,
        "ns per packet through BPF_PROG_TEST_RUN, as a ratio to a trivial XDP_PASS program \
         measured in the same run ([datapath.md](datapath.md) has the method and min–max).\n"
    )?;
    writeln!(
        md,
        "| path | mode | ns/packet | ratio to XDP_PASS | target | result |\n|---|---|---|---|---|---|"
    )?;
    for r in dp["summary"].as_array().into_iter().flatten() {
        let target = r["target_ratio"]
            .as_f64()
            .map(|t| format!("≤ {t}×"))
            .unwrap_or_else(|| "—".into());
        writeln!(
            md,
            "| {} | {} | {:.1} | {:.2}× | {target} | {} |",
            r["path"].as_str().unwrap_or("?"),
            r["mode"].as_str().unwrap_or("?"),
            f(&r["ns_median"]),
            f(&r["ratio_median"]),
            r["result"].as_str().unwrap_or("—"),
        )?;
        if r["mode"] == "single"
            && let Some(t) = r["target_ratio"].as_f64()
        {
            writeln!(
                head,
                "| datapath: {} | {:.2}× XDP_PASS | ≤ {t}× | {} |",
                r["path"].as_str().unwrap_or("?"),
                f(&r["ratio_median"]),
                verdict(f(&r["ratio_median"]) <= t)
            )?;
        }
    }
    md.push('\n');
    Ok(())
}

/// The SYN path against the program before in-flight counting and
/// least-loaded selection: alternating invocations of the datapath
/// benchmark at this commit and at the commit before (`datapath_ab/`,
/// `new-N.json` and `old-N.json`), each path as its ratio to XDP_PASS in
/// its own invocation, and per pair the ratio of the two. Invocations
/// drift by several percent on this VM, so one pair proves little; the
/// median over the pairs is the figure.
fn placement_cost_section(md: &mut String, head: &mut String, dir: &Path) -> Result<()> {
    let ab = dir.join("datapath_ab");
    let mut pairs = Vec::new();
    for i in 1.. {
        match (
            read_json(&ab, &format!("new-{i}.json")),
            read_json(&ab, &format!("old-{i}.json")),
        ) {
            (Some(n), Some(o)) => pairs.push((n, o)),
            _ => break,
        }
    }
    if pairs.is_empty() {
        return Ok(());
    }
    let ratio = |doc: &Value, path: &str| {
        doc["summary"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["path"] == path && r["mode"] == "single")
            .and_then(|r| r["ratio_median"].as_f64())
    };
    writeln!(
        md,
        "### The SYN path before and after placement\n\n\
         {} alternating invocations of `bench datapath` at this commit (`{}`) and at the \
         commit before in-flight counting and least-loaded selection ({}), in \
         `datapath_ab/`. Each path is a ratio to XDP_PASS measured in its own \
         invocation; the table gives, per pair, that ratio over the old SYN path's, \
         median and min–max over the pairs. Goal: the new SYN path at most 1.10× the \
         old.\n",
        pairs.len(),
        pairs[0].0["commit"].as_str().unwrap_or("?"),
        pairs[0].1["commit"].as_str().unwrap_or("?"),
    )?;
    writeln!(md, "| path | × before, median (min–max) |\n|---|---|")?;
    let paths: Vec<String> = pairs[0].0["summary"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["mode"] == "single")
        .filter_map(|r| r["path"].as_str())
        .filter(|p| p.starts_with("SYN") || *p == "established TCP forward")
        .map(str::to_owned)
        .collect();
    let mut medians = BTreeMap::new();
    for path in &paths {
        // The established path is compared with the old established path.
        let old_path = if path.starts_with("SYN") {
            "SYN new flow"
        } else {
            path.as_str()
        };
        let per_pair: Vec<f64> = pairs
            .iter()
            .filter_map(|(n, o)| Some(ratio(n, path)? / ratio(o, old_path)?))
            .collect();
        if per_pair.is_empty() {
            continue;
        }
        let m = median(&per_pair);
        let (lo, hi) = per_pair
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
                (a.min(*x), b.max(*x))
            });
        writeln!(md, "| {path} | {m:.2}× ({lo:.2}–{hi:.2}) |")?;
        medians.insert(path.clone(), m);
    }
    md.push('\n');
    for (path, label) in [
        (
            "SYN new flow (Maglev, 3 backends)",
            "SYN, Maglev (with counting)",
        ),
        (
            "SYN, least-loaded scan, 4 backends",
            "SYN, least-loaded, 4 backends",
        ),
        (
            "SYN, least-loaded scan, 8 backends",
            "SYN, least-loaded, 8 backends (largest scan)",
        ),
        (
            "SYN, least-loaded two choices, 16 backends",
            "SYN, least-loaded two choices, 16 backends",
        ),
    ] {
        if let Some(m) = medians.get(path) {
            writeln!(
                head,
                "| datapath: {label} vs before placement | {m:.2}× | ≤ 1.10× | {} |",
                verdict(*m <= 1.10)
            )?;
        }
    }
    Ok(())
}

fn control_section(md: &mut String, head: &mut String, ctl: Option<&Value>) -> Result<()> {
    writeln!(md, "## 4. Control plane\n")?;
    let Some(ctl) = ctl else {
        writeln!(md, "Not run (no `control.json`).\n")?;
        return Ok(());
    };
    writeln!(
        md,
        "From [control.md](control.md), which has the method. Maglev rebuild, median of \
         repeated builds, and its ratio to the 10-backend build in the same run:\n"
    )?;
    writeln!(
        md,
        "| backends | slots | ms | × 10 backends |\n|---|---|---|---|"
    )?;
    let rows: Vec<&Value> = ctl["maglev_rebuild"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let base = rows
        .iter()
        .find(|r| r["backends"] == 10)
        .map_or(f64::NAN, |r| f(&r["median_ms"]));
    for r in &rows {
        writeln!(
            md,
            "| {} | {} | {:.2} | {:.2}× |",
            r["backends"],
            r["table_size"],
            f(&r["median_ms"]),
            f(&r["median_ms"]) / base
        )?;
        if r["backends"] == 1000 && r["table_size"] == 65537 {
            writeln!(
                head,
                "| control: Maglev rebuild, 1,000 backends | {:.2} ms | < 10 ms | {} |",
                f(&r["median_ms"]),
                verdict(f(&r["median_ms"]) < 10.0)
            )?;
        }
    }
    let p = &ctl["polling"];
    writeln!(
        md,
        "\nDaemon polling {} endpoints at {} Hz: {:.2}% of one core, {:.1} MiB RSS, {} failed polls \
         of {}.\n\nReaction from the first saturated reading to the weight halved: {} polls.\n",
        p["backends"],
        p["hz"],
        f(&p["cpu_percent"]),
        f(&p["rss_mib"]),
        p["poll_errors"],
        p["polls"],
        ctl["reaction_polls"],
    )?;
    writeln!(
        head,
        "| control: daemon CPU, 64 backends at 4 Hz | {:.2}% of a core, {:.1} MiB | < 2% | {} |",
        f(&p["cpu_percent"]),
        f(&p["rss_mib"]),
        verdict(f(&p["cpu_percent"]) < 2.0)
    )?;
    writeln!(
        head,
        "| control: reaction, saturation → weight halved | {} polls | ≤ 2 | {} |",
        ctl["reaction_polls"],
        verdict(ctl["reaction_polls"].as_u64().is_some_and(|n| n <= 2))
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Command, median, percentile, staleness_in};

    #[test]
    fn percentile_is_the_nearest_rank() {
        let v: Vec<f64> = (1..=10).map(f64::from).rev().collect();
        assert_eq!(percentile(&v, 0.9), 9.0);
        assert_eq!(percentile(&v, 0.5), 5.0);
        assert_eq!(percentile(&v, 1.0), 10.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[f64::NAN, 3.0], 0.9), 3.0);
        assert!(percentile(&[], 0.9).is_nan());
    }

    #[test]
    fn a_section_is_stale_when_its_code_changed_or_it_was_recorded_dirty() {
        // A repository of its own, so the test needs no history of this one.
        let dir = std::env::temp_dir().join(format!("router-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("router-ebpf")).unwrap();
        let git = |args: &[&str]| {
            let o = Command::new("git")
                .current_dir(&dir)
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .output()
                .unwrap();
            assert!(o.status.success(), "git {args:?}: {o:?}");
            String::from_utf8_lossy(&o.stdout).trim().to_owned()
        };
        let commit = |file: &str, text: &str| {
            std::fs::write(dir.join(file), text).unwrap();
            git(&["add", "-A"]);
            git(&["commit", "-qm", "x"]);
            git(&["rev-parse", "HEAD"])
        };
        git(&["init", "-q"]);
        let first = commit("router-ebpf/a.rs", "1");
        let second = commit("unrelated.txt", "1");
        assert_eq!(
            staleness_in(&dir, Some(&first), &[]),
            None,
            "only unrelated code changed"
        );
        commit("router-ebpf/a.rs", "2");
        let why = staleness_in(&dir, Some(&second), &[]).expect("the datapath changed");
        assert!(
            why.contains("changed since") && why.contains("router-ebpf/a.rs"),
            "{why}"
        );
        let head = git(&["rev-parse", "HEAD"]);
        assert_eq!(
            staleness_in(&dir, Some(&head), &[]),
            None,
            "recorded at HEAD"
        );
        let dirty = staleness_in(&dir, Some(&format!("{head}-dirty")), &[]).expect("dirty");
        assert!(dirty.contains("uncommitted"), "{dirty}");
        let unknown = staleness_in(&dir, Some("0123456789ab"), &[]).expect("unknown");
        assert!(unknown.contains("cannot be compared"), "{unknown}");
        assert_eq!(
            staleness_in(&dir, None, &[]),
            None,
            "no commit: the section says so"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
    }
}
