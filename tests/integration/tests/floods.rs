//! The router under attack, end to end: a real daemon in network
//! namespaces, legitimate HTTP traffic through the VIP, and raw frames
//! injected on the client's interface (tests/kit/src/raw_sender.rs).
//!
//! - Malformed traffic: every class of bad packet is sent in its own phase
//!   while legitimate connections run, and the datapath's reason counters
//!   must move by exactly the number sent — no more, no less, and no other
//!   bad-packet counter may move. Bad-checksum packets are forwarded (the
//!   datapath does not verify checksums), so each gets a 4-tuple of its own
//!   and no SYN flag: each is then exactly one `lru_miss`, which legitimate
//!   traffic never causes here, and the backends' kernels must count
//!   exactly as many checksum errors.
//! - A SYN flood from spoofed sources overflowing a small connection table
//!   (tests/bench/src/synflood.rs): established streams and new connections must
//!   survive it.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use router_bench::synflood::{self, Rig, VIP_ADDR};
use router_testkit::{
    netns,
    packet::{Packet, TCP_ACK, TCP_SYN, fill_checksums},
    raw_sender::RawSender,
};

/// Packets per class of bad traffic.
const PER_CLASS: u16 = 400;
/// Slow enough that every frame reaches the LB (no backlog overflow on the
/// way) while legitimate traffic runs.
const PACE_PPS: u32 = 8_000;

/// Every counter a bad packet could move. Legitimate traffic moves none of
/// them in this test, so each class's deltas must be exact.
const BAD_REASONS: [&str; 12] = [
    "drop_malformed",
    "pass_fragment",
    "pass_ip_options",
    "pass_unknown_proto",
    "pass_icmp_other",
    "pass_icmp_untracked",
    "lru_miss",
    "drop_no_backend",
    "drop_conn_table_full",
    "drop_snat_exhausted",
    "pass_no_reply_entry",
    "drop_no_reply_entry",
];

/// A kernel SNMP counter on the backends: (file under /proc/net, section, field).
type KernelCounter = (&'static str, &'static str, &'static str);
const TCP_CSUM_ERRORS: KernelCounter = ("snmp", "Tcp", "InCsumErrors");
const IP_CSUM_ERRORS: KernelCounter = ("netstat", "IpExt", "InCsumErrors");

struct Class {
    name: &'static str,
    reason: &'static str,
    frames: Vec<Vec<u8>>,
    /// For packets the datapath forwards: the backend kernel counter that
    /// must account for each of them.
    backend_counter: Option<KernelCounter>,
}

/// Source `i` of class `c`: its own address and port in 198.19.0.0/16.
fn spoofed(c: u8, i: u16) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::new(198, 19, c, (i % 250) as u8 + 1),
        20_000 + i / 250,
    )
}

fn ip_checksum_only(frame: &mut [u8]) {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = router_common::csum::checksum(&frame[14..14 + ihl], 0);
    frame[24..26].copy_from_slice(&c.to_ne_bytes());
}

fn set_tot_len(frame: &mut [u8], len: u16) {
    frame[16..18].copy_from_slice(&len.to_be_bytes());
}

