//! Telemetry: one reading per backend per poll, from NVML, a remote
//! `router agent`, or a Prometheus endpoint. Every reading is validated
//! before the policy sees it; garbage is an error, never a weight.

pub mod agent_source;
pub mod http_client;
pub mod nvml;
pub mod prometheus;
pub mod source;

use std::fmt;

use serde::{Deserialize, Serialize};

/// Which GPU on a host: NVML's index (enumeration order, which can change
/// across reboots) or its UUID (stable).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeviceSelector {
    Index(u32),
    Uuid(String),
}

impl fmt::Display for DeviceSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSelector::Index(i) => write!(f, "GPU {i}"),
            DeviceSelector::Uuid(u) => write!(f, "GPU {u}"),
        }
    }
}

/// What a backend reports. Every field is optional because sources differ:
/// NVML knows the GPU, vLLM knows its queue and KV cache.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// SM (compute) utilization, 0.0–1.0.
    pub gpu_util: Option<f64>,
    /// Memory-controller utilization, 0.0–1.0.
    pub mem_util: Option<f64>,
    pub mem_used_bytes: Option<f64>,
    pub mem_total_bytes: Option<f64>,
    pub power_watts: Option<f64>,
    pub temperature_c: Option<f64>,
    /// NVML clock-throttle (clock event) reason bits, as NVML reports them:
    /// an idle GPU reports `GPU_IDLE` (an H200 at rest reads 0x1), so use
    /// [`clocks_throttled`] to ask whether its clocks are held back.
    pub throttle_reasons: Option<u64>,
    /// Requests in the running batch (vLLM/SGLang).
    pub requests_running: Option<f64>,
    /// Requests queued beyond the batch (vLLM/SGLang).
    pub requests_waiting: Option<f64>,
    /// KV-cache usage, 0.0–1.0.
    pub kv_cache_usage: Option<f64>,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum TelemetryError {
    #[error("invalid reading: {0}")]
    Invalid(String),
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The daemon could not even try: no socket or local port to be had
    /// (see [`http_client::is_local_error`]). Says nothing of the endpoint.
    #[error("local error: {0}")]
    Local(String),
    /// `detail` is the endpoint's own `{"error": "..."}` message, if it
    /// sent one: an agent names the GPU and the NVML error there.
    #[error("HTTP {status} from {url}{}", detail_suffix(.detail))]
    Status {
        status: u16,
        url: String,
        detail: Option<String>,
    },
    #[error("response from {url} exceeds {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("cannot parse response: {0}")]
    Parse(String),
    #[error("NVML: {0}")]
    Nvml(String),
}

fn detail_suffix(detail: &Option<String>) -> String {
    detail
        .as_deref()
        .map(|d| format!(": {d}"))
        .unwrap_or_default()
}

fn finite_nonneg(name: &str, v: Option<f64>) -> Result<(), TelemetryError> {
    match v {
        Some(x) if !x.is_finite() => Err(TelemetryError::Invalid(format!("{name} is {x}"))),
        Some(x) if x < 0.0 => Err(TelemetryError::Invalid(format!("{name} is negative ({x})"))),
        _ => Ok(()),
    }
}

fn fraction(name: &str, v: Option<f64>) -> Result<(), TelemetryError> {
    finite_nonneg(name, v)?;
    match v {
        Some(x) if x > 1.0 => Err(TelemetryError::Invalid(format!(
            "{name} is {:.1}%, above 100%",
            x * 100.0
        ))),
        _ => Ok(()),
    }
}

/// NVML's `GpuIdle` clock-event reason: the clocks are low because nothing
/// runs, which is not a throttle.
pub const THROTTLE_GPU_IDLE: u64 = 0x1;

/// Whether NVML's clock-event reason `bits` hold a GPU's clocks back (power
/// cap, thermal or hardware slowdown, clock settings): any reason but
/// idleness. A real H200 reads 0x1 (idle) at rest and 0x4 (software power
/// cap) under a full matrix-product load.
pub fn clocks_throttled(bits: u64) -> bool {
    bits & !THROTTLE_GPU_IDLE != 0
}

impl Reading {
    /// Rejects NaN, infinities, negative values, fractions above 100% and
    /// memory used above total. A reading that fails is counted and dropped.
    pub fn validate(&self) -> Result<(), TelemetryError> {
        fraction("gpu_util", self.gpu_util)?;
        fraction("mem_util", self.mem_util)?;
        fraction("kv_cache_usage", self.kv_cache_usage)?;
        finite_nonneg("mem_used_bytes", self.mem_used_bytes)?;
        finite_nonneg("mem_total_bytes", self.mem_total_bytes)?;
        finite_nonneg("power_watts", self.power_watts)?;
        finite_nonneg("temperature_c", self.temperature_c)?;
        finite_nonneg("requests_running", self.requests_running)?;
        finite_nonneg("requests_waiting", self.requests_waiting)?;
        if let (Some(u), Some(t)) = (self.mem_used_bytes, self.mem_total_bytes)
            && u > t
        {
            return Err(TelemetryError::Invalid(format!(
                "memory used {u} exceeds total {t}"
            )));
        }
        if self == &Reading::default() {
            return Err(TelemetryError::Invalid("no metric present".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idleness_is_not_a_throttle() {
        // As a real H200 read them: at rest, under a full matrix-product
        // load (software power cap), and a thermal slowdown.
        assert!(!clocks_throttled(0x0));
        assert!(!clocks_throttled(0x1), "GpuIdle alone");
        assert!(clocks_throttled(0x4), "SwPowerCap");
        assert!(clocks_throttled(0x1 | 0x40), "idle and HwThermalSlowdown");
    }

    #[test]
    fn garbage_is_rejected() {
        let ok = Reading {
            gpu_util: Some(0.5),
            ..Reading::default()
        };
        assert!(ok.validate().is_ok());
        for bad in [
            Reading {
                gpu_util: Some(f64::NAN),
                ..ok.clone()
            },
            Reading {
                gpu_util: Some(1.2),
                ..ok.clone()
            },
            Reading {
                gpu_util: Some(-0.1),
                ..ok.clone()
            },
            Reading {
                kv_cache_usage: Some(f64::INFINITY),
                ..ok.clone()
            },
            Reading {
                requests_waiting: Some(-3.0),
                ..ok.clone()
            },
            Reading {
                mem_used_bytes: Some(10.0),
                mem_total_bytes: Some(5.0),
                ..ok.clone()
            },
            Reading::default(),
        ] {
            assert!(bad.validate().is_err(), "{bad:?} must be rejected");
        }
    }
}
