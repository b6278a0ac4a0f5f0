//! Operator views of services and backends: the datapath's counters and
//! latency, the policy's weight and reason, telemetry, health, live flows and
//! per-route cost, joined per backend. The control API serves them, the CLI
//! prints them, `router top` draws them and `/metrics` exports them, so all
//! four always agree. Pure: built from a status snapshot, no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{BackendMode, BackendPolicyStatus, StatusReply};
use crate::datapath::{BackendRole, ConnScan, Counters, Histogram};

/// New-connection rates over a recent window, per (service, backend).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// Seconds the window spans (0 until two samples exist).
    pub window_secs: f64,
    pub new_conns_per_sec: BTreeMap<(String, String), f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendView {
    pub service: String,
    pub name: String,
    #[serde(default)]
    pub role: BackendRole,
    pub address: String,
    pub weight: u32,
    /// Share of the service's Maglev slots, 0.0–1.0.
    pub share: f64,
    pub mode: BackendMode,
    pub reason: String,
    /// `reason` from a fixed set, for metric labels.
    #[serde(default)]
    pub reason_label: String,
    pub last_change: Option<String>,
    pub weight_changes: u64,
    pub load: Option<f64>,
    pub saturated: bool,
    pub stale: bool,
    pub healthy: Option<bool>,
    pub telemetry_source: Option<String>,
    pub telemetry_age_ms: Option<u64>,
    pub telemetry_errors: u64,
    pub gpu_util: Option<f64>,
    pub mem_used_bytes: Option<f64>,
    pub mem_total_bytes: Option<f64>,
    pub power_watts: Option<f64>,
    pub throttle_reasons: Option<u64>,
    pub kv_cache_usage: Option<f64>,
    pub requests_running: Option<f64>,
    pub requests_waiting: Option<f64>,
    pub counters: Counters,
    /// Live forward flows in the connection table (None before the first scan).
    pub active_connections: Option<u64>,
    /// Room: flows in flight at which a least-loaded pick passes the backend
    /// over while another has room (0: no limit).
    #[serde(default)]
    pub max_in_flight: u32,
    /// Flows open now as the datapath counts them at each pick (least-loaded
    /// services place new flows by it; every service keeps it).
    #[serde(default)]
    pub in_flight: u64,
    /// Flows ended since the backend's slot was taken (ends seen by the
    /// datapath and the scan's corrections together).
    #[serde(default)]
    pub flows_closed: u64,
    /// Corrections of the in-flight count by the table scan: flows that
    /// vanished without an end, and ends counted twice.
    #[serde(default)]
    pub in_flight_corrections: crate::datapath::Correction,
    pub new_conns_per_sec: Option<f64>,
    pub connect_p50_ms: Option<f64>,
    pub connect_p99_ms: Option<f64>,
    pub first_byte_p50_ms: Option<f64>,
    pub first_byte_p99_ms: Option<f64>,
    pub connect_latency: Histogram,
    pub first_byte_latency: Histogram,
    pub cost_per_hour: Option<f64>,
    /// `cost_per_hour` spread over the connections this backend took in
    /// the rate window; None while it takes none.
    pub cost_per_1k_connections: Option<f64>,
    pub drain_deadline_unix: Option<u64>,
    pub flows_ended: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub vip: String,
    pub protocol: String,
    pub backends: usize,
    pub healthy_backends: usize,
    pub saturated_backends: usize,
    pub counters: Counters,
    /// `maglev` or `least_loaded`.
    #[serde(default)]
    pub selection: String,
    pub active_connections: Option<u64>,
    #[serde(default)]
    pub in_flight: u64,
    pub new_conns_per_sec: Option<f64>,
    /// Sum over backends that have a configured cost.
    pub cost_per_hour: Option<f64>,
    pub cost_per_1k_connections: Option<f64>,
    /// New connections sent to this service's fallback backends.
    pub fallback_connections: u64,
}

