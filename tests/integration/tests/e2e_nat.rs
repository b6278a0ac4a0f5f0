//! End to end with real TCP: a client namespace, an LB namespace running the
//! real `router daemon`, and three backend namespaces running real HTTP
//! servers. Connections to the VIP split in the weight ratio; a weight change
//! moves new connections while long-lived streams stay on their backend. An
//! ICMP error a backend's kernel sends about a flow reaches its client.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use router_testkit::{
    bpffs::BpfFs,
    daemon_proc::{
        ScratchDir, cleanup_pins, cli, one_arm_config, router_binary, start_daemon,
        start_daemon_pinned, status,
    },
    netns::{self, Topology},
};

const VIP: &str = "198.18.100.1:8000";
const CONNECTIONS: usize = 2400;
const CLIENT_THREADS: usize = 8;

fn backends(weights: &[u32]) -> Vec<(String, String, u32)> {
    netns::fixture_backends(weights)
}

/// `n` short HTTP connections to the VIP from the client namespace; returns
/// how many answers each backend gave.
fn short_connections(topo: &Topology, n: usize) -> BTreeMap<String, usize> {
    let vip: SocketAddr = VIP.parse().unwrap();
    let per_thread = n / CLIENT_THREADS;
    let results: Vec<Vec<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENT_THREADS)
            .map(|_| {
                s.spawn(move || {
                    netns::in_netns(topo.client_ns(), move || {
                        (0..per_thread)
                            .map(|_| {
                                netns::http_get(vip, "/", Duration::from_secs(5))
                                    .expect("GET / through the VIP")
                                    .body
                            })
                            .collect::<Vec<_>>()
                    })
                    .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut counts = BTreeMap::new();
    for body in results.into_iter().flatten() {
        *counts.entry(body).or_insert(0) += 1;
    }
    counts
}

#[test]
fn connections_split_by_weight_and_streams_survive_a_weight_change() {
    let topo = Topology::one_arm(3).expect("topology");
    // The LB reaches every backend once, as a health check would; this also
    // resolves their neighbours before the first balanced packet.
    let _servers = topo
        .spawn_ready_fixture_backends(8000)
        .expect("backend servers");

    let dir = ScratchDir::new("e2e").unwrap();
    let socket = dir.0.join("router.sock");
    let config = dir.0.join("router.toml");
    std::fs::write(
        &config,
        one_arm_config(
            &socket,
            topo.lb_if(),
            VIP,
            netns::LB_ADDR,
            &backends(&[100, 200, 500]),
        ),
    )
    .unwrap();
    let daemon = start_daemon(topo.lb_ns(), &config, &socket).expect("daemon");

    // 1:2:5 → 12.5%, 25%, 62.5%. Each share is binomial; with 2400
    // connections its standard deviation is at most 1.0 percentage point,
    // so a tolerance of 4 points is 4σ or more.
    let counts = short_connections(&topo, CONNECTIONS);
    let total: usize = counts.values().sum();
    assert_eq!(total, CONNECTIONS);
    for (name, expected) in [("b0", 0.125), ("b1", 0.25), ("b2", 0.625)] {
        let share = *counts.get(name).unwrap_or(&0) as f64 / total as f64;
        assert!(
            (share - expected).abs() <= 0.04,
            "{name}: share {share:.3}, expected {expected} ± 0.04 ({counts:?})"
        );
    }

    // The datapath's own counters agree with what the clients saw.
    let st = status(&socket).unwrap();
    let svc = &st.datapath.services[0];
    assert_eq!(svc.counters.new_conns as usize, CONNECTIONS, "{svc:?}");
    for b in &svc.backends {
        assert_eq!(
            b.counters.new_conns as usize, counts[&b.name],
            "backend {} new connections",
            b.name
        );
    }
    let reasons: BTreeMap<_, _> = st.datapath.reasons.iter().cloned().collect();
    assert_eq!(reasons["drop_malformed"], 0);
    assert_eq!(reasons["drop_snat_exhausted"], 0);
    assert!(reasons["tx"] > 0);

    // Long-lived streams opened before the change.
    let vip: SocketAddr = VIP.parse().unwrap();
    let streams: Vec<TcpStream> = netns::in_netns(topo.client_ns(), || {
        (0..12)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(5)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s.write_all(b"GET /stream?seconds=6&interval_ms=100 HTTP/1.0\r\n\r\n")
                    .unwrap();
                s
            })
            .collect()
    })
    .unwrap();
    let mut readers: Vec<BufReader<TcpStream>> = streams.into_iter().map(BufReader::new).collect();
    let mut owners = Vec::new();
    for r in &mut readers {
        let mut line = String::new();
        // Skip the status line and headers.
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        line.clear();
        r.read_line(&mut line).unwrap();
        owners.push(line.trim().to_string());
    }
    assert!(
        owners.iter().any(|o| o != "b2"),
        "some stream must start off b2: {owners:?}"
    );

    // All weight to b2, applied by `router reload`.
    std::fs::write(
        &config,
        one_arm_config(
            &socket,
            topo.lb_if(),
            VIP,
            netns::LB_ADDR,
            &backends(&[0, 0, 100]),
        ),
    )
    .unwrap();
    let msg = cli(&socket, &["reload"]).expect("reload");
    assert!(msg.contains("1 tables swapped"), "{msg}");

    let after = short_connections(&topo, 400);
    assert_eq!(
        after.get("b2"),
        Some(&400),
        "new connections all go to b2: {after:?}"
    );

    // Every stream keeps its backend and ends cleanly (EOF, no reset).
    for (r, owner) in readers.iter_mut().zip(&owners) {
        let mut lines = 1;
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) => break,
                Ok(_) => {
                    assert_eq!(line.trim(), owner, "stream changed backend");
                    lines += 1;
                }
                Err(e) => panic!("stream on {owner} broke after {lines} lines: {e}"),
            }
        }
        assert!(
            lines >= 50,
            "stream on {owner} ended early after {lines} lines"
        );
    }

    let code = daemon.stop(Duration::from_secs(10)).unwrap();
    assert!(code.success(), "daemon exit status {code}");
    // SIGTERM left the pinned datapath attached (restart.rs);
    // `stop` then ran `router daemon --cleanup`, which detaches it.
    let link = netns::exec(topo.lb_ns(), &["ip", "link", "show", topo.lb_if()]).unwrap();
    assert!(
        !link.contains("xdp"),
        "XDP still attached after its pins were removed: {link}"
    );
}

