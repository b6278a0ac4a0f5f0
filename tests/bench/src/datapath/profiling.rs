//! The profiling pass: after every timed run, each path that misses its
//! goal is called again, the same way, under `perf record`, and its
//! samples are grouped into the parts of [`Profile`].
//!
//! It runs after the timed runs so that perf's sampling interrupts never
//! touch a timing.

use std::{fmt::Write as _, path::PathBuf};

use anyhow::{Context, Result, ensure};
use router_common::reasons;
use serde_json::{Value, json};

use super::{
    XDP_TX,
    bench::Bench,
    paths::SYN_CASES,
    perf::{Recording, SAMPLE_HZ},
    profile::{Part, Profile},
    results::Row,
};
use crate::report::median;

/// Calls per batch of the SYN and first-ACK paths: the full run's timed
/// loop, whose client ports (from `SYN_FIRST_PORT`, after the warm-up)
/// all lie in the host's ephemeral range, so every SYN takes the same
/// host-socket lookup as a timed one. Each batch loads a fresh datapath
/// with tables sized for it, as a timed run does, so nothing evicts.
const NEW_FLOW_BATCH: u32 = 20_000;
/// Calls per batch of the established and reply paths, which reuse one
/// flow: only a bound on how long perf stays on past the target.
const FLOW_BATCH: u32 = 50_000;

/// The series keys of the paths profiled: those that miss their goals by
/// far. The non-service pass, a few ns over its goal, would take minutes
/// of calls for a few thousand samples inside the program.
pub(super) const PROFILED: [&str; 4] = ["syn", "first_ack", "established", "reply"];

pub(super) struct PathProfile {
    pub(super) key: &'static str,
    pub(super) profile: Profile,
}

/// Where perf writes its data; removed when dropped.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Seconds of calls sampled per path. A new flow spends most of its call
/// inside the program, so it reaches a few thousand samples there sooner;
/// its batches also load a datapath each, which makes them slow to repeat.
pub struct ProfileSettings {
    pub new_flow_secs: f64,
    pub flow_secs: f64,
}

