//! The results: the machine, the rows (medians, ratios to XDP_PASS,
//! targets), the Markdown table and `datapath.json`.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result};
use router_testkit::kernel_ns::run;
use serde_json::{Value, json};

use super::paths::SYN_CASES;
use super::profiling::{PathProfile, section};
use super::{
    DSR_GOAL, ESTABLISHED_REF, METHOD, NEW_CONN_REF, NON_SERVICE_REF, Reference, SYN_REF, Samples,
    Settings, WARMUP_CALLS, key, min_max,
};
use crate::report::median;

pub struct Machine {
    pub kernel: String,
    pub cpu_model: String,
    pub nproc: usize,
    pub hypervisor: bool,
    pub bpf_jit_enable: String,
    pub pinned_cpu: usize,
}

pub(super) fn machine(pinned_cpu: usize) -> Result<Machine> {
    let kernel = run(&["uname", "-r"])?.trim().to_string();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let hypervisor = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"));
    // Not available_parallelism: that counts the CPUs this (pinned) process may use.
    // SAFETY: sysconf has no memory effects.
    let nproc = usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) })
        .context("counting online CPUs")?;
    let bpf_jit_enable = std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    Ok(Machine {
        kernel,
        cpu_model,
        nproc,
        hypervisor,
        bpf_jit_enable,
        pinned_cpu,
    })
}

/// One row of the results table.
pub(super) struct Row {
    pub(super) path: &'static str,
    /// The single-mode series the row is measured from, if one.
    pub(super) series: Option<&'static str>,
    pub(super) mode: &'static str,
    pub(super) ns: Vec<f64>,
    /// Per run, the 90th percentile of the per-call durations (single
    /// mode; a sum of two calls has none).
    pub(super) p90: Option<Vec<f64>>,
    pub(super) adjusted: Option<Vec<f64>>,
    pub(super) ratio: Option<Vec<f64>>,
    pub(super) raw_ratio: Option<Vec<f64>>,
    pub(super) reference: Option<&'static Reference>,
}

impl Row {
    pub(super) fn verdict(&self) -> &'static str {
        match (self.reference, &self.ratio) {
            (Some(r), Some(v)) if median(v) <= r.target => "met",
            (Some(_), Some(_)) => "missed",
            _ => "—",
        }
    }
}

/// The per-run figure of a single-mode series: the median of its calls'
/// durations, so one interrupted call does not move it as it moves a mean
/// (the means stay in the JSON, under `kernel_ns`).
const SINGLE_FIGURE: &str = "kernel_call_median_ns";

fn per_run(a: &[f64], b: &[f64], f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| f(*x, *y)).collect()
}

