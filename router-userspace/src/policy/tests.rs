use super::*;

const POLL: Duration = Duration::from_millis(500);

fn at(tick: u64) -> Duration {
    POLL * u32::try_from(tick).expect("small tick")
}

fn util(x: f64) -> Reading {
    Reading {
        gpu_util: Some(x),
        ..Reading::default()
    }
}

/// A backend as a test drives it; `inputs` borrows these.
#[derive(Clone, Debug)]
struct B {
    name: &'static str,
    capacity: f64,
    pinned: Option<u32>,
    drained: bool,
    healthy: bool,
    latest: Option<(Duration, Reading)>,
}

impl B {
    fn new(name: &'static str) -> B {
        B {
            name,
            capacity: 1.0,
            pinned: None,
            drained: false,
            healthy: true,
            latest: None,
        }
    }

    /// Sets a reading taken at `tick`.
    fn read(&mut self, tick: u64, load: f64) -> &mut B {
        self.latest = Some((at(tick), util(load)));
        self
    }

    fn input(&self) -> BackendInput<'_> {
        BackendInput {
            name: self.name,
            capacity: self.capacity,
            pinned_weight: self.pinned,
            drained: self.drained,
            healthy: self.healthy,
            latest: self.latest.as_ref().map(|(t, r)| (*t, r)),
            measured: None,
            max_in_flight: None,
        }
    }
}

fn tick(p: &mut Policy, n: u64, bs: &[B]) -> Tick {
    let inputs: Vec<BackendInput<'_>> = bs.iter().map(B::input).collect();
    p.tick(at(n), &inputs)
}

/// Ticks a single backend that reports `load` fresh every tick.
fn tick_one(p: &mut Policy, n: u64, b: &mut B, load: f64) -> Decision {
    b.read(n, load);
    tick(p, n, std::slice::from_ref(b)).decisions.remove(0)
}

fn no_slow_start() -> PolicyConfig {
    PolicyConfig {
        slow_start: Duration::ZERO,
        ..PolicyConfig::default()
    }
}

/// A policy where `b` has settled at `load` (EWMA converged, slow start over).
fn settled(cfg: PolicyConfig, b: &mut B, load: f64) -> (Policy, u64) {
    let mut p = Policy::new(cfg);
    for n in 0..200 {
        tick_one(&mut p, n, b, load);
    }
    (p, 200)
}

#[test]
fn defaults_are_sane() {
    let c = PolicyConfig::default();
    assert!(0.0 < c.target_utilization && c.target_utilization < c.saturation);
    assert!(c.saturation - c.hysteresis > c.target_utilization);
    assert_eq!(c.full(1.0), 100);
    assert_eq!(c.floor(1.0), 2);
    assert_eq!(c.unknown(1.0), 25);
    assert_eq!(c.full(2.5), 250);
    assert_eq!(c.floor(0.01), 1, "the floor is never 0");
    assert_eq!(c.full(f64::NAN), 1);
}

#[test]
fn weight_follows_headroom_and_capacity() {
    let cfg = no_slow_start();
    for (load, cap, want) in [
        (0.0, 1.0, 100),
        (0.4, 1.0, 51), // 2 + 98 × 0.5
        (0.8, 1.0, 2),
        (0.9, 1.0, 2),
        (0.0, 2.0, 200),
        (0.4, 2.0, 102),
    ] {
        let mut b = B::new("a");
        b.capacity = cap;
        let (mut p, n) = settled(cfg.clone(), &mut b, load);
        let d = tick_one(&mut p, n, &mut b, load);
        assert_eq!(d.weight, want, "load {load} capacity {cap}: {d:?}");
        assert_eq!(d.reason, Reason::Headroom);
        assert!(!d.saturated);
    }
}

#[test]
fn only_new_readings_move_the_ewma() {
    let mut p = Policy::new(no_slow_start());
    let mut b = B::new("a");
    let first = tick_one(&mut p, 0, &mut b, 0.2);
    assert_eq!(first.load, Some(0.2), "the first reading seeds the EWMA");
    b.read(1, 0.6);
    let once = tick(&mut p, 1, std::slice::from_ref(&b)).decisions[0].load;
    // Same reading (same timestamp) on later ticks changes nothing.
    for n in 2..5 {
        let again = tick(&mut p, n, std::slice::from_ref(&b)).decisions[0].load;
        assert_eq!(again, once);
    }
    let want = 0.3 * 0.6 + 0.7 * 0.2;
    assert!((once.unwrap_or(0.0) - want).abs() < 1e-12, "{once:?}");
    // An older timestamp is not new either.
    b.latest = Some((at(0), util(1.0)));
    assert_eq!(
        tick(&mut p, 5, std::slice::from_ref(&b)).decisions[0].load,
        once
    );
}

