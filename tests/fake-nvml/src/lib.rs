//! A fake `libnvidia-ml.so` for machines without a GPU. It owns the C ABI
//! that nvml-wrapper 0.13 calls for router's telemetry (init, shutdown,
//! device lookup, name, UUID, index, utilization, memory, power,
//! temperature, clock throttle/event reasons, error strings) and nothing
//! else: a symbol nvml-wrapper looks up but this library lacks surfaces as
//! `FailedToLoadSymbol`, which is what an old real driver would do too.
//!
//! # State file contract
//!
//! Values come from the JSON file named by `FAKE_NVML_STATE`, re-read on
//! every call so a test (or a mock replica) can change a GPU while the
//! library is loaded:
//!
//! ```json
//! {"init_error": null,
//!  "devices": [{"uuid": "GPU-00000000-0000-0000-0000-000000000000", "name": "Fake H100",
//!               "sm_util": 37, "mem_util": 20, "mem_used": 1000000000,
//!               "mem_total": 80000000000, "power_mw": 350000, "temperature_c": 61,
//!               "throttle_reasons": 0, "error": null}]}
//! ```
//!
//! * `init_error` makes `nvmlInit_v2`/`nvmlInitWithFlags` fail; a device's
//!   `error` makes every query on that device fail (handle lookups still
//!   succeed, so a GPU can be "lost" after the caller opened it). Values:
//!   `"gpu_is_lost"`, `"timeout"`, `"unknown"` → `NVML_ERROR_GPU_IS_LOST`,
//!   `NVML_ERROR_TIMEOUT`, `NVML_ERROR_UNKNOWN`.
//! * A device's `"hang": true` makes every query on that device block (a
//!   driver stuck on a GPU) until the state file clears it, re-checked
//!   every 20 ms and given up after a minute with `NVML_ERROR_TIMEOUT`;
//!   handle lookups still return at once. `error` wins over `hang`.
//! * A missing, unreadable or unparseable state file (or an unset
//!   `FAKE_NVML_STATE`) makes init fail with `NVML_ERROR_UNKNOWN`, and any
//!   later call fail the same way.
//! * Device fields other than `uuid` default to zero (`name`: "Fake GPU").
//! * Handles encode the device index (index + 1, so never null); a handle
//!   past the current device list is `NVML_ERROR_INVALID_ARGUMENT`.

