//! Known answers for the two functions the datapath, the daemon and the
//! reference model all share, so a change to either cannot slip through the
//! differential test (which uses the same code on both sides):
//! `router_common::flow_hash` and the weighted Maglev build. The expected
//! values come from `tests/fixtures/known_answers.py`, an independent
//! implementation written from the algorithms' descriptions; the second
//! test runs it on many generated inputs and compares every answer.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use proptest::{
    prelude::RngExt as _,
    test_runner::{RngAlgorithm, TestRng},
};
use router::maglev::{MaglevBackend, build};
use router_common::flow_hash::flow_hash;
use router_testkit::fixtures;
use serde_json::{Value, json};

#[test]
fn flow_hash_known_answers() {
    // Fields as the program loads them: native-endian words of
    // network-order bytes.
    // A key of zero is the unkeyed hash these values were first taken from.
    for ((src, dst, sport, dport, proto), want) in [
        ((0, 0, 0, 0, 0), 2_084_330_187),
        ((16_777_418, 23_335_622, 47_873, 16_415, 6), 290_909_158),
        ((u32::MAX, u32::MAX, u16::MAX, u16::MAX, 17), 3_496_927_054),
    ] {
        assert_eq!(flow_hash([0, 0], src, dst, sport, dport, proto), want);
    }
    // Either half of the key moves a flow's hash.
    let flow = (16_777_418, 23_335_622, 47_873, 16_415, 6);
    let unkeyed = flow_hash([0, 0], flow.0, flow.1, flow.2, flow.3, flow.4);
    for key in [[1, 0], [0, 1], [0xdead_beef, 0x0bad_f00d]] {
        assert_ne!(
            flow_hash(key, flow.0, flow.1, flow.2, flow.3, flow.4),
            unkeyed,
            "key {key:x?}"
        );
    }
}

#[test]
fn maglev_known_answer() {
    let keys = ["198.18.0.11:8000", "198.18.0.12:8000"];
    let backends = [
        MaglevBackend {
            key: keys[0],
            id: 0,
            weight: 1,
        },
        MaglevBackend {
            key: keys[1],
            id: 1,
            weight: 2,
        },
    ];
    assert_eq!(
        build(&backends, 13),
        [1, 1, 0, 1, 0, 1, 1, 0, 1, 1, 1, 0, 1]
    );
}

/// A table size and its backends as (key, id, weight).
type GeneratedTable = (u32, Vec<(String, u32, u32)>);

#[test]
fn the_independent_implementation_agrees_on_generated_inputs() {
    // A fixed seed, so a failure names inputs that can be replayed.
    let mut rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[0x5e; 32]);
    let flows: Vec<(u32, u32, u16, u16, u8)> = (0..2_000)
        .map(|_| {
            (
                rng.random::<u32>(),
                rng.random::<u32>(),
                rng.random::<u16>(),
                rng.random::<u16>(),
                [6u8, 17][rng.random_range(0..2usize)],
            )
        })
        .collect();
    // Prime sizes as configured, and composite ones that take the gap fill.
    let sizes = [1u32, 2, 3, 7, 12, 13, 100, 101, 251, 1009];
    let tables: Vec<GeneratedTable> = (0..40)
        .map(|i| {
            let size = sizes[i % sizes.len()];
            let n = 1 + rng.random_range(0..12u32);
            let backends = (0..n)
                .map(|id| {
                    let key = format!(
                        "198.18.{}.{}:{}",
                        rng.random_range(0..4u32),
                        11 + id,
                        8000 + rng.random_range(0..3u32)
                    );
                    (key, id, rng.random_range(0..6u32))
                })
                .collect();
            (size, backends)
        })
        .collect();

    let request = json!({
        "flows": flows.iter().map(|&(s, d, sp, dp, p)| json!([s, d, sp, dp, p])).collect::<Vec<_>>(),
        "tables": tables.iter().map(|(size, bs)| json!({
            "size": size,
            "backends": bs.iter().map(|(k, id, w)| json!({"key": k, "id": id, "weight": w})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    let script = fixtures::fixture("known_answers.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 (cargo xtask setup installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the script failed");
    let answers: Value = serde_json::from_slice(&out.stdout).unwrap();

    for (i, &(s, d, sp, dp, p)) in flows.iter().enumerate() {
        assert_eq!(
            u64::from(flow_hash([0, 0], s, d, sp, dp, p)),
            answers["flows"][i].as_u64().unwrap(),
            "flow {i}: {:?}",
            flows[i]
        );
    }
    for (i, (size, bs)) in tables.iter().enumerate() {
        let backends: Vec<MaglevBackend<'_>> = bs
            .iter()
            .map(|(k, id, w)| MaglevBackend {
                key: k,
                id: *id,
                weight: *w,
            })
            .collect();
        let want: Vec<u32> = answers["tables"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            build(&backends, *size),
            want,
            "table {i}: size {size}, {bs:?}"
        );
    }
}