#[test]
fn saturation_has_hysteresis_and_a_probe_floor() {
    let mut b = B::new("a");
    let (mut p, mut n) = settled(no_slow_start(), &mut b, 0.5);
    // Two raw readings at/above saturation.
    assert!(!tick_one(&mut p, n, &mut b, 0.97).saturated);
    n += 1;
    let d = tick_one(&mut p, n, &mut b, 0.97);
    n += 1;
    assert!(d.saturated);
    // Alone, a saturated backend is also the all-saturated case.
    assert_eq!((d.weight, d.reason), (2, Reason::AllSaturatedSpread));
    // Between saturation - hysteresis and saturation: stays saturated.
    for _ in 0..20 {
        let d = tick_one(&mut p, n, &mut b, 0.92);
        n += 1;
        assert!(d.saturated, "{d:?}");
        assert_eq!(d.weight, 2);
    }
    // Below 0.90 raw and smoothed: leaves saturation.
    let d = tick_one(&mut p, n, &mut b, 0.5);
    n += 1;
    assert!(!d.saturated, "smoothed {:?}", d.load);
    assert_eq!(d.reason, Reason::Headroom);
    let d = tick_one(&mut p, n, &mut b, 0.5);
    assert!(d.weight > 2);
}

#[test]
fn a_single_spike_does_not_saturate() {
    let mut b = B::new("a");
    let (mut p, n) = settled(no_slow_start(), &mut b, 0.3);
    let d = tick_one(&mut p, n, &mut b, 1.0);
    assert!(!d.saturated);
    let d = tick_one(&mut p, n + 1, &mut b, 0.3);
    assert!(!d.saturated);
    assert_eq!(d.reason, Reason::Headroom);
}

#[test]
fn smoothed_load_at_saturation_saturates_at_once() {
    let mut p = Policy::new(no_slow_start());
    let mut b = B::new("a");
    // First reading seeds the EWMA at 0.99.
    let d = tick_one(&mut p, 0, &mut b, 0.99);
    assert!(d.saturated);
    assert_eq!(d.weight, 2);
}

#[test]
fn steps_are_bounded_except_to_zero_pinned_and_saturation() {
    let mut b = B::new("a");
    let cfg = PolicyConfig {
        // The step bound alone; damping is tested on its own.
        weight_gain: 1.0,
        weight_deadband: 0.0,
        ..no_slow_start()
    };
    let (mut p, mut n) = settled(cfg, &mut b, 0.8);
    assert_eq!(tick_one(&mut p, n, &mut b, 0.8).weight, 2);
    n += 1;
    // Load vanishes: the weight climbs 25 (0.25 × 100) per tick.
    let mut last = 2;
    let mut seen = vec![];
    for _ in 0..10 {
        let d = tick_one(&mut p, n, &mut b, 0.0);
        n += 1;
        assert!(d.weight - last <= 25, "{last} -> {}", d.weight);
        seen.push(d.weight);
        last = d.weight;
    }
    assert_eq!(seen[0], 27);
    // Load back to 0.8 (not saturated): down by at most 25 per tick.
    let d = tick_one(&mut p, n + 1, &mut b, 0.8);
    assert!(last - d.weight <= 25);
    assert!(d.step_limited);
    n += 2;
    // Unhealthy: 0 at once.
    b.healthy = false;
    let d = tick_one(&mut p, n, &mut b, 0.0);
    assert_eq!((d.weight, d.reason), (0, Reason::Unhealthy));
    // Pinned: at once, whatever the previous weight.
    b.healthy = true;
    b.pinned = Some(900);
    let d = tick_one(&mut p, n + 1, &mut b, 0.0);
    assert_eq!((d.weight, d.reason), (900, Reason::Pinned));
    // Unpinned: steps down from 900, not a jump.
    b.pinned = None;
    let d = tick_one(&mut p, n + 2, &mut b, 0.0);
    assert_eq!(d.weight, 875);
}

