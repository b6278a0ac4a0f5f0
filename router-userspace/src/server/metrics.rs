//! Prometheus `/metrics`: a read-only HTTP endpoint (GET only) on its own
//! TCP listener. Every scrape encodes one consistent snapshot of the
//! operator views (`views`), so metrics, API and `router top` agree. Owns
//! metric names and labels; never changes daemon state.
//!
//! Scrapes never take the daemon's lock: the control loop builds a
//! [`Snapshot`] after each poll round (and after a reload or an override)
//! and [`Publisher`] hands it over; a scrape renders the latest one. The
//! server is bounded ([`LIMITS`]): anyone on the host can connect to
//! `metrics_listen`, and idle connections must not use up the descriptors
//! the daemon's probes and polls need.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, MetricEncoder, text::encode},
    metrics::MetricType,
    registry::Registry,
};
use tokio::{sync::watch, task::JoinHandle};
use tracing::info;

use crate::{
    api::{
        BackendMode, StatusReply,
        views::{BackendView, PoolView, ServiceView},
    },
    datapath::Histogram,
    server::bounded::{self, ServerStats},
    telemetry::clocks_throttled,
};

/// The metrics server's bounds (see [`bounded`]). A Prometheus server
/// scrapes over one connection (an HA pair over two); a few more are left
/// for people with curl. One address may hold a quarter of them, so a
/// remote host cannot lock out a local Prometheus when the listener is
/// opened beyond loopback.
pub const LIMITS: bounded::Limits = bounded::Limits {
    max_connections: 32,
    header_timeout: Duration::from_secs(5),
    request_timeout: Duration::from_secs(10),
    connection_timeout: Duration::from_secs(60),
    max_header_bytes: 16 << 10,
    max_per_peer: Some(8),
};

/// Shortest time between two snapshots published after poll rounds, so a
/// short `poll_interval` does not rebuild the views many times a second.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);

/// Everything one scrape reports from the daemon's state, captured under
/// its lock once (by the control loop, see [`Publisher`]).
#[derive(Debug)]
pub struct Snapshot {
    pub services: Vec<ServiceView>,
    pub backends: Vec<BackendView>,
    pub status: StatusReply,
    pub conn_entries: Option<u64>,
    /// `NAT6_CONNS` entries (IPv6 NAT flows), a table sized as `CONNS`.
    pub nat6_conn_entries: Option<u64>,
    pub conn_capacity: u32,
    pub pools: Vec<PoolView>,
}

pub(super) type Labels = Vec<(&'static str, String)>;

fn backend_labels(b: &BackendView) -> Labels {
    vec![("service", b.service.clone()), ("backend", b.name.clone())]
}

fn service_labels(s: &ServiceView) -> Labels {
    vec![("service", s.name.clone())]
}

/// One metric family whose samples are built from a list of items.
fn family<T>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    items: impl IntoIterator<Item = (Labels, T)>,
    mut sample: impl FnMut(&mut MetricEncoder, T) -> std::fmt::Result,
) -> std::fmt::Result {
    let items: Vec<(Labels, T)> = items.into_iter().collect();
    if items.is_empty() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in items {
        let mut fam = m.encode_family(&labels)?;
        sample(&mut fam, v)?;
    }
    Ok(())
}

pub(super) fn gauges(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    items: impl IntoIterator<Item = (Labels, Option<f64>)>,
) -> std::fmt::Result {
    let present = items.into_iter().filter_map(|(l, v)| v.map(|v| (l, v)));
    family(enc, name, help, MetricType::Gauge, present, |m, v| {
        m.encode_gauge(&v)
    })
}

pub(super) fn counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    items: impl IntoIterator<Item = (Labels, u64)>,
) -> std::fmt::Result {
    family(enc, name, help, MetricType::Counter, items, |m, v| {
        m.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&v, None)
    })
}

