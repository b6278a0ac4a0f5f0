//! `[[service.pool]]` and `[[service.segment]]`: what a valid set means,
//! and every refusal at its line and key.

use super::*;

/// Two pools after BASE (lines 16–25), then `extra` from line 26 on.
fn with_pools(extra: &str) -> String {
    format!(
        "{BASE}[[service.pool]]
name = \"stable\"
backends = [\"gpu-0\"]
share = 95
fallback = \"canary\"

[[service.pool]]
name = \"canary\"
backends = [\"gpu-1\"]
share = 5
{extra}"
    )
}

/// `with_pools` with 1-based line `n` replaced by `new`.
fn pools_line(n: usize, new: &str) -> String {
    let text = with_pools("");
    let mut lines: Vec<&str> = text.lines().collect();
    lines[n - 1] = new;
    lines.join("\n") + "\n"
}

#[test]
fn pools_and_segments_parse() {
    let cfg = parse(&with_pools(
        "guard = { ttft_p99_ratio = 1.5, min_connections = 200 }

[[service.segment]]
cidr = \"10.1.0.0/16\"
pool = \"canary\"
",
    ))
    .unwrap();
    let s = &cfg.services[0];
    assert_eq!(s.pools.len(), 2);
    assert_eq!(
        (s.pools[0].share, s.pools[0].fallback),
        (95, Some(1)),
        "stable"
    );
    assert_eq!((s.pools[1].share, s.pools[1].fallback), (5, None), "canary");
    assert_eq!(
        s.pools[1].guard,
        Some(GuardConfig {
            ttft_p99_ratio: 1.5,
            min_connections: 200
        })
    );
    assert_eq!(s.segments.len(), 1);
    assert_eq!(s.segments[0].pool, 1);
    assert_eq!(
        (s.segments[0].addr, s.segments[0].prefix_len),
        ("10.1.0.0".parse().unwrap(), 16)
    );
    // No pools: none implied in the config (the datapath's implicit pool).
    assert!(parse(BASE).unwrap().services[0].pools.is_empty());
}

#[test]
fn shares_must_add_up_to_100() {
    assert_err(
        &pools_line(19, "share = 90"),
        19,
        "service[0].pool[0].share",
        "add up to 95, not 100 (stable 90, canary 5)",
    );
    assert_err(
        &pools_line(19, "share = 101"),
        19,
        "service[0].pool[0].share",
        "101 is above 100 percent",
    );
}

#[test]
fn pools_name_known_backends_once_each() {
    assert_err(
        &pools_line(24, r#"backends = ["gpu-9"]"#),
        24,
        "service[0].pool[1].backends[0]",
        r#"no backend named "gpu-9" in this service"#,
    );
    assert_err(
        &pools_line(24, r#"backends = ["gpu-1", "gpu-0"]"#),
        24,
        "service[0].pool[1].backends[1]",
        r#"backend "gpu-0" is already in pool "stable""#,
    );
    assert_err(
        &pools_line(24, "backends = []"),
        24,
        "service[0].pool[1].backends",
        "needs at least one backend",
    );
    // The second pool to name a backend is the one refused.
    assert_err(
        &pools_line(18, r#"backends = ["gpu-1"]"#),
        24,
        "service[0].pool[1].backends[0]",
        r#"backend "gpu-1" is already in pool "stable""#,
    );
    assert_err(
        &pools_line(23, r#"name = "stable""#),
        23,
        "service[0].pool[1].name",
        r#"duplicate pool name "stable""#,
    );
}

#[test]
fn a_backend_in_no_pool_is_refused() {
    let text =
        format!("{BASE}[[service.pool]]\nname = \"stable\"\nbackends = [\"gpu-0\"]\nshare = 100\n");
    assert_err(
        &text,
        14,
        "service[0].backend[1].name",
        r#"backend "gpu-1" is in no pool"#,
    );
}

#[test]
fn fallbacks_name_a_pool_and_never_cycle() {
    assert_err(
        &pools_line(20, r#"fallback = "nope""#),
        20,
        "service[0].pool[0].fallback",
        r#"no pool named "nope" in this service"#,
    );
    assert_err(
        &pools_line(20, r#"fallback = "stable""#),
        20,
        "service[0].pool[0].fallback",
        "cannot be its own fallback",
    );
    assert_err(
        &with_pools("fallback = \"stable\"\n"),
        20,
        "service[0].pool[0].fallback",
        "fallback cycle: stable → canary → stable",
    );
}

#[test]
fn guards_need_a_ratio_above_1_and_connections() {
    assert_err(
        &with_pools("guard = { ttft_p99_ratio = 0.9, min_connections = 200 }\n"),
        26,
        "service[0].pool[1].guard.ttft_p99_ratio",
        "must be a finite number above 1",
    );
    assert_err(
        &with_pools("guard = { ttft_p99_ratio = 1.5, min_connections = 0 }\n"),
        26,
        "service[0].pool[1].guard.min_connections",
        "must be at least 1",
    );
}

#[test]
fn segments_are_valid_distinct_networks_of_a_known_pool() {
    let seg = |cidr: &str, pool: &str| {
        with_pools(&format!(
            "\n[[service.segment]]\ncidr = \"10.1.0.0/16\"\npool = \"canary\"\n\n[[service.segment]]\ncidr = \"{cidr}\"\npool = \"{pool}\"\n"
        ))
    };
    assert!(parse(&seg("10.1.7.0/24", "stable")).is_ok());
    assert_err(
        &seg("10.1.0.0/33", "stable"),
        32,
        "service[0].segment[1].cidr",
        r#""10.1.0.0/33" is not an IPv4 network"#,
    );
    assert_err(
        &seg("10.1.2.0/16", "stable"),
        32,
        "service[0].segment[1].cidr",
        "host bits are set; the network is 10.1.0.0/16",
    );
    assert_err(
        &seg("10.1.0.0/16", "stable"),
        32,
        "service[0].segment[1].cidr",
        "10.1.0.0/16 is already a segment (line 28)",
    );
    assert_err(
        &seg("10.9.0.0/16", "blue"),
        33,
        "service[0].segment[1].pool",
        r#"no pool named "blue" in this service"#,
    );
    assert_err(
        &format!("{BASE}\n[[service.segment]]\ncidr = \"10.1.0.0/16\"\npool = \"canary\"\n"),
        19,
        "service[0].segment[0].pool",
        "this service has no `[[service.pool]]`",
    );
}
