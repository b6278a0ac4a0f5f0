//! Scalar values as the config writes them: ports, durations, addresses,
//! URLs. Each refusal says what was written and what was expected.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use crate::{config::raw::RawDevice, telemetry::DeviceSelector};

/// A value the config wrote that means nothing valid.
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    #[error("{0:?} is not a port range like \"10000-32767\"")]
    NotPortRange(String),
    #[error("{input:?}: start {lo} is above end {hi}")]
    PortRangeReversed { input: String, lo: u16, hi: u16 },
    #[error("{input:?}: start {lo} is below 1024; SNAT must not take privileged ports")]
    PrivilegedPorts { input: String, lo: u16 },
    #[error("{input:?} is not a duration like \"30s\" or \"10m\" ({source})")]
    NotDuration {
        input: String,
        #[source]
        source: humantime::DurationError,
    },
    #[error("{0:?} must be greater than 0")]
    ZeroDuration(String),
    #[error("{0:?} is not an address:port like \"198.18.0.1:8000\" or \"[2001:db8::1]:8000\"")]
    NotSocketAddr(String),
    #[error("{0:?}: port 0 is not allowed")]
    PortZero(String),
    #[error("{0:?} is an IPv6 address: BGP router ids and peers are IPv4 only")]
    Ipv6(String),
    #[error("{0:?} is not an IPv4 address")]
    NotIpv4(String),
    #[error("{0:?} is not an IPv6 address")]
    NotIpv6(String),
    #[error(
        "{input:?}: {addr} cannot be a SNAT address: backends must reach it by a global \
         route (not loopback, link-local, multicast, unspecified or IPv4-mapped)"
    )]
    NotSnat6 { input: String, addr: Ipv6Addr },
    #[error("{0:?}: a scope (%…) has no place in a SNAT address")]
    SnatScope(String),
    #[error("{input:?}: {addr} is not a unicast address")]
    NotUnicast { input: String, addr: IpAddr },
    #[error("{0:?}: a scope (%…) has no place in a service's address")]
    Ipv6Scope(String),
    #[error("{0:?} is not a GPU index or an NVML UUID like \"GPU-5fb3…\"")]
    NotDevice(String),
    #[error("{input:?} is not a URL ({reason})")]
    NotUrl { input: String, reason: String },
    #[error("{input:?}: scheme {scheme}:// is not supported, only {allowed}")]
    NotHttp {
        input: String,
        scheme: String,
        allowed: &'static str,
    },
    #[error("{0:?} needs http:// in front")]
    NoScheme(String),
    #[error("{0:?} has no host")]
    NoHost(String),
    #[error("{0:?} is not an IPv4 network like \"10.1.0.0/16\"")]
    NotCidr(String),
    #[error("{input:?}: host bits are set; the network is {network}/{len}")]
    CidrHostBits {
        input: String,
        network: Ipv4Addr,
        len: u8,
    },
}

pub(in crate::config) fn parse_port_range(s: &str) -> Result<(u16, u16), ValueError> {
    let malformed = || ValueError::NotPortRange(s.to_owned());
    let (lo, hi) = s.split_once('-').ok_or_else(malformed)?;
    let lo: u16 = lo.trim().parse().map_err(|_| malformed())?;
    let hi: u16 = hi.trim().parse().map_err(|_| malformed())?;
    if lo > hi {
        return Err(ValueError::PortRangeReversed {
            input: s.to_owned(),
            lo,
            hi,
        });
    }
    if lo < 1024 {
        return Err(ValueError::PrivilegedPorts {
            input: s.to_owned(),
            lo,
        });
    }
    Ok((lo, hi))
}

pub(in crate::config) fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    let d = humantime::parse_duration(s).map_err(|source| ValueError::NotDuration {
        input: s.to_owned(),
        source,
    })?;
    if d.is_zero() {
        return Err(ValueError::ZeroDuration(s.to_owned()));
    }
    Ok(d)
}

/// A VIP or backend address: IPv4 `a.b.c.d:port` or IPv6 `[addr]:port`.
pub(in crate::config) fn parse_socket_addr(s: &str) -> Result<SocketAddr, ValueError> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| ValueError::NotSocketAddr(s.to_owned()))?;
    if addr.port() == 0 {
        return Err(ValueError::PortZero(s.to_owned()));
    }
    match addr {
        SocketAddr::V4(a) => check_unicast(s, *a.ip())?,
        SocketAddr::V6(a) => {
            // The maps hold 16 bytes and a port: a scope would be dropped.
            if a.scope_id() != 0 {
                return Err(ValueError::Ipv6Scope(s.to_owned()));
            }
            check_unicast6(s, *a.ip())?;
        }
    }
    Ok(addr)
}

