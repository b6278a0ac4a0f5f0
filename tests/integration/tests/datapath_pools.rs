//! BPF_PROG_TEST_RUN fixtures for pools: a client's segment (longest
//! prefix), its sticky share bucket, the fallback flag followed down a
//! chain of bounded length, and pools that must never be picked.

use std::collections::{BTreeMap, BTreeSet};

use router::datapath::{PoolSpec, SegmentSpec, ServiceSpec};
use router_common::reasons::Reason;
use router_testkit::{
    packet::{Packet, TCP_SYN, addr, ip},
    xdp_fixture::*,
};

const VIP: &str = "198.18.100.1:8000";

/// The backend a translated frame went to: index of 198.18.0.(11 + i).
fn backend_of(frame: &[u8]) -> usize {
    assert!(frame.len() >= 34, "frame too short: {}", frame.len());
    let dst = [frame[30], frame[31], frame[32], frame[33]];
    assert_eq!(dst[..3], [198, 18, 0], "destination {dst:?}");
    usize::from(dst[3]) - 11
}

/// The backend a SYN from `client` lands on, or the verdict if none.
fn syn(f: &mut Fixture, client: &str) -> Result<usize, u32> {
    let p = Packet::tcp(addr(client), addr(VIP), TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
    let (verdict, out) = f.run(&p.build());
    if verdict == XDP_TX {
        Ok(backend_of(&out))
    } else {
        Err(verdict)
    }
}

fn pool(name: &str, backends: &[&str], share: u32, fallback: Option<usize>) -> PoolSpec {
    PoolSpec {
        name: name.into(),
        backends: backends.iter().map(|b| b.to_string()).collect(),
        share,
        fallback,
        saturated: false,
    }
}

fn segment(cidr: &str, pool: usize) -> SegmentSpec {
    let (a, len) = cidr.split_once('/').expect("cidr");
    SegmentSpec {
        addr: ip(a),
        prefix_len: len.parse().expect("prefix length"),
        pool,
    }
}

/// Three backends (b0, b1, b2) in three pools of one backend each.
fn three_pools(shares: [u32; 3]) -> ServiceSpec {
    ServiceSpec {
        pools: vec![
            pool("stable", &["b0"], shares[0], None),
            pool("canary", &["b1"], shares[1], None),
            pool("spare", &["b2"], shares[2], None),
        ],
        ..service("llama", VIP, 6, &[1, 1, 1])
    }
}

#[test]
fn the_longest_matching_segment_picks_the_pool() {
    let spec = ServiceSpec {
        segments: vec![
            segment("198.19.0.0/16", 1),
            segment("198.19.7.0/24", 2),
            segment("198.19.7.128/25", 0),
        ],
        ..three_pools([100, 0, 0])
    };
    let mut f = Fixture::new(&[spec]);
    for (client, want, why) in [
        ("198.19.1.1:40000", 1, "/16 only"),
        ("198.19.7.5:40000", 2, "/24 beats /16"),
        ("198.19.7.200:40000", 0, "/25 beats /24"),
        (
            "198.20.0.1:40000",
            0,
            "no segment: the shares (stable 100%)",
        ),
    ] {
        assert_eq!(syn(&mut f, client), Ok(want), "{client}: {why}");
    }
}

#[test]
fn the_share_split_is_sticky_per_client_address_and_follows_the_shares() {
    // stable 80, canary 20, spare 0: 200 client addresses, three ports each.
    let mut f = Fixture::new(&[three_pools([80, 20, 0])]);
    let mut pool_of: BTreeMap<u32, usize> = BTreeMap::new();
    for c in 0..200u32 {
        let client = format!("198.19.{}.{}", c / 200, 1 + c % 200);
        let mut seen = BTreeSet::new();
        for port in [40000, 40001, 51234] {
            seen.insert(syn(&mut f, &format!("{client}:{port}")).expect("placed"));
        }
        assert_eq!(seen.len(), 1, "{client} landed in pools {seen:?}");
        pool_of.insert(c, *seen.first().expect("one pool"));
    }
    let canary = pool_of.values().filter(|p| **p == 1).count();
    assert!(
        pool_of.values().all(|p| *p != 2),
        "the share-0 pool took a client"
    );
    // 200 addresses at 20%: 40 expected, binomial σ = 5.7; ±3σ.
    assert!((23..=57).contains(&canary), "{canary} of 200 in canary");
}

#[test]
fn a_pool_without_room_spills_down_its_chain_and_is_counted() {
    let mut spec = three_pools([100, 0, 0]);
    spec.pools[0].fallback = Some(1);
    spec.pools[1].fallback = Some(2);
    let mut f = Fixture::new(std::slice::from_ref(&spec));
    assert_eq!(syn(&mut f, "198.19.0.1:40000"), Ok(0), "stable has room");

    spec.pools[0].saturated = true;
    f.dp.apply(std::slice::from_ref(&spec)).expect("apply");
    assert_eq!(
        syn(&mut f, "198.19.0.2:40000"),
        Ok(1),
        "stable full: canary"
    );

    spec.pools[1].saturated = true;
    f.dp.apply(std::slice::from_ref(&spec)).expect("apply");
    assert_eq!(syn(&mut f, "198.19.0.3:40000"), Ok(2), "both full: spare");

    // Every pool full: the client's own pool, not a drop.
    spec.pools[2].saturated = true;
    f.dp.apply(std::slice::from_ref(&spec)).expect("apply");
    assert_eq!(syn(&mut f, "198.19.0.4:40000"), Ok(0), "all full: stable");

    let st = f.dp.status().expect("status");
    let spills: Vec<(String, String, u64)> = st.services[0]
        .spills
        .iter()
        .map(|s| (s.from.clone(), s.to.clone(), s.connections))
        .collect();
    assert_eq!(
        spills,
        [
            ("stable".into(), "canary".into(), 1),
            ("stable".into(), "spare".into(), 1)
        ]
    );
}

#[test]
fn a_fallback_cycle_is_followed_a_bounded_number_of_steps() {
    // The config refuses cycles; the datapath must still end on one.
    let mut spec = three_pools([50, 50, 0]);
    spec.pools[0].fallback = Some(1);
    spec.pools[1].fallback = Some(0);
    spec.pools[0].saturated = true;
    spec.pools[1].saturated = true;
    let mut f = Fixture::new(&[spec]);
    for c in 1..=20 {
        let client = format!("198.19.0.{c}:40000");
        let got = syn(&mut f, &client).expect("placed in its own pool");
        assert!(got < 2, "{client} went to {got}");
    }
}

#[test]
fn a_pool_of_weight_zero_backends_is_never_picked() {
    // canary's only backend has weight 0: no room, and nothing to pick.
    let spec = ServiceSpec {
        pools: vec![
            pool("stable", &["b0"], 50, None),
            pool("canary", &["b1"], 50, Some(0)),
        ],
        ..service("llama", VIP, 6, &[1, 0])
    };
    let mut f = Fixture::new(&[spec]);
    for c in 1..=40 {
        let client = format!("198.19.0.{c}:40000");
        assert_eq!(syn(&mut f, &client), Ok(0), "{client}");
    }
    // Without a fallback, its clients find no backend and are dropped
    // (counted), not sent to a weight-0 backend.
    let spec = ServiceSpec {
        pools: vec![
            pool("stable", &["b0"], 0, None),
            pool("canary", &["b1"], 100, None),
        ],
        ..service("llama", VIP, 6, &[1, 0])
    };
    f.dp.apply(&[spec]).expect("apply");
    let before = f.reasons()[Reason::DropNoBackend as usize];
    assert_eq!(syn(&mut f, "198.19.1.1:40000"), Err(XDP_DROP));
    assert_eq!(f.reasons()[Reason::DropNoBackend as usize], before + 1);
}

#[test]
fn pools_come_and_go_with_the_spec() {
    let mut f = Fixture::new(&[three_pools([0, 100, 0])]);
    assert_eq!(syn(&mut f, "198.19.0.1:40000"), Ok(1));
    // Unpooled again: the service's own table (all three backends).
    f.dp.apply(&[service("llama", VIP, 6, &[0, 0, 1])])
        .expect("apply");
    assert_eq!(syn(&mut f, "198.19.0.1:40001"), Ok(2));
    f.dp.apply(&[three_pools([100, 0, 0])]).expect("apply");
    assert_eq!(syn(&mut f, "198.19.0.1:40002"), Ok(0));
}
