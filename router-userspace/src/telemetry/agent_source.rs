//! GPU telemetry from a remote `router agent`: one authenticated GET per
//! poll, bounded in time and size, parsed strictly and validated.

use std::{sync::Arc, time::Duration};

use super::{DeviceSelector, Reading, TelemetryError, http_client};

/// A reading is a few hundred bytes; anything near this is not one.
pub const MAX_BODY: usize = 64 << 10;

/// Where one backend's GPU telemetry comes from: `router agent` at
/// `base_url`, GPU `device`, bearer `token`.
#[derive(Clone)]
pub struct AgentSource {
    url: String,
    device: DeviceSelector,
    token: String,
    /// For an `https://` agent: the roots its certificate must chain to.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for AgentSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a credential: keep it out of logs.
        f.debug_struct("AgentSource")
            .field("url", &self.url)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl AgentSource {
    /// `base_url` is the agent's root, e.g. `http://10.0.0.5:9400`. A UUID
    /// must be plain (letters, digits, `-`) since it becomes a path segment.
    pub fn new(
        base_url: &str,
        device: DeviceSelector,
        token: impl Into<String>,
    ) -> Result<Self, TelemetryError> {
        let base = base_url.trim_end_matches('/');
        let url = match &device {
            DeviceSelector::Index(i) => format!("{base}/v1/gpus/{i}"),
            DeviceSelector::Uuid(u) => {
                if u.is_empty() || !u.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                    return Err(TelemetryError::Invalid(format!(
                        "GPU UUID {u:?} has characters other than letters, digits and '-'"
                    )));
                }
                format!("{base}/v1/gpus/uuid/{u}")
            }
        };
        Ok(Self {
            url,
            device,
            token: token.into(),
            tls: None,
        })
    }

    /// Trusts `tls`'s roots for an `https://` agent (see `crate::tls`).
    pub fn with_tls(mut self, tls: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The full URL polled.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn device(&self) -> &DeviceSelector {
        &self.device
    }

    /// One validated reading; the whole exchange finishes within `timeout`.
    pub async fn read(&self, timeout: Duration) -> Result<Reading, TelemetryError> {
        let body = http_client::get_tls(
            &self.url,
            Some(&self.token),
            self.tls.as_ref(),
            timeout,
            MAX_BODY,
        )
        .await?;
        parse(&self.url, &body)
    }
}

/// Strict JSON (no NaN, no trailing bytes, right types) holding an object.
/// Unknown fields are tolerated so a newer agent can add metrics during a
/// rolling upgrade; validation still demands at least one known metric.
fn parse(url: &str, body: &[u8]) -> Result<Reading, TelemetryError> {
    if !body.trim_ascii_start().starts_with(b"{") {
        return Err(TelemetryError::Parse(format!(
            "{url}: expected a JSON object"
        )));
    }
    let reading: Reading =
        serde_json::from_slice(body).map_err(|e| TelemetryError::Parse(format!("{url}: {e}")))?;
    reading.validate()?;
    Ok(reading)
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "http://agent/v1/gpus/0";

    #[test]
    fn urls_follow_the_agent_api() {
        let s = AgentSource::new("http://h:9400/", DeviceSelector::Index(3), "t").unwrap();
        assert_eq!(s.url(), "http://h:9400/v1/gpus/3");
        let s = AgentSource::new(
            "http://h:9400",
            DeviceSelector::Uuid("GPU-12ab-34".into()),
            "t",
        )
        .unwrap();
        assert_eq!(s.url(), "http://h:9400/v1/gpus/uuid/GPU-12ab-34");
        assert!(AgentSource::new("http://h", DeviceSelector::Uuid("../x".into()), "t").is_err());
        assert!(
            !format!("{s:?}").contains("\"t\""),
            "token must not be logged"
        );
    }

    #[test]
    fn parse_is_strict() {
        let ok = parse(URL, br#"{"gpu_util":0.5,"future_metric":1}"#).unwrap();
        assert_eq!(ok.gpu_util, Some(0.5));
        for bad in [
            &b"not json"[..],
            b"[0.5]",
            b"0.5",
            br#"{"gpu_util":NaN}"#,
            br#"{"gpu_util":"0.5"}"#,
            br#"{"gpu_util":0.5} trailing"#,
            br#"{"gpu_util":0.5"#,
        ] {
            assert!(
                matches!(parse(URL, bad), Err(TelemetryError::Parse(_))),
                "{:?} must not parse",
                String::from_utf8_lossy(bad)
            );
        }
        for invalid in [
            &br#"{"gpu_util":-0.1}"#[..],
            br#"{"gpu_util":1e999}"#,
            b"{}",
        ] {
            let r = parse(URL, invalid);
            assert!(
                matches!(
                    r,
                    Err(TelemetryError::Invalid(_) | TelemetryError::Parse(_))
                ),
                "{:?}: {r:?}",
                String::from_utf8_lossy(invalid)
            );
        }
    }
}
