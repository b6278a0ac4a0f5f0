//! BPF_PROG_TEST_RUN fixtures for placement: the in-flight count that the
//! datapath keeps per backend (+1 when a flow is created, −1 exactly once
//! when it ends), the least-loaded pick that reads it, and the table scan
//! that corrects counts for flows that vanished without an end.

use router::datapath::{LoadOptions, SCAN_LIMIT};
use router_common::{
    ConnEntry, ConnKey,
    selection::{Candidate, better},
};
use router_testkit::{
    packet::{Packet, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, addr},
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

fn tcp(f: &mut Fixture, src: &str, dst: &str, flags: u8) -> (u32, Vec<u8>) {
    let p = Packet::tcp(addr(src), addr(dst), flags).with_macs(LB_MAC, CLIENT_MAC);
    f.run(&p.build())
}

/// SYN, SYN-ACK, ACK for `client`, on whichever backend it lands; returns
/// the backend's address and the SNAT address and port it sees.
fn handshake(f: &mut Fixture, client: &str) -> (String, String) {
    let (verdict, out) = tcp(f, client, VIP, TCP_SYN);
    assert_eq!(verdict, XDP_TX, "SYN of {client}");
    let backend = format!("198.18.0.{}:8000", 11 + backend_of(&out));
    let snat = format!("198.18.0.1:{}", u16::from_be_bytes([out[34], out[35]]));
    assert_eq!(tcp(f, &backend, &snat, TCP_SYN | TCP_ACK).0, XDP_TX);
    assert_eq!(tcp(f, client, VIP, TCP_ACK).0, XDP_TX);
    (backend, snat)
}

#[test]
fn a_flow_counts_from_its_syn_until_both_sides_said_fin() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let client = "198.18.0.2:40000";
    assert_eq!(tcp(&mut f, client, VIP, TCP_SYN).0, XDP_TX);
    assert_eq!(f.in_flight("llama", "b0"), 1, "counted at the SYN");
    assert_eq!(tcp(&mut f, client, VIP, TCP_SYN).0, XDP_TX);
    assert_eq!(
        f.in_flight("llama", "b0"),
        1,
        "a retransmitted SYN is the same flow"
    );
    let (backend, snat) = ("198.18.0.11:8000", "198.18.0.1:40000");
    assert_eq!(tcp(&mut f, backend, snat, TCP_SYN | TCP_ACK).0, XDP_TX);
    assert_eq!(tcp(&mut f, client, VIP, TCP_ACK).0, XDP_TX);
    assert_eq!(
        f.in_flight("llama", "b0"),
        1,
        "confirming moves the count with the flow"
    );
    assert_eq!(tcp(&mut f, backend, snat, TCP_FIN | TCP_ACK).0, XDP_TX);
    assert_eq!(
        f.in_flight("llama", "b0"),
        1,
        "one side's FIN is a half-close"
    );
    assert_eq!(tcp(&mut f, backend, snat, TCP_FIN | TCP_ACK).0, XDP_TX);
    assert_eq!(
        f.in_flight("llama", "b0"),
        1,
        "a retransmitted FIN changes nothing"
    );
    assert_eq!(tcp(&mut f, client, VIP, TCP_FIN | TCP_ACK).0, XDP_TX);
    assert_eq!(f.in_flight("llama", "b0"), 0, "FIN from both sides ends it");
    assert_eq!(tcp(&mut f, client, VIP, TCP_ACK).0, XDP_TX);
    assert_eq!(tcp(&mut f, client, VIP, TCP_RST).0, XDP_TX);
    assert_eq!(
        f.opened_closed("llama", "b0"),
        (1, 1),
        "ended once, whatever follows"
    );
}

