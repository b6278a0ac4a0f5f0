//! The daemon's TOML configuration.
//!
//! Parsing happens in two passes over the same text: serde (via `toml`)
//! produces typed values, and a span-preserving `toml_edit::ImDocument`
//! maps every error back to a line and a key path, so an operator sees
//! `router.toml:14: service[0].backend[1].address: …` instead of a bare
//! message.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use router_common::{MAX_BACKENDS, MAX_SERVICES, MAX_SNAT_ADDRS, PROTO_TCP, PROTO_UDP};
use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use toml_edit::{ImDocument, Item, Table, Value};

use crate::maglev::is_prime;
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
/// whose entry count must stay well inside u32.
pub const MAX_TABLE_SIZE: u32 = 1 << 24;
/// Linux `IFNAMSIZ` minus the terminating NUL.
const MAX_IFNAME_LEN: usize = 15;
/// Maglev keeps per-backend shares even only with ~100 slots per backend.
const SLOTS_PER_BACKEND: u64 = 100;

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
    /// Kept so later checks (host, daemon) can still point at a line.
    source: Source,
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
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: SocketAddrV4,
    pub protocol: Protocol,
    /// 1..=`MAX_SNAT_ADDRS` distinct addresses.
    pub snat: Vec<Ipv4Addr>,
    /// Never empty; names and addresses are unique within the service.
    pub backends: Vec<BackendConfig>,
    /// Another service whose backends take this one's new connections
    /// while every backend here is saturated.
    pub fallback: Option<String>,
    /// How new flows pick a backend: as written, else `least_loaded` for a
    /// service with any telemetry-driven backend and `maglev` otherwise.
    pub selection: Selection,
}

pub use crate::datapath::Selection;

#[derive(Clone, Debug, PartialEq)]
pub struct BackendConfig {
    pub name: String,
    pub address: SocketAddrV4,
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
        Ok(Config {
            daemon,
            policy,
            services,
            source,
        })
    }

    /// Checks the config against the host: every interface exists, and
    /// every SNAT address is configured on one of the interfaces (replies
    /// to a SNAT address that no interface owns would never reach us).
    ///
    /// `iface_addrs(name)` returns `None` if the interface does not exist,
    /// else its IPv4 addresses.
    pub fn check_host(
        &self,
        iface_addrs: &dyn Fn(&str) -> Option<Vec<Ipv4Addr>>,
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

/// Error messages from the parsers may span lines; ours are one line each.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The config text and its name, for turning offsets into lines.
#[derive(Clone, Debug)]
struct Source {
    origin: String,
    text: String,
}

impl Source {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn column_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        let line_start = self.text.as_bytes()[..end]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
        end - line_start + 1
    }
}

// ---------------------------------------------------------------------------
// Key paths and locating them in the document

#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// A path like `service[0].backend[1].address`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct KeyPath(Vec<Seg>);