/// A pool of a service: its share and room from the control loop, its
/// traffic, latency and cost summed over its backends, and what it handed
/// to its fallback chain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PoolView {
    pub service: String,
    pub name: String,
    pub share: u32,
    pub configured_share: u32,
    pub backends: Vec<String>,
    pub fallback: Option<String>,
    pub segments: Vec<String>,
    pub no_room: bool,
    pub in_flight: u64,
    /// New connections its backends took (its own clients' and those
    /// other pools spilled into it).
    pub new_connections: u64,
    pub new_conns_per_sec: Option<f64>,
    /// New connections of this pool's clients that went down its
    /// fallback chain, by the pool that took them.
    pub fallback_connections: BTreeMap<String, u64>,
    /// Of the new connections that started in this pool, the part that
    /// went to a fallback (since the daemon started).
    pub fallback_rate: Option<f64>,
    pub cost_per_hour: Option<f64>,
    pub cost_per_1k_connections: Option<f64>,
    pub first_byte_p50_ms: Option<f64>,
    pub first_byte_p99_ms: Option<f64>,
    pub first_byte_latency: Histogram,
    pub guard: Option<super::GuardStatus>,
}

/// The pools of every pooled service, joined with their backends' views.
pub fn pools(st: &StatusReply, backends: &[BackendView]) -> Vec<PoolView> {
    st.pools
        .iter()
        .map(|p| {
            let mine: Vec<&BackendView> = backends
                .iter()
                .filter(|b| b.service == p.service && p.backends.contains(&b.name))
                .collect();
            let sum_opt = |f: &dyn Fn(&BackendView) -> Option<f64>| {
                let v: Vec<f64> = mine.iter().filter_map(|b| f(b)).collect();
                (!v.is_empty()).then(|| v.iter().sum::<f64>())
            };
            let rate = sum_opt(&|b| b.new_conns_per_sec);
            let cost = sum_opt(&|b| b.cost_per_hour);
            let mut first_byte = Histogram::default();
            for b in &mine {
                first_byte.add(&b.first_byte_latency);
            }
            let spills: Vec<&crate::datapath::Spill> = st
                .datapath
                .services
                .iter()
                .filter(|s| s.name == p.service)
                .flat_map(|s| &s.spills)
                .collect();
            let fallback_connections: BTreeMap<String, u64> = spills
                .iter()
                .filter(|x| x.from == p.name)
                .map(|x| (x.to.clone(), x.connections))
                .collect();
            let out: u64 = fallback_connections.values().sum();
            let came_in: u64 = spills
                .iter()
                .filter(|x| x.to == p.name)
                .map(|x| x.connections)
                .sum();
            let new_connections: u64 = mine.iter().map(|b| b.counters.new_conns).sum();
            // Connections whose clients started here: those its backends
            // took less the ones spilled into it, plus the ones it spilled.
            let started = new_connections.saturating_sub(came_in) + out;
            PoolView {
                service: p.service.clone(),
                name: p.name.clone(),
                share: p.share,
                configured_share: p.configured_share,
                backends: p.backends.clone(),
                fallback: p.fallback.clone(),
                segments: p.segments.clone(),
                no_room: p.no_room,
                in_flight: mine.iter().map(|b| b.in_flight).sum(),
                new_connections,
                new_conns_per_sec: rate,
                fallback_rate: (started > 0).then(|| out as f64 / started as f64),
                fallback_connections,
                cost_per_hour: cost,
                cost_per_1k_connections: per_1k(cost, rate),
                first_byte_p50_ms: ms(first_byte.quantile(0.5)),
                first_byte_p99_ms: ms(first_byte.quantile(0.99)),
                first_byte_latency: first_byte,
                guard: p.guard.clone(),
            }
        })
        .collect()
}

fn ms(s: Option<f64>) -> Option<f64> {
    s.map(|s| s * 1e3)
}

/// Dollars per 1,000 connections at `per_sec` new connections a second.
fn per_1k(cost_per_hour: Option<f64>, per_sec: Option<f64>) -> Option<f64> {
    let (cost, rate) = (cost_per_hour?, per_sec?);
    (rate > 0.0).then(|| cost / (rate * 3600.0) * 1000.0)
}