fn classes(lb: [u8; 6], client: [u8; 6]) -> Vec<Class> {
    let tcp = |c: u8, i: u16, flags: u8| {
        Packet::tcp(spoofed(c, i), VIP_ADDR, flags).with_macs(lb, client)
    };
    let syn = |c: u8, i: u16| tcp(c, i, TCP_SYN).build();
    fn class(
        c: u8,
        name: &'static str,
        reason: &'static str,
        f: &dyn Fn(u8, u16) -> Vec<u8>,
    ) -> Class {
        Class {
            name,
            reason,
            frames: (0..PER_CLASS).map(|i| f(c, i)).collect(),
            backend_counter: None,
        }
    }
    let mut v = vec![
        class(1, "Ethernet header only", "drop_malformed", &|c, i| {
            syn(c, i)[..14].to_vec()
        }),
        class(2, "truncated IPv4 header", "drop_malformed", &|c, i| {
            syn(c, i)[..24].to_vec()
        }),
        class(3, "truncated TCP header", "drop_malformed", &|c, i| {
            let mut f = syn(c, i)[..44].to_vec();
            set_tot_len(&mut f, 30);
            ip_checksum_only(&mut f);
            f
        }),
        class(4, "IHL 4", "drop_malformed", &|c, i| {
            let mut f = syn(c, i);
            f[14] = 0x44;
            f
        }),
        class(
            5,
            "version 6 in an IPv4 frame",
            "drop_malformed",
            &|c, i| {
                let mut f = syn(c, i);
                f[14] = 0x65;
                ip_checksum_only(&mut f);
                f
            },
        ),
        class(
            6,
            "total length beyond the frame",
            "drop_malformed",
            &|c, i| {
                let mut f = syn(c, i);
                set_tot_len(&mut f, 200);
                ip_checksum_only(&mut f);
                f
            },
        ),
        class(
            7,
            "total length below the header",
            "drop_malformed",
            &|c, i| {
                let mut f = syn(c, i);
                set_tot_len(&mut f, 12);
                ip_checksum_only(&mut f);
                f
            },
        ),
        class(8, "TCP data offset 4", "drop_malformed", &|c, i| {
            let mut f = syn(c, i);
            f[46] = 0x40;
            fill_checksums(&mut f);
            f
        }),
        class(
            9,
            "TCP data offset beyond the datagram",
            "drop_malformed",
            &|c, i| {
                let mut f = syn(c, i);
                f[46] = 0xf0;
                fill_checksums(&mut f);
                f
            },
        ),
        class(10, "UDP length below 8", "drop_malformed", &|c, i| {
            let mut f = Packet::udp(spoofed(c, i), VIP_ADDR, b"abcd")
                .with_macs(lb, client)
                .build();
            f[38..40].copy_from_slice(&4u16.to_be_bytes());
            fill_checksums(&mut f);
            f
        }),
        class(
            11,
            "UDP length beyond the datagram",
            "drop_malformed",
            &|c, i| {
                let mut f = Packet::udp(spoofed(c, i), VIP_ADDR, b"abcd")
                    .with_macs(lb, client)
                    .build();
                f[38..40].copy_from_slice(&200u16.to_be_bytes());
                f
            },
        ),
        class(12, "first fragment (MF)", "pass_fragment", &|c, i| {
            let mut p = tcp(c, i, TCP_SYN);
            p.frag = 0x2000;
            p.build()
        }),
        class(
            13,
            "later fragment (offset 128)",
            "pass_fragment",
            &|c, i| {
                let mut p = tcp(c, i, TCP_SYN);
                p.frag = 0x0010;
                p.build()
            },
        ),
        class(
            14,
            "IP options (NOP, NOP, NOP, EOL)",
            "pass_ip_options",
            &|c, i| {
                let mut p = tcp(c, i, TCP_SYN);
                p.ip_options = vec![0x01, 0x01, 0x01, 0x00];
                p.build()
            },
        ),
        class(15, "ICMP echo to the VIP", "pass_icmp_other", &|c, i| {
            let mut p = tcp(c, i, 0);
            p.proto = 1;
            p.payload = vec![8, 0, 0xf7, 0xff, 0, 0, 0, 0];
            p.build()
        }),
        class(
            16,
            "protocol 253 to the VIP",
            "pass_unknown_proto",
            &|c, i| {
                let mut p = tcp(c, i, 0);
                p.proto = 253;
                p.payload = vec![0; 8];
                p.build()
            },
        ),
        class(
            19,
            "port unreachable about no flow, to the VIP",
            "pass_icmp_untracked",
            &|c, i| {
                // As if the LB had sent this reply to the spoofed source.
                let about = Packet::udp(VIP_ADDR, spoofed(c, i), b"reply");
                Packet::icmp_error(*spoofed(c, i).ip(), &about, (3, 3), [0; 4], 548)
                    .with_macs(lb, client)
                    .build()
            },
        ),
    ];
    let mut bad_tcp = class(
        17,
        "bad TCP checksum (ACK, own 4-tuple)",
        "lru_miss",
        &|c, i| {
            let mut f = tcp(c, i, TCP_ACK).build();
            f[50] ^= 0x5a;
            f
        },
    );
    bad_tcp.backend_counter = Some(TCP_CSUM_ERRORS);
    let mut bad_ip = class(
        18,
        "bad IPv4 header checksum (ACK, own 4-tuple)",
        "lru_miss",
        &|c, i| {
            let mut f = tcp(c, i, TCP_ACK).build();
            f[24] ^= 0x5a;
            f
        },
    );
    bad_ip.backend_counter = Some(IP_CSUM_ERRORS);
    v.push(bad_tcp);
    v.push(bad_ip);
    v
}

