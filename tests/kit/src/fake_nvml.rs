//! The fake NVML library (tests/fake-nvml) from the tests' side: where the
//! built `libfake_nvml.so` is, and writing the state file it reads. The
//! state-file contract is documented in tests/fake-nvml/src/lib.rs.
//!
//! The library finds its state through the process-wide `FAKE_NVML_STATE`,
//! so tests in one process share one state file: [`FakeNvml::acquire`]
//! hands it out one test at a time.

use std::{
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard, OnceLock, PoisonError},
};

use anyhow::{Context, Result, bail};
use serde::Serialize;

/// The environment variable the fake library reads its state path from.
pub const STATE_ENV: &str = "FAKE_NVML_STATE";

const LIBRARY: &str = "libfake_nvml.so";

/// The fake library built next to the running test binary. `cargo test`
/// builds it because router-tests and router-bench dev-depend on
/// fake-nvml; cargo leaves a dependency's cdylib in `target/<profile>/deps/`
/// and only copies it up to `target/<profile>/` for
/// `cargo build -p fake-nvml`, so both are tried.
pub fn library_path() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test binary")?;
    let mut dir = exe.parent().context("test binary has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("no profile directory")?;
    }
    for candidate in [dir.join(LIBRARY), dir.join("deps").join(LIBRARY)] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    bail!(
        "{LIBRARY} is not in {} or its deps/: build it with `cargo build -p fake-nvml` \
         (cargo test on router-tests or router-bench builds it)",
        dir.display()
    )
}

/// An error the fake injects (`NVML_ERROR_GPU_IS_LOST`, `_TIMEOUT`, `_UNKNOWN`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FakeError {
    GpuIsLost,
    Timeout,
    Unknown,
}

/// One fake GPU, field for field the state-file contract.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FakeGpu {
    pub uuid: String,
    pub name: String,
    /// Percent.
    pub sm_util: u32,
    /// Percent.
    pub mem_util: u32,
    pub mem_used: u64,
    pub mem_total: u64,
    pub power_mw: u32,
    pub temperature_c: u32,
    pub throttle_reasons: u64,
    pub error: Option<FakeError>,
    /// Every query on this GPU blocks until this is cleared (a wedged
    /// driver); handle lookups still answer.
    pub hang: bool,
}

impl FakeGpu {
    /// A healthy, moderately busy H100 whose UUID encodes `index`.
    pub fn new(index: u32) -> Self {
        Self {
            uuid: format!("GPU-{index:08x}-0000-0000-0000-000000000000"),
            name: "Fake H100".into(),
            sm_util: 37,
            mem_util: 20,
            mem_used: 1_000_000_000,
            mem_total: 80_000_000_000,
            power_mw: 350_000,
            temperature_c: 61,
            throttle_reasons: 0,
            error: None,
            hang: false,
        }
    }
}

/// The whole state file.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FakeGpuState {
    pub init_error: Option<FakeError>,
    pub devices: Vec<FakeGpu>,
}

impl FakeGpuState {
    /// `n` healthy GPUs, indexes 0..n.
    pub fn with_gpus(n: u32) -> Self {
        Self {
            init_error: None,
            devices: (0..n).map(FakeGpu::new).collect(),
        }
    }

    /// Writes atomically (temp file, then rename), so the library, which
    /// re-reads on every call, never sees half a file.
    pub fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).context("serializing fake GPU state")?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    }
}

/// The process's fake NVML, held by one test at a time.
pub struct FakeNvml {
    _turn: MutexGuard<'static, ()>,
    state: PathBuf,
    library: PathBuf,
}

static TURN: Mutex<()> = Mutex::new(());
static STATE_PATH: OnceLock<PathBuf> = OnceLock::new();

impl FakeNvml {
    /// Waits for this process's turn with the fake, points
    /// `FAKE_NVML_STATE` at the process's state file and writes `initial`.
    /// Call it before anything loads NVML.
    pub fn acquire(initial: &FakeGpuState) -> Result<Self> {
        // A test that panicked while holding the turn leaves nothing behind
        // that the next test's state write does not replace.
        let turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
        let state = STATE_PATH
            .get_or_init(|| {
                let p = std::env::temp_dir()
                    .join(format!("router-fake-nvml-{}.json", std::process::id()));
                // SAFETY: runs once, before this process loads the fake
                // library (the only other reader), and Rust's own env
                // accesses are serialized by std.
                unsafe { std::env::set_var(STATE_ENV, &p) };
                p
            })
            .clone();
        let fake = Self {
            _turn: turn,
            state,
            library: library_path()?,
        };
        fake.set(initial)?;
        Ok(fake)
    }

    /// The fake `libnvidia-ml.so` to pass as the library path.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// The state file `FAKE_NVML_STATE` names.
    pub fn state_path(&self) -> &Path {
        &self.state
    }

    /// Replaces the state; the library's next call sees it.
    pub fn set(&self, state: &FakeGpuState) -> Result<()> {
        state.write(&self.state)
    }

    /// Removes the state file, which the library reports as
    /// `NVML_ERROR_UNKNOWN`.
    pub fn remove_state(&self) -> Result<()> {
        std::fs::remove_file(&self.state)
            .with_context(|| format!("removing {}", self.state.display()))
    }
}

impl Drop for FakeNvml {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.state);
    }
}