pub(super) fn rows(s: &Samples) -> Result<Vec<Row>> {
    let t0_rep = s.get("trivial/repeat/kernel_ns")?;
    let t0_single = s.get(&key("trivial", SINGLE_FIGURE))?;
    // Fixed per-call overhead of single mode, per run.
    let overhead = per_run(t0_single, t0_rep, |a, b| a - b);
    let mut rows = vec![
        Row {
            path: "trivial XDP_PASS (reference)",
            series: None,
            mode: "repeat",
            ns: t0_rep.to_vec(),
            p90: None,
            adjusted: None,
            ratio: Some(vec![1.0; t0_rep.len()]),
            raw_ratio: None,
            reference: None,
        },
        Row {
            path: "non-service pass",
            series: None,
            mode: "repeat",
            ns: s.get("non_service/repeat/kernel_ns")?.to_vec(),
            p90: None,
            adjusted: None,
            ratio: Some(per_run(
                s.get("non_service/repeat/kernel_ns")?,
                t0_rep,
                |a, b| a / b,
            )),
            raw_ratio: None,
            reference: Some(&NON_SERVICE_REF),
        },
        Row {
            path: "trivial XDP_PASS (reference)",
            series: Some("trivial"),
            mode: "single",
            ns: t0_single.to_vec(),
            p90: Some(s.get(&key("trivial", "kernel_call_p90_ns"))?.to_vec()),
            adjusted: Some(t0_rep.to_vec()),
            ratio: Some(vec![1.0; t0_rep.len()]),
            raw_ratio: Some(vec![1.0; t0_rep.len()]),
            reference: None,
        },
    ];
    let fixed = [
        ("non-service pass", "non_service", Some(&NON_SERVICE_REF)),
        (
            "established TCP forward",
            "established",
            Some(&ESTABLISHED_REF),
        ),
        ("reply (backend → SNAT)", "reply", None),
        ("DSR established forward (IPIP)", "dsr_established", None),
        (
            "IPv6 DSR established forward (IPv6 in IPv6)",
            "dsr6_established",
            None,
        ),
        (
            "IPv6 NAT established forward (tail call to router_nat6)",
            "nat6_established",
            None,
        ),
        ("first ACK of a new flow (promotes it)", "first_ack", None),
        (
            "UDP first datagram of a new flow (Maglev, 3 backends)",
            "udp_first",
            None,
        ),
    ];
    let syns = SYN_CASES
        .iter()
        .map(|c| (c.path, c.key, (c.key == "syn").then_some(&SYN_REF)));
    for (path, series, reference) in fixed.into_iter().chain(syns) {
        let ns = s.get(&key(series, SINGLE_FIGURE))?;
        let adjusted = per_run(ns, &overhead, |a, o| a - o);
        rows.push(Row {
            path,
            series: Some(series),
            mode: "single",
            ns: ns.to_vec(),
            p90: Some(s.get(&key(series, "kernel_call_p90_ns"))?.to_vec()),
            ratio: Some(per_run(&adjusted, t0_rep, |a, b| a / b)),
            raw_ratio: Some(per_run(ns, t0_single, |a, b| a / b)),
            adjusted: Some(adjusted),
            reference,
        });
    }
    // The whole cost of a new connection to the datapath: its SYN (Maglev)
    // and the client's first ACK, each net of the per-call overhead.
    let syn = s.get(&key("syn", SINGLE_FIGURE))?;
    let ack = s.get(&key("first_ack", SINGLE_FIGURE))?;
    let both = per_run(syn, ack, |a, b| a + b);
    let adjusted = per_run(&both, &overhead, |a, o| a - 2.0 * o);
    rows.push(Row {
        path: "SYN + first ACK (a new connection, Maglev)",
        series: None,
        mode: "single",
        ns: both,
        p90: None,
        ratio: Some(per_run(&adjusted, t0_rep, |a, b| a / b)),
        // Two calls against one: a raw ratio would count the overhead twice.
        raw_ratio: None,
        adjusted: Some(adjusted),
        reference: Some(&NEW_CONN_REF),
    });
    Ok(rows)
}

fn fmt_ns(v: &[f64]) -> String {
    let (lo, hi) = min_max(v);
    format!("{:.1} ({:.1}–{:.1})", median(v), lo, hi)
}

fn fmt_ratio(v: &[f64]) -> String {
    format!("{:.2}×", median(v))
}

pub(super) fn table(rows: &[Row]) -> String {
    let mut t = String::new();
    t.push_str(
        "| path | mode | ns/packet, median (min–max) | p90 | overhead-subtracted ns | ratio to XDP_PASS | raw ratio | target | Katran | result |\n",
    );
    t.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.path,
            r.mode,
            fmt_ns(&r.ns),
            r.p90
                .as_deref()
                .map(|v| format!("{:.1}", median(v)))
                .unwrap_or_else(|| "—".into()),
            r.adjusted
                .as_deref()
                .map(fmt_ns)
                .unwrap_or_else(|| "—".into()),
            r.ratio
                .as_deref()
                .map(fmt_ratio)
                .unwrap_or_else(|| "—".into()),
            r.raw_ratio
                .as_deref()
                .map(fmt_ratio)
                .unwrap_or_else(|| "—".into()),
            r.reference
                .map(|x| format!("≤ {}×", x.target))
                .unwrap_or_else(|| "—".into()),
            r.reference.map(|x| x.katran).unwrap_or("—"),
            r.verdict(),
        );
    }
    t
}

