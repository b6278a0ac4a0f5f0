//! One telemetry source per backend, built from its config. Construction
//! that can fail (loading NVML, reading a token file) happens on first read
//! and is retried on every poll, so a broken source is an error for that
//! backend only and heals without a restart.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex, TryLockError},
    time::Duration,
};

use super::{
    DeviceSelector, Reading, TelemetryError,
    agent_source::AgentSource,
    nvml::NvmlSource,
    prometheus::{PromFormat, PrometheusSource},
};

/// Where a backend's readings come from, as the config states it. URLs are `http://` only: the
/// telemetry client speaks plain HTTP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TelemetryConfig {
    /// NVML on this host (the router runs beside the GPU).
    Nvml {
        device: DeviceSelector,
        /// libnvidia-ml to load instead of the system one.
        library: Option<PathBuf>,
    },
    /// A remote `router agent`.
    Agent {
        url: String,
        device: DeviceSelector,
        /// Bearer token, read at each poll.
        token_file: PathBuf,
        /// For an `https://` URL: the CA that signed the agent's certificate.
        ca_file: Option<PathBuf>,
    },
    /// A Prometheus text endpoint (the engine's own, or DCGM exporter).
    Prometheus {
        url: String,
        format: PromFormat,
        /// Only series with all these labels count.
        labels: BTreeMap<String, String>,
    },
}

enum Kind {
    Nvml {
        library: Option<PathBuf>,
        device: DeviceSelector,
        opened: Mutex<Option<Arc<NvmlSource>>>,
    },
    Agent {
        url: String,
        device: DeviceSelector,
        token_file: PathBuf,
        ca_file: Option<PathBuf>,
        /// The CA file, loaded once it loads (a bad one is retried each poll).
        tls: Mutex<Option<Arc<rustls::ClientConfig>>>,
    },
    Prometheus(PrometheusSource),
}

pub struct Source {
    kind: Kind,
    describe: String,
}

impl Source {
    pub fn new(cfg: &TelemetryConfig) -> Self {
        match cfg {
            TelemetryConfig::Nvml { device, library } => Self {
                describe: format!("nvml {device}"),
                kind: Kind::Nvml {
                    library: library.clone(),
                    device: device.clone(),
                    opened: Mutex::new(None),
                },
            },
            TelemetryConfig::Agent {
                url,
                device,
                token_file,
                ca_file,
            } => Self {
                describe: format!("agent {url} {device}"),
                kind: Kind::Agent {
                    url: url.clone(),
                    device: device.clone(),
                    token_file: token_file.clone(),
                    ca_file: ca_file.clone(),
                    tls: Mutex::new(None),
                },
            },
            TelemetryConfig::Prometheus {
                url,
                format,
                labels,
            } => Self {
                describe: format!("prometheus {} {url}", format.as_str()),
                kind: Kind::Prometheus(PrometheusSource::new(url.clone(), *format, labels.clone())),
            },
        }
    }

    /// "nvml GPU 0", "prometheus vllm http://…": for status and logs.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// One validated reading, within `timeout` (NVML runs on a blocking
    /// thread; a hung driver call is abandoned at the deadline).
    pub async fn read(self: Arc<Self>, timeout: Duration) -> Result<Reading, TelemetryError> {
        match &self.kind {
            Kind::Nvml { .. } => {
                let me = self.clone();
                let job = tokio::task::spawn_blocking(move || me.read_nvml());
                match tokio::time::timeout(timeout, job).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => Err(TelemetryError::Nvml(format!("NVML read panicked: {e}"))),
                    Err(_) => Err(TelemetryError::Timeout(timeout)),
                }
            }
            Kind::Agent {
                url,
                device,
                token_file,
                ca_file,
                tls,
            } => {
                let token = tokio::fs::read_to_string(token_file).await.map_err(|e| {
                    // The daemon may run as its own user: say which, since
                    // a root-only token file is the usual cause.
                    let who = if e.kind() == std::io::ErrorKind::PermissionDenied {
                        format!(
                            " (not readable by uid {}, which the daemon runs as: make the file \
                             that user's, or its group's with mode 0640)",
                            nix::unistd::geteuid()
                        )
                    } else {
                        String::new()
                    };
                    TelemetryError::Unreachable(format!(
                        "agent token file {}: {e}{who}",
                        token_file.display()
                    ))
                })?;
                let mut source = AgentSource::new(url, device.clone(), token.trim())?;
                if let Some(ca_file) = ca_file {
                    source = source.with_tls(agent_tls(tls, ca_file)?);
                }
                source.read(timeout).await
            }
            Kind::Prometheus(p) => p.read(timeout).await,
        }
    }

    fn read_nvml(&self) -> Result<Reading, TelemetryError> {
        let Kind::Nvml {
            library,
            device,
            opened,
        } = &self.kind
        else {
            return Err(TelemetryError::Nvml("not an NVML source".into()));
        };
        let source = {
            // Held while NVML loads and finds the GPU, which can hang like
            // any NVML call; a poll meanwhile fails rather than queueing a
            // second blocked thread behind it.
            let mut slot = opened.try_lock().map_err(|e| match e {
                TryLockError::WouldBlock => TelemetryError::Nvml(format!(
                    "{device}: opening NVML has not returned (driver hung?)"
                )),
                TryLockError::Poisoned(_) => {
                    TelemetryError::Nvml("NVML source lock poisoned".into())
                }
            })?;
            match slot.as_ref() {
                Some(s) => s.clone(),
                None => {
                    let s = Arc::new(NvmlSource::open(library.as_deref(), device.clone())?);
                    *slot = Some(s.clone());
                    s
                }
            }
        };
        source.read()
    }
}

/// The agent's CA, loaded on first use and kept; a file that does not load
/// is this backend's telemetry error, tried again at the next poll.
fn agent_tls(
    cached: &Mutex<Option<Arc<rustls::ClientConfig>>>,
    ca_file: &std::path::Path,
) -> Result<Arc<rustls::ClientConfig>, TelemetryError> {
    let mut cached = cached.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(config) = cached.as_ref() {
        return Ok(Arc::clone(config));
    }
    let config = crate::tls::client_config(ca_file)
        .map_err(|e| TelemetryError::Unreachable(format!("agent ca_file {e}")))?;
    *cached = Some(Arc::clone(&config));
    Ok(config)
}