#[test]
fn a_fin_from_the_client_first_ends_the_flow_at_the_backends_fin() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let client = "198.18.0.2:40001";
    let (backend, snat) = handshake(&mut f, client);
    assert_eq!(tcp(&mut f, client, VIP, TCP_FIN | TCP_ACK).0, XDP_TX);
    assert_eq!(f.in_flight("llama", "b0"), 1);
    assert_eq!(tcp(&mut f, &backend, &snat, TCP_FIN | TCP_ACK).0, XDP_TX);
    assert_eq!(f.opened_closed("llama", "b0"), (1, 1));
}

#[test]
fn a_reset_from_either_side_ends_the_flow() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let (backend, snat) = handshake(&mut f, "198.18.0.2:40002");
    handshake(&mut f, "198.18.0.2:40003");
    assert_eq!(f.in_flight("llama", "b0"), 2);
    assert_eq!(tcp(&mut f, &backend, &snat, TCP_RST | TCP_ACK).0, XDP_TX);
    assert_eq!(f.in_flight("llama", "b0"), 1, "the backend's RST");
    assert_eq!(tcp(&mut f, "198.18.0.2:40003", VIP, TCP_RST).0, XDP_TX);
    assert_eq!(f.in_flight("llama", "b0"), 0, "the client's RST");
    // A refused connection: the backend resets the SYN itself.
    assert_eq!(tcp(&mut f, "198.18.0.2:40004", VIP, TCP_SYN).0, XDP_TX);
    assert_eq!(
        tcp(
            &mut f,
            "198.18.0.11:8000",
            "198.18.0.1:40004",
            TCP_RST | TCP_ACK
        )
        .0,
        XDP_TX
    );
    assert_eq!(f.opened_closed("llama", "b0"), (3, 3));
}

#[test]
fn a_syn_that_starts_over_on_a_half_closed_port_ends_the_old_flow() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    let client = "198.18.0.2:40005";
    handshake(&mut f, client);
    // Only the client said FIN; the port is then reused for a new connection.
    assert_eq!(tcp(&mut f, client, VIP, TCP_FIN | TCP_ACK).0, XDP_TX);
    assert_eq!(tcp(&mut f, client, VIP, TCP_SYN).0, XDP_TX);
    assert_eq!(f.opened_closed("llama", "b0"), (2, 1));
    assert_eq!(f.in_flight("llama", "b0"), 1);
}

#[test]
fn a_flow_opened_by_a_reset_is_not_counted() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    // A stray RST for a flow without an entry is picked up mid-stream.
    let _ = tcp(&mut f, "198.18.0.2:40006", VIP, TCP_RST | TCP_ACK);
    assert_eq!(f.opened_closed("llama", "b0"), (0, 0));
}

#[test]
fn least_loaded_picks_the_smallest_in_flight_plus_one_over_weight() {
    let weights = [100, 100, 50];
    let mut f = Fixture::new(&[least_loaded(service("llama", VIP, 6, &weights))]);
    let mut counts = [0u64; 3];
    for i in 0..40u16 {
        let client = format!("198.18.0.2:{}", 41000 + i);
        let (verdict, out) = tcp(&mut f, &client, VIP, TCP_SYN);
        assert_eq!(verdict, XDP_TX);
        let got = backend_of(&out);
        // Every backend's score before this pick: (n + 1) / w.
        let score = |b: usize| (counts[b] + 1) as f64 / f64::from(weights[b]);
        let best = (0..3).map(score).fold(f64::INFINITY, f64::min);
        assert_eq!(
            score(got),
            best,
            "SYN {i} went to b{got}, counts {counts:?}"
        );
        counts[got] += 1;
        for (b, n) in counts.iter().enumerate() {
            assert_eq!(f.in_flight("llama", &format!("b{b}")), *n);
        }
    }
    assert_eq!(counts, [16, 16, 8], "in proportion to weight");
    // Ending flows on b0 makes it the pick again.
    for i in 0..40u16 {
        let client = format!("198.18.0.2:{}", 41000 + i);
        let _ = tcp(&mut f, &client, VIP, TCP_RST);
    }
    assert_eq!(counts.iter().sum::<u64>(), 40);
    for b in 0..3 {
        assert_eq!(f.in_flight("llama", &format!("b{b}")), 0);
    }
}