pub(super) fn histograms(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    items: impl IntoIterator<Item = (Labels, Histogram)>,
) -> std::fmt::Result {
    family(enc, name, help, MetricType::Histogram, items, |m, h| {
        let buckets: Vec<(f64, u64)> = h
            .buckets
            .iter()
            .enumerate()
            .map(|(b, n)| {
                let le = Histogram::upper_bound_seconds(b);
                // prometheus-client spells +Inf as f64::MAX.
                (if le.is_finite() { le } else { f64::MAX }, *n)
            })
            .collect();
        m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            h.sum_us as f64 / 1e6,
            h.count(),
            &buckets,
            None,
        )
    })
}

pub(super) fn flag(b: bool) -> Option<f64> {
    Some(if b { 1.0 } else { 0.0 })
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let e = &mut enc;
        let bs = &self.backends;
        let per_b =
            |f: fn(&BackendView) -> Option<f64>| bs.iter().map(move |b| (backend_labels(b), f(b)));
        let per_b_count =
            |f: fn(&BackendView) -> u64| bs.iter().map(move |b| (backend_labels(b), f(b)));

        // Traffic, from the datapath's per-CPU counters.
        counters(
            e,
            "router_backend_packets",
            "Packets forwarded, both directions.",
            per_b_count(|b| b.counters.packets),
        )?;
        counters(
            e,
            "router_backend_bytes",
            "Bytes forwarded, both directions.",
            per_b_count(|b| b.counters.bytes),
        )?;
        counters(
            e,
            "router_backend_new_connections",
            "New connections pinned to the backend.",
            per_b_count(|b| b.counters.new_conns),
        )?;
        gauges(
            e,
            "router_backend_active_connections",
            "Live flows in the connection table (scanned every few seconds).",
            per_b(|b| b.active_connections.map(|n| n as f64)),
        )?;
        gauges(
            e,
            "router_backend_in_flight",
            "Flows open now, counted by the datapath at each pick (the least-loaded selection's input).",
            per_b(|b| Some(b.in_flight as f64)),
        )?;
        gauges(
            e,
            "router_backend_max_in_flight",
            "Room: flows in flight at which a least-loaded pick passes the backend over while another has room (0: no limit).",
            per_b(|b| Some(f64::from(b.max_in_flight))),
        )?;
        counters(
            e,
            "router_backend_flows_closed",
            "Flows ended: FIN both ways or RST seen by the datapath, plus flows the table scan found gone.",
            per_b_count(|b| b.flows_closed),
        )?;
        counters(
            e,
            "router_backend_in_flight_leaked_corrections",
            "Flows the table scan uncounted because they vanished without an end (LRU eviction, expiry, drain deadline).",
            per_b_count(|b| b.in_flight_corrections.leaked),
        )?;
        counters(
            e,
            "router_backend_in_flight_overcount_corrections",
            "Flow ends the table scan took back because more ends than starts were counted.",
            per_b_count(|b| b.in_flight_corrections.overcounted),
        )?;
        gauges(
            e,
            "router_backend_new_connections_per_second",
            "New connections per second over the last minute.",
            per_b(|b| b.new_conns_per_sec),
        )?;

        // Where traffic goes and why.
        gauges(
            e,
            "router_backend_weight",
            "Current weight in the Maglev table.",
            per_b(|b| Some(f64::from(b.weight))),
        )?;
        gauges(
            e,
            "router_backend_share_ratio",
            "Share of the service's Maglev slots.",
            per_b(|b| Some(b.share)),
        )?;
        family(
            e,
            "router_backend_weight_reason",
            "Why the backend has its weight: 1 for the current mode and reason (a fixed set; `router backends` shows the figures).",
            MetricType::Gauge,
            bs.iter().map(|b| {
                let mut l = backend_labels(b);
                l.push(("mode", b.mode.to_string()));
                l.push(("reason", b.reason_label.clone()));
                (l, 1.0f64)
            }),
            |m, v| m.encode_gauge(&v),
        )?;
        counters(
            e,
            "router_backend_weight_changes",
            "Policy weight changes.",
            per_b_count(|b| b.weight_changes),
        )?;
        gauges(
            e,
            "router_backend_draining",
            "1 while drained by an operator or the config.",
            per_b(|b| flag(b.mode == BackendMode::Drain)),
        )?;

        // GPU and replica state, as the policy saw it.
        gauges(
            e,
            "router_backend_gpu_utilization_ratio",
            "GPU SM utilization, 0-1.",
            per_b(|b| b.gpu_util),
        )?;
        gauges(
            e,
            "router_backend_gpu_memory_used_bytes",
            "GPU memory in use.",
            per_b(|b| b.mem_used_bytes),
        )?;
        gauges(
            e,
            "router_backend_gpu_memory_total_bytes",
            "GPU memory installed.",
            per_b(|b| b.mem_total_bytes),
        )?;
        gauges(
            e,
            "router_backend_gpu_power_watts",
            "GPU power draw.",
            per_b(|b| b.power_watts),
        )?;
        gauges(
            e,
            "router_backend_gpu_throttled",
            "1 when NVML reports a clock-throttle reason other than the GPU being idle.",
            per_b(|b| {
                b.throttle_reasons
                    .map(|r| if clocks_throttled(r) { 1.0 } else { 0.0 })
            }),
        )?;
        gauges(
            e,
            "router_backend_gpu_throttle_reasons",
            "NVML clock-throttle reason bits.",
            per_b(|b| b.throttle_reasons.map(|r| r as f64)),
        )?;
        gauges(
            e,
            "router_backend_kv_cache_usage_ratio",
            "KV-cache usage, 0-1.",
            per_b(|b| b.kv_cache_usage),
        )?;
        gauges(
            e,
            "router_backend_requests_running",
            "Requests in the running batch.",
            per_b(|b| b.requests_running),
        )?;
        gauges(
            e,
            "router_backend_requests_waiting",
            "Requests queued beyond the batch.",
            per_b(|b| b.requests_waiting),
        )?;
        gauges(
            e,
            "router_backend_load_ratio",
            "Smoothed load the policy uses, 0-1.",
            per_b(|b| b.load),
        )?;
        gauges(
            e,
            "router_backend_saturated",
            "1 while the policy holds the backend saturated.",
            per_b(|b| flag(b.saturated)),
        )?;
        gauges(
            e,
            "router_backend_telemetry_stale",
            "1 while telemetry is too old to trust.",
            per_b(|b| flag(b.stale)),
        )?;
        gauges(
            e,
            "router_backend_telemetry_age_seconds",
            "Age of the latest valid reading.",
            per_b(|b| b.telemetry_age_ms.map(|ms| ms as f64 / 1e3)),
        )?;
        counters(
            e,
            "router_backend_telemetry_errors",
            "Failed or rejected telemetry polls.",
            per_b_count(|b| b.telemetry_errors),
        )?;
        gauges(
            e,
            "router_backend_healthy",
            "Health-check verdict (absent without a check).",
            per_b(|b| b.healthy.map(|h| if h { 1.0 } else { 0.0 })),
        )?;

        // Cost.
        gauges(
            e,
            "router_backend_cost_per_hour_dollars",
            "Configured cost of the replica.",
            per_b(|b| b.cost_per_hour),
        )?;
        gauges(
            e,
            "router_backend_cost_per_1k_connections_dollars",
            "Cost per hour spread over the last minute's connection rate.",
            per_b(|b| b.cost_per_1k_connections),
        )?;

        // Latency measured in the datapath.
        histograms(
            e,
            "router_backend_connect_latency_seconds",
            "SYN forwarded to SYN-ACK seen, measured in XDP.",
            bs.iter()
                .map(|b| (backend_labels(b), b.connect_latency.clone())),
        )?;
        histograms(
            e,
            "router_backend_first_byte_latency_seconds",
            "Client's first payload to the backend's first payload (time to first token when streaming), measured in XDP.",
            bs.iter()
                .map(|b| (backend_labels(b), b.first_byte_latency.clone())),
        )?;

        // Services.
        let ss = &self.services;
        counters(
            e,
            "router_service_packets",
            "Packets forwarded, both directions.",
            ss.iter().map(|s| (service_labels(s), s.counters.packets)),
        )?;
        counters(
            e,
            "router_service_bytes",
            "Bytes forwarded, both directions.",
            ss.iter().map(|s| (service_labels(s), s.counters.bytes)),
        )?;
        counters(
            e,
            "router_service_new_connections",
            "New connections.",
            ss.iter().map(|s| (service_labels(s), s.counters.new_conns)),
        )?;
        gauges(
            e,
            "router_service_active_connections",
            "Live flows in the connection table.",
            ss.iter()
                .map(|s| (service_labels(s), s.active_connections.map(|n| n as f64))),
        )?;
        gauges(
            e,
            "router_service_saturated_backends",
            "Backends the policy holds saturated.",
            ss.iter()
                .map(|s| (service_labels(s), Some(s.saturated_backends as f64))),
        )?;
        counters(
            e,
            "router_service_fallback_connections",
            "New connections sent to the fallback service's backends.",
            ss.iter()
                .map(|s| (service_labels(s), s.fallback_connections)),
        )?;
        gauges(
            e,
            "router_service_cost_per_hour_dollars",
            "Sum of the backends' configured cost.",
            ss.iter().map(|s| (service_labels(s), s.cost_per_hour)),
        )?;
        gauges(
            e,
            "router_service_cost_per_1k_connections_dollars",
            "Service cost spread over the last minute's connection rate.",
            ss.iter()
                .map(|s| (service_labels(s), s.cost_per_1k_connections)),
        )?;

        // Datapath and daemon.
        counters(
            e,
            "router_datapath_packets",
            "Packets by verdict reason (every pass and drop has one).",
            self.status
                .datapath
                .reasons
                .iter()
                .map(|(r, n)| (vec![("reason", r.clone())], *n)),
        )?;
        gauges(
            e,
            "router_conn_table_entries",
            "Connection-table entries, both directions, from the latest scan.",
            [(Labels::new(), self.conn_entries.map(|n| n as f64))],
        )?;
        gauges(
            e,
            "router_nat6_conn_table_entries",
            "IPv6 NAT connection-table entries, both directions, from the latest scan (a table \
             of router_conn_table_capacity entries of its own).",
            [(Labels::new(), self.nat6_conn_entries.map(|n| n as f64))],
        )?;
        gauges(
            e,
            "router_conn_table_capacity",
            "Connection-table capacity.",
            [(Labels::new(), Some(f64::from(self.conn_capacity)))],
        )?;
        counters(
            e,
            "router_policy_all_saturated_ticks",
            "Policy ticks on which every healthy backend of a service was saturated.",
            [(Labels::new(), self.status.all_saturated_ticks)],
        )?;
        counters(
            e,
            "router_fallback_connections",
            "New connections sent to fallback backends, all services.",
            [(Labels::new(), self.status.fallback_connections)],
        )?;
        counters(
            e,
            "router_health_probe_local_errors",
            "Health probes that failed on a local error (the daemon out of sockets) and changed no verdict: the last weights stay.",
            [(Labels::new(), self.status.health_local_errors)],
        )?;
        gauges(
            e,
            "router_uptime_seconds",
            "Daemon uptime.",
            [(Labels::new(), Some(self.status.uptime_secs as f64))],
        )?;
        super::pool_metrics::encode(e, &self.pools)?;
        Ok(())
    }
}