impl KeyPath {
    fn key(&self, k: &str) -> KeyPath {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_owned()));
        p
    }

    fn index(&self, i: usize) -> KeyPath {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }

    /// Parses the `Display` form back. Only bare keys occur in this schema,
    /// so no quoting is handled.
    fn parse(s: &str) -> KeyPath {
        let mut path = KeyPath::default();
        for part in s.split('.') {
            let (name, mut rest) = part.split_once('[').map_or((part, ""), |(n, r)| (n, r));
            if !name.is_empty() {
                path.0.push(Seg::Key(name.to_owned()));
            }
            while let Some((idx, tail)) = rest.split_once(']') {
                if let Ok(i) = idx.parse() {
                    path.0.push(Seg::Index(i));
                }
                rest = tail.strip_prefix('[').unwrap_or(tail);
            }
        }
        path
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A position in the span-preserving document.
#[derive(Clone, Copy)]
enum Node<'a> {
    Table(&'a Table),
    Inline(&'a toml_edit::InlineTable),
    Array(&'a toml_edit::Array),
    Tables(&'a toml_edit::ArrayOfTables),
    Leaf,
}

impl<'a> Node<'a> {
    fn of_item(item: &'a Item) -> Node<'a> {
        match item {
            Item::Table(t) => Node::Table(t),
            Item::ArrayOfTables(a) => Node::Tables(a),
            Item::Value(v) => Node::of_value(v),
            Item::None => Node::Leaf,
        }
    }

    fn of_value(value: &'a Value) -> Node<'a> {
        match value {
            Value::Array(a) => Node::Array(a),
            Value::InlineTable(t) => Node::Inline(t),
            _ => Node::Leaf,
        }
    }

    /// Follows one path segment; returns the child and the span that best
    /// marks it (a key's own span, so multi-line values point at the key).
    fn step(self, seg: &Seg) -> Option<(Node<'a>, Option<Range<usize>>)> {
        match (self, seg) {
            (Node::Table(t), Seg::Key(k)) => {
                let (key, item) = t.get_key_value(k)?;
                Some((Node::of_item(item), key.span().or_else(|| item.span())))
            }
            (Node::Inline(t), Seg::Key(k)) => {
                let (key, item) = t.get_key_value(k)?;
                Some((Node::of_item(item), key.span().or_else(|| item.span())))
            }
            (Node::Tables(a), Seg::Index(i)) => {
                let t = a.get(*i)?;
                Some((Node::Table(t), t.span()))
            }
            (Node::Array(a), Seg::Index(i)) => {
                let v = a.get(*i)?;
                Some((Node::of_value(v), v.span()))
            }
            _ => None,
        }
    }
}

/// Offset of the deepest node along `path` that the document has, so a
/// missing key is reported at its enclosing table.
fn locate(doc: &ImDocument<String>, path: &KeyPath) -> Option<usize> {
    let mut node = Node::Table(doc.as_table());
    let mut best = None;
    for seg in &path.0 {
        let Some((next, span)) = node.step(seg) else {
            break;
        };
        if let Some(span) = span {
            best = Some(span.start);
        }
        node = next;
    }
    best
}

/// One child of a container: its segment, its key's span (tables only),
/// the child itself and the child's span.
type Entry<'a> = (Seg, Option<Range<usize>>, Node<'a>, Option<Range<usize>>);

/// The key path of the innermost key or value whose span covers `target`,
/// used to name the key in serde errors, which come with a span but no
/// path. Whole-span containment matters: a missing-field error spans its
/// whole table, and must not be pinned on the table's first key.
fn path_at(doc: &ImDocument<String>, target: Range<usize>) -> Option<KeyPath> {
    fn covers(span: Option<Range<usize>>, target: &Range<usize>) -> bool {
        span.is_some_and(|s| s.start <= target.start && target.end <= s.end.max(s.start + 1))
    }

    fn walk<'a>(
        path: &KeyPath,
        target: &Range<usize>,
        entries: &mut dyn Iterator<Item = Entry<'a>>,
    ) -> Option<KeyPath> {
        for (seg, key_span, child, child_span) in entries {
            let here = match &seg {
                Seg::Key(k) => path.key(k),
                Seg::Index(i) => path.index(*i),
            };
            if covers(key_span, target) {
                return Some(here);
            }
            // A table's span does not cover its sub-tables, so look inside
            // every container before settling for the container itself.
            if let Some(found) = search(child, &here, target) {
                return Some(found);
            }
            if covers(child_span, target) {
                return Some(here);
            }
        }
        None
    }

    fn search(node: Node<'_>, path: &KeyPath, target: &Range<usize>) -> Option<KeyPath> {
        match node {
            Node::Table(t) => walk(
                path,
                target,
                &mut t.iter().filter_map(|(k, _)| {
                    let (key, item) = t.get_key_value(k)?;
                    Some((
                        Seg::Key(k.to_owned()),
                        key.span(),
                        Node::of_item(item),
                        item.span(),
                    ))
                }),
            ),
            Node::Inline(t) => walk(
                path,
                target,
                &mut t.iter().filter_map(|(k, _)| {
                    let (key, item) = t.get_key_value(k)?;
                    Some((
                        Seg::Key(k.to_owned()),
                        key.span(),
                        Node::of_item(item),
                        item.span(),
                    ))
                }),
            ),
            Node::Tables(a) => walk(
                path,
                target,
                &mut a
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (Seg::Index(i), None, Node::Table(t), t.span())),
            ),
            Node::Array(a) => walk(
                path,
                target,
                &mut a
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (Seg::Index(i), None, Node::of_value(v), v.span())),
            ),
            Node::Leaf => None,
        }
    }

    // toml reports errors about the document as a whole (a missing
    // top-level table) with an empty span, which would match anything.
    if target.is_empty() {
        return None;
    }
    search(Node::Table(doc.as_table()), &KeyPath::default(), &target)
}

/// Turns key paths into located errors during validation.
struct Locator<'a> {
    source: &'a Source,
    doc: &'a ImDocument<String>,
}

impl Locator<'_> {
    fn err(&self, path: &KeyPath, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.source.origin.clone(),
            line: self.line(path),
            key: path.to_string(),
            message: message.into(),
        }
    }

    fn line(&self, path: &KeyPath) -> usize {
        self.source.line_of(locate(self.doc, path).unwrap_or(0))
    }
}

// ---------------------------------------------------------------------------
// Raw (as written) structures

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    daemon: RawDaemon,
    policy: Option<RawPolicy>,
    #[serde(default)]
    service: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    interface: StringOrList,
    #[serde(default)]
    xdp_mode: XdpMode,
    pin_path: Option<PathBuf>,
    control_socket: Option<PathBuf>,
    metrics_listen: Option<String>,
    table_size: Option<u32>,
    conn_table_size: Option<u32>,
    snat_port_range: Option<String>,
    tcp_idle_timeout: Option<String>,
    tcp_closing_timeout: Option<String>,
    udp_idle_timeout: Option<String>,
    #[serde(default)]
    datapath_log: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    vip: String,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    #[expect(dead_code, reason = "NAT is the only mode; parsed to reject others")]
    forwarding: Forwarding,
    snat: StringOrList,
    #[serde(default)]
    backend: Vec<RawBackend>,
    fallback: Option<String>,
    selection: Option<Selection>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "lowercase")]
