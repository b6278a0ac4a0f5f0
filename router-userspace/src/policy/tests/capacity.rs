//! Capacity mode (least-loaded services): weights from the datapath's
//! measured speed, room from the queue, telemetry never raising either.

use super::*;

/// A replica as the datapath sees it: a fixed number of flows in flight,
/// each taking `secs_per_flow` on it.
struct Sim {
    b: B,
    in_flight: u64,
    secs_per_flow: f64,
    ended: f64,
}

impl Sim {
    fn new(name: &'static str, in_flight: u64, secs_per_flow: f64) -> Sim {
        Sim {
            b: B::new(name),
            in_flight,
            secs_per_flow,
            ended: 0.0,
        }
    }

    fn input(&self) -> BackendInput<'_> {
        BackendInput {
            measured: Some(Measured {
                in_flight: self.in_flight,
                ended: self.ended as u64,
            }),
            ..self.b.input()
        }
    }
}

fn capacity_policy() -> Policy {
    Policy::with_mode(no_slow_start(), Mode::Capacity)
}

/// Advances the sims one poll and ticks.
fn tick_sims(p: &mut Policy, n: u64, sims: &mut [Sim]) -> Tick {
    for s in sims.iter_mut() {
        s.ended += s.in_flight as f64 * POLL.as_secs_f64() / s.secs_per_flow;
    }
    let inputs: Vec<BackendInput<'_>> = sims.iter().map(Sim::input).collect();
    p.tick(at(n), &inputs)
}

#[test]
fn capacity_follows_the_measured_speed() {
    let mut p = capacity_policy();
    // gpu-2 takes 2.5 times as long per flow: speed 0.4.
    let mut sims = [
        Sim::new("gpu-0", 8, 0.5),
        Sim::new("gpu-1", 8, 0.5),
        Sim::new("gpu-2", 3, 1.25),
    ];
    let mut t = tick_sims(&mut p, 0, &mut sims);
    assert!(
        t.decisions.iter().all(|d| d.weight == 100),
        "unmeasured: all as fast as the fastest"
    );
    for n in 1..240 {
        t = tick_sims(&mut p, n, &mut sims);
    }
    let w: Vec<u32> = t.decisions.iter().map(|d| d.weight).collect();
    assert_eq!(&w[..2], &[100, 100]);
    assert!((35..=45).contains(&w[2]), "slow one at about 40: {w:?}");
    assert_eq!(t.decisions[2].reason.to_string(), "capacity: speed 0.40");
}

#[test]
fn measurement_noise_does_not_move_the_capacity() {
    let mut p = capacity_policy();
    let mut sims = [Sim::new("gpu-0", 8, 0.5), Sim::new("gpu-1", 8, 0.5)];
    for n in 0..120 {
        tick_sims(&mut p, n, &mut sims);
    }
    let mut changes = 0;
    let mut last = tick_sims(&mut p, 120, &mut sims).decisions[1].weight;
    // A minute of ±10% wobble in gpu-1's flow times (a deterministic zigzag).
    for n in 121..241 {
        sims[1].secs_per_flow = if n % 6 < 3 { 0.45 } else { 0.55 };
        let w = tick_sims(&mut p, n, &mut sims).decisions[1].weight;
        if w != last {
            changes += 1;
            last = w;
        }
    }
    assert_eq!(
        changes, 0,
        "weight moved {changes} times in a minute of noise"
    );
    // A real slowdown moves it.
    sims[1].secs_per_flow = 1.0;
    for n in 241..400 {
        last = tick_sims(&mut p, n, &mut sims).decisions[1].weight;
    }
    assert!((40..=60).contains(&last), "halved speed: {last}");
}

#[test]
fn telemetry_claiming_idle_does_not_raise_capacity() {
    let mut p = capacity_policy();
    let mut sims = [Sim::new("gpu-0", 8, 0.5), Sim::new("liar", 8, 2.0)];
    for n in 0..240 {
        // The liar says it is idle; its flows say it is four times slower.
        sims[1].b.read(n, 0.0);
        sims[0].b.read(n, 0.9);
        tick_sims(&mut p, n, &mut sims);
    }
    let t = tick_sims(&mut p, 240, &mut sims);
    assert!(
        t.decisions[1].weight <= 30,
        "liar got {}",
        t.decisions[1].weight
    );
    assert_eq!(t.decisions[0].weight, 100);
}

#[test]
fn room_is_the_batch_seen_full_or_the_configured_limit() {
    let mut p = capacity_policy();
    let mut sims = [Sim::new("gpu-0", 8, 0.5), Sim::new("gpu-1", 8, 0.5)];
    sims[1].b.latest = None;
    let busy = Reading {
        requests_running: Some(8.0),
        requests_waiting: Some(2.0),
        ..Reading::default()
    };
    let mut t = tick_sims(&mut p, 0, &mut sims);
    for n in 1..=4 {
        sims[0].b.latest = Some((at(n), busy.clone()));
        t = tick_sims(&mut p, n, &mut sims);
    }
    assert_eq!(
        t.decisions[0].max_in_flight, 8,
        "learned: 8 running and a queue through four polls"
    );
    assert_eq!(t.decisions[1].max_in_flight, 0, "nothing known: no limit");
    let mut fixed = capacity_policy();
    let b = B::new("gpu-0");
    let input = BackendInput {
        max_in_flight: Some(4),
        latest: Some((at(0), &busy)),
        ..b.input()
    };
    let t = fixed.tick(at(0), &[input]);
    assert_eq!(t.decisions[0].max_in_flight, 4, "the config wins");
}

