//! From EndpointSlices to backends: a pure function of what the watcher
//! holds, so every rule about conditions, ports and addresses is tested
//! without an API server.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

use crate::config::{BackendConfig, EndpointPort, KubernetesDiscovery};

/// Why a set of slices gives no backend list; the daemon keeps the one it
/// has rather than apply part of one.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SliceError {
    #[error(
        "EndpointSlice {slice}: {count} ports ({names}), so which one the backends listen on is \
         ambiguous; set discovery.kubernetes.port"
    )]
    AmbiguousPort {
        slice: String,
        count: usize,
        names: String,
    },
    #[error("EndpointSlice {slice}: lists no port; set discovery.kubernetes.port to a number")]
    NoPort { slice: String },
    #[error("EndpointSlice {slice}: no port named {name:?} (it has {names})")]
    NoSuchPort {
        slice: String,
        name: String,
        names: String,
    },
    #[error("EndpointSlice {slice}: port {port} is not a port (1 to 65535)")]
    BadPort { slice: String, port: i32 },
}

/// The backends of a discovered service, and what had to be left out.
#[derive(Debug, Default, PartialEq)]
pub struct Mapped {
    /// Ordered by address, so the same endpoints always give the same list.
    pub backends: Vec<BackendConfig>,
    /// IPv6 (and FQDN) addresses: the datapath forwards IPv4 only.
    pub skipped_not_ipv4: usize,
}

/// What an endpoint's conditions make of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Active,
    /// Weight 0 for new flows; established ones finish.
    Drained,
    Absent,
}

fn role(ep: &Endpoint) -> Role {
    let c = ep.conditions.as_ref();
    let ready = c.and_then(|c| c.ready);
    // A missing `serving` means what `ready` says (clusters before 1.22),
    // and a missing `ready` means ready (the API's own reading).
    let serving = c.and_then(|c| c.serving).or(ready).unwrap_or(true);
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    match (serving, terminating) {
        (true, false) => Role::Active,
        // A terminating pod commonly fails its readiness at once while
        // it finishes what it has: its established flows still need it,
        // until the slice drops it.
        (_, true) => Role::Drained,
        (false, false) => Role::Absent,
    }
}

fn port_names(slice: &EndpointSlice) -> String {
    let names: Vec<String> = slice
        .ports
        .iter()
        .flatten()
        .map(|p| {
            format!(
                "{}={}",
                p.name.as_deref().unwrap_or("\"\""),
                p.port.map_or_else(|| "?".to_owned(), |n| n.to_string())
            )
        })
        .collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

/// The port the slice's endpoints listen on, as `spec.port` selects it.
fn slice_port(slice: &EndpointSlice, want: Option<&EndpointPort>) -> Result<u16, SliceError> {
    let name = || slice.metadata.name.clone().unwrap_or_default();
    let ports = slice.ports.as_deref().unwrap_or_default();
    let number = match want {
        Some(EndpointPort::Number(n)) => return Ok(*n),
        Some(EndpointPort::Name(wanted)) => {
            ports
                .iter()
                .find(|p| p.name.as_deref() == Some(wanted.as_str()))
                .ok_or_else(|| SliceError::NoSuchPort {
                    slice: name(),
                    name: wanted.clone(),
                    names: port_names(slice),
                })?
                .port
        }
        None => match ports {
            [] => return Err(SliceError::NoPort { slice: name() }),
            [only] => only.port,
            more => {
                return Err(SliceError::AmbiguousPort {
                    slice: name(),
                    count: more.len(),
                    names: port_names(slice),
                });
            }
        },
    };
    // A slice port without a number means "all ports" in the API; a
    // backend needs one.
    let n = number.ok_or_else(|| SliceError::NoPort { slice: name() })?;
    u16::try_from(n)
        .ok()
        .filter(|&p| p > 0)
        .ok_or(SliceError::BadPort {
            slice: name(),
            port: n,
        })
}

/// The backends the slices list: each IPv4 address of a serving endpoint
/// on the selected port, named by its pod (or its address), drained while
/// terminating. An address in two slices (a slice being split) counts once,
/// active if either says so.
pub fn backends_from_slices<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    spec: &KubernetesDiscovery,
) -> Result<Mapped, SliceError> {
    let mut by_addr: BTreeMap<SocketAddrV4, (String, Role)> = BTreeMap::new();
    let mut skipped_not_ipv4 = 0;
    for slice in slices {
        if slice.address_type != "IPv4" {
            skipped_not_ipv4 += slice
                .endpoints
                .iter()
                .map(|e| e.addresses.len())
                .sum::<usize>();
            continue;
        }
        let present: Vec<(&Endpoint, Role)> = slice
            .endpoints
            .iter()
            .map(|e| (e, role(e)))
            .filter(|(_, r)| *r != Role::Absent)
            .collect();
        // A slice with nothing to route needs no port (slices of a
        // scaled-down service often list none).
        if present.is_empty() {
            continue;
        }
        let port = slice_port(slice, spec.port.as_ref())?;
        for (ep, r) in present {
            for a in &ep.addresses {
                let Ok(ip) = a.parse::<Ipv4Addr>() else {
                    skipped_not_ipv4 += 1;
                    continue;
                };
                let addr = SocketAddrV4::new(ip, port);
                let name = ep
                    .target_ref
                    .as_ref()
                    .and_then(|t| t.name.clone())
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| ip.to_string());
                by_addr
                    .entry(addr)
                    .and_modify(|(_, old)| {
                        if r == Role::Active {
                            *old = Role::Active;
                        }
                    })
                    .or_insert((name, r));
            }
        }
    }
    let mut backends: Vec<BackendConfig> = Vec::with_capacity(by_addr.len());
    for (address, (name, r)) in by_addr {
        // Names must be unique in a service; a pod with two addresses (or
        // two ports) keeps its name on the first.
        let name = if backends.iter().any(|b| b.name == name) {
            address.to_string()
        } else {
            name
        };
        backends.push(spec.backend(name, address, r == Role::Drained));
    }
    Ok(Mapped {
        backends,
        skipped_not_ipv4,
    })
}