enum Forwarding {
    #[default]
    Nat,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: String,
    address: String,
    weight: Option<u32>,
    capacity: Option<f64>,
    telemetry: Option<RawTelemetry>,
    health: Option<RawHealth>,
    cost_per_hour: Option<f64>,
    drain: Option<bool>,
    max_in_flight: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    poll_interval: Option<String>,
    target_utilization: Option<f64>,
    saturation: Option<f64>,
    hysteresis: Option<f64>,
    saturation_confirm: Option<u32>,
    ewma_alpha: Option<f64>,
    slow_start: Option<String>,
    slow_start_aggression: Option<f64>,
    min_weight_fraction: Option<f64>,
    max_step_fraction: Option<f64>,
    weight_gain: Option<f64>,
    weight_deadband: Option<f64>,
    stale_after: Option<String>,
    stale_decay: Option<String>,
    stale_fraction: Option<f64>,
    full_weight: Option<u32>,
    signal: Option<RawSignal>,
    speed_window: Option<String>,
    capacity_deadband: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSignal {
    gpu_util: Option<f64>,
    kv_cache: Option<f64>,
    queue: Option<f64>,
    queue_norm: Option<f64>,
}

/// Flat on purpose: an internally tagged enum would lose the spans, and
/// errors could then name only `telemetry`, not the offending key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    source: String,
    device: Option<RawDevice>,
    library: Option<PathBuf>,
    url: Option<String>,
    token_file: Option<PathBuf>,
    format: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    tcp: Option<bool>,
    http_path: Option<String>,
    interval: Option<String>,
    timeout: Option<String>,
    fall: Option<u32>,
    rise: Option<u32>,
}

/// An NVML index or UUID as written.
enum RawDevice {
    Index(u32),
    Uuid(String),
}