/// The servers' own counters, read at each scrape (they change without
/// the control loop).
#[derive(Clone, Debug, Default)]
pub struct ServerCounters {
    pub metrics: Arc<ServerStats>,
    pub control: Arc<ServerStats>,
}

impl Collector for ServerCounters {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let by_limit = |stats: &ServerStats| {
            [
                (vec![("limit", "total".to_string())], stats.refused()),
                (
                    vec![("limit", "peer".to_string())],
                    stats.refused_per_peer(),
                ),
            ]
        };
        counters(
            &mut enc,
            "router_metrics_connections_refused",
            "Connections to metrics_listen closed on accept, by the limit reached: the server's connection cap (total) or one peer address's share (peer).",
            by_limit(&self.metrics),
        )?;
        counters(
            &mut enc,
            "router_control_connections_refused",
            "Connections to the control socket closed on accept because the server's connection cap was reached.",
            [(Labels::new(), self.control.refused())],
        )
    }
}

/// A published snapshot, shared between scrapes.
#[derive(Debug)]
struct Shared(Arc<Snapshot>);

impl Collector for Shared {
    fn encode(&self, enc: DescriptorEncoder) -> std::fmt::Result {
        self.0.encode(enc)
    }
}

/// Encodes a snapshot and the servers' counters in the
/// Prometheus/OpenMetrics text format.
pub fn render(
    snapshot: Arc<Snapshot>,
    servers: &ServerCounters,
) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Shared(snapshot)));
    registry.register_collector(Box::new(servers.clone()));
    let mut out = String::new();
    encode(&mut out, &registry)?;
    Ok(out)
}

