//! The backend side of DSR: `router decap attach|detach|status` load, pin
//! and remove the `decap` XDP program (see router-ebpf/src/decap.rs) on a
//! backend's interface. Pinned, so it outlives the command and keeps
//! working across reboots of nothing but the command; `detach` removes it.
//!
//! Under the pin directory each interface has its own directory holding
//! the link and the program's maps (the outer addresses of each family
//! and the counters), so `status` and `detach` need nothing but the
//! interface's name.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
    },
};
use router_common::{
    dsr::{DECAP_PACKETS, DECAP_PASSED},
    v6::Addr6,
};

use crate::datapath::{DECAP_OBJ, pinning};

/// Where `decap` pins when not told otherwise: beside the router's own
/// pins, apart from them.
pub const DEFAULT_DECAP_PIN_PATH: &str = "/sys/fs/bpf/router-decap";

#[derive(Debug, thiserror::Error)]
pub enum DecapError {
    #[error("--interface {0}: no such interface on this host")]
    NoInterface(String),
    #[error(
        "--interface {0}: it has no IPv4 or global IPv6 address, so no tunnel packet can be \
         addressed to it; give the outer addresses with --address"
    )]
    NoAddress(String),
    #[error("--interface {interface}: decap is not attached (nothing pinned at {path})")]
    NotAttached { interface: String, path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {detail}")]
    Bpf { what: String, detail: String },
    #[error(transparent)]
    Datapath(#[from] crate::datapath::DatapathError),
}

fn bpf(what: impl Into<String>) -> impl FnOnce(String) -> DecapError {
    move |detail| DecapError::Bpf {
        what: what.into(),
        detail,
    }
}

/// What `attach` does.
#[derive(Clone, Debug)]
pub struct AttachOptions {
    pub interface: String,
    /// Outer destinations to accept; empty: the interface's IPv4 and
    /// global IPv6 addresses.
    pub addresses: Vec<IpAddr>,
    /// GUE port accepted besides IPIP; 0: IPIP only.
    pub gue_port: u16,
    pub pin_path: PathBuf,
}

fn dir_of(pin_path: &Path, interface: &str) -> PathBuf {
    pin_path.join(interface)
}

/// The interface's IPv4 addresses and its IPv6 ones that an LB can route
/// a tunnel to: not link-local (which needs a scope), loopback or
/// multicast.
fn interface_addresses(interface: &str) -> Result<Vec<IpAddr>, DecapError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| DecapError::Io {
        path: PathBuf::from("getifaddrs"),
        source: e.into(),
    })?;
    Ok(addrs
        .filter(|a| a.interface_name == interface)
        .filter_map(|a| {
            let a = a.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            let v6 = a.as_sockaddr_in6()?.ip();
            let routable = !(v6.is_unicast_link_local() || v6.is_loopback() || v6.is_multicast());
            routable.then_some(IpAddr::V6(v6))
        })
        .collect())
}

/// Makes the pinned map `name` hold exactly `keys`, each with `value`:
/// new keys first, stale ones after, so an address kept is never missing.
fn sync_addresses<K: aya::Pod + PartialEq>(
    ebpf: &mut Ebpf,
    name: &'static str,
    keys: &[K],
    value: u32,
) -> Result<(), DecapError> {
    let mut map: BpfHashMap<_, K, u32> = BpfHashMap::try_from(
        ebpf.map_mut(name)
            .ok_or_else(|| bpf("the decap object")(format!("no map {name}")))?,
    )
    .map_err(|e| bpf(name)(e.to_string()))?;
    let old: Vec<K> = map.keys().filter_map(Result::ok).collect();
    for k in keys {
        map.insert(k, value, 0)
            .map_err(|e| bpf(name)(e.to_string()))?;
    }
    for k in old {
        if !keys.contains(&k) {
            map.remove(&k).map_err(|e| bpf(name)(e.to_string()))?;
        }
    }
    Ok(())
}

