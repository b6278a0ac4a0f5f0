//! Facts about the host the daemon runs on: interface addresses and the
//! kernel's own ephemeral port range. The settings the daemon changes are
//! in `host_settings`.

use std::{collections::HashMap, net::Ipv4Addr};

/// IPv4 addresses per interface name, as `getifaddrs(3)` reports them.
pub fn interface_addresses() -> std::io::Result<HashMap<String, Vec<Ipv4Addr>>> {
    let mut out: HashMap<String, Vec<Ipv4Addr>> = HashMap::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)? {
        let entry = out.entry(ifa.interface_name.clone()).or_default();
        if let Some(addr) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            entry.push(addr.ip());
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
