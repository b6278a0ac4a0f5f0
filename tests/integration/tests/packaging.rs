//! What operators install from `packaging/`: the systemd units must be
//! well-formed (`systemd-analyze verify` where it exists, our own parse
//! always), keep what XDP attach and bpffs pins need, and run command lines
//! the `router` binary accepts; the Grafana dashboard must query only the
//! metric families the daemon exports, with their labels, counters through
//! `rate()`, and carry its datasource input and template variables.
//! File checks only: nothing here touches the kernel or the network.
//!
//! `systemd` checks the units; `promql` holds the exported families and
//! the expression checker that `dashboard` runs over every panel.

use std::path::PathBuf;

use router_testkit::fixtures::workspace_root;

#[path = "packaging/dashboard.rs"]
mod dashboard;
#[path = "packaging/promql.rs"]
mod promql;
#[path = "packaging/systemd.rs"]
mod systemd;

fn repo_file(rel: &str) -> PathBuf {
    workspace_root().join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}