#[test]
fn a_backend_without_room_loses_to_any_with_room() {
    let weights = [100, 100, 40];
    let mut spec = least_loaded(service("llama", VIP, 6, &weights));
    // The two fast ones batch at most 3 each; the slow one has no limit.
    spec.backends[0].max_in_flight = 3;
    spec.backends[1].max_in_flight = 3;
    let mut f = Fixture::new(&[spec]);
    let mut counts = [0u64; 3];
    let limits = [3u32, 3, 0];
    for i in 0..20u16 {
        let client = format!("198.18.0.2:{}", 41500 + i);
        let (verdict, out) = tcp(&mut f, &client, VIP, TCP_SYN);
        assert_eq!(verdict, XDP_TX);
        let got = backend_of(&out);
        let cand = |b: usize| Candidate {
            in_flight: counts[b],
            weight: weights[b],
            max_in_flight: limits[b],
        };
        for other in 0..3 {
            assert!(
                !better(&cand(other), &cand(got)),
                "SYN {i} went to b{got}, but b{other} was better: counts {counts:?}"
            );
        }
        counts[got] += 1;
    }
    // Fast ones fill their room first; then the score decides among all.
    assert!(counts[0] >= 3 && counts[1] >= 3, "{counts:?}");
    assert!(
        counts[2] >= 8,
        "the slow one takes what the full ones cannot: {counts:?}"
    );
}

#[test]
fn equally_loaded_backends_share_new_flows() {
    let mut f = Fixture::new(&[least_loaded(service("llama", VIP, 6, &[100, 100, 100]))]);
    let mut first_picks = [0u32; 3];
    for i in 0..60u16 {
        let client = format!("198.18.0.2:{}", 42000 + i);
        let (_, out) = tcp(&mut f, &client, VIP, TCP_SYN);
        first_picks[backend_of(&out)] += 1;
        // Reset at once: every pick is made with all three idle.
        let _ = tcp(&mut f, &client, VIP, TCP_RST);
    }
    for (b, n) in first_picks.iter().enumerate() {
        assert!(*n >= 8, "b{b} got {n} of 60 ties: {first_picks:?}");
    }
}

#[test]
fn least_loaded_never_picks_a_backend_at_weight_zero() {
    let mut f = Fixture::new(&[least_loaded(service("llama", VIP, 6, &[100, 0, 100]))]);
    for i in 0..30u16 {
        let client = format!("198.18.0.2:{}", 43000 + i);
        let (verdict, out) = tcp(&mut f, &client, VIP, TCP_SYN);
        assert_eq!(verdict, XDP_TX);
        assert_ne!(backend_of(&out), 1, "SYN {i}");
    }
    assert_eq!(f.in_flight("llama", "b1"), 0);
    let mut all_zero = Fixture::new(&[least_loaded(service("llama", VIP, 6, &[0, 0]))]);
    assert_eq!(
        tcp(&mut all_zero, "198.18.0.2:43100", VIP, TCP_SYN).0,
        XDP_DROP
    );
}