impl<'de> Deserialize<'de> for RawDevice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawDevice;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a GPU index (integer) or UUID (string)")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawDevice, E> {
                u32::try_from(v)
                    .map(RawDevice::Index)
                    .map_err(|_| E::custom(format!("GPU index {v} is out of range")))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawDevice, E> {
                u32::try_from(v)
                    .map(RawDevice::Index)
                    .map_err(|_| E::custom(format!("GPU index {v} is out of range")))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawDevice, E> {
                Ok(RawDevice::Uuid(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A string or a list of strings; `list` remembers which, so errors can
/// name `key[i]` only when there is an index to name.
struct StringOrList {
    items: Vec<String>,
    list: bool,
}

impl StringOrList {
    fn item_path(&self, base: &KeyPath, i: usize) -> KeyPath {
        if self.list {
            base.index(i)
        } else {
            base.clone()
        }
    }
}

impl<'de> Deserialize<'de> for StringOrList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StringOrList;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<StringOrList, E> {
                Ok(StringOrList {
                    items: vec![v.to_owned()],
                    list: false,
                })
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StringOrList, A::Error> {
                let mut items = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    items.push(s);
                }
                Ok(StringOrList { items, list: true })
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------
// Validation

fn validate_daemon(loc: &Locator<'_>, raw: RawDaemon) -> Result<DaemonConfig, ConfigError> {
    let base = KeyPath::default().key("daemon");

    let iface_key = base.key("interface");
    if raw.interface.items.is_empty() {
        return Err(loc.err(&iface_key, "needs at least one interface"));
    }
    for (i, name) in raw.interface.items.iter().enumerate() {
        let key = raw.interface.item_path(&iface_key, i);
        if name.is_empty() {
            return Err(loc.err(&key, "interface name must not be empty"));
        }
        if name.len() > MAX_IFNAME_LEN || name.contains(|c: char| c == '/' || c.is_whitespace()) {
            return Err(loc.err(&key, format!("{name:?} is not a valid interface name")));
        }
        if raw.interface.items[..i].contains(name) {
            return Err(loc.err(&key, format!("interface {name:?} is listed twice")));
        }
    }

    let pin_path = raw.pin_path.unwrap_or_else(|| DEFAULT_PIN_PATH.into());
    if !pin_path.is_absolute() {
        return Err(loc.err(
            &base.key("pin_path"),
            format!(
                "{:?} must be an absolute path (under bpffs)",
                pin_path.display()
            ),
        ));
    }
    let control_socket = raw
        .control_socket
        .unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into());
    if control_socket.as_os_str().is_empty() {
        return Err(loc.err(&base.key("control_socket"), "must not be empty"));
    }

    let metrics_listen = match raw.metrics_listen.as_deref() {
        None => Some(DEFAULT_METRICS_LISTEN),
        Some("") => None,
        Some(s) => Some(s),
    }
    .map(|s| {
        s.parse::<std::net::SocketAddr>().map_err(|_| {
            loc.err(
                &base.key("metrics_listen"),
                format!("{s:?} is not an address:port (\"\" turns /metrics off)"),
            )
        })
    })
    .transpose()?;

    let table_size = raw.table_size.unwrap_or(DEFAULT_TABLE_SIZE);
    let conn_table_size = raw.conn_table_size.unwrap_or(DEFAULT_CONN_TABLE_SIZE);
    if conn_table_size == 0 {
        return Err(loc.err(&base.key("conn_table_size"), "must be greater than 0"));
    }

    let (snat_port_min, snat_port_max) = match &raw.snat_port_range {
        None => (DEFAULT_SNAT_PORT_MIN, DEFAULT_SNAT_PORT_MAX),
        Some(s) => parse_port_range(s).map_err(|m| loc.err(&base.key("snat_port_range"), m))?,
    };

    let duration = |name: &str, raw: &Option<String>, default: Duration| match raw {
        None => Ok(default),
        Some(s) => parse_duration(s).map_err(|m| loc.err(&base.key(name), m)),
    };
    let tcp_idle_timeout = duration(
        "tcp_idle_timeout",
        &raw.tcp_idle_timeout,
        DEFAULT_TCP_IDLE_TIMEOUT,
    )?;
    let tcp_closing_timeout = duration(
        "tcp_closing_timeout",
        &raw.tcp_closing_timeout,
        DEFAULT_TCP_CLOSING_TIMEOUT,
    )?;
    let udp_idle_timeout = duration(
        "udp_idle_timeout",
        &raw.udp_idle_timeout,
        DEFAULT_UDP_IDLE_TIMEOUT,
    )?;

    Ok(DaemonConfig {
        interfaces: raw.interface.items,
        xdp_mode: raw.xdp_mode,
        pin_path,
        control_socket,
        metrics_listen,
        table_size,
        conn_table_size,
        snat_port_min,
        snat_port_max,
        tcp_idle_timeout,
        tcp_closing_timeout,
        udp_idle_timeout,
        datapath_log: raw.datapath_log,
    })
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let malformed = || format!("{s:?} is not a port range like \"10000-32767\"");
    let (lo, hi) = s.split_once('-').ok_or_else(malformed)?;
    let lo: u16 = lo.trim().parse().map_err(|_| malformed())?;
    let hi: u16 = hi.trim().parse().map_err(|_| malformed())?;
    if lo > hi {
        return Err(format!("{s:?}: start {lo} is above end {hi}"));
    }
    if lo < 1024 {
        return Err(format!(
            "{s:?}: start {lo} is below 1024; SNAT must not take privileged ports"
        ));
    }
    Ok((lo, hi))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like \"30s\" or \"10m\" ({e})"))?;
    if d.is_zero() {
        return Err(format!("{s:?} must be greater than 0"));
    }
    Ok(d)
}

fn parse_socket_addr(s: &str) -> Result<SocketAddrV4, String> {
    let addr: SocketAddrV4 = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 address:port"))?;
    if addr.port() == 0 {
        return Err(format!("{s:?}: port 0 is not allowed"));
    }
    check_unicast(*addr.ip()).map_err(|m| format!("{s:?}: {m}"))?;
    Ok(addr)
}

fn parse_ipv4(s: &str) -> Result<Ipv4Addr, String> {
    let addr: Ipv4Addr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 address"))?;
    check_unicast(addr).map_err(|m| format!("{s:?}: {m}"))?;
    Ok(addr)
}

fn check_unicast(addr: Ipv4Addr) -> Result<(), String> {
    if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
        return Err(format!("{addr} is not a unicast address"));
    }
    Ok(())
}

fn validate_services(
    loc: &Locator<'_>,
    raw: Vec<RawService>,
    policy: &PolicyConfig,
) -> Result<Vec<ServiceConfig>, ConfigError> {
    let base = KeyPath::default().key("service");
    if raw.len() > MAX_SERVICES as usize {
        return Err(loc.err(
            &base.index(MAX_SERVICES as usize),
            format!("at most {MAX_SERVICES} services are supported"),
        ));
    }
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut vips: HashMap<(SocketAddrV4, Protocol), usize> = HashMap::new();
    let mut total_backends = 0usize;
    let mut services = Vec::with_capacity(raw.len());

    for (s, svc) in raw.into_iter().enumerate() {
        let sp = base.index(s);

        if svc.name.is_empty() {
            return Err(loc.err(&sp.key("name"), "service name must not be empty"));
        }
        if let Some(&first) = names.get(&svc.name) {
            return Err(loc.err(
                &sp.key("name"),
                format!(
                    "duplicate service name {:?} (first used at line {})",
                    svc.name,
                    loc.line(&base.index(first).key("name"))
                ),
            ));
        }
        names.insert(svc.name.clone(), s);

        let vip = parse_socket_addr(&svc.vip).map_err(|m| loc.err(&sp.key("vip"), m))?;
        if let Some(&first) = vips.get(&(vip, svc.protocol)) {
            return Err(loc.err(
                &sp.key("vip"),
                format!(
                    "{vip}/{} is already used by service {:?}",
                    svc.protocol,
                    services_name(&services, first)
                ),
            ));
        }
        vips.insert((vip, svc.protocol), s);

        let snat_key = sp.key("snat");
        if svc.snat.items.is_empty() || svc.snat.items.len() > MAX_SNAT_ADDRS {
            return Err(loc.err(
                &snat_key,
                format!(
                    "needs 1 to {MAX_SNAT_ADDRS} addresses, got {}",
                    svc.snat.items.len()
                ),
            ));
        }
        let mut snat = Vec::with_capacity(svc.snat.items.len());
        for (j, a) in svc.snat.items.iter().enumerate() {
            let key = svc.snat.item_path(&snat_key, j);
            let addr = parse_ipv4(a).map_err(|m| loc.err(&key, m))?;
            if snat.contains(&addr) {
                return Err(loc.err(&key, format!("SNAT address {addr} is listed twice")));
            }
            snat.push(addr);
        }

        let bp = sp.key("backend");
        if svc.backend.is_empty() {
            return Err(loc.err(
                &bp,
                format!("service {:?} needs at least one backend", svc.name),
            ));
        }
        let mut backends: Vec<BackendConfig> = Vec::with_capacity(svc.backend.len());
        for (b, be) in svc.backend.into_iter().enumerate() {
            let p = bp.index(b);
            total_backends += 1;
            if total_backends > MAX_BACKENDS as usize {
                return Err(loc.err(
                    &p,
                    format!("at most {MAX_BACKENDS} backends are supported across all services"),
                ));
            }
            if be.name.is_empty() {
                return Err(loc.err(&p.key("name"), "backend name must not be empty"));
            }
            if let Some(first) = backends.iter().position(|x| x.name == be.name) {
                return Err(loc.err(
                    &p.key("name"),
                    format!(
                        "duplicate backend name {:?} in service {:?} (first used at line {})",
                        be.name,
                        svc.name,
                        loc.line(&bp.index(first).key("name"))
                    ),
                ));
            }
            let address =
                parse_socket_addr(&be.address).map_err(|m| loc.err(&p.key("address"), m))?;
            // Maglev seeds each backend's permutation with its address, so
            // two backends on one address would compete for the same slots.
            if let Some(other) = backends.iter().find(|x| x.address == address) {
                return Err(loc.err(
                    &p.key("address"),
                    format!(
                        "{address} is already backend {:?} of this service",
                        other.name
                    ),
                ));
            }
            let capacity = match be.capacity {
                None => 1.0,
                Some(_) if be.weight.is_some() => {
                    return Err(loc.err(
                        &p.key("capacity"),
                        "give `weight` (a pinned weight) or `capacity` (policy-driven), not both",
                    ));
                }
                Some(c) if c.is_finite() && c > 0.0 => c,
                Some(c) => {
                    return Err(loc.err(
                        &p.key("capacity"),
                        format!("{c} must be a finite number above 0"),
                    ));
                }
            };
            let cost_per_hour = match be.cost_per_hour {
                Some(c) if !(c.is_finite() && c >= 0.0) => {
                    return Err(loc.err(
                        &p.key("cost_per_hour"),
                        format!("{c} must be a finite number >= 0"),
                    ));
                }
                c => c,
            };
            let telemetry = be
                .telemetry
                .map(|t| validate_telemetry(loc, &p.key("telemetry"), t))
                .transpose()?;
            let health = be
                .health
                .map(|h| validate_health(loc, &p.key("health"), h))
                .transpose()?;
            let weight = match (be.weight, &telemetry) {
                (Some(w), _) => Some(w),
                // Static: today's default, scaled by capacity.
                (None, None) => Some(policy.full(capacity)),
                (None, Some(_)) => None,
            };
            if be.max_in_flight == Some(0) {
                return Err(loc.err(
                    &p.key("max_in_flight"),
                    "0 would leave the backend no room ever; leave it out for no limit",
                ));
            }
            backends.push(BackendConfig {
                name: be.name,
                address,
                weight,
                capacity,
                telemetry,
                health,
                cost_per_hour,
                drain: be.drain.unwrap_or(false),
                max_in_flight: be.max_in_flight,
            });
        }

        // Telemetry-driven services place by load: their weights are
        // capacities, and counting in-flight work at the moment of each
        // pick is what keeps bursts off one replica between polls. Static
        // services keep consistent hashing, which needs no shared state.
        let selection = svc.selection.unwrap_or_else(|| {
            if backends.iter().any(|b| b.telemetry.is_some()) {
                Selection::LeastLoaded
            } else {
                Selection::Maglev
            }
        });
        services.push(ServiceConfig {
            name: svc.name,
            vip,
            protocol: svc.protocol,
            snat,
            backends,
            fallback: svc.fallback,
            selection,
        });
    }
    for (i, svc) in services.iter().enumerate() {
        let Some(fb) = &svc.fallback else { continue };
        let key = base.index(i).key("fallback");
        let Some(target) = services.iter().find(|s| &s.name == fb) else {
            return Err(loc.err(&key, format!("no service named {fb:?}")));
        };
        if target.name == svc.name {
            return Err(loc.err(&key, "a service cannot be its own fallback"));
        }
        if target.protocol != svc.protocol {
            return Err(loc.err(
                &key,
                format!(
                    "{fb:?} is {}, this service is {}",
                    target.protocol, svc.protocol
                ),
            ));
        }
        if target.backends.len() + svc.backends.len() > MAX_BACKENDS as usize {
            return Err(loc.err(
                &key,
                "with its fallback the service exceeds the backend limit",
            ));
        }
    }
    Ok(services)
}

fn validate_policy(loc: &Locator<'_>, raw: RawPolicy) -> Result<PolicyConfig, ConfigError> {
    let base = KeyPath::default().key("policy");
    let d = PolicyConfig::default();
    let duration = |name: &str, raw: &Option<String>, default: Duration| match raw {
        None => Ok(default),
        Some(s) => parse_duration(s).map_err(|m| loc.err(&base.key(name), m)),
    };
    // `!(ok)` rather than the negated comparison, so NaN (TOML `nan`) fails.
    let number = |name: &str, raw: Option<f64>, default: f64, ok: fn(f64) -> bool, want: &str| {
        let v = raw.unwrap_or(default);
        if ok(v) {
            Ok(v)
        } else {
            Err(loc.err(&base.key(name), format!("{v} must be {want}")))
        }
    };
    let unit = |x: f64| 0.0 < x && x <= 1.0;

    let poll_interval = duration("poll_interval", &raw.poll_interval, d.poll_interval)?;
    if poll_interval < MIN_POLL_INTERVAL {
        return Err(loc.err(
            &base.key("poll_interval"),
            format!("{poll_interval:?} is below the minimum {MIN_POLL_INTERVAL:?}"),
        ));
    }
    let saturation = number(
        "saturation",
        raw.saturation,
        d.saturation,
        unit,
        "in (0, 1]",
    )?;
    let target_utilization = raw.target_utilization.unwrap_or(d.target_utilization);
    if !(0.0 < target_utilization && target_utilization < saturation) {
        // Name the key that was written; with both written, the target.
        let key = if raw.target_utilization.is_none() {
            "saturation"
        } else {
            "target_utilization"
        };
        return Err(loc.err(
            &base.key(key),
            format!(
                "need 0 < target_utilization ({target_utilization}) < saturation ({saturation}) <= 1"
            ),
        ));
    }
    let hysteresis = raw.hysteresis.unwrap_or(d.hysteresis);
    if !(0.0 <= hysteresis && hysteresis < saturation) {
        return Err(loc.err(
            &base.key("hysteresis"),
            format!("{hysteresis} must be >= 0 and below saturation ({saturation})"),
        ));
    }
    let saturation_confirm = raw.saturation_confirm.unwrap_or(d.saturation_confirm);
    if saturation_confirm == 0 {
        return Err(loc.err(&base.key("saturation_confirm"), "must be at least 1"));
    }
    let ewma_alpha = number(
        "ewma_alpha",
        raw.ewma_alpha,
        d.ewma_alpha,
        unit,
        "in (0, 1]",
    )?;
    let slow_start = duration("slow_start", &raw.slow_start, d.slow_start)?;
    let slow_start_aggression = number(
        "slow_start_aggression",
        raw.slow_start_aggression,
        d.slow_start_aggression,
        |x| x.is_finite() && x > 0.0,
        "a finite number above 0",
    )?;
    let min_weight_fraction = number(
        "min_weight_fraction",
        raw.min_weight_fraction,
        d.min_weight_fraction,
        unit,
        "in (0, 1]",
    )?;
    let max_step_fraction = number(
        "max_step_fraction",
        raw.max_step_fraction,
        d.max_step_fraction,
        unit,
        "in (0, 1]",
    )?;
    let weight_gain = number(
        "weight_gain",
        raw.weight_gain,
        d.weight_gain,
        unit,
        "in (0, 1]",
    )?;
    let weight_deadband = number(
        "weight_deadband",
        raw.weight_deadband,
        d.weight_deadband,
        |x| x.is_finite() && (0.0..1.0).contains(&x),
        "in [0, 1)",
    )?;
    let stale_after = duration("stale_after", &raw.stale_after, d.stale_after)?;
    if stale_after <= poll_interval {
        return Err(loc.err(
            &base.key("stale_after"),
            format!(
                "{stale_after:?} must exceed poll_interval ({poll_interval:?}), or every reading would be stale"
            ),
        ));
    }
    let stale_decay = duration("stale_decay", &raw.stale_decay, d.stale_decay)?;
    let stale_fraction = number(
        "stale_fraction",
        raw.stale_fraction,
        d.stale_fraction,
        unit,
        "in (0, 1]",
    )?;
    let full_weight = raw.full_weight.unwrap_or(d.full_weight);
    if !(1..=MAX_FULL_WEIGHT).contains(&full_weight) {
        return Err(loc.err(
            &base.key("full_weight"),
            format!("{full_weight} must be 1 to {MAX_FULL_WEIGHT}"),
        ));
    }
    let signal = validate_signal(loc, &base.key("signal"), raw.signal.unwrap_or_default())?;
    let speed_window = duration("speed_window", &raw.speed_window, d.speed_window)?;
    if speed_window < poll_interval {
        return Err(loc.err(
            &base.key("speed_window"),
            format!(
                "{speed_window:?} must be at least poll_interval ({poll_interval:?}): a window shorter than one poll measures nothing"
            ),
        ));
    }
    let capacity_deadband = number(
        "capacity_deadband",
        raw.capacity_deadband,
        d.capacity_deadband,
        |x| x.is_finite() && (0.0..1.0).contains(&x),
        "in [0, 1)",
    )?;
    Ok(PolicyConfig {
        poll_interval,
        target_utilization,
        saturation,
        hysteresis,
        saturation_confirm,
        ewma_alpha,
        slow_start,
        slow_start_aggression,
        min_weight_fraction,
        max_step_fraction,
        weight_gain,
        weight_deadband,
        stale_after,
        stale_decay,
        stale_fraction,
        signal,
        full_weight,
        speed_window,
        capacity_deadband,
    })
}

fn validate_signal(
    loc: &Locator<'_>,
    base: &KeyPath,
    raw: RawSignal,
) -> Result<SignalMix, ConfigError> {
    let d = SignalMix::default();
    let factor = |name: &str, v: Option<f64>, default: f64| {
        let v = v.unwrap_or(default);
        if (0.0..=1.0).contains(&v) {
            Ok(v)
        } else {
            Err(loc.err(
                &base.key(name),
                format!("{v} must be in [0, 1] (0 disables the signal)"),
            ))
        }
    };
    let gpu_util = factor("gpu_util", raw.gpu_util, d.gpu_util)?;
    let kv_cache = factor("kv_cache", raw.kv_cache, d.kv_cache)?;
    let queue = factor("queue", raw.queue, d.queue)?;
    let queue_norm = raw.queue_norm.unwrap_or(d.queue_norm);
    if !(queue_norm.is_finite() && queue_norm > 0.0) {
        return Err(loc.err(
            &base.key("queue_norm"),
            format!("{queue_norm} must be a finite number above 0"),
        ));
    }
    if gpu_util == 0.0 && kv_cache == 0.0 && queue == 0.0 {
        return Err(loc.err(
            base,
            "every signal is disabled; the policy would see no load at all",
        ));
    }
    Ok(SignalMix {
        gpu_util,
        kv_cache,
        queue,
        queue_norm,
    })
}

fn parse_device(raw: RawDevice) -> Result<DeviceSelector, String> {
    match raw {
        RawDevice::Index(i) => Ok(DeviceSelector::Index(i)),
        RawDevice::Uuid(u) => {
            let well_formed = (u.starts_with("GPU-") || u.starts_with("MIG-"))
                && u.len() > 4
                && u.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if well_formed {
                Ok(DeviceSelector::Uuid(u))
            } else {
                Err(format!(
                    "{u:?} is not a GPU index or an NVML UUID like \"GPU-5fb3…\""
                ))
            }
        }
    }
}

/// The telemetry client speaks plain HTTP only.
fn parse_http_url(s: &str) -> Result<String, String> {
    let uri: hyper::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(format!(
                "{s:?}: scheme {other}:// is not supported, only http://"
            ));
        }
        None => return Err(format!("{s:?} needs http:// in front")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{s:?} has no host"));
    }
    Ok(s.to_owned())
}