/// Profiles every path of [`PROFILED`].
pub(super) fn run_profiles(b: &mut Bench, settings: &ProfileSettings) -> Result<Vec<PathProfile>> {
    let dir =
        ScratchDir(std::env::temp_dir().join(format!("router-bench-perf-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
    let mut out = Vec::new();
    for key in PROFILED {
        let target = if matches!(key, "syn" | "first_ack") {
            settings.new_flow_secs
        } else {
            settings.flow_secs
        };
        let mut rec = Recording::start(&dir.0, key)?;
        while rec.enabled_secs() < target {
            batch(b, key, &mut rec)?;
        }
        let secs = rec.enabled_secs();
        let text = rec.finish()?;
        if let Some(keep) = std::env::var_os("ROUTER_BENCH_KEEP_PERF_SCRIPT") {
            // For a new test fixture, or to look at what "other" holds.
            let at = PathBuf::from(keep).join(format!("perf-script-{key}.txt"));
            std::fs::write(&at, &text).with_context(|| format!("writing {}", at.display()))?;
        }
        let profile = Profile::from_script(&text, secs);
        ensure!(
            profile.in_program > 0,
            "profile of {key}: none of {} samples is inside the router program (perf names \
             it from its JIT symbol: are net.core.bpf_jit_enable and bpf_jit_kallsyms 1?)",
            profile.samples
        );
        eprintln!(
            "  profile {key}: {} of {} samples in the program over {secs:.1} s",
            profile.in_program, profile.samples
        );
        out.push(PathProfile { key, profile });
    }
    Ok(out)
}

/// One batch of `key`'s calls, each checked as in the timed runs.
fn batch(b: &mut Bench, key: &str, rec: &mut Recording) -> Result<()> {
    match key {
        "syn" => b.syn_single(NEW_FLOW_BATCH, &SYN_CASES[0], Some(rec))?,
        "first_ack" => b.first_ack_single(NEW_FLOW_BATCH, Some(rec))?,
        "established" => {
            let frame = b.est_ack.clone();
            let what = "established profile";
            b.router_single(&frame, FLOW_BATCH, XDP_TX, reasons::TX, what, Some(rec))?
        }
        "reply" => {
            let frame = b.reply_ack.clone();
            let what = "reply profile";
            b.router_single(&frame, FLOW_BATCH, XDP_TX, reasons::TX, what, Some(rec))?
        }
        _ => anyhow::bail!("no profiling batch for {key}"),
    };
    Ok(())
}

/// The profile section of `datapath.md` and its JSON: per path, each
/// part's share of the in-program samples and the ns that share stands for
/// out of the path's overhead-subtracted median from the same invocation.
pub(super) fn section(profiles: &[PathProfile], rows: &[Row]) -> Result<(String, Value)> {
    let mut cols = Vec::new();
    for p in profiles {
        let row = rows
            .iter()
            .find(|r| r.series == Some(p.key) && r.mode == "single")
            .with_context(|| format!("no single-mode row for the profiled {}", p.key))?;
        let ns = row
            .adjusted
            .as_deref()
            .map(median)
            .with_context(|| format!("no overhead-subtracted figure for {}", p.key))?;
        cols.push((row.path, ns, p));
    }
    let mut md = String::from(
        "## Where the time goes: profile of the paths that miss their goals\n\n\
         Share of the samples inside the `router` program, and the ns that share stands \
         for out of the path's overhead-subtracted median above (same invocation); how \
         the samples were taken is under Method.\n\n| part |",
    );
    for (path, ..) in &cols {
        let _ = write!(md, " {path} |");
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(cols.len()));
    md.push('\n');
    for part in Part::ALL {
        let _ = write!(md, "| {} |", part.name());
        for (_, ns, p) in &cols {
            let share = p.profile.share(part);
            let _ = write!(md, " {:.1}% · {:.0} ns |", 100.0 * share, share * ns);
        }
        md.push('\n');
    }
    md.push_str("| samples in the program (of all taken) |");
    for (_, _, p) in &cols {
        let _ = write!(md, " {} (of {}) |", p.profile.in_program, p.profile.samples);
    }
    md.push_str("\n| seconds of calls sampled |");
    for (_, _, p) in &cols {
        let _ = write!(md, " {:.1} |", p.profile.secs);
    }
    md.push_str("\n| overhead-subtracted ns, median |");
    for (_, ns, _) in &cols {
        let _ = write!(md, " {ns:.1} |");
    }
    md.push_str("\n\nWhat the program called most, by in-program samples:\n\n");
    for (path, _, p) in &cols {
        let mut top: Vec<(&String, &u64)> = p.profile.callees.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let list: Vec<String> = top
            .iter()
            .take(8)
            .map(|(name, n)| {
                let pct = 100.0 * **n as f64 / p.profile.in_program.max(1) as f64;
                format!("`{name}` {pct:.1}%")
            })
            .collect();
        let _ = writeln!(md, "- {path}: {}", list.join(", "));
    }
    md.push('\n');
    let paths: Vec<Value> = cols
        .iter()
        .map(|(path, ns, p)| {
            let parts: Vec<Value> = Part::ALL
                .iter()
                .map(|part| {
                    json!({
                        "part": part.key(),
                        "name": part.name(),
                        "samples": p.profile.count(*part),
                        "share": p.profile.share(*part),
                        "ns": p.profile.share(*part) * ns,
                    })
                })
                .collect();
            json!({
                "series": p.key,
                "path": path,
                "seconds_sampled": p.profile.secs,
                "samples": p.profile.samples,
                "in_program_samples": p.profile.in_program,
                "overhead_subtracted_ns_median": ns,
                "parts": parts,
                "callees": p.profile.callees,
            })
        })
        .collect();
    let doc = json!({
        "event": "cpu-clock",
        "sample_hz": SAMPLE_HZ,
        "paths": paths,
    });
    Ok((md, doc))
}