/// What the tunnels of `addresses` are called in `attach`'s line.
fn tunnels(addresses: &[IpAddr]) -> &'static str {
    match (
        addresses.iter().any(IpAddr::is_ipv4),
        addresses.iter().any(IpAddr::is_ipv6),
    ) {
        (true, true) => "IPIP, IPv6-in-IPv6",
        (false, true) => "IPv6-in-IPv6",
        _ => "IPIP",
    }
}

/// Loads the program on `opts.interface` (or, if it is there already,
/// replaces its addresses and port) and pins it. Returns the line to print.
pub fn attach(opts: &AttachOptions) -> Result<String, DecapError> {
    if nix::net::if_::if_nametoindex(opts.interface.as_str()).is_err() {
        return Err(DecapError::NoInterface(opts.interface.clone()));
    }
    let addresses = if opts.addresses.is_empty() {
        interface_addresses(&opts.interface)?
    } else {
        opts.addresses.clone()
    };
    if addresses.is_empty() {
        return Err(DecapError::NoAddress(opts.interface.clone()));
    }
    pinning::mount_bpffs_if_missing(&opts.pin_path)?;
    let dir = dir_of(&opts.pin_path, &opts.interface);
    std::fs::create_dir_all(&dir).map_err(|source| DecapError::Io {
        path: dir.clone(),
        source,
    })?;
    let link = dir.join("link");
    let mut ebpf = EbpfLoader::new()
        .map_pin_path("DECAP_ADDRS", dir.join("DECAP_ADDRS"))
        .map_pin_path("DECAP_ADDRS6", dir.join("DECAP_ADDRS6"))
        .map_pin_path("DECAP_STATS", dir.join("DECAP_STATS"))
        .load(DECAP_OBJ)
        .map_err(|e| bpf("loading the decap program")(e.to_string()))?;
    let again = link.exists();
    if !again {
        let program: &mut Xdp = ebpf
            .program_mut("decap")
            .ok_or_else(|| bpf("the decap object")("no program named decap".into()))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| bpf("the decap program")(e.to_string()))?;
        program
            .load()
            .map_err(|e| bpf("verifying the decap program")(e.to_string()))?;
        let id = program
            .attach(&opts.interface, XdpMode::Default)
            .map_err(|e| bpf(format!("attaching to {}", opts.interface))(e.to_string()))?;
        let fd = FdLink::try_from(
            program
                .take_link(id)
                .map_err(|e| bpf("the decap link")(e.to_string()))?,
        )
        .map_err(|e| bpf("the decap link")(e.to_string()))?;
        fd.pin(&link)
            .map_err(|e| bpf(format!("pinning {}", link.display()))(e.to_string()))?;
    }
    let gue_port = u32::from(opts.gue_port.to_be());
    let v4: Vec<u32> = addresses
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(a) => Some(u32::from_ne_bytes(a.octets())),
            IpAddr::V6(_) => None,
        })
        .collect();
    let v6: Vec<Addr6> = addresses
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(_) => None,
            IpAddr::V6(a) => Some(Addr6::from_octets(a.octets())),
        })
        .collect();
    sync_addresses(&mut ebpf, "DECAP_ADDRS", &v4, gue_port)?;
    sync_addresses(&mut ebpf, "DECAP_ADDRS6", &v6, gue_port)?;
    let list: Vec<String> = addresses.iter().map(IpAddr::to_string).collect();
    let tunnels = tunnels(&addresses);
    let gue = if opts.gue_port == 0 {
        format!("{tunnels} only")
    } else {
        format!("{tunnels} and GUE to port {}", opts.gue_port)
    };
    Ok(format!(
        "decap {} {} for {} ({gue})",
        if again { "updated on" } else { "attached to" },
        opts.interface,
        list.join(", ")
    ))
}

