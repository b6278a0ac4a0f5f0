//! The `polled_least_queue` contender's poller: it scrapes each replica's
//! queue and pins all new traffic on the least-queued one.

use std::{
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Result;
use router_testkit::{daemon_proc::status, netns};

use super::setup::{per_backend, replica_addr, set_weight};
use super::{SCRAPE_INTERVAL, SPEEDS};

/// What `polled_least_queue`'s poller did in a run.
#[derive(Default)]
pub(super) struct PollerStats {
    pub(super) rounds: u64,
    /// Replica scrapes that failed (a replica not up yet counts here).
    pub(super) scrape_failures: u64,
    /// `router weight set` calls made.
    pub(super) pins: u64,
}

/// `polled_least_queue`'s decision loop, run in the LB namespace (where the
/// router's own scrapes come from) until `done`: every SCRAPE_INTERVAL it
/// reads each replica's queue (running + waiting requests) from its
/// /metrics and pins weight 100 on the routable replica(s) with the least
/// queue, 0 on the others, through the router's CLI. The datapath is the
/// router's Maglev draw, so only this decision differs from the others.
pub(super) fn poll_least_queue(socket: &Path, done: &AtomicBool) -> Result<PollerStats> {
    let mut stats = PollerStats::default();
    // What the last run left was reset to 100 before this one.
    let mut pinned = [100u32; SPEEDS.len()];
    let start = Instant::now();
    while !done.load(Ordering::Relaxed) {
        let st = status(socket)?;
        // Only backends the router would route to are candidates, as a
        // scheduler scores only ready endpoints; pinning all traffic on one
        // that is not healthy yet would leave no backend at all.
        let routable = per_backend(&st, |b| {
            b.healthy.unwrap_or(true) && b.mode != router::api::BackendMode::Drain
        });
        let queues: Vec<Option<f64>> = (0..SPEEDS.len()).map(scrape_queue).collect();
        stats.rounds += 1;
        stats.scrape_failures += queues.iter().filter(|q| q.is_none()).count() as u64;
        if let Some(want) = least_queue_weights(&queues, &routable) {
            stats.pins += apply_pins(socket, &mut pinned, &want)?;
        }
        let next = SCRAPE_INTERVAL.mul_f64(stats.rounds as f64);
        if let Some(wait) = next.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    Ok(stats)
}

/// Running + waiting requests from replica `i`'s /metrics; None when it
/// does not answer (not up) or the figures are missing.
fn scrape_queue(i: usize) -> Option<f64> {
    let r = netns::http_get(replica_addr(i), "/metrics", Duration::from_millis(300)).ok()?;
    (r.status == 200).then_some(())?;
    queue_from_metrics(&r.body)
}

pub(super) fn queue_from_metrics(text: &str) -> Option<f64> {
    let gauge = |name: &str| {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    Some(gauge("vllm:num_requests_running")? + gauge("vllm:num_requests_waiting")?)
}

/// Weight 100 for the routable replicas whose queue is the least (ties
/// share), 0 for the rest; None when no routable replica answered (the
/// weights then stay as they are).
pub(super) fn least_queue_weights(queues: &[Option<f64>], routable: &[bool]) -> Option<Vec<u32>> {
    let candidate = |i: usize| queues[i].filter(|_| routable[i]);
    let least = (0..queues.len())
        .filter_map(candidate)
        .min_by(f64::total_cmp)?;
    Some(
        (0..queues.len())
            .map(|i| if candidate(i) == Some(least) { 100 } else { 0 })
            .collect(),
    )
}

/// Pins `want`, raising weights before lowering any, so the service never
/// passes through a moment with every weight at 0. Returns the calls made.
fn apply_pins(socket: &Path, pinned: &mut [u32], want: &[u32]) -> Result<u64> {
    let mut calls = 0;
    let raise = (0..want.len()).filter(|&i| want[i] > pinned[i]);
    let lower = (0..want.len()).filter(|&i| want[i] < pinned[i]);
    let order: Vec<usize> = raise.chain(lower).collect();
    for i in order {
        set_weight(socket, i, want[i])?;
        pinned[i] = want[i];
        calls += 1;
    }
    Ok(calls)
}