/// Sums one kernel counter over every backend namespace.
fn backend_counter(rig: &Rig, (file, section, field): KernelCounter) -> u64 {
    (0..rig.topo.backend_count())
        .map(|i| {
            let text = netns::exec(
                rig.topo.backend_ns(i),
                &["cat", &format!("/proc/net/{file}")],
            )
            .unwrap();
            let prefix = format!("{section}:");
            let mut rows = text.lines().filter(|l| l.starts_with(&prefix));
            let names = rows
                .next()
                .unwrap_or_else(|| panic!("no {section} in {file}"));
            let values = rows.next().unwrap();
            let at = names
                .split_whitespace()
                .position(|n| n == field)
                .unwrap_or_else(|| panic!("no {section} {field} in {file}"));
            values
                .split_whitespace()
                .nth(at)
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum()
}

fn reasons(rig: &Rig) -> BTreeMap<String, u64> {
    rig.status().unwrap().datapath.reasons.into_iter().collect()
}

/// Polls `read` until it reaches `target` (or 5 s pass), then waits a
/// little longer so that a late overshoot would show too. The caller
/// asserts the exact count, so time never decides a pass: the 5 s only
/// ends the wait for a count that will never come, and the 300 ms is a
/// margin for packets still queued on the veth, which XDP counts within
/// microseconds of their sending (the sender has returned by then).
fn settle(mut read: impl FnMut() -> u64, target: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    for _ in 0..200 {
        if read() >= target || Instant::now() > deadline {
            break;
        }
        thread::sleep(Duration::from_millis(25));
    }
    thread::sleep(Duration::from_millis(300));
    read()
}

#[test]
fn malformed_traffic_is_counted_exactly_while_legitimate_connections_run() {
    let rig = Rig::new("malformed", 2, "", &[]).unwrap();
    let (got, failed, errors) = rig.short_gets(10).unwrap();
    assert_eq!((got, failed), (10, 0), "before any bad packet: {errors:?}");

    let sender = RawSender::open(rig.topo.client_ns(), rig.topo.client_if()).unwrap();
    let classes = classes(rig.lb_mac, rig.client_mac);
    let vip = SocketAddr::V4(VIP_ADDR);
    let stop = AtomicBool::new(false);
    let client_ns = rig.topo.client_ns();

    let (mismatches, legit) = thread::scope(|s| {
        // Legitimate traffic for the whole run: short connections in a loop,
        // bounded by count and time.
        let stop = &stop;
        let legit = s.spawn(move || {
            netns::in_netns(client_ns, || {
                let (mut attempts, mut failures) = (0u32, Vec::new());
                let deadline = Instant::now() + Duration::from_secs(45);
                while !stop.load(Ordering::Relaxed)
                    && attempts < 20_000
                    && Instant::now() < deadline
                {
                    attempts += 1;
                    match netns::http_get(vip, "/", Duration::from_secs(5)) {
                        Ok(r) if r.status == 200 => {}
                        Ok(r) => failures.push(format!("{} {:?}", r.status, r.body)),
                        Err(e) => failures.push(format!("{e:#}")),
                    }
                    thread::sleep(Duration::from_millis(5));
                }
                (attempts, failures)
            })
            .unwrap()
        });

        let mut mismatches = Vec::new();
        for class in &classes {
            let n = class.frames.len() as u64;
            let before = reasons(&rig);
            let kernel_before = class.backend_counter.map(|c| backend_counter(&rig, c));
            sender
                .send_paced(&class.frames, PACE_PPS, Duration::from_secs(10))
                .unwrap();
            let own = before[class.reason];
            settle(|| reasons(&rig)[class.reason] - own, n);
            let after = reasons(&rig);
            for r in BAD_REASONS {
                let want = if r == class.reason { n } else { 0 };
                let got = after[r] - before[r];
                if got != want {
                    mismatches.push(format!(
                        "{}: {r} moved by {got}, expected {want}",
                        class.name
                    ));
                }
            }
            let mut line = format!(
                "{:<45} {n} sent, {} +{}",
                class.name,
                class.reason,
                after[class.reason] - before[class.reason]
            );
            if let (Some(c), Some(k0)) = (class.backend_counter, kernel_before) {
                let got = settle(|| backend_counter(&rig, c) - k0, n);
                line.push_str(&format!(", backends' {} {} +{got}", c.1, c.2));
                if got != n {
                    mismatches.push(format!(
                        "{}: backends counted {got} {} {}, expected {n}",
                        class.name, c.1, c.2
                    ));
                }
            }
            eprintln!("{line}");
        }
        stop.store(true, Ordering::Relaxed);
        (mismatches, legit.join().unwrap())
    });

    let (attempts, failures) = legit;
    eprintln!(
        "legitimate connections alongside: {attempts}, failed: {}",
        failures.len()
    );
    assert!(
        mismatches.is_empty(),
        "counters did not account for every bad packet:\n{}",
        mismatches.join("\n")
    );
    assert!(
        attempts >= 100,
        "only {attempts} legitimate connections ran alongside"
    );
    assert!(
        failures.is_empty(),
        "{} of {attempts} legitimate connections failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // The path is as healthy after the run as before.
    let (got, failed, errors) = rig.short_gets(20).unwrap();
    assert_eq!((got, failed), (20, 0), "after the bad packets: {errors:?}");
    rig.stop().unwrap();
}

#[test]
fn syn_flood_overflowing_the_connection_table_spares_streams_and_new_connections() {
    let params = synflood::Params::test();
    let report = synflood::run(&params).expect("SYN-flood scenario");
    eprintln!("{}", report.table());
    eprintln!("new connection errors: {:?}", report.new_conn_errors);

    // The flood really overflowed the tables, many times over: ten times
    // what the connection table holds, and twice the flows (two entries
    // each) that the half-open table holds, which is where SYNs go.
    let half_open = router_common::half_open_table_size(params.conn_table_size);
    assert!(
        report.datapath_new_flows >= 10 * u64::from(params.conn_table_size)
            && report.datapath_new_flows >= u64::from(half_open),
        "the flood created only {} flows against a table of {} and a half-open table of {}",
        report.datapath_new_flows,
        params.conn_table_size,
        half_open
    );
    // And no spoofed SYN got into the connection table: it holds at most
    // the two directions of each legitimate connection (a flood that got
    // there fills it).
    assert!(
        report.conn_table_entries <= 2 * report.legitimate_connections(),
        "{} connection-table entries for {} legitimate connections",
        report.conn_table_entries,
        report.legitimate_connections()
    );
    let broken: Vec<_> = report
        .streams
        .iter()
        .filter(|s| s.error.is_some())
        .collect();
    assert!(
        broken.is_empty(),
        "{} of {} established streams broke under the flood: {broken:?}",
        broken.len(),
        report.streams.len()
    );
    assert!(
        report.new_conn_attempts >= 20,
        "only {} new connections were tried during the flood",
        report.new_conn_attempts
    );
    assert_eq!(
        (report.new_conn_failures, report.after_flood_failures),
        (0, 0),
        "new connections failed during ({} of {}) or after ({} of {}) the flood: {:?}",
        report.new_conn_failures,
        report.new_conn_attempts,
        report.after_flood_failures,
        report.after_flood_attempts,
        report.new_conn_errors
    );
}
