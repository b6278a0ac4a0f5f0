//! GPU telemetry from NVML (libnvidia-ml) on this host: loading the library,
//! resolving a GPU by index or UUID, and turning one round of NVML queries
//! into a validated [`Reading`], with errors that name the library or GPU.
//!
//! Every NVML call blocks (a wedged driver can stall one for seconds), so
//! async callers — the daemon's poll loop and `router agent` — run
//! [`NvmlSource::read`] / [`NvmlLibrary::read`] under
//! `tokio::task::spawn_blocking`, never on a runtime worker. Such a call
//! cannot be cancelled: a caller that gives up on it leaves its thread
//! blocked in the driver. So a GPU has at most one read under way; a read
//! asked for meanwhile fails at once instead of blocking another thread.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use nvml_wrapper::{Device, Nvml, enum_wrappers::device::TemperatureSensor, error::NvmlError};

use super::{DeviceSelector, Reading, TelemetryError};

/// What nvml-wrapper dlopens when no path is given.
const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

/// A loaded and initialized NVML. One per process is enough; share it with
/// `Arc` between [`NvmlSource`]s and requests. NVML is thread-safe.
pub struct NvmlLibrary {
    nvml: Nvml,
    path: PathBuf,
    /// "GPU 0 (GPU-…)" per GPU, learned while it answered: a lost GPU no
    /// longer reports its UUID, yet the error should still name it.
    labels: Mutex<HashMap<DeviceSelector, String>>,
    /// GPUs with a read under way (see the module docs).
    reading: InFlight<DeviceSelector>,
}

impl std::fmt::Debug for NvmlLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlLibrary")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl NvmlLibrary {
    /// Loads `library` (the system's `libnvidia-ml.so.1` when `None`) and
    /// initializes NVML. Blocking.
    pub fn open(library: Option<&Path>) -> Result<Self, TelemetryError> {
        let path = library.map_or_else(|| PathBuf::from(DEFAULT_LIBRARY), Path::to_path_buf);
        let mut builder = Nvml::builder();
        if let Some(lib) = library {
            builder.lib_path(lib.as_os_str());
        }
        let nvml = builder.init().map_err(|e| {
            TelemetryError::Nvml(match e {
                NvmlError::LibloadingError(e) => {
                    format!("cannot load NVML library {}: {e}", path.display())
                }
                NvmlError::FailedToLoadSymbol(e) => {
                    format!("{} is not a usable NVML library: {e}", path.display())
                }
                e => format!(
                    "initializing NVML from {}: {}",
                    path.display(),
                    describe(&e)
                ),
            })
        })?;
        Ok(Self {
            nvml,
            path,
            labels: Mutex::default(),
            reading: InFlight::default(),
        })
    }

    /// The library this was loaded from, as given (or the default name).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One validated reading of `device`. Blocking.
    pub fn read(&self, device: &DeviceSelector) -> Result<Reading, TelemetryError> {
        self.read_classified(device)
            .map_err(ReadFailure::into_error)
    }

    /// [`NvmlLibrary::read`], telling a GPU that is not there from one that
    /// fails, so the agent can answer 404 rather than 503.
    pub(crate) fn read_classified(&self, device: &DeviceSelector) -> Result<Reading, ReadFailure> {
        let Some(_reading) = self.reading.begin(device) else {
            let label = self
                .labels
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(device)
                .cloned()
                .unwrap_or_else(|| device.to_string());
            return Err(ReadFailure::Failed(TelemetryError::Nvml(format!(
                "{label}: an earlier NVML call has not returned (driver hung?); not starting another"
            ))));
        };
        let dev = self.device(device)?;
        let known = self.known_label(device, &dev);
        let reading = read_device(&dev, || {
            known.clone().unwrap_or_else(|| self.label(&dev, device))
        })
        .map_err(ReadFailure::Failed)?;
        Ok(reading)
    }

    /// The remembered label, learning it now if the GPU answers.
    fn known_label(&self, sel: &DeviceSelector, dev: &Device<'_>) -> Option<String> {
        let labels = || self.labels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(l) = labels().get(sel) {
            return Some(l.clone());
        }
        // Asked outside the lock: NVML may block. Only a complete label is
        // worth remembering.
        let complete = match sel {
            DeviceSelector::Index(i) => dev.uuid().ok().map(|u| format!("GPU {i} ({u})")),
            DeviceSelector::Uuid(u) => dev.index().ok().map(|i| format!("GPU {i} ({u})")),
        }?;
        labels().insert(sel.clone(), complete.clone());
        Some(complete)
    }

    fn device(&self, sel: &DeviceSelector) -> Result<Device<'_>, ReadFailure> {
        let found = match sel {
            DeviceSelector::Index(i) => self.nvml.device_by_index(*i),
            DeviceSelector::Uuid(u) => self.nvml.device_by_uuid(u.as_str()),
        };
        found.map_err(|e| match e {
            // NVML says InvalidArg for an index past the end, NotFound for
            // an unknown UUID: either way the configured GPU is not here.
            NvmlError::InvalidArg | NvmlError::NotFound => {
                let present = self
                    .nvml
                    .device_count()
                    .map_or_else(|_| String::new(), |n| format!(" ({n} GPUs present)"));
                ReadFailure::NoSuchGpu(TelemetryError::Nvml(format!("{sel}: no such GPU{present}")))
            }
            e => ReadFailure::Failed(TelemetryError::Nvml(format!("{sel}: {}", describe(&e)))),
        })
    }

    /// "GPU 0 (GPU-…)" with whatever of index and UUID NVML still reports;
    /// only built on the error path, where the GPU may answer nothing.
    fn label(&self, dev: &Device<'_>, sel: &DeviceSelector) -> String {
        match sel {
            DeviceSelector::Index(i) => match dev.uuid() {
                Ok(u) => format!("GPU {i} ({u})"),
                Err(_) => format!("GPU {i}"),
            },
            DeviceSelector::Uuid(u) => match dev.index() {
                Ok(i) => format!("GPU {i} ({u})"),
                Err(_) => format!("GPU {u}"),
            },
        }
    }
}

