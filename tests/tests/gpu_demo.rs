//! `cargo xtask demo`, non-interactively and for a bounded time, as a
//! newcomer would see it: the saturated replica's share of new connections
//! must fall and the cold replica must ramp in (the demo's `--check`).

use std::process::Command;

#[test]
fn the_demo_shows_traffic_leaving_the_saturated_replica() {
    let out = Command::new(env!("CARGO_BIN_EXE_gpu_demo"))
        .args(["--plain", "--check", "--duration", "40s"])
        .output()
        .expect("running the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("gpu-0 saturates"), "{stdout}");
    assert!(stdout.contains("gpu-3 comes up cold"), "{stdout}");
    assert!(
        stdout.contains("TTFB P99"),
        "the backends table is printed: {stdout}"
    );
    assert!(stdout.contains("check passed"), "{stdout}");
    assert!(
        stdout.contains("errors 0"),
        "no failed completion: {stdout}"
    );
}