fn json_rows(rows: &[Row]) -> Value {
    Value::Array(
        rows.iter()
            .map(|r| {
                json!({
                    "path": r.path,
                    "mode": r.mode,
                    "ns_median": median(&r.ns),
                    "p90_ns_median": r.p90.as_deref().map(median),
                    "overhead_subtracted_ns_median": r.adjusted.as_deref().map(median),
                    "ratio_median": r.ratio.as_deref().map(median),
                    "raw_ratio_median": r.raw_ratio.as_deref().map(median),
                    "target_ratio": r.reference.map(|x| x.target),
                    "katran_ratio": r.reference.map(|x| x.katran),
                    "result": r.verdict(),
                })
            })
            .collect(),
    )
}

pub(super) fn write_results(
    settings: &Settings,
    m: &Machine,
    s: &Samples,
    rows: &[Row],
    table: &str,
    profiles: &[PathProfile],
) -> Result<()> {
    let (profile_md, profile_json) = section(profiles, rows)?;
    let dir = &settings.out_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let machine_md = format!(
        "- kernel: `{}`\n- CPU: {} ({} CPUs online{}; the benchmark ran pinned to CPU {})\n- BPF JIT: `net.core.bpf_jit_enable = {}`\n",
        m.kernel,
        m.cpu_model,
        m.nproc,
        if m.hypervisor {
            ", virtual machine"
        } else {
            ""
        },
        m.pinned_cpu,
        m.bpf_jit_enable,
    );
    let t0_rep = s.get("trivial/repeat/kernel_ns")?;
    let t0_single = s.get(&key("trivial", SINGLE_FIGURE))?;
    let overhead = median(&per_run(t0_single, t0_rep, |a, b| a - b));
    let wall_rep_ratio = median(&per_run(
        s.get("non_service/repeat/wall_ns")?,
        s.get("trivial/repeat/wall_ns")?,
        |a, b| a / b,
    ));
    let ns_single = rows
        .iter()
        .find(|r| r.path == "non-service pass" && r.mode == "single")
        .and_then(|r| r.ratio.as_deref())
        .map(median)
        .context("non-service single row")?;
    let ns_repeat = rows
        .iter()
        .find(|r| r.path == "non-service pass" && r.mode == "repeat")
        .and_then(|r| r.ratio.as_deref())
        .map(median)
        .context("non-service repeat row")?;
    let dsr = against_nat(rows, "dsr_established")?;
    let dsr6 = against_nat(rows, "dsr6_established")?;
    let nat6 = against_nat(rows, "nat6_established")?;
    let (dsr_ratio, dsr6_ratio, nat6_ratio) = (median(&dsr), median(&dsr6), median(&nat6));
    let mut dsr_line = String::new();
    for (what, per) in [("DSR", &dsr), ("IPv6 DSR", &dsr6)] {
        let (lo, hi) = min_max(per);
        let ratio = median(per);
        dsr_line.push_str(&format!(
            "{what} established forward against NAT established forward, overhead-subtracted ns, \
             per run: {ratio:.2}× ({lo:.2}–{hi:.2}); goal ≤ {DSR_GOAL}×: {}.\n\n",
            if ratio <= DSR_GOAL { "met" } else { "missed" }
        ));
    }
    let (lo, hi) = min_max(&nat6);
    dsr_line.push_str(&format!(
        "IPv6 NAT established forward against IPv4 NAT established forward, overhead-subtracted \
         ns, per run: {nat6_ratio:.2}× ({lo:.2}–{hi:.2}); no goal: two programs' parses, two \
         table lookups before the tail call, and 128-bit keys.\n\n"
    ));
    let md = format!(
        "# Datapath benchmark\n\n\
         Generated by `cargo xtask bench datapath{quick}` \
         (`cargo run --release -p router-bench --bin bench -- datapath{quick}`). \
         {runs} runs; repeat mode R = {repeat}; single mode {calls} timed calls per path and run \
         (after {warm} untimed warm-up calls).\n\n\
         {table}\n\
         {dsr_line}\
         Fixed single-mode per-call overhead O = T0_single − T0_repeat: {overhead:.1} ns (median), \
         subtracted from every single-mode figure in the \"overhead-subtracted\" column. \
         \"ratio to XDP_PASS\" is the overhead-corrected ratio and is what the target is judged on; \
         \"raw ratio\" is path_single / T0_single.\n\n\
         Consistency checks. (1) The non-service pass is measured in both modes: {ns_single:.2}× in \
         single mode (overhead-corrected) against {ns_repeat:.2}× in repeat mode. What remains between \
         the two is the extra cost of running a program once per syscall, with caches and predictors \
         disturbed between calls, which subtracting O cannot remove; the single-mode ratios of the \
         other paths carry the same bias, so they overstate rather than understate their cost next \
         to repeat-mode figures such as Katran's. (2) Wall-clock time around the repeat-mode syscall \
         (fractional ns, not truncated like the kernel's figure, but including interrupts and \
         rescheduling that the kernel's timer leaves out): non-service / trivial = {wall_rep_ratio:.2}×.\n\n\
         {profile_md}\
         ## Method\n\n{METHOD}\n\
         ## Machine\n\n{machine_md}\n\
         Raw per-run numbers: `datapath.json`.\n",
        quick = if settings.quick { " --quick" } else { "" },
        runs = settings.runs,
        repeat = settings.repeat,
        calls = settings.single_calls,
        warm = WARMUP_CALLS,
    );
    let samples: serde_json::Map<String, Value> =
        s.0.iter()
            .map(|(k, v)| ((*k).to_string(), json!(v)))
            .collect();
    let doc = json!({
        "benchmark": "datapath",
        "quick": settings.quick,
        "settings": {
            "runs": settings.runs,
            "repeat": settings.repeat,
            "single_calls": settings.single_calls,
            "warmup_calls": WARMUP_CALLS,
            "frame_bytes": 54,
        },
        "machine": {
            "kernel": m.kernel,
            "cpu_model": m.cpu_model,
            "nproc": m.nproc,
            "virtual_machine": m.hypervisor,
            "bpf_jit_enable": m.bpf_jit_enable,
            "pinned_cpu": m.pinned_cpu,
        },
        "units": "ns per packet; kernel_ns = BPF_PROG_TEST_RUN duration (repeat: per repetition; single: mean per call), kernel_call_median_ns = median of the per-call durations of one single-mode run (the table's single-mode figure), kernel_call_p90_ns = their 90th percentile, wall_ns = wall clock per packet around the syscall(s)",
        "per_run": samples,
        "single_overhead_ns_per_run": per_run(t0_single, t0_rep, |a, b| a - b),
        "summary": json_rows(rows),
        "dsr_over_nat_established_per_run": dsr,
        "dsr_over_nat_established": dsr_ratio,
        "dsr6_over_nat_established_per_run": dsr6,
        "dsr6_over_nat_established": dsr6_ratio,
        "nat6_over_nat_established_per_run": nat6,
        "nat6_over_nat_established": nat6_ratio,
        "profile": profile_json,
        "commit": crate::report::source_commit(),
        "method": METHOD,
    });
    write(&dir.join("datapath.md"), &md)?;
    write(
        &dir.join("datapath.json"),
        &(serde_json::to_string_pretty(&doc).context("encoding datapath.json")? + "\n"),
    )?;
    eprintln!(
        "wrote {} and {}",
        dir.join("datapath.md").display(),
        dir.join("datapath.json").display()
    );
    Ok(())
}

/// Per run, the overhead-subtracted ns of series `dsr` (a DSR or IPv6
/// path) over IPv4 NAT's established forward.
fn against_nat(rows: &[Row], dsr: &str) -> Result<Vec<f64>> {
    let adjusted = |series: &str| {
        rows.iter()
            .find(|r| r.series == Some(series))
            .and_then(|r| r.adjusted.clone())
            .with_context(|| format!("no {series} row"))
    };
    Ok(per_run(
        &adjusted(dsr)?,
        &adjusted("established")?,
        |a, b| a / b,
    ))
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
