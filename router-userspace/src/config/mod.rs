//! The daemon's TOML configuration.
//!
//! Parsing happens in two passes over the same text: serde (via `toml`)
//! produces typed values, and a span-preserving `toml_edit::ImDocument`
//! maps every error back to a line and a key path, so an operator sees
//! `router.toml:14: service[0].backend[1].address: …` instead of a bare
//! message.

mod locate;
mod raw;
mod validate;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use router_common::{MAX_BACKENDS, MAX_SERVICES, MAX_SNAT_ADDRS, PROTO_TCP, PROTO_UDP};
use serde::Deserialize;
use toml_edit::ImDocument;

use crate::policy::{PolicyConfig, SignalMix};

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/router";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/router/router.sock";
/// Prometheus `/metrics`: loopback, so exposing it is a deliberate choice.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9090";
pub const DEFAULT_TABLE_SIZE: u32 = router_common::DEFAULT_TABLE_SIZE;
pub const DEFAULT_CONN_TABLE_SIZE: u32 = router_common::DEFAULT_CONN_TABLE_SIZE;
pub const DEFAULT_SNAT_PORT_MIN: u16 = 10000;
pub const DEFAULT_SNAT_PORT_MAX: u16 = 32767;
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_TCP_CLOSING_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Weight of a static backend (no `weight`, no `telemetry`) of capacity
/// 1.0: it equals the policy's default `full_weight`, so such a backend
/// and an idle telemetry-driven one of equal capacity get equal shares.
pub const DEFAULT_WEIGHT: u32 = 100;
/// Polling faster than this would make telemetry the load.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Keeps `capacity × full_weight` well inside u32.
pub const MAX_FULL_WEIGHT: u32 = 1_000_000;
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_millis(500);
pub const DEFAULT_HEALTH_FALL: u32 = 3;
pub const DEFAULT_HEALTH_RISE: u32 = 2;
/// Tables of all services share one BPF array of `MAX_SERVICES` × 2 halves,
/// whose entry count must stay well inside u32; Maglev owns the limit.
pub use crate::maglev::MAX_TABLE_SIZE;
/// Linux `IFNAMSIZ` minus the terminating NUL.
const MAX_IFNAME_LEN: usize = 15;

/// A configuration problem, always naming where it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The text is not valid TOML; no key can be named.
    #[error("{origin}:{line}: {message}")]
    Syntax {
        origin: String,
        line: usize,
        message: String,
    },
    /// A key is unknown, mistyped or has an invalid value.
    #[error("{origin}:{line}: {key}: {message}")]
    Invalid {
        origin: String,
        line: usize,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// 1-based line of the offending text, if the error has one.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { line, .. } | ConfigError::Invalid { line, .. } => Some(*line),
        }
    }

    /// Key path such as `service[0].backend[1].address`, if the error has one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode where supported, generic mode otherwise.
    #[default]
    Auto,
    Driver,
    Skb,
}

impl XdpMode {
    pub fn as_str(self) -> &'static str {
        match self {
            XdpMode::Auto => "auto",
            XdpMode::Driver => "driver",
            XdpMode::Skb => "skb",
        }
    }
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    /// IP protocol number, as stored in `ServiceKey::proto`.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub daemon: DaemonConfig,
    /// `[policy]`, defaults applied, validated.
    pub policy: PolicyConfig,
    pub services: Vec<ServiceConfig>,
    /// `[bgp]`: announce the VIPs through a gobgpd the daemon runs.
    pub bgp: Option<BgpConfig>,
    /// Kept so later checks (host, daemon) can still point at a line.
    source: Source,
}

