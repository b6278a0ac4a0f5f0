//! NVML telemetry against the real nvml-wrapper and the fake libnvidia-ml
//! (tests/fake-nvml): values, device selection, injected driver errors,
//! a missing library, a state change between polls, and a hung GPU.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use router::telemetry::{DeviceSelector, Reading, TelemetryError, nvml::NvmlSource};
use router_testkit::fake_nvml::{FakeError, FakeGpu, FakeGpuState, FakeNvml};

fn busy_gpu() -> FakeGpu {
    FakeGpu {
        sm_util: 83,
        mem_util: 45,
        mem_used: 60_000_000_000,
        mem_total: 80_000_000_000,
        power_mw: 612_500,
        temperature_c: 74,
        // SW power cap | HW slowdown.
        throttle_reasons: 0x4 | 0x8,
        ..FakeGpu::new(1)
    }
}

fn expected(g: &FakeGpu) -> Reading {
    Reading {
        gpu_util: Some(f64::from(g.sm_util) / 100.0),
        mem_util: Some(f64::from(g.mem_util) / 100.0),
        mem_used_bytes: Some(g.mem_used as f64),
        mem_total_bytes: Some(g.mem_total as f64),
        power_watts: Some(f64::from(g.power_mw) / 1000.0),
        temperature_c: Some(f64::from(g.temperature_c)),
        throttle_reasons: Some(g.throttle_reasons),
        ..Reading::default()
    }
}

fn two_gpus() -> FakeGpuState {
    FakeGpuState {
        init_error: None,
        devices: vec![FakeGpu::new(0), busy_gpu()],
    }
}

fn nvml_error(r: Result<impl std::fmt::Debug, TelemetryError>) -> String {
    match r {
        Err(TelemetryError::Nvml(msg)) => msg,
        other => panic!("expected an NVML error, got {other:?}"),
    }
}

#[test]
fn readings_equal_the_state_file_by_index_and_by_uuid() {
    let fake = FakeNvml::acquire(&two_gpus()).unwrap();
    let by_index = NvmlSource::open(Some(fake.library()), DeviceSelector::Index(1)).unwrap();
    assert_eq!(by_index.read().unwrap(), expected(&busy_gpu()));
    let by_uuid =
        NvmlSource::open(Some(fake.library()), DeviceSelector::Uuid(busy_gpu().uuid)).unwrap();
    assert_eq!(by_uuid.read().unwrap(), expected(&busy_gpu()));
    let first = NvmlSource::open(Some(fake.library()), DeviceSelector::Index(0)).unwrap();
    assert_eq!(first.read().unwrap(), expected(&FakeGpu::new(0)));
}

#[test]
fn a_changed_state_file_changes_the_next_reading() {
    let fake = FakeNvml::acquire(&two_gpus()).unwrap();
    let src = NvmlSource::open(Some(fake.library()), DeviceSelector::Index(0)).unwrap();
    assert_eq!(src.read().unwrap().gpu_util, Some(0.37));
    let mut state = two_gpus();
    state.devices[0].sm_util = 99;
    state.devices[0].temperature_c = 88;
    fake.set(&state).unwrap();
    let r = src.read().unwrap();
    assert_eq!(r.gpu_util, Some(0.99));
    assert_eq!(r.temperature_c, Some(88.0));
}

#[test]
fn injected_device_errors_name_the_gpu() {
    let fake = FakeNvml::acquire(&two_gpus()).unwrap();
    let by_index = NvmlSource::open(Some(fake.library()), DeviceSelector::Index(0)).unwrap();
    let by_uuid =
        NvmlSource::open(Some(fake.library()), DeviceSelector::Uuid(busy_gpu().uuid)).unwrap();
    for (error, words) in [
        (FakeError::GpuIsLost, "GPU is lost"),
        (FakeError::Timeout, "timed out"),
        (FakeError::Unknown, "unknown error"),
    ] {
        let mut state = two_gpus();
        for d in &mut state.devices {
            d.error = Some(error);
        }
        fake.set(&state).unwrap();
        let msg = nvml_error(by_index.read());
        assert!(
            msg.starts_with("GPU 0 (GPU-00000000-0000-0000-0000-000000000000): ")
                && msg.contains(words),
            "{error:?}: {msg}"
        );
        let msg = nvml_error(by_uuid.read());
        assert!(
            msg.starts_with("GPU 1 (GPU-00000001-0000-0000-0000-000000000000): ")
                && msg.contains(words),
            "{error:?}: {msg}"
        );
    }
    // Recovery: the next healthy poll reads again.
    fake.set(&two_gpus()).unwrap();
    assert!(by_index.read().is_ok());
}

