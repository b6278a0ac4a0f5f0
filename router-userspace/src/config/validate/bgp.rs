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
    Ok(BgpConfig {
        local_as: raw.local_as,
        router_id,
        peers,
        hold_time,
        drain,
        gobgpd: raw.gobgpd.unwrap_or_else(|| "gobgpd".into()),
        gobgp: raw.gobgp.unwrap_or_else(|| "gobgp".into()),
    })
}
