//! The phases every test goes through: break the faulted sources and watch
//! their weights decay, heal them and watch the weights recover, stop.

use std::{
    collections::BTreeMap,
    thread,
    time::{Duration, Instant},
};

use router::api::StatusReply;

use super::rig::{Counted, Rig, hang_guard, policy_of, ticks_in};
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
    let from = rig.status().policy_ticks;
    // Stale within stale_after (5 polls: the daemon's ticks are a poll
    // apart or more), at the stale share stale_decay (10 polls) later;
    // 10 more ticks are room for the faults' own polls running late.
    let bound = ticks_in(STALE_AFTER + STALE_DECAY) + 10;
    let mut traces: BTreeMap<&str, Trace> = BTreeMap::new();
    // Until every faulted backend has sat at the stale share for a few
    // samples.
    let mut settled_samples = 0;
    let last = loop {
        thread::sleep(SAMPLE_EVERY);
        let st = rig.status();
        rig.check_invariants(
            &st,
            settled,
            &format!("{} ticks into the faults", st.policy_ticks - from),
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
            st.policy_ticks < from + bound,
            "not every faulted backend reached the stale share within {bound} ticks: {traces:?}"
        );
        assert!(
            start.elapsed() < hang_guard(bound),
            "the daemon ran {} ticks in {:?}: hung?",
            st.policy_ticks - from,
            start.elapsed()
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
        // Held while the last reading was fresh. Whether the first sample
        // still finds it fresh depends on how soon it came (staleness is
        // the daemon's clock, stale_after), so only the fresh ones are
        // held to it.
        assert!(
            trace.iter().take_while(|s| !s.0).all(|s| s.1 == held),
            "{what}: the weight moved before the reading went stale: {trace:?}"
        );
        let p = policy_of(&last, name);
        // Gradually, not in one jump: the daemon counts each change, seen
        // by this sampler or not. The decay spans stale_decay, 10 polls;
        // 3 changes hold even with ticks three times as far apart.
        let changes = p.weight_changes - policy_of(&before, name).weight_changes;
        assert!(
            changes >= 3,
            "{what}: the weight went from {held} to {STALE_SHARE} in {changes} changes: {trace:?}"
        );
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
    // Counted from before the first heal: a weight may start climbing
    // while the others are healed.
    let healed = rig.status();
    let from = healed.policy_ticks;
    for i in 0..rig.cases.len() {
        rig.heal(i);
    }
    let names: Vec<&'static str> = rig.faulted().map(|c| c.name).collect();
    let start = Instant::now();
    // A damped climb from the stale share (30% of the gap a tick) and four
    // steady samples: about 15 ticks; 50 (10 s) are room.
    let bound = 50;
    let mut traces: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    let mut steady_samples = 0;
    let last = loop {
        thread::sleep(SAMPLE_EVERY);
        let st = rig.status();
        rig.check_invariants(
            &st,
            settled,
            &format!("{} ticks into the recovery", st.policy_ticks - from),
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
            start.elapsed() < hang_guard(bound),
            "the daemon ran {} ticks in {:?}: hung?",
            st.policy_ticks - from,
            start.elapsed()
        );
        assert!(
            st.policy_ticks < from + bound,
            "not every backend recovered within {bound} ticks (settled at {settled:?}): {traces:?}; {:?}",
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
        // Through intermediate weights: counted by the daemon, so a
        // sampler that missed them cannot fail this.
        let changes =
            policy_of(&last, name).weight_changes - policy_of(&healed, name).weight_changes;
        assert!(
            changes >= 2,
            "{name}: jumped back in {changes} change instead of climbing: {trace:?}"
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