#[test]
fn a_flow_picked_up_mid_stream_goes_where_maglev_sends_it() {
    let weights = [100, 100, 100];
    // Two datapaths that must hash alike: one secret for both.
    let opts = || LoadOptions {
        table_size: 1021,
        flow_hash_key: Some([0x5eed_0001, 0x5eed_0002]),
        ..LoadOptions::default()
    };
    let mut maglev = Fixture::with_options(&[service("llama", VIP, 6, &weights)], opts());
    let mut ll = Fixture::with_options(&[least_loaded(service("llama", VIP, 6, &weights))], opts());
    // Three flows each: equal loads, so a least-loaded pick would be the
    // member where the flow hash starts the scan.
    for port in 44900..44909u16 {
        let _ = tcp(&mut ll, &format!("198.18.0.3:{port}"), VIP, TCP_SYN);
    }
    let mut would_differ = 0;
    for port in 44000..44040u16 {
        let client = format!("198.18.0.2:{port}");
        let (_, want) = tcp(&mut maglev, &client, VIP, TCP_ACK | TCP_PSH);
        let target = backend_of(&want);
        let (_, got) = tcp(&mut ll, &client, VIP, TCP_ACK | TCP_PSH);
        assert_eq!(backend_of(&got), target, "client port {port}");
        // Back to equal loads for the next client.
        let _ = tcp(&mut ll, &client, VIP, TCP_RST);
        let (c, v) = (addr(&client), addr(VIP));
        let hash = router_common::flow_hash::flow_hash(
            maglev.dp.flow_hash_key(),
            u32::from_ne_bytes(c.ip().octets()),
            u32::from_ne_bytes(v.ip().octets()),
            c.port().to_be(),
            v.port().to_be(),
            6,
        );
        if hash % 3 != target as u32 {
            would_differ += 1;
        }
    }
    assert!(
        would_differ >= 10,
        "only {would_differ} of 40 cases tell the two apart"
    );
}

#[test]
fn udp_flows_are_placed_by_load_too() {
    let vip = "198.18.100.2:5353";
    let mut f = Fixture::new(&[least_loaded(service("dns", vip, 17, &[100, 100]))]);
    let mut counts = [0u32; 2];
    for i in 0..10u16 {
        let p = Packet::udp(addr(&format!("198.18.0.2:{}", 45000 + i)), addr(vip), b"q")
            .with_macs(LB_MAC, CLIENT_MAC);
        let (verdict, out) = f.run(&p.build());
        assert_eq!(verdict, XDP_TX);
        counts[backend_of(&out)] += 1;
    }
    assert_eq!(counts, [5, 5]);
}

#[test]
fn a_large_service_compares_two_choices_and_stays_balanced() {
    let n = SCAN_LIMIT + 8;
    let mut weights = vec![100u32; n];
    weights[3] = 0;
    let mut f = Fixture::new(&[least_loaded(service("big", VIP, 6, &weights))]);
    let mut counts = vec![0u32; n];
    let rounds = 10 * n as u32;
    for i in 0..rounds {
        let client = format!("198.18.2.{}:{}", i % 200 + 1, 46000 + i / 200);
        // Most backends have no neighbour here: the translated SYN is passed.
        let p = Packet::tcp(addr(&client), addr(VIP), TCP_SYN).with_macs(LB_MAC, CLIENT_MAC);
        let (verdict, out) = f.run(&p.build());
        assert!(
            verdict == XDP_TX || verdict == XDP_PASS,
            "verdict {verdict}"
        );
        counts[backend_of(&out)] += 1;
    }
    assert_eq!(counts[3], 0, "weight 0 is never picked");
    let live: Vec<u32> = counts
        .iter()
        .enumerate()
        .filter(|(b, _)| *b != 3)
        .map(|(_, c)| *c)
        .collect();
    let (lo, hi) = (live.iter().min().unwrap(), live.iter().max().unwrap());
    // A weighted random draw would spread ±3σ ≈ ±10 around 10; two choices
    // keep every backend within a few flows of the mean.
    assert!(hi - lo <= 6, "spread {lo}..{hi}: {counts:?}");
}

fn conns(f: &mut Fixture) -> aya::maps::HashMap<&mut aya::maps::MapData, ConnKey, ConnEntry> {
    table(f, "CONNS")
}

