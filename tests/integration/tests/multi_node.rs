//! Several ingress nodes (router-bench's `failover` scenario): two LB
//! namespaces running the real `router daemon` with one `hash_seed`, a DSR
//! service and `[bgp]` towards an upstream router running BIRD 2, which
//! installs an ECMP route over both. The route appears with both next hops
//! within 5 s, flows split over both LBs, both report one table
//! fingerprint; an LB with every backend drained withdraws and announces
//! again when they come back; a SIGTERM withdraws first and a kill -9 drops
//! the session, and either way no stream of 50 is reset or moves backend
//! (the survivor re-hashes them: `lru_miss`). All of it again over IPv6.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use router_bench::failover::{
    HOLD_S, Mode, Rig, STREAMS, fail_over,
    topology::{VIP_ADDR, VIP6_ADDR},
};
use router_testkit::{daemon_proc::cli, netns};

#[test]
fn two_lbs_share_the_vip_and_a_lost_one_breaks_no_stream() {
    shares_the_vip_and_loses_no_stream("multinode", Mode::Dsr, &format!("{VIP_ADDR}/32"));
}

/// The same over IPv6: an IPv6 VIP announced as a /128 with each LB's
/// IPv6 next hop, IPv6 ECMP at the router, IPv6 in IPv6 to the backends.
#[test]
fn ipv6_two_lbs_share_the_vip_and_a_lost_one_breaks_no_stream() {
    shares_the_vip_and_loses_no_stream("multinode6", Mode::Dsr6, &format!("{VIP6_ADDR}/128"));
}

/// The rig in `mode`: one route over both LBs, one fingerprint, flows
/// split, a drained LB withdrawn and back, then a SIGTERM and a kill -9
/// under streams that all end cleanly on their backends.
fn shares_the_vip_and_loses_no_stream(tag: &str, mode: Mode, prefix: &str) {
    let mut rig = Rig::start(tag, mode).expect("two LBs behind BIRD");
    eprintln!("ECMP route over both LBs after {:?}", rig.converged);
    let both = vec![rig.topo.lb_hop(0), rig.topo.lb_hop(1)];

    let st = rig.daemons[0].status().unwrap();
    let bgp = st.bgp.expect("bgp status");
    assert_eq!(bgp.announced, vec![prefix.to_string()]);
    assert!(
        bgp.sessions.iter().all(|s| s.state == "established"),
        "{bgp:?}"
    );
    // One fingerprint: the same Maglev placement on both nodes.
    let f0 = rig.daemons[0].status().unwrap().table_fingerprint;
    let f1 = rig.daemons[1].status().unwrap().table_fingerprint;
    assert!(f0.is_some() && f0 == f1, "{f0:?} vs {f1:?}");

    // 200 flows split over both LBs, and over both backends.
    let vip: SocketAddr = rig.topo.vip().parse().unwrap();
    let bodies: Vec<String> = netns::in_netns(&rig.topo.client, || {
        (0..200)
            .map(|_| {
                netns::http_get(vip, "/", Duration::from_secs(5))
                    .expect("GET")
                    .body
            })
            .collect()
    })
    .unwrap();
    let mut per_backend = BTreeMap::new();
    for b in bodies {
        *per_backend.entry(b).or_insert(0) += 1;
    }
    let new_conns = |i: usize| {
        rig.daemons[i].status().unwrap().datapath.services[0]
            .counters
            .new_conns
    };
    let (n0, n1) = (new_conns(0), new_conns(1));
    assert_eq!(n0 + n1, 200, "every flow through one LB or the other");
    assert!(n0 >= 40 && n1 >= 40, "ECMP split {n0}/{n1}");
    assert_eq!(per_backend.len(), 2, "{per_backend:?}");

    // Every backend of LB 0 drained: nothing to serve, it withdraws;
    // undrained, it announces again.
    let ctl = |i: usize, args: &[&str]| cli(&rig.sockets[i], args).expect("router CLI");
    ctl(0, &["drain", "llama", "b0"]);
    ctl(0, &["drain", "llama", "b1"]);
    rig.topo
        .await_next_hops(&[rig.topo.lb_hop(1)], Duration::from_secs(5))
        .expect("LB 0 withdraws with no backend to serve");
    ctl(0, &["undrain", "llama", "b0"]);
    ctl(0, &["undrain", "llama", "b1"]);
    rig.topo
        .await_next_hops(&both, Duration::from_secs(5))
        .expect("LB 0 announces again");

    // SIGTERM of LB 0, then (LB 0 back) kill -9 of LB 1, each under 50 streams.
    for (victim, term) in [(0, true), (1, false)] {
        let f = fail_over(&mut rig, victim, term).expect("failover");
        eprintln!("{f:?}");
        assert_eq!(
            f.streams.clean, STREAMS,
            "{}: every stream ended cleanly",
            f.how
        );
        assert_eq!(f.streams.moved_backend, 0, "{}: no stream moved", f.how);
        assert!(
            f.withdrawn_ms <= (HOLD_S as f64 + 1.0) * 1e3,
            "{}: withdrawn after {} ms",
            f.how,
            f.withdrawn_ms
        );
        assert!(
            f.survivor_lru_misses > 0,
            "{}: the survivor picked up streams",
            f.how
        );
        rig.restart(victim).expect("the victim back");
    }
}

/// The negative control: the same kill with NAT forwarding. The survivor
/// re-hashes a moved flow to the same backend, but from its own SNAT
/// address, a connection the backend never had: it resets.
#[test]
fn with_nat_the_killed_lbs_flows_break() {
    let mut rig = Rig::start("multinode-nat", Mode::Nat).expect("two NAT LBs behind BIRD");
    let f = fail_over(&mut rig, 0, false).expect("failover");
    eprintln!("{f:?}");
    assert!(
        f.streams.broken > 0 && f.streams.broken < STREAMS,
        "the killed LB's streams, and only those, break: {f:?}"
    );
}
