//! Telemetry faults injected into a running daemon. One service's backends
//! each take their telemetry from a different source (a `router agent` on
//! the backend's host over the fake NVML, a stand-in agent or Prometheus
//! endpoint that can misbehave, or the daemon's own NVML), and each faulted
//! backend gets one fault while the daemon's own status is sampled every
//! 150 ms:
//!
//! - the faulted backend holds its weight while its last reading is fresh,
//!   then decays gradually to the quarter share (`stale_fraction` of full)
//!   over `stale_decay`, and is never treated as idle (never above what it
//!   had) nor as dead (never 0: it is healthy);
//! - the other backends keep their weights exactly;
//! - no healthy backend ever has weight 0, and the datapath's weights are
//!   the policy's;
//! - each failure is counted where it belongs (`errors` for a source that
//!   fails, `invalid` for garbage) and named in `last_error`;
//! - once the fault is removed the weight climbs back in bounded steps;
//! - the daemon answers throughout and exits cleanly on SIGTERM.
//!
//! Short policy timings (poll 200 ms, stale after 1 s, decay over 2 s) keep
//! each scenario to a few seconds. Each phase is bounded in the daemon's
//! policy ticks (`policy_ticks` in status), and gradualness is the
//! daemon's count of weight changes, so a busy machine slowing the daemon
//! or the sampler down fails nothing; the wall clock only bounds a daemon
//! that stopped ticking.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use router_testkit::{daemon_proc::policy_weights, fake_nvml::FakeError, netns};

#[path = "telemetry_faults/phases.rs"]
mod phases;
#[path = "telemetry_faults/rig.rs"]
mod rig;

use phases::{break_and_decay, heal_and_recover, stop};
use rig::{Counted, Fault, Rig, Source, faulty, steady};

const VIP: &str = "198.18.100.1:8000";
const SNAT: std::net::Ipv4Addr = netns::SNAT_ADDR;
/// Every telemetry endpoint listens on this port of its backend's host.
const TELEMETRY_PORT: u16 = 9400;
const TOKEN: &str = "fault-injection-token";

/// The daemon gives each poll 0.8 of this (160 ms) before counting a
/// timeout: the slow and hanging endpoints' faults are missing it. A
/// steady source that misses it now and then on a busy machine keeps its
/// weight (`check_invariants`); only five misses in a row (stale_after)
/// would move it.
const POLL: Duration = Duration::from_millis(200);
const STALE_AFTER: Duration = Duration::from_secs(1);
const STALE_DECAY: Duration = Duration::from_secs(2);
const SAMPLE_EVERY: Duration = Duration::from_millis(150);
/// Healthy load of every source (GPU utilization or KV-cache usage): the
/// weight settles near floor + (full − floor) × (0.8 − 0.2) / 0.8 ≈ 76,
/// far enough above the stale share for the decay to be seen.
const LOAD: f64 = 0.2;
/// `stale_fraction` (0.25) × full weight (100) at capacity 1.0: where an
/// unknown load ends up.
const STALE_SHARE: u32 = 25;
/// `weight_deadband` × full weight: a settled weight is within this of its
/// target, from whichever side it approached.
const DEADBAND: u32 = 10;

#[test]
fn nvml_errors_degrade_only_the_broken_gpu() {
    use FakeError::*;
    let cases = vec![
        steady("steady-agent", Source::Agent),
        steady("steady-local", Source::LocalNvml(0)),
        // A lost GPU stays lost until the fault is removed (a GPU that
        // fell off the bus comes back only after a reset).
        faulty(
            "agent-gpu-lost",
            Source::Agent,
            Fault::Nvml(GpuIsLost),
            Counted::Errors,
            "GPU is lost",
        ),
        faulty(
            "agent-nvml-timeout",
            Source::Agent,
            Fault::Nvml(Timeout),
            Counted::Errors,
            "utilization: timed out",
        ),
        faulty(
            "agent-nvml-unknown",
            Source::Agent,
            Fault::Nvml(Unknown),
            Counted::Errors,
            "unknown error",
        ),
        faulty(
            "agent-nvml-hung",
            Source::Agent,
            Fault::NvmlHang,
            Counted::Errors,
            "has not returned",
        ),
        faulty(
            "local-gpu-lost",
            Source::LocalNvml(1),
            Fault::Nvml(GpuIsLost),
            Counted::Errors,
            "GPU is lost",
        ),
        faulty(
            "local-nvml-timeout",
            Source::LocalNvml(2),
            Fault::Nvml(Timeout),
            Counted::Errors,
            "utilization: timed out",
        ),
        faulty(
            "local-nvml-unknown",
            Source::LocalNvml(3),
            Fault::Nvml(Unknown),
            Counted::Errors,
            "unknown error",
        ),
        faulty(
            "local-nvml-hung",
            Source::LocalNvml(4),
            Fault::NvmlHang,
            Counted::Errors,
            "has not returned",
        ),
    ];
    let mut rig = Rig::start("nvml", cases, false);
    let settled = rig.settle();
    let threads_before = rig.thread_counts();
    break_and_decay(&mut rig, &settled);
    // A hung NVML call cannot be cancelled; a poller that starts another
    // on every poll ends up with a thread per poll stuck in the driver
    // (more than 15 here), and in time with no threads left.
    let threads_during = rig.thread_counts();
    println!("threads before the faults {threads_before:?}, during {threads_during:?}");
    for (who, before) in &threads_before {
        let during = threads_during[who];
        assert!(
            during <= before + 4,
            "{who}: {before} threads before a GPU hung, {during} while it hung: \
             NVML calls pile up on the hung GPU"
        );
    }
    heal_and_recover(&mut rig, &settled);
    stop(rig);
}

