//! The phases every test goes through: break the faulted sources and watch
//! their weights decay, heal them and watch the weights recover, stop.

use std::{
    collections::BTreeMap,
    thread,
    time::{Duration, Instant},
};

use router::api::StatusReply;

use super::rig::{Counted, Rig, policy_of};
use super::{DEADBAND, SAMPLE_EVERY, STALE_AFTER, STALE_DECAY, STALE_SHARE};

/// One sample of a faulted backend: (stale, weight, reason).
type Trace = Vec<(bool, u32, String)>;

/// Breaks every faulted backend at once and follows them until each sits
/// at the stale share; checks the decay of each. Returns the last status.
pub(super) fn break_and_decay(rig: &mut Rig, settled: &BTreeMap<String, u32>) -> StatusReply {
    let before = rig.status();
    let names: Vec<&'static str> = rig.faulted().map(|c| c.name).collect();
    for name in &names {
        assert!(
            settled[*name] >= STALE_SHARE + 15,
            "{name} settled at {}, too close to the stale share {STALE_SHARE} to see a decay",
            settled[*name]
        );
    }
    for i in 0..rig.cases.len() {
        rig.inject(i);
    }
    let start = Instant::now();
    let mut traces: BTreeMap<&str, Trace> = BTreeMap::new();
    // Until every faulted backend has sat at the stale share for a few
    // samples, bounded well beyond stale_after + stale_decay.
    let mut settled_samples = 0;
    let last = loop {
        thread::sleep(SAMPLE_EVERY);
        let st = rig.status();
        rig.check_invariants(
            &st,
            settled,
            &format!("{:?} into the faults", start.elapsed()),
        );
        for name in &names {
            let p = policy_of(&st, name);
            traces
                .entry(name)
                .or_default()
                .push((p.stale, p.weight, p.reason.clone()));
        }
        let all_stale = names
            .iter()
            .all(|n| policy_of(&st, n).reason == "telemetry stale");
        settled_samples = if all_stale { settled_samples + 1 } else { 0 };
        if settled_samples >= 3 {
            break st;
        }
        assert!(
            start.elapsed() < STALE_AFTER + STALE_DECAY + Duration::from_secs(6),
            "not every faulted backend reached the stale share: {traces:?}"
        );
    };

    for case in rig.faulted() {
        let name = case.name;
        let held = settled[name];
        let trace = &traces[name];
        let fault = case.fault.unwrap();
        let what = format!("{name} ({fault:?})");
        assert!(
            trace
                .iter()
                .all(|(_, w, _)| (STALE_SHARE..=held).contains(w)),
            "{what}: the weight left [{STALE_SHARE}, {held}] — read as idle or as dead: {trace:?}"
        );
        assert!(
            trace.windows(2).all(|w| w[1].1 <= w[0].1),
            "{what}: the weight went up with no fresh reading: {trace:?}"
        );
        assert!(
            trace.iter().take_while(|s| !s.0).all(|s| s.1 == held),
            "{what}: the weight moved before the reading went stale: {trace:?}"
        );
        assert!(
            !trace[0].0 && trace[0].1 == held,
            "{what}: the weight was not held while the last reading was fresh: {trace:?}"
        );
        let mut steps: Vec<u32> = trace
            .iter()
            .map(|s| s.1)
            .filter(|w| (STALE_SHARE + 1..held).contains(w))
            .collect();
        steps.dedup();
        assert!(
            steps.len() >= 3,
            "{what}: the weight did not decay gradually from {held} to {STALE_SHARE}: {trace:?}"
        );
        let p = policy_of(&last, name);
        assert!(
            p.stale && p.weight == STALE_SHARE && p.reason == "telemetry stale",
            "{what}: ends at weight {}, stale {}, reason {:?}; want {STALE_SHARE}, stale, \"telemetry stale\"",
            p.weight,
            p.stale,
            p.reason
        );
        let (b, a) = (&policy_of(&before, name).stats, &p.stats);
        let (errors, invalid) = (a.errors - b.errors, a.invalid - b.invalid);
        let timeouts = a.timeouts - b.timeouts;
        let polls = a.polls - b.polls;
        match case.counted {
            // A source that fails never delivers a reading to reject.
            Counted::Errors => assert!(
                errors >= 5 && invalid == 0,
                "{what}: {errors} errors and {invalid} invalid readings in {polls} polls; \
                 want every failure counted as an error; stats {a:?}"
            ),
            // Garbage is rejected, not mistaken for a failing source: every
            // poll that got an answer counted it invalid, and the only
            // errors are polls that missed their deadline (a busy machine).
            Counted::Invalid => assert!(
                invalid >= 5 && errors == timeouts && invalid + errors == polls,
                "{what}: {invalid} invalid readings, {errors} errors ({timeouts} timeouts) in \
                 {polls} polls; want every answered poll counted invalid; stats {a:?}"
            ),
        }
        let mut decay: Vec<u32> = trace.iter().map(|s| s.1).collect();
        decay.dedup();
        println!(
            "{name}: {held} → {decay:?}; {errors} errors, {invalid} invalid in {polls} polls; {:?}",
            a.last_error.as_deref().unwrap_or("")
        );
        assert!(
            a.last_error
                .as_deref()
                .is_some_and(|e| e.contains(case.message)),
            "{what}: last_error {:?} does not say {:?}",
            a.last_error,
            case.message
        );
    }
    last
}