/// `[bgp]`: the session settings of the gobgpd the daemon runs as its
/// child (see `bgp`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgpConfig {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    /// Never empty.
    pub peers: Vec<BgpPeer>,
    /// Hold time offered to every peer; at least 3 s.
    pub hold_time: Duration,
    /// After SIGTERM: how long the daemon waits between withdrawing its
    /// VIPs and ending the sessions, so peers move traffic first.
    pub drain: Duration,
    /// The next hop of the IPv6 VIPs' /128 paths: an IPv6 address of this
    /// LB. Set whenever a service listens on IPv6; the sessions then carry
    /// IPv6 unicast besides IPv4.
    pub next_hop6: Option<std::net::Ipv6Addr>,
    pub gobgpd: PathBuf,
    pub gobgp: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BgpPeer {
    pub address: Ipv4Addr,
    pub asn: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonConfig {
    /// One interface, or several for two-armed set-ups; never empty.
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    pub pin_path: PathBuf,
    pub control_socket: PathBuf,
    /// Where `/metrics` is served; None when `metrics_listen = ""`.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Maglev slots per service; prime.
    pub table_size: u32,
    pub conn_table_size: u32,
    /// SNAT port probe range, inclusive, `1024 <= min <= max`.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub tcp_idle_timeout: Duration,
    pub tcp_closing_timeout: Duration,
    pub udp_idle_timeout: Duration,
    pub datapath_log: bool,
    /// The flow hash's key, the same on every node that shares the VIPs
    /// (see `hash_seed` in docs/operations.md); None: a random key when the
    /// maps are created, kept across restarts.
    pub hash_seed: Option<u64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    /// IPv4, or IPv6 for a service without pools or segments.
    pub vip: SocketAddr,
    pub protocol: Protocol,
    /// 1..=`MAX_SNAT_ADDRS` distinct addresses of the VIP's family for a
    /// NAT service; none for DSR.
    pub snat: Vec<IpAddr>,
    /// Never empty; names and addresses are unique within the service,
    /// and addresses are of the VIP's family.
    pub backends: Vec<BackendConfig>,
    /// Another service whose backends take this one's new connections
    /// while every backend here is saturated.
    pub fallback: Option<String>,
    /// How new flows pick a backend: as written, else `least_loaded` for a
    /// service with any telemetry-driven backend and `maglev` otherwise.
    pub selection: Selection,
    /// Named groups of the backends (see `router_common::pools`); empty:
    /// one implicit pool of every backend.
    pub pools: Vec<PoolConfig>,
    /// Client networks routed to a pool, in config order.
    pub segments: Vec<SegmentConfig>,
    /// NAT (with `snat`), or DSR with its encapsulation (no `snat`).
    pub forwarding: Forwarding,
    /// Backends come from Kubernetes instead of the file: `backends` is
    /// empty until the first list of the EndpointSlices completes.
    pub discovery: Option<KubernetesDiscovery>,
}

/// Why a service cannot take a new backend list (see `Config::with_backends`).
#[derive(Debug, thiserror::Error)]
pub enum BackendsError {
    #[error("no service {0}")]
    NoService(usize),
    #[error("{0} backends: at most {MAX_BACKENDS} are supported across all services")]
    TooMany(usize),
    #[error(transparent)]
    TableSize(#[from] crate::maglev::TableSizeError),
}

/// `discovery.kubernetes` of a service: where its backends are listed.
#[derive(Clone, Debug, PartialEq)]
pub struct KubernetesDiscovery {
    pub namespace: String,
    /// The Kubernetes Service whose EndpointSlices
    /// (`kubernetes.io/service-name=<service>`) list the backends.
    pub service: String,
    /// None: each slice's only port.
    pub port: Option<EndpointPort>,
    /// None: `$KUBECONFIG`, `~/.kube/config`, then the pod's service account.
    pub kubeconfig: Option<PathBuf>,
    /// Capacity of every discovered backend (1.0 unless written).
    pub capacity: f64,
    /// Their pinned weight: `capacity × policy.full_weight` as for a static
    /// backend; None with `telemetry` (the policy decides).
    pub weight: Option<u32>,
    /// Every discovered backend's telemetry, its URL with `{ip}` replaced
    /// by the backend's address (see `telemetry_for`).
    pub telemetry: Option<TelemetryConfig>,
}

/// What `{ip}` stands for in a discovered service's telemetry URL.
pub const IP_PLACEHOLDER: &str = "{ip}";

impl KubernetesDiscovery {
    /// The backend discovery makes of a pod `name` at `address`: this
    /// service's capacity, weight and telemetry, drained while the pod
    /// terminates.
    pub fn backend(&self, name: String, address: SocketAddrV4, drain: bool) -> BackendConfig {
        BackendConfig {
            name,
            address: address.into(),
            weight: self.weight,
            capacity: self.capacity,
            telemetry: self.telemetry_for(*address.ip()),
            health: None,
            cost_per_hour: None,
            drain,
            max_in_flight: None,
        }
    }

    /// The telemetry of the discovered backend at `ip`.
    pub fn telemetry_for(&self, ip: Ipv4Addr) -> Option<TelemetryConfig> {
        let mut t = self.telemetry.clone()?;
        match &mut t {
            TelemetryConfig::Prometheus { url, .. } | TelemetryConfig::Agent { url, .. } => {
                *url = url.replace(IP_PLACEHOLDER, &ip.to_string());
            }
            TelemetryConfig::Nvml { .. } => {}
        }
        Some(t)
    }
}

/// Which port of an EndpointSlice the backends listen on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointPort {
    /// The slice port of this name.
    Name(String),
    /// This port, whatever the slice names.
    Number(u16),
}

/// A pool of a service: every backend is in exactly one pool.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    /// Backend names of the service, in config order; never empty.
    pub backends: Vec<String>,
    /// Percent of new connections from clients no segment matches; the
    /// shares of a service's pools add up to 100. 0: segments and
    /// fallbacks only.
    pub share: u32,
    /// Index (into `pools`) of the pool that takes this one's new
    /// connections while it has no room. Chains are acyclic and at most
    /// `MAX_FALLBACK_DEPTH` long.
    pub fallback: Option<usize>,
    pub guard: Option<GuardConfig>,
}

