//! Where a service listens and what its backends' slots hold, for each
//! address family: an IPv4 service is keyed in `SERVICES` and its
//! backends' addresses are in `BACKENDS`; an IPv6 one is keyed in
//! `SERVICES6` and its backends' addresses are in `BACKEND_ADDRS6`. Pure
//! conversions: nothing here touches a map.

use std::net::{IpAddr, SocketAddr};

use router_common::{
    Backend, ServiceKey,
    v6::{Addr6, ServiceKey6},
};

use super::{BackendSpec, ServiceSpec};

/// Where a service listens: its key in its family's services map
/// (`SERVICES`, or `SERVICES6` for an IPv6 VIP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ListenKey {
    V4(ServiceKey),
    V6(ServiceKey6),
}

impl ListenKey {
    /// The VIP and port this key names.
    pub fn vip(&self) -> SocketAddr {
        match self {
            ListenKey::V4(k) => {
                SocketAddr::new(IpAddr::from(k.addr.to_ne_bytes()), u16::from_be(k.port))
            }
            ListenKey::V6(k) => {
                SocketAddr::new(IpAddr::from(k.addr.octets()), u16::from_be(k.port))
            }
        }
    }

    pub fn proto(&self) -> u8 {
        match self {
            ListenKey::V4(k) => k.proto,
            ListenKey::V6(k) => k.proto,
        }
    }

    pub fn map_name(&self) -> &'static str {
        match self {
            ListenKey::V4(_) => "SERVICES",
            ListenKey::V6(_) => "SERVICES6",
        }
    }
}

pub(super) fn service_key(spec: &ServiceSpec) -> ListenKey {
    let port = spec.vip.port().to_be();
    match spec.vip.ip() {
        IpAddr::V4(a) => ListenKey::V4(ServiceKey {
            addr: u32::from_ne_bytes(a.octets()),
            port,
            proto: spec.proto,
            _pad: 0,
        }),
        IpAddr::V6(a) => ListenKey::V6(ServiceKey6 {
            addr: Addr6::from_octets(a.octets()),
            port,
            proto: spec.proto,
            _pad: 0,
        }),
    }
}

/// A backend's `BACKENDS` value: an IPv6 backend's address lives in
/// `BACKEND_ADDRS6` (see `addr6_of`), so its `addr` is 0.
pub(super) fn backend_value(b: &BackendSpec, sid: u32) -> Backend {
    let addr = match b.address.ip() {
        IpAddr::V4(a) => u32::from_ne_bytes(a.octets()),
        IpAddr::V6(_) => 0,
    };
    Backend {
        addr,
        port: b.address.port().to_be(),
        _pad: 0,
        service_id: sid,
        in_use: 1,
        weight: b.weight,
        max_in_flight: b.max_in_flight,
    }
}

/// A backend's `BACKEND_ADDRS6` entry; None for an IPv4 backend.
pub(super) fn addr6_of(b: &BackendSpec) -> Option<Addr6> {
    match b.address.ip() {
        IpAddr::V4(_) => None,
        IpAddr::V6(a) => Some(Addr6::from_octets(a.octets())),
    }
}