/// Removes every fault and follows the faulted backends until each is back
/// where it settled before the fault, climbing in bounded steps.
pub(super) fn heal_and_recover(rig: &mut Rig, settled: &BTreeMap<String, u32>) {
    for i in 0..rig.cases.len() {
        rig.heal(i);
    }
    let names: Vec<&'static str> = rig.faulted().map(|c| c.name).collect();
    let start = Instant::now();
    let mut traces: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    let mut steady_samples = 0;
    let last = loop {
        thread::sleep(SAMPLE_EVERY);
        let st = rig.status();
        rig.check_invariants(
            &st,
            settled,
            &format!("{:?} into the recovery", start.elapsed()),
        );
        for name in &names {
            traces
                .entry(name)
                .or_default()
                .push(policy_of(&st, name).weight);
        }
        // Back: fresh, following headroom again, and no longer moving
        // (the damped climb stops within the deadband of its target).
        let back = |n: &&str| {
            let p = policy_of(&st, n);
            let trace = &traces[n];
            !p.stale
                && p.reason == "headroom"
                && p.weight > STALE_SHARE
                && trace.len() >= 2
                && trace[trace.len() - 2] == p.weight
        };
        steady_samples = if names.iter().all(back) {
            steady_samples + 1
        } else {
            0
        };
        if steady_samples >= 4 {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not every backend recovered (settled at {settled:?}): {traces:?}; {:?}",
            st.policy
                .iter()
                .map(|p| (&p.backend, p.weight, &p.reason, &p.stats.last_error))
                .collect::<Vec<_>>()
        );
    };
    for name in &names {
        let trace = &traces[name];
        let mut climb = trace.clone();
        climb.dedup();
        println!("{name} recovering: {climb:?}");
        // Samples are not ticks (a busy machine can put two polls between
        // samples), so the step bound itself is left to the policy's unit
        // tests; what shows here is a climb, never a fall, through
        // intermediate weights rather than one jump.
        assert!(
            trace.windows(2).all(|w| w[1] >= w[0]),
            "{name}: the weight fell while recovering: {trace:?}"
        );
        let last_weight = *trace.last().unwrap();
        assert!(
            trace
                .iter()
                .any(|w| (STALE_SHARE + 1..last_weight).contains(w)),
            "{name}: jumped back instead of climbing: {trace:?}"
        );
        // Before and after, the weight approached the same target from
        // below and stopped within the deadband of it.
        let p = policy_of(&last, name);
        assert!(
            p.weight.abs_diff(settled[*name]) < DEADBAND,
            "{name}: recovered to {}, not back where it settled ({}): {trace:?}",
            p.weight,
            settled[*name]
        );
    }
}

/// Stops the daemon the way an operator would; it must still be running
/// and exit cleanly.
pub(super) fn stop(mut rig: Rig) {
    let daemon = rig.daemon.take().unwrap();
    let exit = daemon.stop(Duration::from_secs(10)).unwrap();
    assert!(exit.success(), "the daemon exited with {exit} on SIGTERM");
}