/// Automatic rollback of a pool whose time to first byte falls behind.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GuardConfig {
    /// Trip when the pool's TTFT p99 exceeds this multiple of the other
    /// pools' p99; finite, above 1.
    pub ttft_p99_ratio: f64,
    /// Connections (first bytes measured) the pool needs in the window
    /// before the guard judges; at least 1.
    pub min_connections: u64,
}

/// A client network routed to a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentConfig {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    /// Index into the service's `pools`.
    pub pool: usize,
}

pub use crate::datapath::{Forwarding, Selection};

#[derive(Clone, Debug, PartialEq)]
pub struct BackendConfig {
    pub name: String,
    pub address: SocketAddr,
    /// The pinned weight: `weight` as written, or for a static backend
    /// (neither `weight` nor `telemetry`) `capacity × policy.full_weight`
    /// (100 by default, today's static weight). `None`: the policy decides.
    pub weight: Option<u32>,
    /// Relative static capacity, > 0 and finite; 1.0 unless written.
    pub capacity: f64,
    /// Telemetry is still polled for a pinned backend, for status only.
    pub telemetry: Option<TelemetryConfig>,
    /// `None`: no probes, the backend counts as healthy.
    pub health: Option<HealthConfig>,
    pub cost_per_hour: Option<f64>,
    /// Drained: weight 0 for new flows while established flows finish.
    pub drain: bool,
    /// Least-loaded services: flows in flight at which the backend has no
    /// room (an engine's batch size, say); learned from telemetry when unset.
    pub max_in_flight: Option<u32>,
}

impl BackendConfig {
    /// The weight the policy must leave alone, if any.
    pub fn pinned(&self) -> Option<u32> {
        self.weight
    }
}

/// Which GPU a telemetry source reads (one definition, shared with the sources).
pub use crate::telemetry::DeviceSelector;

/// The metric dialect of a Prometheus endpoint (one definition, shared with the source).
pub use crate::telemetry::prometheus::PromFormat;

/// Where a backend's readings come from (one definition, shared with the sources).
pub use crate::telemetry::source::TelemetryConfig;

