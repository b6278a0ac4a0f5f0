//! `[bgp]`: the sessions of the speaker that announces the VIPs.
use super::{
    super::{
        locate::{KeyPath, Locator},
        raw::*,
    },
    *,
};

/// `[bgp]`.
pub(in crate::config) fn validate_bgp(
    loc: &Locator<'_>,
    raw: RawBgp,
    services: &[ServiceConfig],
) -> Result<BgpConfig, ConfigError> {
    let base = KeyPath::default().key("bgp");
    if raw.local_as == 0 {
        return Err(loc.err(&base.key("local_as"), "must be an AS number above 0"));
    }
    let router_id = parse_ipv4(&raw.router_id).map_err(|m| loc.err(&base.key("router_id"), m))?;
    if raw.peers.is_empty() {
        return Err(loc.err(
            &base.key("peers"),
            "needs at least one peer, e.g. peers = [{ address = \"198.18.0.254\", as = 65000 }]: \
             with none, nothing would ever learn the VIPs",
        ));
    }
    let mut peers = Vec::with_capacity(raw.peers.len());
    for (i, p) in raw.peers.into_iter().enumerate() {
        let key = base.key("peers").index(i);
        let address = parse_ipv4(&p.address).map_err(|m| loc.err(&key.key("address"), m))?;
        if p.asn == 0 {
            return Err(loc.err(&key.key("as"), "must be an AS number above 0"));
        }
        if peers.iter().any(|q: &BgpPeer| q.address == address) {
            return Err(loc.err(&key.key("address"), format!("{address} is listed twice")));
        }
        peers.push(BgpPeer {
            address,
            asn: p.asn,
        });
    }
    let duration = |key: &str, v: Option<String>, default: Duration| match v {
        None => Ok(default),
        Some(s) => parse_duration(&s).map_err(|e| loc.err(&base.key(key), e.to_string())),
    };
    let hold_time = duration("hold_time", raw.hold_time, Duration::from_secs(9))?;
    if hold_time < Duration::from_secs(3) || hold_time > Duration::from_secs(65535) {
        return Err(loc.err(
            &base.key("hold_time"),
            "BGP allows 3 s to 65535 s (RFC 4271)",
        ));
    }
    let drain = duration("drain", raw.drain, Duration::from_secs(5))?;
    let next_hop6 = raw
        .next_hop6
        .map(|s| parse_next_hop6(&s).map_err(|m| loc.err(&base.key("next_hop6"), m)))
        .transpose()?;
    if next_hop6.is_none()
        && let Some(s) = services.iter().find(|s| s.vip.is_ipv6())
    {
        return Err(loc.err(
            &base.key("next_hop6"),
            format!(
                "service {:?} listens on IPv6 ({}): its /128 path needs an IPv6 next hop; set \
                 next_hop6 to an IPv6 address of this LB",
                s.name, s.vip
            ),
        ));
    }
    Ok(BgpConfig {
        local_as: raw.local_as,
        router_id,
        peers,
        hold_time,
        drain,
        next_hop6,
        gobgpd: raw.gobgpd.unwrap_or_else(|| "gobgpd".into()),
        gobgp: raw.gobgp.unwrap_or_else(|| "gobgp".into()),
    })
}

/// An IPv6 address peers can forward to: global, so neither unspecified,
/// loopback, multicast nor link-local (which needs an interface).
fn parse_next_hop6(s: &str) -> Result<std::net::Ipv6Addr, String> {
    let a: std::net::Ipv6Addr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv6 address"))?;
    if a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_unicast_link_local() {
        return Err(format!(
            "{s:?}: {a} cannot be a next hop; give a global IPv6 address of this LB"
        ));
    }
    Ok(a)
}