fn is_label_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn validate_telemetry(
    loc: &Locator<'_>,
    base: &KeyPath,
    raw: RawTelemetry,
) -> Result<TelemetryConfig, ConfigError> {
    let source = raw.source.as_str();
    let allowed: &[&str] = match source {
        "nvml" => &["device", "library"],
        "agent" => &["url", "device", "token_file"],
        "prometheus" => &["url", "format", "labels"],
        other => {
            return Err(loc.err(
                &base.key("source"),
                format!("unknown telemetry source {other:?} (expected nvml, agent or prometheus)"),
            ));
        }
    };
    let given = [
        ("device", raw.device.is_some()),
        ("library", raw.library.is_some()),
        ("url", raw.url.is_some()),
        ("token_file", raw.token_file.is_some()),
        ("format", raw.format.is_some()),
        ("labels", raw.labels.is_some()),
    ];
    if let Some((key, _)) = given
        .iter()
        .find(|(key, present)| *present && !allowed.contains(key))
    {
        return Err(loc.err(
            &base.key(key),
            format!("`{key}` does not apply to source {source:?}"),
        ));
    }
    let missing = |key: &str| loc.err(base, format!("source {source:?} needs `{key}`"));
    let device = |raw: Option<RawDevice>| match raw {
        None => Err(missing("device")),
        Some(d) => parse_device(d).map_err(|m| loc.err(&base.key("device"), m)),
    };
    let url = |raw: Option<String>| match raw {
        None => Err(missing("url")),
        Some(u) => parse_http_url(&u).map_err(|m| loc.err(&base.key("url"), m)),
    };
    match source {
        "nvml" => {
            let library = raw.library;
            if library.as_ref().is_some_and(|l| l.as_os_str().is_empty()) {
                return Err(loc.err(&base.key("library"), "must not be empty"));
            }
            Ok(TelemetryConfig::Nvml {
                device: device(raw.device)?,
                library,
            })
        }
        "agent" => {
            let url = url(raw.url)?;
            let device = device(raw.device)?;
            let token_file = raw.token_file.ok_or_else(|| missing("token_file"))?;
            if token_file.as_os_str().is_empty() {
                return Err(loc.err(&base.key("token_file"), "must not be empty"));
            }
            Ok(TelemetryConfig::Agent {
                url,
                device,
                token_file,
            })
        }
        _ => {
            let url = url(raw.url)?;
            let format = match raw.format.as_deref() {
                None => return Err(missing("format")),
                Some("vllm") => PromFormat::Vllm,
                Some("sglang") => PromFormat::Sglang,
                Some("dcgm") => PromFormat::Dcgm,
                Some(other) => {
                    return Err(loc.err(
                        &base.key("format"),
                        format!("unknown format {other:?} (expected vllm, sglang or dcgm)"),
                    ));
                }
            };
            let labels = raw.labels.unwrap_or_default();
            if let Some(bad) = labels.keys().find(|k| !is_label_name(k)) {
                return Err(loc.err(
                    &base.key("labels").key(bad),
                    format!("{bad:?} is not a Prometheus label name"),
                ));
            }
            Ok(TelemetryConfig::Prometheus {
                url,
                format,
                labels,
            })
        }
    }
}

