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

mod capacity;