#[test]
fn agents_and_prometheus_endpoints_that_fail_degrade_only_their_backend() {
    let cases = vec![
        steady("steady-agent", Source::Agent),
        steady("steady-prometheus", Source::Prometheus),
        faulty(
            "agent-down",
            Source::Agent,
            Fault::AgentDown,
            Counted::Errors,
            "Connection refused",
        ),
        // Answers, but long after the poll's deadline (0.8 × poll_interval).
        faulty(
            "agent-slow",
            Source::FakeAgent,
            Fault::Endpoint("slow 1000"),
            Counted::Errors,
            "timed out after",
        ),
        faulty(
            "agent-garbage",
            Source::FakeAgent,
            Fault::Endpoint("garbage"),
            Counted::Invalid,
            "expected a JSON object",
        ),
        faulty(
            "agent-invalid",
            Source::FakeAgent,
            Fault::Endpoint("invalid"),
            Counted::Invalid,
            "gpu_util is negative",
        ),
        // Accepts and reads the request, never answers.
        faulty(
            "prometheus-hang",
            Source::Prometheus,
            Fault::Endpoint("hang"),
            Counted::Errors,
            "timed out after",
        ),
        faulty(
            "prometheus-garbage",
            Source::Prometheus,
            Fault::Endpoint("garbage"),
            Counted::Invalid,
            "not UTF-8",
        ),
        faulty(
            "prometheus-invalid",
            Source::Prometheus,
            Fault::Endpoint("invalid"),
            Counted::Invalid,
            "above 100%",
        ),
    ];
    let mut rig = Rig::start("endpoints", cases, false);
    let settled = rig.settle();
    break_and_decay(&mut rig, &settled);
    heal_and_recover(&mut rig, &settled);
    stop(rig);
}

/// Every source fails at once: no backend's load is known, yet all are
/// healthy, so all keep the same conservative share and connections through
/// the VIP keep succeeding on every one of them.
#[test]
fn with_every_source_failing_traffic_still_spreads_over_all_backends() {
    let cases = vec![
        faulty(
            "agent-down",
            Source::Agent,
            Fault::AgentDown,
            Counted::Errors,
            "Connection refused",
        ),
        faulty(
            "agent-slow",
            Source::FakeAgent,
            Fault::Endpoint("slow 1000"),
            Counted::Errors,
            "timed out after",
        ),
        faulty(
            "prometheus-hang",
            Source::Prometheus,
            Fault::Endpoint("hang"),
            Counted::Errors,
            "timed out after",
        ),
        faulty(
            "prometheus-garbage",
            Source::Prometheus,
            Fault::Endpoint("garbage"),
            Counted::Invalid,
            "not UTF-8",
        ),
        faulty(
            "local-gpu-lost",
            Source::LocalNvml(0),
            Fault::Nvml(FakeError::GpuIsLost),
            Counted::Errors,
            "GPU is lost",
        ),
    ];
    let mut rig = Rig::start("all", cases, true);
    let settled = rig.settle();
    let st = break_and_decay(&mut rig, &settled);
    assert!(
        st.policy.iter().all(|p| p.weight == STALE_SHARE),
        "every backend should hold the same unknown-load share: {:?}",
        policy_weights(&st)
    );

    // 200 connections through the VIP, all answered, spread over every
    // backend (equal weights: 40 each expected; binomial σ ≈ 5.7).
    let vip: SocketAddr = VIP.parse().unwrap();
    let answers = netns::in_netns(rig.topo.client_ns(), || {
        (0..200)
            .map(|_| {
                netns::http_get(vip, "/", Duration::from_secs(5))
                    .expect("GET / through the VIP while all telemetry is down")
                    .body
            })
            .collect::<Vec<_>>()
    })
    .unwrap();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for body in answers {
        *counts.entry(body).or_default() += 1;
    }
    for case in &rig.cases {
        let n = counts.get(case.name).copied().unwrap_or(0);
        assert!(
            n >= 15,
            "{} answered {n} of 200 connections at an equal weight: {counts:?}",
            case.name
        );
    }
    let st = rig.status();
    rig.check_invariants(&st, &settled, "after the traffic");

    heal_and_recover(&mut rig, &settled);
    stop(rig);
}