fn validate_health(
    loc: &Locator<'_>,
    base: &KeyPath,
    raw: RawHealth,
) -> Result<HealthConfig, ConfigError> {
    let duration = |name: &str, raw: &Option<String>, default: Duration| match raw {
        None => Ok(default),
        Some(s) => parse_duration(s).map_err(|m| loc.err(&base.key(name), m)),
    };
    let tcp = raw.tcp.unwrap_or(true);
    if let Some(path) = &raw.http_path
        && !path.starts_with('/')
    {
        return Err(loc.err(
            &base.key("http_path"),
            format!("{path:?} must start with '/'"),
        ));
    }
    if !tcp && raw.http_path.is_none() {
        return Err(loc.err(
            base,
            "no probe left: set tcp = true or an http_path (or drop `health`)",
        ));
    }
    let interval = duration("interval", &raw.interval, DEFAULT_HEALTH_INTERVAL)?;
    let timeout = duration("timeout", &raw.timeout, DEFAULT_HEALTH_TIMEOUT)?;
    if timeout > interval {
        let key = if raw.timeout.is_some() {
            "timeout"
        } else {
            "interval"
        };
        return Err(loc.err(
            &base.key(key),
            format!("timeout {timeout:?} exceeds interval {interval:?}; probes would overlap"),
        ));
    }
    let count = |name: &str, v: Option<u32>, default: u32| match v.unwrap_or(default) {
        0 => Err(loc.err(&base.key(name), "must be at least 1")),
        n => Ok(n),
    };
    Ok(HealthConfig {
        tcp,
        http_path: raw.http_path,
        interval,
        timeout,
        fall: count("fall", raw.fall, DEFAULT_HEALTH_FALL)?,
        rise: count("rise", raw.rise, DEFAULT_HEALTH_RISE)?,
    })
}