use std::{
    ffi::{CStr, c_char, c_uint, c_ulonglong, c_void},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use serde::Deserialize;

type NvmlReturn = c_uint;
type DeviceHandle = *mut c_void;

const SUCCESS: NvmlReturn = 0;
const ERROR_UNINITIALIZED: NvmlReturn = 1;
const ERROR_INVALID_ARGUMENT: NvmlReturn = 2;
const ERROR_NOT_FOUND: NvmlReturn = 6;
const ERROR_INSUFFICIENT_SIZE: NvmlReturn = 7;
const ERROR_TIMEOUT: NvmlReturn = 10;
const ERROR_GPU_IS_LOST: NvmlReturn = 15;
const ERROR_ARGUMENT_VERSION_MISMATCH: NvmlReturn = 25;
const ERROR_UNKNOWN: NvmlReturn = 999;

const TEMPERATURE_GPU: c_uint = 0;

/// How often a hung query looks whether the test released it, and when it
/// gives up on its own (so a forgotten hang cannot wedge a test run).
const HANG_RECHECK: Duration = Duration::from_millis(20);
const HANG_LIMIT: Duration = Duration::from_secs(60);
const DRIVER_VERSION: &str = "550.54.15";

/// Real NVML reference-counts init/shutdown; callers (and nvml-wrapper's
/// Drop) rely on a balanced shutdown succeeding.
static INIT_COUNT: AtomicU32 = AtomicU32::new(0);

#[derive(Deserialize)]
struct State {
    #[serde(default)]
    init_error: Option<InjectedError>,
    #[serde(default)]
    devices: Vec<Gpu>,
}

#[derive(Deserialize)]
struct Gpu {
    uuid: String,
    #[serde(default = "default_name")]
    name: String,
    #[serde(default)]
    sm_util: u32,
    #[serde(default)]
    mem_util: u32,
    #[serde(default)]
    mem_used: u64,
    #[serde(default)]
    mem_total: u64,
    #[serde(default)]
    power_mw: u32,
    #[serde(default)]
    temperature_c: u32,
    #[serde(default)]
    throttle_reasons: u64,
    #[serde(default)]
    error: Option<InjectedError>,
    #[serde(default)]
    hang: bool,
}

fn default_name() -> String {
    "Fake GPU".to_string()
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum InjectedError {
    GpuIsLost,
    Timeout,
    Unknown,
}

impl InjectedError {
    fn code(self) -> NvmlReturn {
        match self {
            InjectedError::GpuIsLost => ERROR_GPU_IS_LOST,
            InjectedError::Timeout => ERROR_TIMEOUT,
            InjectedError::Unknown => ERROR_UNKNOWN,
        }
    }
}

fn load_state() -> Result<State, NvmlReturn> {
    let path = std::env::var_os("FAKE_NVML_STATE").ok_or(ERROR_UNKNOWN)?;
    let text = std::fs::read(path).map_err(|_| ERROR_UNKNOWN)?;
    serde_json::from_slice(&text).map_err(|_| ERROR_UNKNOWN)
}

fn initialized() -> Result<(), NvmlReturn> {
    if INIT_COUNT.load(Ordering::Acquire) == 0 {
        Err(ERROR_UNINITIALIZED)
    } else {
        Ok(())
    }
}

fn handle_for(index: usize) -> DeviceHandle {
    // Never dereferenced: the handle is only an index in disguise.
    (index + 1) as DeviceHandle
}

/// Runs `f` on the device behind `handle` unless the library is not
/// initialized, the handle is bogus, or the state injects an error.
fn with_device(handle: DeviceHandle, f: impl FnOnce(usize, &Gpu) -> NvmlReturn) -> NvmlReturn {
    let run = || -> Result<NvmlReturn, NvmlReturn> {
        initialized()?;
        let index = (handle as usize)
            .checked_sub(1)
            .ok_or(ERROR_INVALID_ARGUMENT)?;
        let hung_since = Instant::now();
        loop {
            let state = load_state()?;
            let gpu = state.devices.get(index).ok_or(ERROR_INVALID_ARGUMENT)?;
            if let Some(e) = gpu.error {
                return Err(e.code());
            }
            if !gpu.hang {
                return Ok(f(index, gpu));
            }
            if hung_since.elapsed() > HANG_LIMIT {
                return Err(ERROR_TIMEOUT);
            }
            std::thread::sleep(HANG_RECHECK);
        }
    };
    run().unwrap_or_else(|code| code)
}

/// Copies `s` and a NUL into the caller's `len`-byte buffer.
///
/// # Safety
/// `buf` is null or valid for `len` bytes of writes.
unsafe fn write_cstr(s: &str, buf: *mut c_char, len: c_uint) -> NvmlReturn {
    if buf.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    if s.as_bytes().contains(&0) {
        // A NUL inside would silently truncate the string the caller sees.
        return ERROR_UNKNOWN;
    }
    let needed = s.len() + 1;
    if needed > len as usize {
        return ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: `needed <= len` bytes fit, per the caller's contract, and the
    // source is a live &str that cannot overlap a caller-owned buffer.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), s.len());
        *buf.add(s.len()) = 0;
    }
    SUCCESS
}

/// Writes `value` through `out` unless it is null.
///
/// # Safety
/// `out` is null or valid for a write of `T`.
unsafe fn write_out<T>(out: *mut T, value: T) -> NvmlReturn {
    if out.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: non-null and valid per the caller's contract.
    unsafe { out.write(value) };
    SUCCESS
}

fn init() -> NvmlReturn {
    match load_state() {
        Ok(State {
            init_error: Some(e),
            ..
        }) => e.code(),
        Ok(_) => {
            INIT_COUNT.fetch_add(1, Ordering::AcqRel);
            SUCCESS
        }
        Err(code) => code,
    }
}

/// `nvmlReturn_t nvmlInit_v2(void)`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> NvmlReturn {
    init()
}

/// `nvmlReturn_t nvmlInitWithFlags(unsigned int flags)`; flags are ignored.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> NvmlReturn {
    init()
}

/// `nvmlReturn_t nvmlShutdown(void)`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> NvmlReturn {
    let dropped =
        INIT_COUNT.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    match dropped {
        Ok(_) => SUCCESS,
        Err(_) => ERROR_UNINITIALIZED,
    }
}