pub fn backends(st: &StatusReply, scan: Option<&ConnScan>, rates: &Rates) -> Vec<BackendView> {
    let policy: BTreeMap<(&str, &str), &BackendPolicyStatus> = st
        .policy
        .iter()
        .map(|p| ((p.service.as_str(), p.backend.as_str()), p))
        .collect();
    let mut out = Vec::new();
    for s in &st.datapath.services {
        for b in &s.backends {
            let p = policy.get(&(s.name.as_str(), b.name.as_str())).copied();
            let t = p.and_then(|p| p.telemetry.as_ref());
            let rate = rates
                .new_conns_per_sec
                .get(&(s.name.clone(), b.name.clone()))
                .copied();
            let cost = p.and_then(|p| p.cost_per_hour);
            out.push(BackendView {
                service: s.name.clone(),
                name: b.name.clone(),
                role: b.role,
                address: b.address.clone(),
                weight: b.weight,
                share: if s.table_size == 0 {
                    0.0
                } else {
                    f64::from(b.slots) / f64::from(s.table_size)
                },
                mode: p.map_or(BackendMode::Static, |p| p.mode),
                reason: p.map_or_else(|| "config".into(), |p| p.reason.clone()),
                reason_label: p.map_or_else(|| "config".into(), |p| p.reason_label.clone()),
                last_change: p.and_then(|p| p.last_change.clone()),
                weight_changes: p.map_or(0, |p| p.weight_changes),
                load: p.and_then(|p| p.load),
                saturated: p.is_some_and(|p| p.saturated),
                stale: p.is_some_and(|p| p.stale),
                healthy: p.and_then(|p| p.healthy),
                telemetry_source: p.and_then(|p| p.telemetry_source.clone()),
                telemetry_age_ms: p.and_then(|p| p.telemetry_age_ms),
                telemetry_errors: p.map_or(0, |p| p.stats.errors + p.stats.invalid),
                gpu_util: t.and_then(|t| t.gpu_util),
                mem_used_bytes: t.and_then(|t| t.mem_used_bytes),
                mem_total_bytes: t.and_then(|t| t.mem_total_bytes),
                power_watts: t.and_then(|t| t.power_watts),
                throttle_reasons: t.and_then(|t| t.throttle_reasons),
                kv_cache_usage: t.and_then(|t| t.kv_cache_usage),
                requests_running: t.and_then(|t| t.requests_running),
                requests_waiting: t.and_then(|t| t.requests_waiting),
                counters: b.counters,
                active_connections: scan.map(|sc| sc.active.get(&b.id).copied().unwrap_or(0)),
                in_flight: b.in_flight,
                max_in_flight: b.max_in_flight,
                flows_closed: b.flows_closed,
                in_flight_corrections: scan
                    .and_then(|sc| sc.corrections_total.get(&b.id).copied())
                    .unwrap_or_default(),
                new_conns_per_sec: rate,
                connect_p50_ms: ms(b.latency.connect.quantile(0.5)),
                connect_p99_ms: ms(b.latency.connect.quantile(0.99)),
                first_byte_p50_ms: ms(b.latency.first_byte.quantile(0.5)),
                first_byte_p99_ms: ms(b.latency.first_byte.quantile(0.99)),
                connect_latency: b.latency.connect.clone(),
                first_byte_latency: b.latency.first_byte.clone(),
                cost_per_hour: cost,
                cost_per_1k_connections: per_1k(cost, rate),
                drain_deadline_unix: p.and_then(|p| p.drain_deadline_unix),
                flows_ended: p.and_then(|p| p.flows_ended),
            });
        }
    }
    out
}