/// The latest snapshot, or why it could not be built; `None` before the
/// first.
type Published = Option<Result<Arc<Snapshot>, Arc<anyhow::Error>>>;

/// The control loop's end: publishes snapshots for the metrics server.
#[derive(Debug)]
pub struct Publisher {
    tx: watch::Sender<Published>,
    last: Option<Instant>,
}

/// The metrics server's end: the latest published snapshot.
#[derive(Clone, Debug)]
pub struct Snapshots(watch::Receiver<Published>);

impl Publisher {
    pub fn new() -> (Publisher, Snapshots) {
        let (tx, rx) = watch::channel(None);
        (Publisher { tx, last: None }, Snapshots(rx))
    }

    /// Whether to build a snapshot now: only while a metrics server is
    /// there to read it, and after a poll round (`force` false) at most
    /// once per [`PUBLISH_EVERY`].
    pub fn due(&self, force: bool) -> bool {
        self.tx.receiver_count() > 0
            && (force || self.last.is_none_or(|t| t.elapsed() >= PUBLISH_EVERY))
    }

    pub fn publish(&mut self, snapshot: anyhow::Result<Snapshot>) {
        self.last = Some(Instant::now());
        self.tx
            .send_replace(Some(snapshot.map(Arc::new).map_err(Arc::new)));
    }
}

