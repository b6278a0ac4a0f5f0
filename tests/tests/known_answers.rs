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

use router::maglev::{MaglevBackend, build};
use router_common::flow_hash::flow_hash;
use serde_json::{Value, json};

#[test]
fn flow_hash_known_answers() {
    // Fields as the program loads them: native-endian words of
    // network-order bytes.
    for ((src, dst, sport, dport, proto), want) in [
        ((0, 0, 0, 0, 0), 2_084_330_187),
        ((16_777_418, 23_335_622, 47_873, 16_415, 6), 290_909_158),
        ((u32::MAX, u32::MAX, u16::MAX, u16::MAX, 17), 3_496_927_054),
    ] {
        assert_eq!(flow_hash(src, dst, sport, dport, proto), want);
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

/// A deterministic generator, so a failure names inputs that can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 16
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn the_independent_implementation_agrees_on_generated_inputs() {
    let mut rng = Lcg(0x5eed_1234);
    let flows: Vec<(u32, u32, u16, u16, u8)> = (0..2_000)
        .map(|_| {
            (
                rng.next() as u32,
                rng.next() as u32,
                rng.next() as u16,
                rng.next() as u16,
                [6u8, 17][rng.below(2) as usize],
            )
        })
        .collect();
    // Prime sizes as configured, and composite ones that take the gap fill.
    let sizes = [1u32, 2, 3, 7, 12, 13, 100, 101, 251, 1009];
    let tables: Vec<GeneratedTable> = (0..40)
        .map(|i| {
            let size = sizes[i % sizes.len()];
            let n = 1 + rng.below(12) as u32;
            let backends = (0..n)
                .map(|id| {
                    let key = format!(
                        "198.18.{}.{}:{}",
                        rng.below(4),
                        11 + id,
                        8000 + rng.below(3)
                    );
                    (key, id, rng.below(6) as u32)
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
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/known_answers.py");
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
            u64::from(flow_hash(s, d, sp, dp, p)),
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
