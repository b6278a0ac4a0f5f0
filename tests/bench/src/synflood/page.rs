//! `bench synflood`: both scenarios, `synflood.md` and `synflood.json`.

use std::path::Path;

use anyhow::{Context as _, Result};

use super::{NEW_CONN_GAP, NEW_CONN_THREADS, Params, Report, SNAT_EXTRA, run};

/// `bench synflood`: runs the scenario paced and unpaced (shorter with
/// `quick`) and writes `synflood.md` and `synflood.json` into `out_dir`.
/// Asserts nothing: the flood test does.
pub fn run_bench(quick: bool, out_dir: &Path) -> Result<()> {
    let paced = run(&Params::bench(true, quick))?;
    let unpaced = run(&Params::bench(false, quick))?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let page = bench_page(&paced, &unpaced);
    let md = out_dir.join("synflood.md");
    std::fs::write(&md, &page).with_context(|| format!("writing {}", md.display()))?;
    let json = out_dir.join("synflood.json");
    let both = serde_json::json!({
        "commit": crate::report::source_commit(),
        "paced": paced,
        "unpaced": unpaced,
    });
    let text = serde_json::to_string_pretty(&both).context("encoding the reports")?;
    std::fs::write(&json, text + "\n").with_context(|| format!("writing {}", json.display()))?;
    println!("{page}");
    println!("bench: wrote {} and {}", md.display(), json.display());
    Ok(())
}

/// bench/synflood.md: what was run, then each run's figures.
fn bench_page(paced: &Report, unpaced: &Report) -> String {
    let p = &paced.params;
    let mut s = String::new();
    s.push_str("# SYN flood against a small connection table\n\n");
    s.push_str(&format!(
        "Recorded at commit `{}`.\n\n",
        crate::report::source_commit()
    ));
    s.push_str(&format!(
        "`cargo xtask bench synflood`; the test `tests/integration/tests/floods.rs` runs the paced \
         scenario for 8 s with one sender thread and asserts the behaviour, not the speed. \
         A real daemon in network namespaces (one arm, {} Python HTTP backends, {} SNAT \
         addresses, `conn_table_size = {}`, so a half-open table of {} entries); {} \
         long-lived streams (a line every {} ms) are opened through the VIP; then raw-socket \
         threads in the client namespace send SYNs from spoofed sources in 198.19.0.0/16 \
         (random source and port per packet) at the VIP for {} s, while {} client threads \
         each open a new connection every {} ms. Everything shares this machine's CPUs \
         (senders, LB, backends answering every SYN, clients).\n\n",
        p.backends,
        1 + SNAT_EXTRA.len(),
        p.conn_table_size,
        router_common::half_open_table_size(p.conn_table_size),
        p.streams,
        p.stream_interval_ms,
        p.flood_max.as_secs(),
        NEW_CONN_THREADS,
        NEW_CONN_GAP.as_millis(),
    ));
    s.push_str(
        "Two runs. **Paced**: at two thirds of what the datapath absorbed in an unpaced \
         calibration second, which leaves CPU to the legitimate traffic; this measures how \
         the router handles a flood. **Unpaced**: as fast as the sender threads go; the \
         machine is overloaded and packets are dropped before the program sees them, \
         legitimate ones included, so streams stall until the flood stops and new \
         connections time out: that is capacity, not flood handling. A stream is kept when \
         it ends cleanly with every line from the backend that started it, however long \
         TCP had to retransmit (the longest wait shows how long). \"New flows\" counts every \
         flow the datapath created: spoofed SYNs that reached it and the legitimate \
         connections.\n\n",
    );
    for (title, r) in [("Paced", paced), ("Unpaced", unpaced)] {
        s.push_str(&format!("## {title}\n\n"));
        s.push_str(&r.table());
        s.push('\n');
    }
    s
}

impl Report {
    /// The figures of one run as markdown tables.
    pub fn table(&self) -> String {
        let p = &self.params;
        let reason = |name: &str| *self.reasons_during_flood.get(name).unwrap_or(&0);
        let mut s = String::new();
        s.push_str("| figure | value |\n|---|---|\n");
        let rows = [
            ("conn_table_size", p.conn_table_size.to_string()),
            (
                "half-open table",
                format!(
                    "{} entries",
                    router_common::half_open_table_size(p.conn_table_size)
                ),
            ),
            (
                "backends, SNAT addresses",
                format!("{}, {}", p.backends, 1 + SNAT_EXTRA.len()),
            ),
            (
                "flood duration",
                format!(
                    "{:.1} s (bound {} s)",
                    self.flood_secs,
                    p.flood_max.as_secs()
                ),
            ),
            (
                "flood sent",
                format!(
                    "{} packets, {:.0} packets/s ({} sender threads, {})",
                    self.flood_sent,
                    self.flood_rate_pps,
                    p.flood_threads,
                    match self.calibrated_rate_pps {
                        Some(r) => format!(
                            "paced to two thirds of the {r:.0}/s the datapath absorbed in an \
                             unpaced second"
                        ),
                        None => "unpaced".to_owned(),
                    }
                ),
            ),
            (
                "new flows in the datapath",
                format!(
                    "{} ({:.0}/s; {:.0}× the table)",
                    self.datapath_new_flows,
                    self.datapath_rate_pps,
                    self.datapath_new_flows as f64 / f64::from(p.conn_table_size.max(1))
                ),
            ),
            ("lru_miss during the flood", reason("lru_miss").to_string()),
            (
                "connection-table entries at the end",
                format!(
                    "{} (for {} legitimate connections)",
                    self.conn_table_entries,
                    self.legitimate_connections()
                ),
            ),
            (
                "replies without an entry during the flood: dropped / passed to the host",
                format!(
                    "{} / {}",
                    reason("drop_no_reply_entry"),
                    reason("pass_no_reply_entry")
                ),
            ),
            (
                "drop_conn_table_full / drop_snat_exhausted",
                format!(
                    "{} / {}",
                    reason("drop_conn_table_full"),
                    reason("drop_snat_exhausted")
                ),
            ),
            (
                "streams kept",
                format!(
                    "{} of {} ({} lines each, then its end)",
                    self.streams_kept,
                    self.streams.len(),
                    self.stream_lines_expected
                ),
            ),
            (
                "longest wait for a stream line",
                format!(
                    "{} ms",
                    self.streams.iter().map(|s| s.max_gap_ms).max().unwrap_or(0)
                ),
            ),
            (
                "new connections during the flood",
                format!(
                    "{} attempted, {} failed; slowest {} ms",
                    self.new_conn_attempts, self.new_conn_failures, self.new_conn_slowest_ms
                ),
            ),
            (
                "new connections after the flood",
                format!(
                    "{} attempted, {} failed",
                    self.after_flood_attempts, self.after_flood_failures
                ),
            ),
        ];
        for (k, v) in rows {
            s.push_str(&format!("| {k} | {v} |\n"));
        }
        s.push_str("\nEvery reason counter that moved during the flood:\n\n");
        s.push_str("| reason | packets |\n|---|---|\n");
        for (k, v) in &self.reasons_during_flood {
            s.push_str(&format!("| `{k}` | {v} |\n"));
        }
        s
    }
}