#[test]
fn saturation_cuts_immediately_from_full() {
    let mut b = B::new("a");
    let (mut p, n) = settled(no_slow_start(), &mut b, 0.0);
    let d0 = tick_one(&mut p, n, &mut b, 0.0);
    assert_eq!(d0.weight, 100);
    let d1 = tick_one(&mut p, n + 1, &mut b, 1.0);
    assert_eq!(d1.weight, 75, "first high reading: EWMA and step");
    let d2 = tick_one(&mut p, n + 2, &mut b, 1.0);
    assert_eq!((d2.weight, d2.saturated), (2, true));
}

/// Product requirement: degrading one replica cuts its share of new
/// connections within 2 poll intervals.
#[test]
fn reaction_within_two_ticks() {
    let cfg = PolicyConfig::default();
    let mut a = B::new("a");
    let mut other = B::new("b");
    let mut p = Policy::new(cfg);
    let mut n = 0;
    for _ in 0..200 {
        a.read(n, 0.3);
        other.read(n, 0.3);
        tick(&mut p, n, &[a.clone(), other.clone()]);
        n += 1;
    }
    a.read(n, 0.3);
    other.read(n, 0.3);
    let before = tick(&mut p, n, &[a.clone(), other.clone()]).decisions;
    let share = |d: &[Decision]| f64::from(d[0].weight) / f64::from(d[0].weight + d[1].weight);
    let share_before = share(&before);
    // 63 is the exact headroom weight; the deadband (10) may stop short.
    assert!(before[0].weight.abs_diff(63) < 10, "{before:?}");
    assert!((share_before - 0.5).abs() < 1e-9);

    // 30% -> 100%.
    let mut after = vec![];
    for k in 1..=2 {
        a.read(n + k, 1.0);
        other.read(n + k, 0.3);
        after.push(tick(&mut p, n + k, &[a.clone(), other.clone()]).decisions);
    }
    assert!(
        after[0][0].weight < before[0].weight,
        "EWMA cuts on the first poll: {:?}",
        after[0][0]
    );
    assert_eq!(after[1][0].weight, 2, "saturated by the second poll");
    assert_eq!(after[1][0].reason, Reason::Saturated);
    assert!(share(&after[1]) < 0.05, "{}", share(&after[1]));

    // 30% -> 90% (not saturated) also at least halves within 2 ticks.
    let mut c = B::new("c");
    let (mut p, n) = settled(PolicyConfig::default(), &mut c, 0.3);
    let w0 = tick_one(&mut p, n, &mut c, 0.3).weight;
    tick_one(&mut p, n + 1, &mut c, 0.9);
    let w2 = tick_one(&mut p, n + 2, &mut c, 0.9).weight;
    assert!(w2 * 2 <= w0, "{w0} -> {w2}");
}

#[test]
fn slow_start_counts_from_readiness() {
    let cfg = PolicyConfig {
        // Exact ramp values below; damping is tested on its own.
        weight_gain: 1.0,
        weight_deadband: 0.0,
        ..PolicyConfig::default()
    };
    let mut p = Policy::new(cfg);
    let mut b = B::new("a");
    // Healthy for 20 s but no telemetry: conservative share, no ramp yet.
    for n in 0..40 {
        let d = tick(&mut p, n, std::slice::from_ref(&b))
            .decisions
            .remove(0);
        assert_eq!((d.weight, d.reason), (25, Reason::NoTelemetry));
    }
    // Ready at tick 40: the window (60 ticks) starts now, from the floor.
    let d = tick_one(&mut p, 40, &mut b, 0.0);
    assert_eq!(d.reason, Reason::SlowStart { progress: 0.0 });
    assert_eq!(d.weight, 2);
    let d = tick_one(&mut p, 70, &mut b, 0.0);
    assert_eq!(d.reason, Reason::SlowStart { progress: 0.5 });
    assert_eq!(d.target, 50);
    let mut last = d.weight;
    for n in 71..100 {
        let d = tick_one(&mut p, n, &mut b, 0.0);
        assert!(d.weight >= last, "ramp only rises");
        last = d.weight;
    }
    let d = tick_one(&mut p, 100, &mut b, 0.0);
    assert_eq!((d.weight, d.reason), (100, Reason::Headroom));
    assert_eq!(
        format!("{}", Reason::SlowStart { progress: 0.5 }),
        "slow start 50%"
    );
}