fn services_name(services: &[ServiceConfig], i: usize) -> &str {
    services.get(i).map_or("", |s| s.name.as_str())
}

fn check_table_size(
    loc: &Locator<'_>,
    daemon: &DaemonConfig,
    services: &[ServiceConfig],
) -> Result<(), ConfigError> {
    let key = KeyPath::default().key("daemon").key("table_size");
    let size = daemon.table_size;
    if size > MAX_TABLE_SIZE {
        return Err(loc.err(
            &key,
            format!("{size} is above the maximum {MAX_TABLE_SIZE}"),
        ));
    }
    if !is_prime(size) {
        return Err(loc.err(
            &key,
            format!(
                "{size} is not prime (Maglev needs a prime table size; try {})",
                next_prime(u64::from(size))
            ),
        ));
    }
    if let Some(big) = services.iter().max_by_key(|s| s.backends.len()) {
        let need = SLOTS_PER_BACKEND * big.backends.len() as u64;
        if u64::from(size) < need {
            return Err(loc.err(
                &key,
                format!(
                    "{size} is below 100 x the {} backends of service {:?}; use a prime >= {need}, e.g. {}",
                    big.backends.len(),
                    big.name,
                    next_prime(need)
                ),
            ));
        }
    }
    Ok(())
}

fn next_prime(from: u64) -> u64 {
    (from..=u64::from(u32::MAX))
        .find(|&n| is_prime(n as u32))
        .unwrap_or(from)
}

#[cfg(test)]
mod tests;