pub fn services(st: &StatusReply, backends: &[BackendView]) -> Vec<ServiceView> {
    st.datapath
        .services
        .iter()
        .map(|s| {
            let mine: Vec<&BackendView> = backends.iter().filter(|b| b.service == s.name).collect();
            let sum_opt = |f: &dyn Fn(&BackendView) -> Option<f64>| {
                let v: Vec<f64> = mine.iter().filter_map(|b| f(b)).collect();
                (!v.is_empty()).then(|| v.iter().sum::<f64>())
            };
            let rate = sum_opt(&|b| b.new_conns_per_sec);
            let cost = sum_opt(&|b| b.cost_per_hour);
            ServiceView {
                name: s.name.clone(),
                vip: s.vip.clone(),
                protocol: s.protocol.clone(),
                backends: mine.len(),
                healthy_backends: mine.iter().filter(|b| b.healthy != Some(false)).count(),
                saturated_backends: mine.iter().filter(|b| b.saturated).count(),
                counters: s.counters,
                selection: s.selection.clone(),
                in_flight: mine.iter().map(|b| b.in_flight).sum(),
                active_connections: mine
                    .iter()
                    .map(|b| b.active_connections)
                    .sum::<Option<u64>>(),
                new_conns_per_sec: rate,
                cost_per_hour: cost,
                cost_per_1k_connections: per_1k(cost, rate),
                fallback_connections: mine
                    .iter()
                    .filter(|b| b.role == BackendRole::Fallback)
                    .map(|b| b.counters.new_conns)
                    .sum(),
            }
        })
        .collect()
}

/// New-connection counters per (service, backend) at one instant.
type CounterSample = (std::time::Instant, BTreeMap<(String, String), u64>);

/// Samples of each backend's new-connection counter, for rates over a
/// sliding window without any state in the datapath.
#[derive(Debug, Default)]
pub struct RateWindow {
    samples: std::collections::VecDeque<CounterSample>,
}

impl RateWindow {
    /// How far back rates look.
    pub const SPAN: std::time::Duration = std::time::Duration::from_secs(60);

    pub fn push(&mut self, at: std::time::Instant, counts: BTreeMap<(String, String), u64>) {
        self.samples.push_back((at, counts));
        while self.samples.len() > 2
            && self
                .samples
                .front()
                .is_some_and(|(t, _)| at.duration_since(*t) > Self::SPAN)
        {
            self.samples.pop_front();
        }
    }

    pub fn rates(&self) -> Rates {
        let (Some((t0, first)), Some((t1, last))) = (self.samples.front(), self.samples.back())
        else {
            return Rates::default();
        };
        let secs = t1.duration_since(*t0).as_secs_f64();
        if secs <= 0.0 {
            return Rates::default();
        }
        Rates {
            window_secs: secs,
            new_conns_per_sec: last
                .iter()
                .map(|(k, n)| {
                    // A backend that appeared mid-window counts from zero.
                    let before = first.get(k).copied().unwrap_or(0);
                    (k.clone(), n.saturating_sub(before) as f64 / secs)
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn counts(n: u64) -> BTreeMap<(String, String), u64> {
        [(("llama".to_string(), "gpu-0".to_string()), n)].into()
    }

    #[test]
    fn rates_span_the_window_and_forget_older_samples() {
        let t = Instant::now();
        let mut w = RateWindow::default();
        assert_eq!(w.rates(), Rates::default());
        w.push(t, counts(0));
        w.push(t + Duration::from_secs(10), counts(100));
        let r = w.rates();
        assert_eq!(r.window_secs, 10.0);
        assert_eq!(r.new_conns_per_sec[&("llama".into(), "gpu-0".into())], 10.0);
        // 100 s later the first samples have left the window.
        w.push(t + Duration::from_secs(70), counts(700));
        w.push(t + Duration::from_secs(110), counts(700));
        let r = w.rates();
        assert!(r.window_secs <= 60.0, "{}", r.window_secs);
        assert_eq!(r.new_conns_per_sec[&("llama".into(), "gpu-0".into())], 0.0);
    }

    #[test]
    fn cost_per_thousand_connections() {
        // $3.60 an hour at 1 connection a second: 3600 connections cost $3.60,
        // so 1,000 cost $1.
        let c = per_1k(Some(3.6), Some(1.0)).unwrap();
        assert!((c - 1.0).abs() < 1e-9, "{c}");
        assert_eq!(per_1k(Some(3.6), Some(0.0)), None);
        assert_eq!(per_1k(None, Some(1.0)), None);
    }
}