/// `const char *nvmlErrorString(nvmlReturn_t result)`; static strings.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(result: NvmlReturn) -> *const c_char {
    let s: &'static CStr = match result {
        SUCCESS => c"Success",
        ERROR_UNINITIALIZED => c"Uninitialized",
        ERROR_INVALID_ARGUMENT => c"Invalid Argument",
        ERROR_NOT_FOUND => c"Not Found",
        ERROR_INSUFFICIENT_SIZE => c"Insufficient Size",
        ERROR_TIMEOUT => c"Timeout",
        ERROR_GPU_IS_LOST => c"GPU is lost",
        ERROR_ARGUMENT_VERSION_MISMATCH => c"Argument version mismatch",
        _ => c"Unknown Error",
    };
    s.as_ptr()
}

/// `nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)`.
///
/// # Safety
/// `version` is null or valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    if let Err(code) = initialized() {
        return code;
    }
    // SAFETY: forwarded caller contract.
    unsafe { write_cstr(DRIVER_VERSION, version, length) }
}

/// `nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount)`.
///
/// # Safety
/// `count` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> NvmlReturn {
    let n = match initialized().and_then(|()| load_state()) {
        Ok(state) => state.devices.len(),
        Err(code) => return code,
    };
    let Ok(n) = c_uint::try_from(n) else {
        return ERROR_UNKNOWN;
    };
    // SAFETY: forwarded caller contract.
    unsafe { write_out(count, n) }
}

/// `nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)`.
///
/// # Safety
/// `device` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut DeviceHandle,
) -> NvmlReturn {
    let found = initialized().and_then(|()| load_state()).and_then(|state| {
        if (index as usize) < state.devices.len() {
            Ok(handle_for(index as usize))
        } else {
            Err(ERROR_INVALID_ARGUMENT)
        }
    });
    match found {
        // SAFETY: forwarded caller contract.
        Ok(h) => unsafe { write_out(device, h) },
        Err(code) => code,
    }
}

/// `nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)`.
///
/// # Safety
/// `uuid` is null or a NUL-terminated string; `device` is null or valid for
/// a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut DeviceHandle,
) -> NvmlReturn {
    if uuid.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: non-null and NUL-terminated per the caller's contract.
    let wanted = unsafe { CStr::from_ptr(uuid) }.to_bytes();
    let found = initialized().and_then(|()| load_state()).and_then(|state| {
        state
            .devices
            .iter()
            .position(|g| g.uuid.as_bytes() == wanted)
            .map(handle_for)
            .ok_or(ERROR_NOT_FOUND)
    });
    match found {
        // SAFETY: forwarded caller contract.
        Ok(h) => unsafe { write_out(device, h) },
        Err(code) => code,
    }
}

/// `nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)`.
///
/// # Safety
/// `index` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(
    device: DeviceHandle,
    index: *mut c_uint,
) -> NvmlReturn {
    with_device(device, |i, _| match c_uint::try_from(i) {
        // SAFETY: forwarded caller contract.
        Ok(i) => unsafe { write_out(index, i) },
        Err(_) => ERROR_UNKNOWN,
    })
}

/// `nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)`.
///
/// # Safety
/// `name` is null or valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: DeviceHandle,
    name: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    // SAFETY: forwarded caller contract.
    with_device(device, |_, g| unsafe { write_cstr(&g.name, name, length) })
}

/// `nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)`.
///
/// # Safety
/// `uuid` is null or valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: DeviceHandle,
    uuid: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    // SAFETY: forwarded caller contract.
    with_device(device, |_, g| unsafe { write_cstr(&g.uuid, uuid, length) })
}

/// `nvmlUtilization_t`: percentages over the last sample period.
#[repr(C)]
pub struct Utilization {
    pub gpu: c_uint,
    pub memory: c_uint,
}

/// `nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t, nvmlUtilization_t *)`.
///
/// # Safety
/// `utilization` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: DeviceHandle,
    utilization: *mut Utilization,
) -> NvmlReturn {
    with_device(device, |_, g| {
        let u = Utilization {
            gpu: g.sm_util,
            memory: g.mem_util,
        };
        // SAFETY: forwarded caller contract.
        unsafe { write_out(utilization, u) }
    })
}

/// `nvmlMemory_t` (v1).
#[repr(C)]
pub struct Memory {
    pub total: c_ulonglong,
    pub free: c_ulonglong,
    pub used: c_ulonglong,
}

/// `nvmlMemory_v2_t`; `version` must be `NVML_STRUCT_VERSION(Memory, 2)`.
#[repr(C)]
pub struct MemoryV2 {
    pub version: c_uint,
    pub total: c_ulonglong,
    pub reserved: c_ulonglong,
    pub free: c_ulonglong,
    pub used: c_ulonglong,
}

