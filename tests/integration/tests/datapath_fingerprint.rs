//! Identical tables on every ingress node: two datapaths with the same
//! `hash_seed` and the same services pick the same backend for the same
//! packets and report the same table fingerprint, however their backend ids
//! were allocated; another seed or another weight changes the fingerprint.
//! A seed that differs from a pinned datapath's key is refused.

use router::datapath::{Datapath, DatapathError, LoadOptions, PinDir, flow_hash_key_of_seed};
use router_testkit::{
    bpffs::BpfFs,
    packet::{Packet, TCP_SYN, addr},
    xdp_fixture::*,
};

const SEED: u64 = 0x5f3a_9c0e_12b4_d7e8;
const VIPS: [&str; 2] = ["198.18.100.1:8000", "198.18.100.2:443"];

fn options(seed: u64) -> LoadOptions {
    LoadOptions {
        table_size: 1021,
        flow_hash_key: Some(flow_hash_key_of_seed(seed)),
        ..LoadOptions::default()
    }
}

fn services(weights: [&[u32]; 2]) -> Vec<router::datapath::ServiceSpec> {
    let a = service("chat", VIPS[0], 6, weights[0]);
    let mut b = service("embed", VIPS[1], 6, weights[1]);
    // The same hosts (those with neighbour entries in the fixture), on
    // another port.
    for (i, be) in b.backends.iter_mut().enumerate() {
        be.name = format!("e{i}");
        be.address = addr(&format!("198.18.0.{}:9000", 11 + i)).into();
    }
    vec![a, b]
}

/// Where each of 400 SYNs (spread over client addresses and ports, to
/// both VIPs) went: the translated destination address and port, or the
/// verdict.
fn placements(f: &mut Fixture) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..400u32 {
        let client = format!("198.19.{}.{}:{}", i % 7, 1 + i % 200, 20_000 + i * 37);
        let vip = VIPS[(i % 2) as usize];
        let p = Packet::tcp(addr(&client), addr(vip), TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
        let (verdict, frame) = f.run(&p.build());
        out.push(if verdict == XDP_TX {
            let port = u16::from_be_bytes([frame[36], frame[37]]);
            format!(
                "{}.{}.{}.{}:{port}",
                frame[30], frame[31], frame[32], frame[33]
            )
        } else {
            format!("verdict {verdict}")
        });
    }
    out
}

/// A node: the datapath loaded with `seed`, given `specs` in that order
/// (after `first`, applied and then replaced, so its ids are allocated
/// differently), and what it placed.
fn node(
    seed: u64,
    first: &[router::datapath::ServiceSpec],
    specs: &[router::datapath::ServiceSpec],
) -> (String, Vec<String>) {
    let mut f = Fixture::with_options(first, options(seed));
    f.dp.apply(specs).expect("apply");
    // The retired ids are released one round later.
    f.dp.apply(specs).expect("apply again");
    let fp = f.dp.table_fingerprint().expect("every table known");
    let placed = placements(&mut f);
    (fp, placed)
}

#[test]
fn nodes_with_one_seed_place_alike_and_say_so() {
    let specs = services([&[100, 50, 100], &[100, 100, 100]]);
    let mut reversed = specs.clone();
    reversed.reverse();
    let decoy = vec![service("decoy", "198.18.100.9:80", 6, &[1, 1, 1, 1])];

    let (fp_a, placed_a) = node(SEED, &specs, &specs);
    let (fp_b, placed_b) = node(SEED, &decoy, &reversed);
    assert_eq!(fp_a.len(), 16, "{fp_a}");
    assert_eq!(fp_a, fp_b, "same seed and services, other ids and order");
    assert_eq!(placed_a, placed_b);
    assert!(
        placed_a.iter().all(|p| p.starts_with("198.18.0.")),
        "{placed_a:?}"
    );
    let used: std::collections::BTreeSet<&String> = placed_a.iter().collect();
    assert_eq!(used.len(), 6, "every backend takes flows: {used:?}");

    // Another seed: another key, and flows land elsewhere.
    let (fp_c, placed_c) = node(SEED ^ 1, &specs, &specs);
    assert_ne!(fp_a, fp_c);
    let moved = placed_a
        .iter()
        .zip(&placed_c)
        .filter(|(a, c)| a != c)
        .count();
    assert!(moved > 100, "only {moved} of 400 flows moved with the key");

    // Another weight: another table.
    let other = services([&[100, 50, 90], &[100, 100, 100]]);
    let (fp_d, _) = node(SEED, &other, &other);
    assert_ne!(fp_a, fp_d);
}

#[test]
fn a_seed_that_differs_from_the_pinned_key_is_refused() {
    let fs = BpfFs::mount().expect("bpffs");
    let pins = PinDir::new(fs.pin_path());
    let specs = services([&[100, 100, 100], &[100, 100, 100]]);
    let first = {
        let (mut dp, adopted) = Datapath::open_pinned(options(SEED), &pins).expect("pin");
        assert!(!adopted);
        dp.apply(&specs).expect("apply");
        dp.table_fingerprint().expect("fingerprint")
    };

    let err = match Datapath::open_pinned(options(SEED + 1), &pins) {
        Err(e) => e,
        Ok(_) => panic!("another seed adopted the pinned datapath"),
    };
    assert!(matches!(err, DatapathError::HashSeedMismatch(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.starts_with("daemon.hash_seed: "), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");

    // The same seed, or none, adopts it with its key: the same placement.
    for opts in [
        options(SEED),
        LoadOptions {
            flow_hash_key: None,
            ..options(SEED)
        },
    ] {
        let (mut dp, adopted) = Datapath::open_pinned(opts, &pins).expect("adopt");
        assert!(adopted);
        dp.apply(&specs).expect("apply");
        assert_eq!(dp.table_fingerprint().as_deref(), Some(first.as_str()));
    }
    router::datapath::pinning::remove_all(&pins).expect("remove the pins");
}