#[test]
fn slow_start_aggression_ramps_faster() {
    let mut weights = vec![];
    for aggression in [1.0, 3.0] {
        let cfg = PolicyConfig {
            slow_start_aggression: aggression,
            ..PolicyConfig::default()
        };
        let mut p = Policy::new(cfg);
        let mut b = B::new("a");
        let mut w = 0;
        for n in 0..12 {
            w = tick_one(&mut p, n, &mut b, 0.0).weight;
        }
        weights.push(w);
    }
    assert!(weights[1] > weights[0], "{weights:?}");
}

#[test]
fn recovered_and_undrained_backends_slow_start_again() {
    let mut b = B::new("a");
    let (mut p, mut n) = settled(PolicyConfig::default(), &mut b, 0.0);
    assert_eq!(tick_one(&mut p, n, &mut b, 0.0).weight, 100);
    n += 1;
    b.healthy = false;
    let d = tick_one(&mut p, n, &mut b, 0.9);
    assert_eq!((d.weight, d.reason, d.load), (0, Reason::Unhealthy, None));
    n += 1;
    b.healthy = true;
    let d = tick_one(&mut p, n, &mut b, 0.0);
    assert_eq!((d.weight, d.load), (2, Some(0.0)), "EWMA reseeded: {d:?}");
    assert!(matches!(d.reason, Reason::SlowStart { .. }));
    for k in 1..=60 {
        tick_one(&mut p, n + k, &mut b, 0.0);
    }
    n += 61;
    b.drained = true;
    let d = tick_one(&mut p, n, &mut b, 0.0);
    assert_eq!((d.weight, d.reason), (0, Reason::Drained));
    b.drained = false;
    let d = tick_one(&mut p, n + 1, &mut b, 0.0);
    assert_eq!(d.weight, 2);
    assert!(matches!(d.reason, Reason::SlowStart { .. }));
}

#[test]
fn recovered_without_fresh_telemetry_holds_the_floor() {
    let mut b = B::new("a");
    let (mut p, n) = settled(no_slow_start(), &mut b, 0.0);
    b.healthy = false;
    tick(&mut p, n, std::slice::from_ref(&b));
    b.healthy = true;
    // The last reading is older than stale_after.
    b.latest = Some((at(n - 20), util(0.0)));
    let d = tick(&mut p, n + 1, std::slice::from_ref(&b))
        .decisions
        .remove(0);
    assert!(d.stale);
    assert_eq!(d.weight, 2);
}

#[test]
fn stale_holds_then_decays_never_idle() {
    let cfg = PolicyConfig {
        weight_gain: 1.0,
        weight_deadband: 0.0,
        ..no_slow_start()
    };
    let mut b = B::new("a");
    let (mut p, n) = settled(cfg, &mut b, 0.16);
    let d = tick_one(&mut p, n, &mut b, 0.16);
    assert_eq!(d.weight, 80);
    // Readings stop. Before stale_after (6 ticks) the weight holds.
    for k in 1..6 {
        let d = tick(&mut p, n + k, std::slice::from_ref(&b))
            .decisions
            .remove(0);
        assert_eq!((d.weight, d.reason, d.stale), (80, Reason::Headroom, false));
    }
    // Stale from tick n+6: linear decay over 10 s (20 ticks) to 25.
    let d = tick(&mut p, n + 6, std::slice::from_ref(&b))
        .decisions
        .remove(0);
    assert!(d.stale);
    assert_eq!(
        (d.weight, d.reason),
        (80, Reason::StaleDecay { progress: 0.0 })
    );
    for k in 7..16 {
        tick(&mut p, n + k, std::slice::from_ref(&b));
    }
    let d = tick(&mut p, n + 16, std::slice::from_ref(&b))
        .decisions
        .remove(0);
    assert_eq!(d.weight, 53, "halfway from 80 to 25 (rounded): {d:?}");
    for k in 17..40 {
        let d = tick(&mut p, n + k, std::slice::from_ref(&b))
            .decisions
            .remove(0);
        assert!(d.weight <= 53);
    }
    let d = tick(&mut p, n + 40, std::slice::from_ref(&b))
        .decisions
        .remove(0);
    assert_eq!((d.weight, d.reason), (25, Reason::Stale));
    assert_eq!(d.reason.to_string(), "telemetry stale");
    // Fresh again: back to headroom, stepping.
    let d = tick_one(&mut p, n + 41, &mut b, 0.16);
    assert!(!d.stale);
    assert_eq!(d.weight, 50);
}

#[test]
fn stale_saturated_backend_stays_at_floor() {
    let mut b = B::new("a");
    let (mut p, n) = settled(no_slow_start(), &mut b, 1.0);
    for k in 0..60 {
        let d = tick(&mut p, n + k, std::slice::from_ref(&b))
            .decisions
            .remove(0);
        assert_eq!(d.weight, 2, "tick {k}: {d:?}");
    }
}