#[derive(Clone)]
struct Scraping {
    snapshots: Snapshots,
    servers: ServerCounters,
}

async fn metrics(State(s): State<Scraping>) -> Response {
    // Clones an Arc; the watch's own lock is held for no longer.
    let published = s.snapshots.0.borrow().clone();
    let text = match published {
        None => {
            return (StatusCode::SERVICE_UNAVAILABLE, "no snapshot yet").into_response();
        }
        Some(Err(e)) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")).into_response();
        }
        Some(Ok(snapshot)) => match render(snapshot, &s.servers) {
            Ok(t) => t,
            Err(e) => {
                return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
            }
        },
    };
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Binds `/metrics` (GET only: any other method gets 405) and serves what
/// `snapshots` last received, within [`LIMITS`]; `servers.metrics` counts
/// this server's refusals.
pub async fn serve(
    addr: SocketAddr,
    snapshots: Snapshots,
    servers: ServerCounters,
) -> anyhow::Result<JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding metrics_listen {addr}"))?;
    let stats = Arc::clone(&servers.metrics);
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(Scraping { snapshots, servers });
    info!("serving /metrics on {addr}");
    Ok(tokio::spawn(bounded::serve(
        "metrics",
        listener,
        app,
        LIMITS,
        stats,
        std::future::pending(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_are_built_only_for_a_reader_and_not_too_often() {
        let (mut publisher, snapshots) = Publisher::new();
        assert!(publisher.due(false) && publisher.due(true));
        publisher.publish(Err(anyhow::anyhow!("no datapath")));
        assert!(matches!(&*snapshots.0.borrow(), Some(Err(e)) if e.to_string() == "no datapath"));
        assert!(!publisher.due(false), "right after a publish");
        assert!(
            publisher.due(true),
            "an operator's change is published at once"
        );
        drop(snapshots);
        assert!(!publisher.due(true), "nobody scrapes");
    }
}
