//! `[[service.pool]]` and `[[service.segment]]`: who belongs to which
//! pool, the shares of unmatched clients, fallback chains, guards, and the
//! client networks routed to a pool.

use router_common::pools::{MAX_FALLBACK_DEPTH, MAX_POOLS};

use super::{
    super::{
        locate::{KeyPath, Locator},
        raw::*,
    },
    *,
};

/// The pools of the service at `sp`, whose validated backends are
/// `backends`. No pools: an empty list (one implicit pool of everything).
pub(super) fn validate_pools(
    loc: &Locator<'_>,
    sp: &KeyPath,
    raw: Vec<RawPool>,
    backends: &[BackendConfig],
) -> Result<Vec<PoolConfig>, ConfigError> {
    let base = sp.key("pool");
    if raw.is_empty() {
        return Ok(Vec::new());
    }
    if raw.len() > MAX_POOLS as usize {
        return Err(loc.err(
            &base.index(MAX_POOLS as usize),
            format!("at most {MAX_POOLS} pools per service are supported"),
        ));
    }
    // backend name → (pool index) of the pool that first named it.
    let mut owner: HashMap<&str, usize> = HashMap::new();
    let mut pools: Vec<PoolConfig> = Vec::with_capacity(raw.len());
    let mut fallbacks: Vec<Option<String>> = Vec::with_capacity(raw.len());
    for (i, p) in raw.iter().enumerate() {
        let pp = base.index(i);
        if p.name.is_empty() {
            return Err(loc.err(&pp.key("name"), "pool name must not be empty"));
        }
        if let Some(first) = pools.iter().position(|q| q.name == p.name) {
            return Err(loc.err(
                &pp.key("name"),
                format!(
                    "duplicate pool name {:?} (first used at line {})",
                    p.name,
                    loc.line(&base.index(first).key("name"))
                ),
            ));
        }
        let bp = pp.key("backends");
        if p.backends.is_empty() {
            return Err(loc.err(&bp, format!("pool {:?} needs at least one backend", p.name)));
        }
        for (j, b) in p.backends.iter().enumerate() {
            if !backends.iter().any(|x| &x.name == b) {
                return Err(loc.err(
                    &bp.index(j),
                    format!("no backend named {b:?} in this service"),
                ));
            }
            if let Some(&first) = owner.get(b.as_str()) {
                return Err(loc.err(
                    &bp.index(j),
                    format!(
                        "backend {b:?} is already in pool {:?}; a backend belongs to one pool",
                        raw[first].name
                    ),
                ));
            }
            owner.insert(b, i);
        }
        let share = p.share.unwrap_or(0);
        if share > 100 {
            return Err(loc.err(&pp.key("share"), format!("{share} is above 100 percent")));
        }
        let guard = p
            .guard
            .as_ref()
            .map(|g| validate_guard(loc, &pp.key("guard"), g))
            .transpose()?;
        pools.push(PoolConfig {
            name: p.name.clone(),
            backends: p.backends.clone(),
            share,
            fallback: None,
            guard,
        });
        fallbacks.push(p.fallback.clone());
    }
    // A backend left out of every pool would never be picked: almost
    // certainly a mistake, and one that shows only as an idle replica.
    if let Some((i, b)) = backends
        .iter()
        .enumerate()
        .find(|(_, b)| !owner.contains_key(b.name.as_str()))
    {
        return Err(loc.err(
            &sp.key("backend").index(i).key("name"),
            format!(
                "backend {:?} is in no pool; with pools, every backend belongs to one",
                b.name
            ),
        ));
    }
    let total: u32 = pools.iter().map(|p| p.share).sum();
    if total != 100 {
        return Err(loc.err(
            &base.index(0).key("share"),
            format!(
                "the pools' shares add up to {total}, not 100 ({})",
                pools
                    .iter()
                    .map(|p| format!("{} {}", p.name, p.share))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    for (i, fb) in fallbacks.iter().enumerate() {
        let Some(fb) = fb else { continue };
        let key = base.index(i).key("fallback");
        let Some(target) = pools.iter().position(|p| &p.name == fb) else {
            return Err(loc.err(&key, format!("no pool named {fb:?} in this service")));
        };
        if target == i {
            return Err(loc.err(&key, "a pool cannot be its own fallback"));
        }
        pools[i].fallback = Some(target);
    }
    for (i, p) in pools.iter().enumerate() {
        let mut chain = vec![i];
        let mut next = p.fallback;
        while let Some(n) = next {
            if chain.contains(&n) {
                chain.push(n);
                return Err(loc.err(
                    &base.index(i).key("fallback"),
                    format!("fallback cycle: {}", chain_names(&pools, &chain)),
                ));
            }
            chain.push(n);
            next = pools[n].fallback;
        }
        if chain.len() - 1 > MAX_FALLBACK_DEPTH as usize {
            return Err(loc.err(
                &base.index(i).key("fallback"),
                format!(
                    "fallback chain {} is longer than {MAX_FALLBACK_DEPTH} steps",
                    chain_names(&pools, &chain)
                ),
            ));
        }
    }
    Ok(pools)
}

fn chain_names(pools: &[PoolConfig], chain: &[usize]) -> String {
    chain
        .iter()
        .map(|&i| pools[i].name.as_str())
        .collect::<Vec<_>>()
        .join(" → ")
}

fn validate_guard(
    loc: &Locator<'_>,
    gp: &KeyPath,
    g: &RawGuard,
) -> Result<GuardConfig, ConfigError> {
    if !(g.ttft_p99_ratio.is_finite() && g.ttft_p99_ratio > 1.0) {
        return Err(loc.err(
            &gp.key("ttft_p99_ratio"),
            format!(
                "{} must be a finite number above 1 (the multiple of the other pools' p99 that trips it)",
                g.ttft_p99_ratio
            ),
        ));
    }
    if g.min_connections == 0 {
        return Err(loc.err(
            &gp.key("min_connections"),
            "must be at least 1: a guard must see connections before it judges",
        ));
    }
    Ok(GuardConfig {
        ttft_p99_ratio: g.ttft_p99_ratio,
        min_connections: g.min_connections,
    })
}

/// The segments of the service at `sp`, whose pools are `pools`.
pub(super) fn validate_segments(
    loc: &Locator<'_>,
    sp: &KeyPath,
    raw: Vec<RawSegment>,
    pools: &[PoolConfig],
) -> Result<Vec<SegmentConfig>, ConfigError> {
    let base = sp.key("segment");
    let mut segments: Vec<SegmentConfig> = Vec::with_capacity(raw.len());
    for (i, s) in raw.iter().enumerate() {
        let p = base.index(i);
        if pools.is_empty() {
            return Err(loc.err(
                &p.key("pool"),
                "segments route clients to pools; this service has no `[[service.pool]]`",
            ));
        }
        let (addr, prefix_len) = parse_cidr(&s.cidr).map_err(|m| loc.err(&p.key("cidr"), m))?;
        let Some(pool) = pools.iter().position(|x| x.name == s.pool) else {
            return Err(loc.err(
                &p.key("pool"),
                format!("no pool named {:?} in this service", s.pool),
            ));
        };
        if let Some(first) = segments
            .iter()
            .position(|x| x.addr == addr && x.prefix_len == prefix_len)
        {
            return Err(loc.err(
                &p.key("cidr"),
                format!(
                    "{addr}/{prefix_len} is already a segment (line {}); one network routes to one pool",
                    loc.line(&base.index(first).key("cidr"))
                ),
            ));
        }
        segments.push(SegmentConfig {
            addr,
            prefix_len,
            pool,
        });
    }
    Ok(segments)
}