/// `net.ipv4.conf.lb0.<key>` in the LB namespace.
fn lb_setting(topo: &Topology, key: &str) -> String {
    let path = format!("/proc/sys/net/ipv4/conf/{}/{key}", topo.lb_if());
    netns::in_netns(topo.lb_ns(), || std::fs::read_to_string(&path))
        .unwrap()
        .unwrap()
        .trim()
        .to_string()
}

/// A host nobody prepared: forwarding off, `accept_local` off, strict
/// reverse-path filtering, an empty neighbour table, static weights and no
/// health checks. With the daemon's managed neighbour entries deleted,
/// nothing resolves a backend's neighbour before the first balanced SYN,
/// which the stack must then forward translated.
/// `config check` names what the daemon will set, the daemon sets it and
/// every connection succeeds, and `--cleanup` in the same namespace gives
/// the host its settings back.
#[test]
fn an_unprepared_host_forwards_every_connection_and_gets_its_settings_back() {
    let topo = Topology::one_arm_unprepared(3).expect("topology");
    let _servers = topo.spawn_fixture_backends(8000).expect("backend servers");
    let before: Vec<String> = ["forwarding", "accept_local", "rp_filter"]
        .iter()
        .map(|k| lb_setting(&topo, k))
        .collect();
    assert_eq!(before, ["0", "0", "1"]);
    let neighbours = netns::exec(topo.lb_ns(), &["ip", "neigh", "show"]).unwrap();
    assert!(
        neighbours.trim().is_empty(),
        "no neighbour known: {neighbours}"
    );

    let dir = ScratchDir::new("e2e-unprepared").unwrap();
    let socket = dir.0.join("router.sock");
    let config = dir.0.join("router.toml");
    std::fs::write(
        &config,
        one_arm_config(
            &socket,
            topo.lb_if(),
            VIP,
            netns::LB_ADDR,
            &backends(&[100, 100, 100]),
        ),
    )
    .unwrap();
    let router = router_binary().unwrap();
    let check = netns::exec(
        topo.lb_ns(),
        &[
            router.to_str().unwrap(),
            "config",
            "check",
            config.to_str().unwrap(),
        ],
    )
    .unwrap();
    assert!(
        check.contains(&format!(
            "{} is a veth: frames the router sends out of it",
            topo.lb_if()
        )),
        "config check names what the veth needs from its peer: {check}"
    );
    for key in ["forwarding 0 → 1", "accept_local 0 → 1", "rp_filter 1 → 2"] {
        assert!(
            check.contains(&format!(
                "the daemon sets net.ipv4.conf.{}.{key}",
                topo.lb_if()
            )),
            "{key}: {check}"
        );
    }

    let pins = BpfFs::mount().unwrap();
    let daemon =
        start_daemon_pinned(topo.lb_ns(), &config, &socket, &pins.pin_path()).expect("daemon");
    assert_eq!(
        ["forwarding", "accept_local", "rp_filter"].map(|k| lb_setting(&topo, k)),
        ["1", "1", "2"]
    );
    // The daemon gave each backend a managed neighbour entry at start
    // (tests/neighbours.rs). Without them the first packets of flows meet
    // unresolved neighbours, as on a kernel before 5.16: the stack must
    // resolve them, and only the settings above let it. The daemon adds
    // them again on reload or a link change only, so they stay gone.
    for i in 0..3 {
        let addr = topo.backend_addr(i).to_string();
        netns::exec(
            topo.lb_ns(),
            &["ip", "neigh", "del", &addr, "dev", topo.lb_if()],
        )
        .unwrap();
    }
    let counts = short_connections(&topo, 240);
    assert_eq!(counts.values().sum::<usize>(), 240, "{counts:?}");
    assert_eq!(counts.len(), 3, "every backend answers: {counts:?}");
    let reasons = &status(&socket).unwrap().datapath.reasons;
    let fib_failed = reasons
        .iter()
        .find(|(r, _)| r == "pass_fib_failed")
        .map_or(0, |(_, n)| *n);
    assert!(
        fib_failed > 0,
        "the first packets met unresolved neighbours and went through the stack: {reasons:?}"
    );

    assert!(daemon.stop(Duration::from_secs(10)).unwrap().success());
    // --cleanup from another namespace must not touch this one's settings.
    let elsewhere = cleanup_pins(&socket, &pins.pin_path()).unwrap();
    assert!(elsewhere.contains("not restored"), "{elsewhere}");
    assert_eq!(lb_setting(&topo, "rp_filter"), "2");
    // In the daemon's namespace it restores them.
    let out = netns::exec(
        topo.lb_ns(),
        &[
            router.to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
            "daemon",
            "--cleanup",
            "--pin-path",
            pins.pin_path().to_str().unwrap(),
        ],
    )
    .unwrap();
    assert!(out.contains("restored net.ipv4.conf"), "{out}");
    assert_eq!(
        ["forwarding", "accept_local", "rp_filter"].map(|k| lb_setting(&topo, k)),
        ["0", "0", "1"]
    );
}

