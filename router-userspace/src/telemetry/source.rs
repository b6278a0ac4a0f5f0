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
        /// Bearer token, read at start and on reload.
        token_file: PathBuf,
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
            } => Self {
                describe: format!("agent {url} {device}"),
                kind: Kind::Agent {
                    url: url.clone(),
                    device: device.clone(),
                    token_file: token_file.clone(),
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
            } => {
                let token = tokio::fs::read_to_string(token_file).await.map_err(|e| {
                    TelemetryError::Unreachable(format!(
                        "agent token file {}: {e}",
                        token_file.display()
                    ))
                })?;
                let source = AgentSource::new(url, device.clone(), token.trim())?;
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
