//! The pools' part of `/metrics`: share, room, traffic, fallbacks by
//! target, first-byte latency and cost per pool, and the guards' trips.

use prometheus_client::encoding::DescriptorEncoder;

use super::metrics::{Labels, counters, flag, gauges, histograms};
use crate::api::views::PoolView;

fn labels(p: &PoolView) -> Labels {
    vec![("service", p.service.clone()), ("pool", p.name.clone())]
}

pub(super) fn encode(e: &mut DescriptorEncoder, pools: &[PoolView]) -> std::fmt::Result {
    let per = |f: fn(&PoolView) -> Option<f64>| pools.iter().map(move |p| (labels(p), f(p)));
    gauges(
        e,
        "router_pool_share_ratio",
        "Part of the new connections of clients no segment matches that go to the pool (0–1).",
        per(|p| Some(f64::from(p.share) / 100.0)),
    )?;
    gauges(
        e,
        "router_pool_no_room",
        "1 while every backend of the pool is saturated, unhealthy or drained (its new connections go to its fallback).",
        per(|p| flag(p.no_room)),
    )?;
    gauges(
        e,
        "router_pool_in_flight",
        "Flows open now on the pool's backends.",
        per(|p| Some(p.in_flight as f64)),
    )?;
    counters(
        e,
        "router_pool_new_connections",
        "New connections the pool's backends took.",
        pools.iter().map(|p| (labels(p), p.new_connections)),
    )?;
    counters(
        e,
        "router_pool_fallback_connections",
        "New connections of the pool's clients that went to another pool of its fallback chain, by that pool.",
        pools.iter().flat_map(|p| {
            p.fallback_connections.iter().map(move |(to, n)| {
                let mut l = labels(p);
                l.push(("target", to.clone()));
                (l, *n)
            })
        }),
    )?;
    histograms(
        e,
        "router_pool_first_byte_latency_seconds",
        "First client payload to first backend payload, measured in XDP, summed over the pool's backends.",
        pools
            .iter()
            .map(|p| (labels(p), p.first_byte_latency.clone())),
    )?;
    gauges(
        e,
        "router_pool_cost_per_hour_dollars",
        "Configured cost of the pool's backends.",
        per(|p| p.cost_per_hour),
    )?;
    gauges(
        e,
        "router_pool_cost_per_1k_connections_dollars",
        "Pool cost spread over the last minute's connection rate.",
        per(|p| p.cost_per_1k_connections),
    )?;
    counters(
        e,
        "router_pool_guard_trips",
        "Times the pool's rollback guard set its share to 0.",
        pools
            .iter()
            .filter_map(|p| p.guard.as_ref().map(|g| (labels(p), g.trips))),
    )?;
    Ok(())
}