/// A UDP service whose backends listen on nothing: each backend's kernel
/// answers a datagram with "port unreachable", addressed to the SNAT
/// address and quoting what the LB sent it. The datapath translates it
/// back (the quote becomes the client's own datagram to the VIP), so the
/// client's connected socket fails at once with ECONNREFUSED, as it would
/// talking to the backend directly. Untranslated, the error would end at
/// the LB's stack and the client would wait for its timeout.
#[test]
fn a_backends_port_unreachable_reaches_the_udp_client() {
    let topo = Topology::one_arm(2).expect("topology");
    let dir = ScratchDir::new("e2e-icmp").unwrap();
    let socket = dir.0.join("router.sock");
    let config = dir.0.join("router.toml");
    let vip = "198.18.100.1:5353";
    let closed: Vec<(String, String, u32)> = (0..2)
        .map(|i| {
            (
                format!("b{i}"),
                format!("{}:5353", netns::backend_addr(i)),
                100,
            )
        })
        .collect();
    let toml = one_arm_config(&socket, topo.lb_if(), vip, netns::LB_ADDR, &closed)
        .replace("protocol = \"tcp\"", "protocol = \"udp\"");
    assert!(toml.contains("protocol = \"udp\""), "{toml}");
    std::fs::write(&config, toml).unwrap();
    let daemon = start_daemon(topo.lb_ns(), &config, &socket).expect("daemon");

    let vip: SocketAddr = vip.parse().unwrap();
    let outcomes: Vec<std::io::Result<usize>> = netns::in_netns(topo.client_ns(), || {
        // Several clients, so that both backends (and, for the first
        // datagram to each, an unresolved neighbour) are met; no more
        // than a backend's kernel sends in a burst to one address (6)
        // before its ICMP rate limit holds errors back.
        (0..4)
            .map(|i| {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.connect(vip).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                s.send(format!("query {i}").as_bytes()).unwrap();
                s.recv(&mut [0u8; 64])
            })
            .collect()
    })
    .unwrap();
    for (i, o) in outcomes.iter().enumerate() {
        let kind = o.as_ref().map_err(std::io::Error::kind);
        assert_eq!(
            kind.err(),
            Some(std::io::ErrorKind::ConnectionRefused),
            "client {i}: {o:?}"
        );
    }
    let st = status(&socket).unwrap();
    let reasons: BTreeMap<_, _> = st.datapath.reasons.iter().cloned().collect();
    assert_eq!(reasons["pass_icmp_untracked"], 0, "{reasons:?}");
    let svc = &st.datapath.services[0];
    assert_eq!(svc.counters.new_conns, 4, "{svc:?}");
    assert_eq!(
        svc.counters.reply_packets, 4,
        "one translated error per datagram: {svc:?}"
    );
    assert!(daemon.stop(Duration::from_secs(10)).unwrap().success());
}

