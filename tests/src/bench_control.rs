//! Control-plane benchmarks: the cost of turning weights into a Maglev
//! table. Every figure is the median of repeated builds.

use std::{fmt::Write as _, path::Path, time::Instant};

use anyhow::{Context, Result};
use router::maglev::{self, MaglevBackend};

pub struct MaglevRow {
    pub backends: usize,
    pub table_size: u32,
    pub runs: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

/// Backends with distinct keys and a spread of weights (1..=1000), so the
/// build exercises the weighted turn-taking, not the equal-weight shortcut.
fn backends(n: usize) -> (Vec<String>, Vec<u32>) {
    let keys = (0..n)
        .map(|i| {
            format!(
                "198.{}.{}.{}:8000",
                18 + (i >> 16),
                (i >> 8) & 0xff,
                i & 0xff
            )
        })
        .collect();
    let weights = (0..n)
        .map(|i| 1 + ((i as u32).wrapping_mul(2_654_435_761) % 1000))
        .collect();
    (keys, weights)
}

pub fn maglev_rebuild(n: usize, size: u32, runs: usize) -> MaglevRow {
    let (keys, weights) = backends(n);
    let input: Vec<MaglevBackend<'_>> = keys
        .iter()
        .zip(&weights)
        .enumerate()
        .map(|(i, (k, w))| MaglevBackend {
            key: k,
            id: i as u32,
            weight: *w,
        })
        .collect();
    let mut ms: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            let table = maglev::build(&input, size);
            let elapsed = t.elapsed().as_secs_f64() * 1e3;
            std::hint::black_box(table);
            elapsed
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    MaglevRow {
        backends: n,
        table_size: size,
        runs,
        median_ms: ms[ms.len() / 2],
        min_ms: ms[0],
        max_ms: ms[ms.len() - 1],
    }
}

pub fn run_control(quick: bool, out_dir: &Path) -> Result<()> {
    let runs = if quick { 3 } else { 15 };
    let mut rows = Vec::new();
    for n in [10, 100, 1_000, 10_000] {
        rows.push(maglev_rebuild(n, 65_537, runs));
    }
    // At 10,000 backends a 65537-slot table is below 100 slots per backend;
    // also measure the size the config check demands.
    rows.push(maglev_rebuild(10_000, 1_000_003, runs));

    let mut md = String::new();
    writeln!(md, "# Control-plane benchmarks\n")?;
    writeln!(
        md,
        "Maglev rebuild: `router::maglev::build` from weights to a full table, single thread, \
         release build; median of {runs} builds (min–max). Weights are spread over 1–1000 so the \
         weighted turn-taking is exercised. Target (GPU-policy issue): 1,000 backends at 65537 \
         slots under 10 ms.\n"
    )?;
    writeln!(
        md,
        "| backends | table size | median ms | min–max ms | target | result |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    for r in &rows {
        let (target, result) = if r.backends == 1_000 && r.table_size == 65_537 {
            ("< 10 ms", if r.median_ms < 10.0 { "met" } else { "missed" })
        } else {
            ("—", "—")
        };
        writeln!(
            md,
            "| {} | {} | {:.2} | {:.2}–{:.2} | {target} | {result} |",
            r.backends, r.table_size, r.median_ms, r.min_ms, r.max_ms
        )?;
    }
    print!("{md}");
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    std::fs::write(out_dir.join("control.md"), &md).context("writing control.md")?;
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "backends": r.backends, "table_size": r.table_size, "runs": r.runs,
                "median_ms": r.median_ms, "min_ms": r.min_ms, "max_ms": r.max_ms,
            })
        })
        .collect();
    std::fs::write(
        out_dir.join("control.json"),
        serde_json::to_string_pretty(&serde_json::json!({ "maglev_rebuild": json }))?,
    )
    .context("writing control.json")?;
    Ok(())
}