#[test]
fn never_reported_gets_conservative_share() {
    let mut p = Policy::new(no_slow_start());
    let mut b = B::new("a");
    b.capacity = 2.0;
    let d = tick(&mut p, 0, std::slice::from_ref(&b))
        .decisions
        .remove(0);
    assert_eq!(
        (d.weight, d.reason, d.stale),
        (50, Reason::NoTelemetry, false)
    );
    // A reading without any enabled signal does not count as telemetry.
    b.latest = Some((
        at(1),
        Reading {
            power_watts: Some(200.0),
            ..Reading::default()
        },
    ));
    let d = tick(&mut p, 1, std::slice::from_ref(&b))
        .decisions
        .remove(0);
    assert_eq!(d.reason, Reason::NoTelemetry);
}

#[test]
fn overrides_and_health_precedence() {
    let mut p = Policy::new(no_slow_start());
    let mut b = B::new("a");
    b.read(0, 0.99);
    b.pinned = Some(7);
    let d = tick(&mut p, 0, std::slice::from_ref(&b))
        .decisions
        .remove(0);
    assert_eq!(
        (d.weight, d.reason),
        (7, Reason::Pinned),
        "pinned beats telemetry"
    );
    b.healthy = false;
    let d = tick(&mut p, 1, std::slice::from_ref(&b))
        .decisions
        .remove(0);
    assert_eq!(
        (d.weight, d.reason),
        (0, Reason::Unhealthy),
        "health beats pin"
    );
    b.healthy = true;
    b.drained = true;
    let d = tick(&mut p, 2, std::slice::from_ref(&b))
        .decisions
        .remove(0);
    assert_eq!(
        (d.weight, d.reason),
        (0, Reason::Drained),
        "drain beats pin"
    );
}

#[test]
fn all_saturated_spreads_at_floor_and_flags() {
    let mut p = Policy::new(no_slow_start());
    let mut bs = [B::new("a"), B::new("b"), B::new("c")];
    bs[1].capacity = 2.0;
    bs[2].healthy = false;
    let mut t = None;
    for n in 0..5 {
        for b in &mut bs {
            b.read(n, 1.0);
        }
        t = Some(tick(&mut p, n, &bs));
    }
    let t = t.expect("ticked");
    assert!(t.all_saturated);
    let w: Vec<(u32, Reason)> = t.decisions.iter().map(|d| (d.weight, d.reason)).collect();
    assert_eq!(
        w,
        [
            (2, Reason::AllSaturatedSpread),
            (4, Reason::AllSaturatedSpread),
            (0, Reason::Unhealthy)
        ]
    );
    // One recovers: no longer all saturated.
    bs[0].read(5, 0.1);
    bs[0].read(6, 0.1);
    tick(&mut p, 5, &bs);
    bs[0].read(6, 0.1);
    let t = tick(&mut p, 6, &bs);
    assert!(!t.all_saturated);
    assert_eq!(t.decisions[1].reason, Reason::Saturated);
}

/// Tiny deterministic generator so the property test needs no crate.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A random scenario: per tick, per backend, random health, drain, pin,
/// reading presence and load.
fn scenario(seed: u64, ticks: u64) -> Vec<Vec<B>> {
    let mut rng = Lcg(seed);
    let names = ["a", "b", "c", "d"];
    let mut bs: Vec<B> = names.iter().map(|n| B::new(n)).collect();
    let mut out = vec![];
    for n in 0..ticks {
        for b in &mut bs {
            b.healthy = rng.below(10) != 0;
            b.drained = rng.below(20) == 0;
            b.pinned = (rng.below(15) == 0).then(|| u32::try_from(rng.below(3)).unwrap_or(0));
            b.capacity = [0.5, 1.0, 2.0][usize::try_from(rng.below(3)).unwrap_or(0)];
            if rng.below(4) != 0 {
                let load = rng.below(101) as f64 / 100.0;
                b.read(n, load);
            }
        }
        out.push(bs.clone());
    }
    out
}

