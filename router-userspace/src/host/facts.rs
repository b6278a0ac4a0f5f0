//! Facts about the host the daemon runs on: interface addresses and the
//! kernel's own ephemeral port range. The settings the daemon changes are
//! in `host_settings`.

use std::{collections::HashMap, net::IpAddr};

/// Addresses per interface name, as `getifaddrs(3)` reports them: every
/// IPv4 one, and the IPv6 ones a backend can answer to (link-local,
/// loopback and multicast ones cannot be a SNAT address, see
/// `Config::check_host`).
pub fn interface_addresses() -> std::io::Result<HashMap<String, Vec<IpAddr>>> {
    let mut out: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)? {
        let entry = out.entry(ifa.interface_name.clone()).or_default();
        let Some(addr) = ifa.address.as_ref() else {
            continue;
        };
        if let Some(v4) = addr.as_sockaddr_in() {
            entry.push(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = addr.as_sockaddr_in6().map(|a| a.ip())
            && !(v6.is_unicast_link_local() || v6.is_loopback() || v6.is_multicast())
        {
            entry.push(IpAddr::V6(v6));
        }
    }
    Ok(out)
}

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`).
pub fn ephemeral_port_range() -> std::io::Result<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) => Ok((lo, hi)),
        _ => Err(std::io::Error::other(format!(
            "unexpected ip_local_port_range {text:?}"
        ))),
    }
}