/// Keys with work under way; [`InFlight::begin`] claims one until the
/// returned guard drops (also when the work panics).
#[derive(Debug)]
pub(crate) struct InFlight<K: Eq + Hash + Clone> {
    busy: Mutex<HashSet<K>>,
}

impl<K: Eq + Hash + Clone> Default for InFlight<K> {
    fn default() -> Self {
        Self {
            busy: Mutex::default(),
        }
    }
}

impl<K: Eq + Hash + Clone> InFlight<K> {
    /// Claims `key`; `None` while an earlier claim on it is held.
    pub(crate) fn begin(&self, key: &K) -> Option<Claim<'_, K>> {
        let fresh = self
            .busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.clone());
        fresh.then(|| Claim {
            set: self,
            key: key.clone(),
        })
    }
}

pub(crate) struct Claim<'a, K: Eq + Hash + Clone> {
    set: &'a InFlight<K>,
    key: K,
}

impl<K: Eq + Hash + Clone> Drop for Claim<'_, K> {
    fn drop(&mut self) {
        self.set
            .busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

#[derive(Debug)]
pub(crate) enum ReadFailure {
    NoSuchGpu(TelemetryError),
    Failed(TelemetryError),
}

impl ReadFailure {
    pub(crate) fn into_error(self) -> TelemetryError {
        match self {
            ReadFailure::NoSuchGpu(e) | ReadFailure::Failed(e) => e,
        }
    }
}

/// Queries one GPU. A metric the GPU does not support is left out; any
/// other failure fails the whole reading, since a GPU that is lost or timing
/// out must not keep its last weight.
fn read_device(dev: &Device<'_>, label: impl Fn() -> String) -> Result<Reading, TelemetryError> {
    let label = &label;
    let util = optional(dev.utilization_rates(), "utilization", label)?;
    let mem = optional(dev.memory_info(), "memory info", label)?;
    let power_mw = optional(dev.power_usage(), "power usage", label)?;
    let temp = optional(
        dev.temperature(TemperatureSensor::Gpu),
        "temperature",
        label,
    )?;
    let throttle = optional(dev.current_throttle_reasons(), "throttle reasons", label)?;
    let reading = Reading {
        gpu_util: util.as_ref().map(|u| f64::from(u.gpu) / 100.0),
        mem_util: util.as_ref().map(|u| f64::from(u.memory) / 100.0),
        // u64 → f64 loses precision only above 2^53 bytes (8 PiB).
        mem_used_bytes: mem.as_ref().map(|m| m.used as f64),
        mem_total_bytes: mem.as_ref().map(|m| m.total as f64),
        power_watts: power_mw.map(|mw| f64::from(mw) / 1000.0),
        temperature_c: temp.map(f64::from),
        throttle_reasons: throttle.map(|t| t.bits()),
        ..Reading::default()
    };
    reading
        .validate()
        .map_err(|e| TelemetryError::Nvml(format!("{}: {e}", label())))?;
    Ok(reading)
}

fn optional<T>(
    r: Result<T, NvmlError>,
    what: &str,
    label: &impl Fn() -> String,
) -> Result<Option<T>, TelemetryError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(NvmlError::NotSupported) => Ok(None),
        Err(e) => Err(TelemetryError::Nvml(format!(
            "{}: {what}: {}",
            label(),
            describe(&e)
        ))),
    }
}