#[test]
fn the_table_scan_uncounts_flows_that_vanished_without_an_end() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    for port in 47000..47005u16 {
        handshake(&mut f, &format!("198.18.0.2:{port}"));
    }
    assert_eq!(f.in_flight("llama", "b0"), 5);
    // The LRU evicts two flows' forward entries: no FIN will ever count them.
    let victims: Vec<ConnKey> = conns(&mut f)
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, e)| e.flags & router_common::CONN_REPLY == 0)
        .map(|(k, _)| k)
        .take(2)
        .collect();
    for k in &victims {
        conns(&mut f).remove(k).unwrap();
    }
    assert_eq!(f.in_flight("llama", "b0"), 5, "the datapath cannot know");
    let scan = f.dp.conn_table().unwrap().scan().unwrap();
    let id = f.dp.backend_id("llama", "b0").unwrap();
    assert_eq!(scan.counted.get(&id), Some(&3));
    assert_eq!(scan.corrections[&id].leaked, 2);
    assert_eq!(
        f.in_flight("llama", "b0"),
        3,
        "corrected to what the table holds"
    );
    let again = f.dp.conn_table().unwrap().scan().unwrap();
    assert!(again.corrections.is_empty(), "nothing more to correct");
}

#[test]
fn a_drain_deadline_uncounts_the_flows_it_ends() {
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    handshake(&mut f, "198.18.0.2:47100");
    assert_eq!(tcp(&mut f, "198.18.0.2:47101", VIP, TCP_SYN).0, XDP_TX);
    assert_eq!(f.in_flight("llama", "b0"), 2);
    let id = f.dp.backend_id("llama", "b0").unwrap();
    let mut table = f.dp.conn_table().unwrap();
    assert_eq!(table.end_backend_flows(id).unwrap(), 2);
    table.scan().unwrap();
    assert_eq!(f.in_flight("llama", "b0"), 0);
}

/// One service of one backend whose half-open and closing entries expire
/// after 20 ms, so a test can let them.
fn one_backend_with_quick_expiry() -> Fixture {
    Fixture::with_options(
        &[service("llama", VIP, 6, &[1])],
        LoadOptions {
            table_size: 1021,
            tcp_closing_ns: 20_000_000,
            ..LoadOptions::default()
        },
    )
}

#[test]
fn expired_flows_are_uncounted_by_the_scan() {
    let mut f = one_backend_with_quick_expiry();
    // A SYN nobody answers: half-open, then expired after the closing timeout.
    assert_eq!(tcp(&mut f, "198.18.0.2:47200", VIP, TCP_SYN).0, XDP_TX);
    handshake(&mut f, "198.18.0.2:47201");
    std::thread::sleep(std::time::Duration::from_millis(100));
    f.dp.conn_table().unwrap().scan().unwrap();
    assert_eq!(f.in_flight("llama", "b0"), 1, "the confirmed flow lives on");
}

#[test]
fn an_end_from_the_backend_leaves_an_expired_forward_entry_to_the_scan() {
    let mut f = one_backend_with_quick_expiry();
    let client = "198.18.0.2:47300";
    let (backend, snat) = handshake(&mut f, client);
    // The client half-closes, then the backend takes longer than the
    // closing timeout to answer: the client's forward entry expires while
    // the backend's reply entry (not closing: the idle timeout) lives on.
    assert_eq!(tcp(&mut f, client, VIP, TCP_FIN | TCP_ACK).0, XDP_TX);
    std::thread::sleep(std::time::Duration::from_millis(100));
    // The daemon's scan finds the expired entry and uncounts the flow.
    f.dp.conn_table().unwrap().scan().unwrap();
    assert_eq!(
        f.opened_closed("llama", "b0"),
        (1, 1),
        "uncounted by the scan"
    );
    // The backend's FIN (or RST) rides its live reply entry and ends the
    // flow, whose forward entry is still in the table, expired and
    // still carrying CONN_COUNTED: it must not be uncounted a second time.
    assert_eq!(tcp(&mut f, &backend, &snat, TCP_FIN | TCP_ACK).0, XDP_TX);
    assert_eq!(
        f.opened_closed("llama", "b0"),
        (1, 1),
        "an expired flow is the scan's to uncount, once"
    );
    // Counted twice, the end would leave the count one short for good:
    // the next flow would read as none in flight.
    handshake(&mut f, "198.18.0.2:47301");
    assert_eq!(f.in_flight("llama", "b0"), 1);
}