pub(in crate::config) fn parse_ipv4(s: &str) -> Result<Ipv4Addr, ValueError> {
    let addr: Ipv4Addr = s.parse().map_err(|_| {
        if s.parse::<std::net::Ipv6Addr>().is_ok() {
            ValueError::Ipv6(s.to_owned())
        } else {
            ValueError::NotIpv4(s.to_owned())
        }
    })?;
    check_unicast(s, addr)?;
    Ok(addr)
}

/// A SNAT address of a service whose VIP is IPv6 if `v6`: text that is
/// no address is refused as not one of that family; an address of the
/// other family is returned, for the caller to refuse where it knows the
/// VIP. An IPv6 one is where backends send their replies, so it must be
/// routable from them without a scope.
pub(in crate::config) fn parse_snat_addr(s: &str, v6: bool) -> Result<IpAddr, ValueError> {
    if s.contains('%')
        && s.split('%')
            .next()
            .is_some_and(|a| a.parse::<Ipv6Addr>().is_ok())
    {
        return Err(ValueError::SnatScope(s.to_owned()));
    }
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => {
            check_unicast(s, a)?;
            Ok(a.into())
        }
        Ok(IpAddr::V6(a)) => {
            check_unicast6(s, a)?;
            // `router_nat6` writes it as a source: ::1 and ::ffff:a.b.c.d
            // would leave the host as nothing a backend can answer.
            if a.is_loopback() || a.to_ipv4_mapped().is_some() {
                return Err(ValueError::NotSnat6 {
                    input: s.to_owned(),
                    addr: a,
                });
            }
            Ok(a.into())
        }
        Err(_) if v6 => Err(ValueError::NotIpv6(s.to_owned())),
        Err(_) => Err(ValueError::NotIpv4(s.to_owned())),
    }
}

/// An IPv4 network `a.b.c.d/len`, `len` 0..=32, with no host bits set (a
/// typo such as 10.1.2.0/16 would otherwise quietly mean 10.1.0.0/16).
pub(in crate::config) fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), ValueError> {
    let malformed = || ValueError::NotCidr(s.to_owned());
    let (addr, len) = s.split_once('/').ok_or_else(malformed)?;
    let addr: Ipv4Addr = addr.trim().parse().map_err(|_| malformed())?;
    let len: u8 = len.trim().parse().map_err(|_| malformed())?;
    if len > 32 {
        return Err(malformed());
    }
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    let network = Ipv4Addr::from(u32::from(addr) & mask);
    if network != addr {
        return Err(ValueError::CidrHostBits {
            input: s.to_owned(),
            network,
            len,
        });
    }
    Ok((addr, len))
}

fn check_unicast(input: &str, addr: Ipv4Addr) -> Result<(), ValueError> {
    if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
        return Err(ValueError::NotUnicast {
            input: input.to_owned(),
            addr: addr.into(),
        });
    }
    Ok(())
}

/// An IPv6 address a packet can be sent to and from without a scope:
/// neither unspecified, multicast nor link-local (fe80::/10).
fn check_unicast6(input: &str, addr: Ipv6Addr) -> Result<(), ValueError> {
    if addr.is_unspecified() || addr.is_multicast() || addr.is_unicast_link_local() {
        return Err(ValueError::NotUnicast {
            input: input.to_owned(),
            addr: addr.into(),
        });
    }
    Ok(())
}

pub(in crate::config) fn parse_device(raw: RawDevice) -> Result<DeviceSelector, ValueError> {
    match raw {
        RawDevice::Index(i) => Ok(DeviceSelector::Index(i)),
        RawDevice::Uuid(u) => {
            let well_formed = (u.starts_with("GPU-") || u.starts_with("MIG-"))
                && u.len() > 4
                && u.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if well_formed {
                Ok(DeviceSelector::Uuid(u))
            } else {
                Err(ValueError::NotDevice(u))
            }
        }
    }
}

/// The telemetry client speaks plain HTTP, and HTTPS where `https` (to an
/// agent). Returns the URL and whether it is HTTPS.
pub(in crate::config) fn parse_http_url(
    s: &str,
    https: bool,
) -> Result<(String, bool), ValueError> {
    let uri: hyper::Uri =
        s.parse()
            .map_err(|e: hyper::http::uri::InvalidUri| ValueError::NotUrl {
                input: s.to_owned(),
                reason: e.to_string(),
            })?;
    let is_https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") if https => true,
        Some(other) => {
            return Err(ValueError::NotHttp {
                input: s.to_owned(),
                scheme: other.to_owned(),
                allowed: if https {
                    "http:// and https://"
                } else {
                    "http://"
                },
            });
        }
        None => return Err(ValueError::NoScheme(s.to_owned())),
    };
    if uri.host().is_none_or(str::is_empty) {
        return Err(ValueError::NoHost(s.to_owned()));
    }
    Ok((s.to_owned(), is_https))
}