/// NVML's own wording for the errors operators meet, nvml-wrapper's for
/// the rest.
fn describe(e: &NvmlError) -> String {
    match e {
        NvmlError::GpuLost => "GPU is lost".into(),
        NvmlError::Timeout => "timed out".into(),
        NvmlError::Unknown => "unknown error".into(),
        NvmlError::DriverNotLoaded => "NVIDIA driver is not loaded".into(),
        NvmlError::NoPermission => "no permission to talk to the driver".into(),
        e => e.to_string(),
    }
}

/// One GPU's telemetry source: a shared [`NvmlLibrary`] and the GPU.
#[derive(Debug)]
pub struct NvmlSource {
    library: Arc<NvmlLibrary>,
    device: DeviceSelector,
}

impl NvmlSource {
    /// Loads NVML from `library` (the system's when `None`) and checks that
    /// `device` exists. Blocking.
    pub fn open(library: Option<&Path>, device: DeviceSelector) -> Result<Self, TelemetryError> {
        Self::with_library(Arc::new(NvmlLibrary::open(library)?), device)
    }

    /// Like [`NvmlSource::open`] on an already loaded library, so several
    /// GPUs of one host share one NVML. Blocking.
    pub fn with_library(
        library: Arc<NvmlLibrary>,
        device: DeviceSelector,
    ) -> Result<Self, TelemetryError> {
        let dev = library.device(&device).map_err(ReadFailure::into_error)?;
        library.known_label(&device, &dev);
        Ok(Self { library, device })
    }

    pub fn device(&self) -> &DeviceSelector {
        &self.device
    }

    pub fn library(&self) -> &Arc<NvmlLibrary> {
        &self.library
    }

    /// One validated reading. Blocking: call it via `spawn_blocking`.
    pub fn read(&self) -> Result<Reading, TelemetryError> {
        self.library.read(&self.device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_claim_per_key_until_it_drops() {
        let set = InFlight::<u32>::default();
        let first = set.begin(&0).expect("free");
        assert!(set.begin(&0).is_none(), "a second read of a busy GPU");
        let other = set.begin(&1).expect("another GPU is not held up");
        drop(first);
        assert!(set.begin(&0).is_some(), "free again once the first ends");
        drop(other);
    }

    #[test]
    fn a_panicking_holder_releases_its_claim() {
        let set = InFlight::<u32>::default();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _claim = set.begin(&7);
            panic!("NVML wrapper panicked");
        }));
        assert!(r.is_err());
        assert!(set.begin(&7).is_some());
    }
}
