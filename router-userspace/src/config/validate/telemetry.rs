//! A backend's `telemetry` and `health` tables.
use super::{
    super::{
        locate::{KeyPath, Locator},
        raw::*,
    },
    *,
};

pub(in crate::config) fn is_label_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

pub(in crate::config) fn validate_telemetry(
    loc: &Locator<'_>,
    base: &KeyPath,
    raw: RawTelemetry,
) -> Result<TelemetryConfig, ConfigError> {
    let source = raw.source.as_str();
    let allowed: &[&str] = match source {
        "nvml" => &["device", "library"],
        "agent" => &["url", "device", "token_file", "ca_file"],
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
        ("ca_file", raw.ca_file.is_some()),
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
    let url = |raw: Option<String>, https: bool| match raw {
        None => Err(missing("url")),
        Some(u) => parse_http_url(&u, https).map_err(|m| loc.err(&base.key("url"), m)),
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
            let (url, https) = url(raw.url, true)?;
            let device = device(raw.device)?;
            let token_file = raw.token_file.ok_or_else(|| missing("token_file"))?;
            if token_file.as_os_str().is_empty() {
                return Err(loc.err(&base.key("token_file"), "must not be empty"));
            }
            let ca_file = raw.ca_file;
            match (https, &ca_file) {
                (true, None) => {
                    return Err(loc.err(
                        &base.key("url"),
                        "an https:// agent needs `ca_file`, the CA that signed its certificate",
                    ));
                }
                (false, Some(_)) => {
                    return Err(loc.err(
                        &base.key("ca_file"),
                        "applies to https:// agents only (the token travels in clear over http://)",
                    ));
                }
                (true, Some(f)) if f.as_os_str().is_empty() => {
                    return Err(loc.err(&base.key("ca_file"), "must not be empty"));
                }
                _ => {}
            }
            Ok(TelemetryConfig::Agent {
                url,
                device,
                token_file,
                ca_file,
            })
        }
        _ => {
            let (url, _) = url(raw.url, false)?;
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

pub(in crate::config) fn validate_health(
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