#[test]
fn capacity_mode_keeps_pins_drains_and_health() {
    let mut p = capacity_policy();
    let mut sims = [
        Sim::new("pinned", 8, 0.5),
        Sim::new("drained", 8, 0.5),
        Sim::new("down", 8, 0.5),
    ];
    sims[0].b.pinned = Some(7);
    sims[1].b.drained = true;
    sims[2].b.healthy = false;
    let t = tick_sims(&mut p, 0, &mut sims);
    let w: Vec<u32> = t.decisions.iter().map(|d| d.weight).collect();
    assert_eq!(w, [7, 0, 0]);
}

#[test]
fn capacity_ramps_through_slow_start() {
    let mut p = Policy::with_mode(
        PolicyConfig {
            slow_start: Duration::from_secs(10),
            ..PolicyConfig::default()
        },
        Mode::Capacity,
    );
    let mut sims = [Sim::new("gpu-0", 8, 0.5)];
    let first = tick_sims(&mut p, 0, &mut sims).decisions[0].weight;
    assert_eq!(first, 2, "starts at the floor fraction of full");
    let mid = tick_sims(&mut p, 10, &mut sims).decisions[0].weight;
    assert_eq!(mid, 50, "halfway through the window");
    let done = tick_sims(&mut p, 20, &mut sims).decisions[0].weight;
    assert_eq!(done, 100);
}

#[test]
fn all_saturated_in_capacity_mode_keeps_capacities_and_reports_the_overflow() {
    let mut p = capacity_policy();
    let mut sims = [Sim::new("gpu-0", 8, 0.5), Sim::new("gpu-1", 8, 0.5)];
    let mut t = tick_sims(&mut p, 0, &mut sims);
    for n in 1..4 {
        for s in sims.iter_mut() {
            s.b.read(n, 1.0);
        }
        t = tick_sims(&mut p, n, &mut sims);
    }
    assert!(t.all_saturated);
    assert!(t.decisions.iter().all(|d| d.weight == 100 && d.saturated));
}

#[test]
fn telemetry_faults_leave_capacities_alone() {
    let mut p = capacity_policy();
    let mut sims = [Sim::new("gpu-0", 8, 0.5), Sim::new("gpu-1", 8, 1.0)];
    let mut t = tick_sims(&mut p, 0, &mut sims);
    for n in 1..200 {
        sims[0].b.read(n, 0.5);
        sims[1].b.read(n, 0.5);
        t = tick_sims(&mut p, n, &mut sims);
    }
    let before: Vec<u32> = t.decisions.iter().map(|d| d.weight).collect();
    assert_eq!(before[0], 100);
    assert!((40..=60).contains(&before[1]), "{before:?}");
    // gpu-1's telemetry goes silent for a minute: stale, never idle.
    for n in 200..320 {
        sims[0].b.read(n, 0.5);
        t = tick_sims(&mut p, n, &mut sims);
        let w: Vec<u32> = t.decisions.iter().map(|d| d.weight).collect();
        assert_eq!(w, before, "tick {n}: capacities moved with telemetry");
    }
}

impl Lcg {
    fn unit(&mut self) -> f64 {
        self.next() as f64 / (1u64 << 31) as f64
    }

    /// A Poisson draw of mean `m` (Knuth's method; small means only).
    fn poisson(&mut self, m: f64) -> u64 {
        let limit = (-m).exp();
        let (mut k, mut p) = (0, 1.0);
        loop {
            p *= self.unit();
            if p <= limit {
                return k;
            }
            k += 1;
        }
    }
}

#[test]
fn a_slow_replicas_thin_evidence_does_not_churn_its_capacity() {
    let mut p = capacity_policy();
    let mut rng = Lcg(7);
    // gpu-1 holds 1 to 3 flows of 1.25 s: under 2 completions a second,
    // each tick's count drawn at random, so its estimate is noisy.
    let mut sims = [Sim::new("gpu-0", 8, 0.5), Sim::new("gpu-1", 2, 1.25)];
    let mut changes = 0;
    let mut last = None;
    for n in 0..480 {
        sims[1].in_flight = 1 + (rng.unit() * 3.0) as u64;
        let mean = sims[1].in_flight as f64 * POLL.as_secs_f64() / sims[1].secs_per_flow;
        // tick_sims adds the expected completions; replace them with a draw.
        sims[1].ended -= mean;
        sims[1].ended += rng.poisson(mean) as f64;
        let w = tick_sims(&mut p, n, &mut sims).decisions[1].weight;
        if n >= 240 {
            if last.is_some_and(|l| l != w) {
                changes += 1;
            }
            last = Some(w);
        }
    }
    assert!(
        changes <= 2,
        "{changes} changes in two minutes at steady load"
    );
}

#[test]
fn reason_labels_stay_one_series_through_a_ramp_and_a_decay() {
    let mut p = Policy::new(PolicyConfig::default());
    let mut b = B::new("a");
    let mut shown = std::collections::BTreeSet::new();
    let mut labels = std::collections::BTreeSet::new();
    // A ramp, then silence long enough to decay.
    for n in 0..100 {
        let d = tick_one(&mut p, n, &mut b, 0.2);
        shown.insert(d.reason.to_string());
        labels.insert(d.reason.label());
    }
    for n in 100..400 {
        let d = tick(&mut p, n, std::slice::from_ref(&b))
            .decisions
            .remove(0);
        shown.insert(d.reason.to_string());
        labels.insert(d.reason.label());
    }
    assert!(shown.len() > 20, "the figures move: {shown:?}");
    assert!(
        labels.is_subset(&["headroom", "slow_start", "stale", "stale_decay"].into()),
        "{labels:?}"
    );
    assert!(labels.contains("slow_start") && labels.contains("stale_decay"));
    for l in labels {
        assert!(
            l.bytes().all(|c| c.is_ascii_lowercase() || c == b'_'),
            "{l}"
        );
    }
}