/// NAT over IPv6 with real TCP: an IPv6 VIP, two IPv6 backends, the LB's
/// own IPv6 address as SNAT address. Connections split over both backends,
/// their answers come back through the LB (reply packets counted), and a
/// request of several full segments and its answer get through.
#[test]
fn ipv6_nat_connections_reach_both_backends_through_the_snat_address() {
    const VIP6: &str = "[2001:2:100::1]:8000";
    const N: usize = 200;
    let topo = Topology::one_arm(2).expect("topology");
    topo.enable_ipv6().expect("IPv6 in the topology");
    let snat = netns::ipv6_addr(netns::LB_ADDR);
    let mut servers = Vec::new();
    for i in 0..2 {
        let ns = topo.backend_ns(i);
        servers.push(
            netns::spawn_http_backend(ns, &format!("b{i}"), std::net::Ipv6Addr::UNSPECIFIED, 8000)
                .expect("backend"),
        );
        let own = netns::ipv6_addr(topo.backend_addr(i));
        netns::wait_for_tcp(
            topo.lb_ns(),
            SocketAddr::from((own, 8000)),
            Duration::from_secs(5),
        )
        .unwrap();
    }
    let dir = ScratchDir::new("nat6").unwrap();
    let socket = dir.0.join("router.sock");
    let config = dir.0.join("router.toml");
    let backends: Vec<(String, String, u32)> = (0..2)
        .map(|i| {
            let addr = netns::ipv6_addr(topo.backend_addr(i));
            (format!("b{i}"), format!("[{addr}]:8000"), 1)
        })
        .collect();
    std::fs::write(
        &config,
        one_arm_config(&socket, topo.lb_if(), VIP6, snat, &backends),
    )
    .unwrap();
    let daemon = start_daemon(topo.lb_ns(), &config, &socket).expect("daemon");

    let vip: SocketAddr = VIP6.parse().unwrap();
    let bodies: Vec<String> = netns::in_netns(topo.client_ns(), move || {
        (0..N)
            .map(|_| {
                netns::http_get(vip, "/", Duration::from_secs(5))
                    .expect("GET / through the IPv6 VIP")
                    .body
            })
            .collect()
    })
    .unwrap();
    let mut counts = BTreeMap::new();
    for b in bodies {
        *counts.entry(b).or_insert(0usize) += 1;
    }
    assert!(
        counts.len() == 2 && counts.values().all(|n| *n >= N / 5),
        "{counts:?}"
    );

    // Several full segments each way, every one translated.
    let pad = "x".repeat(6000);
    let answer = netns::in_netns(topo.client_ns(), move || {
        let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(
            format!("GET /stream?seconds=1&interval_ms=10 HTTP/1.0\r\nX-Pad: {pad}\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut s, &mut out).unwrap();
        out
    })
    .unwrap();
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");

    let st = status(&socket).unwrap();
    let svc = &st.datapath.services[0];
    assert_eq!(svc.counters.new_conns as usize, N + 1, "{svc:?}");
    assert!(
        svc.counters.reply_packets as usize >= 2 * N,
        "the answers came back through the LB: {svc:?}"
    );
    let reasons: BTreeMap<_, _> = st.datapath.reasons.iter().cloned().collect();
    for r in [
        "drop_no_backend",
        "drop_snat_exhausted",
        "drop_no_reply_entry",
        "drop_malformed",
    ] {
        assert_eq!(reasons[r], 0, "{r}: {reasons:?}");
    }
    drop(daemon);
    drop(servers);
}