/// Active health probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    /// Probe by TCP connect.
    pub tcp: bool,
    /// Probe by HTTP GET of this path (2xx is healthy).
    pub http_path: Option<String>,
    pub interval: Duration,
    /// Never above `interval`.
    pub timeout: Duration,
    /// Consecutive failures that make a healthy backend unhealthy.
    pub fall: u32,
    /// Consecutive successes that make an unhealthy backend healthy.
    pub rise: u32,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Whether any service listens on IPv6 (and needs the host settings
    /// of `host::settings::needed_ipv6`).
    pub fn has_ipv6_service(&self) -> bool {
        self.services.iter().any(|s| s.vip.is_ipv6())
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let source = Source {
            origin: origin.to_owned(),
            text: text.to_owned(),
        };
        let doc = ImDocument::parse(text.to_owned()).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            ConfigError::Syntax {
                origin: origin.to_owned(),
                line: source.line_of(offset),
                message: format!(
                    "invalid TOML at column {}: {}",
                    source.column_of(offset),
                    one_line(e.message())
                ),
            }
        })?;
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let offset = span.start;
            let message = one_line(e.message());
            match path_at(&doc, span) {
                Some(key) => ConfigError::Invalid {
                    origin: origin.to_owned(),
                    line: source.line_of(offset),
                    key: key.to_string(),
                    message,
                },
                None => ConfigError::Syntax {
                    origin: origin.to_owned(),
                    line: source.line_of(offset),
                    message,
                },
            }
        })?;
        let loc = Locator {
            source: &source,
            doc: &doc,
        };
        let daemon = validate_daemon(&loc, raw.daemon)?;
        let policy = validate_policy(&loc, raw.policy.unwrap_or_default())?;
        let services = validate_services(&loc, raw.service, &policy)?;
        check_table_size(&loc, &daemon, &services)?;
        let bgp = raw
            .bgp
            .map(|b| validate_bgp(&loc, b, &services))
            .transpose()?;
        Ok(Config {
            daemon,
            policy,
            services,
            bgp,
            source,
        })
    }

    /// Checks the config against the host: every interface exists, and
    /// every SNAT address is configured on one of the interfaces (replies
    /// to a SNAT address that no interface owns would never reach us).
    ///
    /// `iface_addrs(name)` returns `None` if the interface does not exist,
    /// else its IPv4 addresses and its global IPv6 ones.
    pub fn check_host(
        &self,
        iface_addrs: &dyn Fn(&str) -> Option<Vec<IpAddr>>,
    ) -> Result<(), ConfigError> {
        let mut host_addrs = Vec::new();
        for (i, name) in self.daemon.interfaces.iter().enumerate() {
            match iface_addrs(name) {
                Some(addrs) => host_addrs.extend(addrs),
                None => {
                    return Err(self.error_at(
                        &self.interface_key(i),
                        format!("interface {name:?} does not exist on this host"),
                    ));
                }
            }
        }
        for (s, svc) in self.services.iter().enumerate() {
            for (j, addr) in svc.snat.iter().enumerate() {
                if !host_addrs.contains(addr) {
                    return Err(self.error_at(
                        &self.snat_key(s, j),
                        format!(
                            "SNAT address {addr} is not configured on {}",
                            self.daemon.interfaces.join(" or ")
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Builds an error located at `key` (e.g. `daemon.snat_port_range` or
    /// `service[1].snat[0]`), for checks made after parsing, such as the
    /// daemon's comparison with the host's ephemeral port range. Falls back
    /// to the nearest enclosing table's line when the key was not written
    /// out (a default applied).
    pub fn error_at(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let path = KeyPath::parse(key);
        let offset = ImDocument::parse(self.source.text.clone())
            .ok()
            .and_then(|doc| locate(&doc, &path));
        ConfigError::Invalid {
            origin: self.source.origin.clone(),
            line: self.source.line_of(offset.unwrap_or(0)),
            key: key.to_owned(),
            message: message.into(),
        }
    }

    /// This config with service `index`'s backends replaced by `backends`
    /// (a discovered list), or why the datapath could not take them: the
    /// checks `parse` makes of backend counts, made again.
    pub fn with_backends(
        &self,
        index: usize,
        backends: Vec<BackendConfig>,
    ) -> Result<Config, BackendsError> {
        let mut cfg = self.clone();
        let svc = cfg
            .services
            .get_mut(index)
            .ok_or(BackendsError::NoService(index))?;
        svc.backends = backends;
        let total: usize = cfg.services.iter().map(|s| s.backends.len()).sum();
        if total > MAX_BACKENDS as usize {
            return Err(BackendsError::TooMany(total));
        }
        let largest = cfg
            .services
            .iter()
            .max_by_key(|s| s.backends.len())
            .map(|s| (s.name.as_str(), s.backends.len()));
        crate::maglev::check_table_size(cfg.daemon.table_size, largest)?;
        Ok(cfg)
    }

    /// Where this config came from (a path or the name given to `parse`).
    pub fn origin(&self) -> &str {
        &self.source.origin
    }

    fn interface_key(&self, i: usize) -> String {
        if self.list_at("daemon.interface") {
            format!("daemon.interface[{i}]")
        } else {
            "daemon.interface".to_owned()
        }
    }

    fn snat_key(&self, s: usize, j: usize) -> String {
        if self.list_at(&format!("service[{s}].snat")) {
            format!("service[{s}].snat[{j}]")
        } else {
            format!("service[{s}].snat")
        }
    }

    /// Whether the value at `key` was written as an array (the text parsed
    /// once already, so this only fails if it was not an array).
    fn list_at(&self, key: &str) -> bool {
        let Ok(doc) = ImDocument::parse(self.source.text.clone()) else {
            return false;
        };
        let mut node = Node::Table(doc.as_table());
        for seg in &KeyPath::parse(key).0 {
            match node.step(seg) {
                Some((next, _)) => node = next,
                None => return false,
            }
        }
        matches!(node, Node::Array(_))
    }
}

use locate::{KeyPath, Locator, Node, Source, locate, one_line, path_at};
use raw::RawConfig;
pub use validate::ValueError;
use validate::{
    check_table_size, validate_bgp, validate_daemon, validate_policy, validate_services,
};

#[cfg(test)]
mod tests;