#[test]
fn injected_init_errors_fail_open() {
    let fake = FakeNvml::acquire(&two_gpus()).unwrap();
    for (error, words) in [
        (FakeError::GpuIsLost, "GPU is lost"),
        (FakeError::Timeout, "timed out"),
        (FakeError::Unknown, "unknown error"),
    ] {
        let state = FakeGpuState {
            init_error: Some(error),
            ..two_gpus()
        };
        fake.set(&state).unwrap();
        let msg = nvml_error(NvmlSource::open(
            Some(fake.library()),
            DeviceSelector::Index(0),
        ));
        assert!(
            msg.contains("initializing NVML from")
                && msg.contains(&fake.library().display().to_string())
                && msg.contains(words),
            "{error:?}: {msg}"
        );
    }
}

#[test]
fn a_missing_state_file_fails_init() {
    let fake = FakeNvml::acquire(&two_gpus()).unwrap();
    fake.remove_state().unwrap();
    let msg = nvml_error(NvmlSource::open(
        Some(fake.library()),
        DeviceSelector::Index(0),
    ));
    assert!(msg.contains("unknown error"), "{msg}");
}

#[test]
fn unknown_gpus_are_refused_at_open() {
    let fake = FakeNvml::acquire(&two_gpus()).unwrap();
    let msg = nvml_error(NvmlSource::open(
        Some(fake.library()),
        DeviceSelector::Index(2),
    ));
    assert_eq!(msg, "GPU 2: no such GPU (2 GPUs present)");
    let msg = nvml_error(NvmlSource::open(
        Some(fake.library()),
        DeviceSelector::Uuid("GPU-nope".into()),
    ));
    assert_eq!(msg, "GPU GPU-nope: no such GPU (2 GPUs present)");
}

#[test]
fn a_missing_library_is_named() {
    let missing = Path::new("/nonexistent/libnvidia-ml.so.1");
    let msg = nvml_error(NvmlSource::open(Some(missing), DeviceSelector::Index(0)));
    assert!(
        msg.starts_with("cannot load NVML library /nonexistent/libnvidia-ml.so.1: "),
        "{msg}"
    );
}

#[test]
fn a_library_that_is_not_nvml_is_named() {
    // libc loads fine but has no nvmlInit_v2.
    let libc = Path::new("libc.so.6");
    let msg = nvml_error(NvmlSource::open(Some(libc), DeviceSelector::Index(0)));
    assert!(
        msg.starts_with("libc.so.6 is not a usable NVML library"),
        "{msg}"
    );
}

#[test]
fn a_hung_gpu_blocks_one_read_and_refuses_the_next() {
    let fake = FakeNvml::acquire(&two_gpus()).unwrap();
    let hung = Arc::new(NvmlSource::open(Some(fake.library()), DeviceSelector::Index(0)).unwrap());
    let other = NvmlSource::with_library(hung.library().clone(), DeviceSelector::Index(1)).unwrap();
    let mut state = two_gpus();
    state.devices[0].hang = true;
    fake.set(&state).unwrap();

    // Reads from threads, as a poller would run them, until one is refused
    // at once: the first to reach the driver blocks there (a poller would
    // give up on it and move on; its thread stays stuck).
    let spawn_read = || {
        let hung = hung.clone();
        std::thread::spawn(move || hung.read())
    };
    let mut readers = Vec::new();
    // A hang guard: a read refused at once but slower than the 100 ms
    // look only adds a reader here, which then finishes on its own.
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let probe = spawn_read();
        std::thread::sleep(Duration::from_millis(100));
        if probe.is_finished() {
            break probe.join().unwrap();
        }
        readers.push(probe);
        assert!(
            Instant::now() < deadline,
            "every read of the hung GPU blocks"
        );
    };
    let msg = nvml_error(refused);
    assert!(
        msg.starts_with("GPU 0 (GPU-00000000-0000-0000-0000-000000000000): ")
            && msg.contains("has not returned"),
        "{msg}"
    );
    // Refused again and again without touching the driver: a read that
    // reached it would block there until the GPU recovers below, so these
    // returning at all is the proof. The deadline only keeps a read that
    // did block from hanging the test; it is no speed limit.
    let again = {
        let hung = hung.clone();
        std::thread::spawn(move || (0..20).map(|_| nvml_error(hung.read())).collect::<Vec<_>>())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !again.is_finished() {
        assert!(
            Instant::now() < deadline,
            "a read of the hung GPU went to the driver and blocked"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let again = again.join().unwrap();
    assert!(
        again.iter().all(|m| m.contains("has not returned")),
        "{again:?}"
    );
    // Another GPU on the same library is not held up.
    assert_eq!(other.read().unwrap(), expected(&busy_gpu()));
    // One thread is in the driver; every other read was refused.
    assert_eq!(
        readers.iter().filter(|r| !r.is_finished()).count(),
        1,
        "exactly one read is stuck in the driver"
    );

    // The driver recovers: the stuck read returns and reads work again.
    fake.set(&two_gpus()).unwrap();
    let returned: Vec<_> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    assert_eq!(
        returned.iter().filter(|r| r.is_ok()).count(),
        1,
        "{returned:?}"
    );
    assert_eq!(hung.read().unwrap(), expected(&FakeGpu::new(0)));
}