const MEMORY_V2_VERSION: c_uint = (std::mem::size_of::<MemoryV2>() | (2 << 24)) as c_uint;

/// `nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t, nvmlMemory_t *)`.
///
/// # Safety
/// `memory` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: DeviceHandle,
    memory: *mut Memory,
) -> NvmlReturn {
    with_device(device, |_, g| {
        let m = Memory {
            total: g.mem_total,
            free: g.mem_total.saturating_sub(g.mem_used),
            used: g.mem_used,
        };
        // SAFETY: forwarded caller contract.
        unsafe { write_out(memory, m) }
    })
}

/// `nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t, nvmlMemory_v2_t *)`.
///
/// # Safety
/// `memory` is null or valid for a read and a write of `nvmlMemory_v2_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: DeviceHandle,
    memory: *mut MemoryV2,
) -> NvmlReturn {
    if memory.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // Real NVML checks the caller's struct version before filling it in.
    // SAFETY: non-null and valid per the caller's contract.
    if unsafe { (*memory).version } != MEMORY_V2_VERSION {
        return ERROR_ARGUMENT_VERSION_MISMATCH;
    }
    with_device(device, |_, g| {
        let m = MemoryV2 {
            version: MEMORY_V2_VERSION,
            total: g.mem_total,
            reserved: 0,
            free: g.mem_total.saturating_sub(g.mem_used),
            used: g.mem_used,
        };
        // SAFETY: forwarded caller contract.
        unsafe { write_out(memory, m) }
    })
}

/// `nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t, unsigned int *power)`, milliwatts.
///
/// # Safety
/// `power` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(
    device: DeviceHandle,
    power: *mut c_uint,
) -> NvmlReturn {
    // SAFETY: forwarded caller contract.
    with_device(device, |_, g| unsafe { write_out(power, g.power_mw) })
}

/// `nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t, nvmlTemperatureSensors_t, unsigned int *)`.
/// Only the GPU die sensor exists.
///
/// # Safety
/// `temp` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: DeviceHandle,
    sensor: c_uint,
    temp: *mut c_uint,
) -> NvmlReturn {
    if sensor != TEMPERATURE_GPU {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: forwarded caller contract.
    with_device(device, |_, g| unsafe { write_out(temp, g.temperature_c) })
}

/// `nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t, unsigned long long *)`.
///
/// # Safety
/// `reasons` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksThrottleReasons(
    device: DeviceHandle,
    reasons: *mut c_ulonglong,
) -> NvmlReturn {
    // SAFETY: forwarded caller contract.
    with_device(device, |_, g| unsafe {
        write_out(reasons, g.throttle_reasons)
    })
}

/// `nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t, unsigned long long *)`,
/// the newer name for the same bits.
///
/// # Safety
/// `reasons` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksEventReasons(
    device: DeviceHandle,
    reasons: *mut c_ulonglong,
) -> NvmlReturn {
    // SAFETY: forwarded caller contract.
    with_device(device, |_, g| unsafe {
        write_out(reasons, g.throttle_reasons)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_bounds_checked() {
        let mut buf = [0x55 as c_char; 4];
        // SAFETY: buf is 4 bytes.
        assert_eq!(
            unsafe { write_cstr("abcd", buf.as_mut_ptr(), 4) },
            ERROR_INSUFFICIENT_SIZE
        );
        assert_eq!(buf, [0x55; 4], "a refused write leaves the buffer alone");
        // SAFETY: buf is 4 bytes.
        assert_eq!(unsafe { write_cstr("abc", buf.as_mut_ptr(), 4) }, SUCCESS);
        // SAFETY: write_cstr NUL-terminated it.
        assert_eq!(unsafe { CStr::from_ptr(buf.as_ptr()) }, c"abc");
        // SAFETY: null is allowed and refused.
        assert_eq!(
            unsafe { write_cstr("a", std::ptr::null_mut(), 4) },
            ERROR_INVALID_ARGUMENT
        );
    }

    #[test]
    fn memory_v2_version_matches_nvml_struct_version() {
        // NVML_STRUCT_VERSION(Memory, 2) on 64-bit: sizeof is 40.
        assert_eq!(MEMORY_V2_VERSION, 40 | (2 << 24));
    }

    #[test]
    fn bogus_handles_are_refused() {
        assert_eq!(
            with_device(std::ptr::null_mut(), |_, _| SUCCESS),
            ERROR_UNINITIALIZED
        );
    }
}
