//! The daemon's TOML configuration.
//!
//! Parsing happens in two passes over the same text: serde (via `toml`)
//! produces typed values, and a span-preserving `toml_edit::ImDocument`
//! maps every error back to a line and a key path, so an operator sees
//! `router.toml:14: service[0].backend[1].address: …` instead of a bare
//! message.

use std::collections::HashMap;
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

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/router";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/router/router.sock";
pub const DEFAULT_TABLE_SIZE: u32 = router_common::DEFAULT_TABLE_SIZE;
pub const DEFAULT_CONN_TABLE_SIZE: u32 = router_common::DEFAULT_CONN_TABLE_SIZE;
pub const DEFAULT_SNAT_PORT_MIN: u16 = 10000;
pub const DEFAULT_SNAT_PORT_MAX: u16 = 32767;
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_TCP_CLOSING_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_WEIGHT: u32 = 100;
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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: SocketAddrV4,
    pub protocol: Protocol,
    /// 1..=`MAX_SNAT_ADDRS` distinct addresses.
    pub snat: Vec<Ipv4Addr>,
    /// Never empty; names and addresses are unique within the service.
    pub backends: Vec<BackendConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    pub name: String,
    pub address: SocketAddrV4,
    pub weight: u32,
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
        let services = validate_services(&loc, raw.service)?;
        check_table_size(&loc, &daemon, &services)?;
        Ok(Config {
            daemon,
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
    #[serde(default = "default_weight")]
    weight: u32,
}

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
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
            backends.push(BackendConfig {
                name: be.name,
                address,
                weight: be.weight,
            });
        }

        services.push(ServiceConfig {
            name: svc.name,
            vip,
            protocol: svc.protocol,
            snat,
            backends,
        });
    }
    Ok(services)
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
