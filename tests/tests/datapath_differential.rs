//! Differential test of the datapath: sessions of random map state and
//! random packets, well-formed and not, go through BPF_PROG_TEST_RUN and
//! through the userspace reference model (`router_tests::model`). For every
//! packet the verdict, the output bytes, the reason counters and every
//! backend's in-flight counts (`BACKEND_LOAD`, opened and closed) must
//! agree, and a rewritten packet's checksums must verify on their own;
//! after every session the traffic counters, the latency sample counts and
//! both connection tables (`CONN_COUNTED` included) must agree too.
//!
//! Services place new flows by Maglev or by least load, room first:
//! scanned (small services) or by two choices (a large one, and services
//! whose scan list is empty). A session seeds every backend's counts, and may run with
//! `BACKENDS` weights of another weight set than its tables (an apply
//! caught between writing the slots and flipping the tables).
//!
//! One program and namespace serve every session; a session starts from
//! empty tables, seeds them (both sides alike), and runs its packets. Seeded
//! ages sit far from every timeout (see the model's module docs), so the
//! kernel's clock decides nothing the model cannot.
//!
//! Seeded ages are 0, 20, 40 and 70 s against timeouts of 10 s (closing
//! and half-open), 30 s (UDP) and 50 s (TCP), and a session takes
//! milliseconds; one that fails after running past 5 s runs again. An age
//! of 70 s needs a clock (CLOCK_MONOTONIC_COARSE, time since boot) that has
//! run that long: on a machine booted less than 75 s ago the test waits.
//!
//! The seed is fixed so a run is repeatable; `ROUTER_DIFFTEST_SEED=<n>`
//! picks another and `ROUTER_DIFFTEST_SEED=random` a fresh one (printed).
//! `ROUTER_DIFFTEST_PACKETS` changes how many packets make a run (at least
//! 100,000 by default). A failure shows the shrunk session, every packet
//! in and out with the rules the model applied, and what differed. A run
//! of the default length must also have taken each rule of `MUST_TAKE`.

use std::{cell::RefCell, time::Instant};

use proptest::test_runner::{Config as PtConfig, RngAlgorithm, TestRng, TestRunner};

// The crate root looks for modules beside it, not in a folder of its name.
#[path = "datapath_differential/session.rs"]
mod session;
#[path = "datapath_differential/strategies.rs"]
mod strategies;
#[path = "datapath_differential/world.rs"]
mod world;

use strategies::*;
use world::*;

const DEFAULT_PACKETS: u64 = 100_000;

/// Model rules that a run of the default length must take at least once
/// each: how flows are counted and uncounted, and both least-loaded
/// picks. A change to the strategies that starves one fails here instead
/// of leaving it untested.
const MUST_TAKE: &[&str] = &[
    "new flow counted",
    "a flow opened by a RST is not counted",
    "uncounted: a RST from the client",
    "uncounted: a RST from the backend",
    "uncounted: FIN from both, the client last",
    "uncounted: FIN from both, the backend last",
    "uncounted: a SYN starts over",
    "FIN from the client, the backend's side open",
    "FIN from the backend, the client's side open",
    "end from the backend, the forward entry expired: the daemon's to uncount",
    "end of a flow not counted",
    "placed by Maglev",
    "least-loaded service: picked up mid-stream, placed by Maglev",
    "scan: one least loaded",
    "scan: equals met, the earlier kept",
    "scan: room decided between members",
    "scan: no member has room, the least loaded",
    "two choices: room decides, the first has it",
    "two choices: room decides, the second has it",
    "two choices: the first is no worse",
    "two choices: the second is less loaded",
    "two choices: the pick's slot has weight 0, no backend",
    "two choices: an empty table, no backend",
];

// ---------------------------------------------------------------------------

fn seed_from_env() -> u64 {
    match std::env::var("ROUTER_DIFFTEST_SEED").ok().as_deref() {
        None | Some("") => 0x5eed_d1ff,
        Some("random") => {
            let s = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            eprintln!("ROUTER_DIFFTEST_SEED={s}");
            s
        }
        Some(v) => v
            .parse()
            .expect("ROUTER_DIFFTEST_SEED: a number or \"random\""),
    }
}

#[test]
fn kernel_and_model_agree_on_every_packet() {
    let target: u64 = std::env::var("ROUTER_DIFFTEST_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_PACKETS);
    let seed = seed_from_env();
    let world = RefCell::new(World::new());
    let strategy = session(world.borrow().dests.len());
    let started = Instant::now();
    let mut round = 0u64;
    while world.borrow().packets < target {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        bytes[8..16].copy_from_slice(&round.to_le_bytes());
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
        let mut runner = TestRunner::new_with_rng(
            PtConfig {
                cases: 500,
                failure_persistence: None,
                max_shrink_iters: 2_000,
                ..PtConfig::default()
            },
            rng,
        );
        let result = runner.run(&strategy, |s| world.borrow_mut().run_session(&s));
        if let Err(e) = result {
            panic!("seed {seed}, round {round}: {e}");
        }
        round += 1;
    }
    let w = world.borrow();
    eprintln!(
        "{} packets in {} sessions, {:.1} s",
        w.packets,
        w.sessions,
        started.elapsed().as_secs_f64()
    );
    eprintln!("reasons counted and rules taken (model):");
    for (what, n) in &w.tally {
        eprintln!("  {n:>8}  {what}");
    }
    if target >= DEFAULT_PACKETS {
        let missed: Vec<&str> = MUST_TAKE
            .iter()
            .copied()
            .filter(|r| !w.tally.contains_key(r))
            .collect();
        assert!(missed.is_empty(), "rules no packet took: {missed:?}");
    }
}