#[test]
fn never_all_zero_while_a_backend_can_take_traffic() {
    for seed in 0..50 {
        let mut p = Policy::new(PolicyConfig::default());
        for (n, bs) in scenario(seed, 200).iter().enumerate() {
            let t = tick(&mut p, n as u64, bs);
            for (d, b) in t.decisions.iter().zip(bs) {
                let can = b.healthy && !b.drained && b.pinned.is_none();
                assert!(!can || d.weight >= 1, "seed {seed} tick {n}: {d:?}");
                if !b.healthy || b.drained {
                    assert_eq!(d.weight, 0);
                }
            }
        }
    }
}

#[test]
fn deterministic_and_order_independent() {
    for seed in 0..20 {
        let script = scenario(seed, 150);
        let mut p1 = Policy::new(PolicyConfig::default());
        let mut p2 = Policy::new(PolicyConfig::default());
        let mut p3 = Policy::new(PolicyConfig::default());
        let mut rng = Lcg(seed ^ 0xabcdef);
        for (n, bs) in script.iter().enumerate() {
            let n = n as u64;
            let t1 = tick(&mut p1, n, bs);
            let t2 = tick(&mut p2, n, bs);
            assert_eq!(t1, t2, "same inputs, same outputs");
            let mut shuffled = bs.clone();
            for i in (1..shuffled.len()).rev() {
                let j = usize::try_from(rng.below(i as u64 + 1)).unwrap_or(0);
                shuffled.swap(i, j);
            }
            let t3 = tick(&mut p3, n, &shuffled);
            assert_eq!(t1.all_saturated, t3.all_saturated);
            for d in &t1.decisions {
                let other = t3.decisions.iter().find(|x| x.name == d.name);
                assert_eq!(Some(d), other, "seed {seed} tick {n}");
            }
        }
    }
}

#[test]
fn saturate_then_recover_settles_and_stops_changing() {
    let mut p = Policy::new(PolicyConfig::default());
    let mut b = B::new("a");
    let mut weights = vec![];
    // Warm up at 40%, saturate for 10 ticks, recover to 40% for good.
    for n in 0..300 {
        let load = if (100..110).contains(&n) { 1.0 } else { 0.4 };
        weights.push(tick_one(&mut p, n, &mut b, load).weight);
    }
    let steady = weights[99];
    assert!(
        steady.abs_diff(51) < 10,
        "headroom weight at 40%, within the deadband: {steady}"
    );
    assert_eq!(weights[109], 2, "saturated");
    let changes_after = weights[110..].windows(2).filter(|w| w[0] != w[1]).count();
    assert!(changes_after <= 30, "{changes_after} changes: {weights:?}");
    let last_change = weights.windows(2).rposition(|w| w[0] != w[1]).unwrap_or(0);
    assert!(last_change < 140, "settled by tick {last_change}");
    assert!(
        weights[140..].iter().all(|&w| w.abs_diff(steady) < 10),
        "back within the deadband of {steady}: {weights:?}"
    );
}

#[test]
fn changed_flag_tracks_weight_changes_and_membership() {
    let mut p = Policy::new(no_slow_start());
    let mut a = B::new("a");
    let b = B::new("b");
    a.read(0, 0.4);
    assert!(tick(&mut p, 0, &[a.clone(), b.clone()]).changed);
    assert!(!tick(&mut p, 1, &[a.clone(), b.clone()]).changed);
    assert!(tick(&mut p, 2, std::slice::from_ref(&a)).changed, "b left");
    assert!(!tick(&mut p, 3, std::slice::from_ref(&a)).changed);
}

#[test]
fn increases_are_damped_cuts_are_not() {
    let mut b = B::new("a");
    let (mut p, mut n) = settled(no_slow_start(), &mut b, 0.8);
    assert_eq!(tick_one(&mut p, n, &mut b, 0.8).weight, 2);
    n += 1;
    // Load vanishes: each tick closes 30% of the gap to the target, so the
    // weight approaches full gradually instead of jumping by the full step.
    let mut trace = vec![];
    for _ in 0..20 {
        let d = tick_one(&mut p, n, &mut b, 0.0);
        n += 1;
        trace.push(d.weight);
    }
    assert!(trace[0] < 27, "first move is damped: {trace:?}");
    assert!(trace.windows(2).all(|w| w[1] >= w[0]), "{trace:?}");
    assert_eq!(*trace.last().unwrap(), 100, "reaches full: {trace:?}");
    // A cut is not damped: load back to 0.7 drops the full step at once.
    let d = tick_one(&mut p, n, &mut b, 0.7);
    assert_eq!(d.weight, 75, "{d:?}");
}

// --- capacity mode (least-loaded services) -----------------------------------

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