/// Detaches and unpins the program of `interface`.
pub fn detach(pin_path: &Path, interface: &str) -> Result<String, DecapError> {
    let dir = dir_of(pin_path, interface);
    let link = dir.join("link");
    if !link.exists() {
        return Err(DecapError::NotAttached {
            interface: interface.into(),
            path: link,
        });
    }
    let pinned = PinnedLink::from_pin(&link)
        .map_err(|e| bpf(format!("{}", link.display()))(e.to_string()))?;
    // The link's last reference goes with this fd: that detaches it.
    drop(pinned.unpin().map_err(|source| DecapError::Io {
        path: link.clone(),
        source,
    })?);
    std::fs::remove_dir_all(&dir).map_err(|source| DecapError::Io { path: dir, source })?;
    Ok(format!("decap detached from {interface}"))
}

/// One interface's decap state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DecapStatus {
    pub interface: String,
    /// IPv4 ones first, then IPv6.
    pub addresses: Vec<IpAddr>,
    /// 0: IPIP only.
    pub gue_port: u16,
    pub decapsulated: u64,
    pub passed: u64,
}

/// Every interface with the program pinned under `pin_path`.
pub fn status(pin_path: &Path) -> Result<Vec<DecapStatus>, DecapError> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(pin_path) else {
        return Ok(out);
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for interface in names {
        let dir = dir_of(pin_path, &interface);
        let open = |name: &str| {
            MapData::from_pin(dir.join(name))
                .map(aya::maps::Map::HashMap)
                .map_err(|e| bpf(format!("{}", dir.join(name).display()))(e.to_string()))
        };
        let addrs_map = open("DECAP_ADDRS")?;
        let addrs: BpfHashMap<_, u32, u32> =
            BpfHashMap::try_from(addrs_map).map_err(|e| bpf("DECAP_ADDRS")(e.to_string()))?;
        let mut addresses = Vec::new();
        let mut gue_port = 0;
        for entry in addrs.iter() {
            let (k, v) = entry.map_err(|e| bpf("DECAP_ADDRS")(e.to_string()))?;
            addresses.push(IpAddr::V4(Ipv4Addr::from(k.to_ne_bytes())));
            gue_port = u16::from_be(v as u16);
        }
        // Absent where an earlier router, before IPv6, attached it.
        if dir.join("DECAP_ADDRS6").exists() {
            let addrs6: BpfHashMap<_, Addr6, u32> = BpfHashMap::try_from(open("DECAP_ADDRS6")?)
                .map_err(|e| bpf("DECAP_ADDRS6")(e.to_string()))?;
            for entry in addrs6.iter() {
                let (k, v) = entry.map_err(|e| bpf("DECAP_ADDRS6")(e.to_string()))?;
                addresses.push(IpAddr::V6(Ipv6Addr::from(k.octets())));
                gue_port = u16::from_be(v as u16);
            }
        }
        addresses.sort();
        let stats_data = MapData::from_pin(dir.join("DECAP_STATS"))
            .map_err(|e| bpf("DECAP_STATS")(e.to_string()))?;
        let stats: PerCpuArray<_, u64> =
            PerCpuArray::try_from(aya::maps::Map::PerCpuArray(stats_data))
                .map_err(|e| bpf("DECAP_STATS")(e.to_string()))?;
        let sum = |i: u32| -> Result<u64, DecapError> {
            Ok(stats
                .get(&i, 0)
                .map_err(|e| bpf("DECAP_STATS")(e.to_string()))?
                .iter()
                .sum())
        };
        out.push(DecapStatus {
            interface,
            addresses,
            gue_port,
            decapsulated: sum(DECAP_PACKETS)?,
            passed: sum(DECAP_PASSED)?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attach_line_names_the_tunnels_of_each_family() {
        let v4 = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 11));
        let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11));
        assert_eq!(tunnels(&[v4]), "IPIP");
        assert_eq!(tunnels(&[v6]), "IPv6-in-IPv6");
        assert_eq!(tunnels(&[v4, v6]), "IPIP, IPv6-in-IPv6");
    }
}
