//! `[daemon]`: interfaces, tables, SNAT ports, timeouts, listeners.
use super::{
    super::{
        locate::{KeyPath, Locator},
        raw::*,
    },
    *,
};

pub(in crate::config) fn validate_daemon(
    loc: &Locator<'_>,
    raw: RawDaemon,
) -> Result<DaemonConfig, ConfigError> {
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

    let hash_seed = raw
        .hash_seed
        .as_deref()
        .map(|s| parse_hash_seed(s).map_err(|m| loc.err(&base.key("hash_seed"), m)))
        .transpose()?;

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
        hash_seed,
    })
}

/// 16 hex digits, not all zero: the flow hash's 64-bit key.
pub(in crate::config) fn parse_hash_seed(s: &str) -> Result<u64, String> {
    let digits = s.strip_prefix("0x").unwrap_or(s);
    if digits.len() != 16 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{s:?} is not 16 hex digits (make one with `openssl rand -hex 8`)"
        ));
    }
    match u64::from_str_radix(digits, 16) {
        Ok(0) => Err(
            "must not be zero: the key keeps clients from aiming their flows at one backend".into(),
        ),
        Ok(v) => Ok(v),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}
