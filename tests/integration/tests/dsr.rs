//! DSR end to end with real TCP: a client, an LB running the real `router
//! daemon` with a DSR service, and two backends that run `router decap`
//! on their interface and hold the VIP on `lo`. Connections reach both
//! backends, every answer goes straight to the client (the LB counts no
//! reply packet), a request too large for the tunnel gets through after
//! the LB's "fragmentation needed", and `decap detach` removes the program.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use router_testkit::{
    bpffs::BpfFs,
    daemon_proc::{ScratchDir, router_binary, start_daemon, status},
    netns::{self, Topology},
};

const VIP: &str = "198.18.100.1:8000";
const CONNECTIONS: usize = 200;

fn router(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let bin = router_binary()?;
    let mut all = vec![bin.to_string_lossy().into_owned()];
    all.extend(args.iter().map(|s| s.to_string()));
    netns::exec(ns, &all)
}

/// A 6 KB request through `vip` from the client is answered: whatever
/// did not fit the tunnel was refused with an ICMP answer the client's
/// path-MTU discovery acted on.
fn large_request_gets_through(topo: &Topology, vip: SocketAddr) {
    let pad = "x".repeat(6000);
    let answer = netns::in_netns(topo.client_ns(), move || {
        let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(format!("GET / HTTP/1.0\r\nX-Pad: {pad}\r\n\r\n").as_bytes())
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .unwrap();
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
}

/// `CONNECTIONS` GETs through `vip` from the client land on both backends,
/// at least a fifth on each.
fn connections_reach_both_backends(topo: &Topology, vip: SocketAddr) {
    let bodies: Vec<String> = netns::in_netns(topo.client_ns(), move || {
        (0..CONNECTIONS)
            .map(|_| {
                netns::http_get(vip, "/", Duration::from_secs(5))
                    .expect("GET / through the VIP")
                    .body
            })
            .collect()
    })
    .unwrap();
    let mut counts = BTreeMap::new();
    for b in bodies {
        *counts.entry(b).or_insert(0usize) += 1;
    }
    assert_eq!(counts.values().sum::<usize>(), CONNECTIONS);
    assert!(
        counts.len() == 2 && counts.values().all(|n| *n >= CONNECTIONS / 5),
        "{counts:?}"
    );
}

#[test]
fn dsr_connections_reach_the_backends_and_answers_bypass_the_lb() {
    let topo = Topology::one_arm(2).expect("topology");
    let fs = BpfFs::mount().expect("bpffs");
    let vip: SocketAddr = VIP.parse().unwrap();
    let mut servers = Vec::new();
    for i in 0..2 {
        let ns = topo.backend_ns(i);
        // The VIP is the backend's own, on lo; ARP for it stays the LB's.
        netns::exec(ns, &["ip", "addr", "add", "198.18.100.1/32", "dev", "lo"]).unwrap();
        for (key, value) in [
            ("net.ipv4.conf.all.arp_ignore", "1"),
            ("net.ipv4.conf.all.arp_announce", "2"),
        ] {
            netns::exec(ns, &["sysctl", "-q", "-w", &format!("{key}={value}")]).unwrap();
        }
        servers.push(
            netns::spawn_http_backend(ns, &format!("b{i}"), Ipv4Addr::UNSPECIFIED, 8000)
                .expect("backend"),
        );
        let pins = fs.pin_path().join(format!("decap-b{i}"));
        let pins = pins.to_str().unwrap();
        let out = router(
            ns,
            &[
                "decap",
                "attach",
                "--interface",
                topo.backend_if(),
                "--pin-path",
                pins,
            ],
        )
        .expect("decap attach");
        assert!(out.contains(&topo.backend_addr(i).to_string()), "{out}");
        // The LB resolves the backend's neighbour, as a health check would.
        netns::wait_for_tcp(
            topo.lb_ns(),
            SocketAddr::from((topo.backend_addr(i), 8000)),
            Duration::from_secs(5),
        )
        .unwrap();
    }

    let dir = ScratchDir::new("dsr").unwrap();
    let socket = dir.0.join("router.sock");
    let config = dir.0.join("router.toml");
    let mut text = format!(
        "[daemon]\ninterface = \"{}\"\ncontrol_socket = \"{}\"\n\n[[service]]\nname = \"llama\"\n\
         vip = \"{VIP}\"\nforwarding = \"dsr\"\nencap = \"ipip\"\n",
        topo.lb_if(),
        socket.display()
    );
    for i in 0..2 {
        text.push_str(&format!(
            "\n[[service.backend]]\nname = \"b{i}\"\naddress = \"{}:8000\"\nweight = 1\n",
            topo.backend_addr(i)
        ));
    }
    std::fs::write(&config, text).unwrap();
    let daemon = start_daemon(topo.lb_ns(), &config, &socket).expect("daemon");

    connections_reach_both_backends(&topo, vip);

    // A request larger than the tunnel lets through at 1,500 bytes: the
    // client learns the path MTU from the LB's ICMP and sends it again.
    large_request_gets_through(&topo, vip);

    let st = status(&socket).unwrap();
    let svc = &st.datapath.services[0];
    assert_eq!(svc.counters.new_conns as usize, CONNECTIONS + 1, "{svc:?}");
    assert_eq!(svc.counters.reply_packets, 0, "answers went around the LB");
    let reasons: BTreeMap<_, _> = st.datapath.reasons.iter().cloned().collect();
    assert!(reasons["icmp_too_big"] >= 1, "{reasons:?}");
    assert_eq!(reasons["drop_too_big"], 0);
    assert_eq!(reasons["drop_no_backend"], 0);

    let mut decapsulated = 0;
    for i in 0..2 {
        let pins = fs.pin_path().join(format!("decap-b{i}"));
        let pins = pins.to_str().unwrap();
        let json = router(
            topo.backend_ns(i),
            &["decap", "status", "--json", "--pin-path", pins],
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        decapsulated += v[0]["decapsulated"].as_u64().unwrap();
        let detach = [
            "decap",
            "detach",
            "--interface",
            topo.backend_if(),
            "--pin-path",
            pins,
        ];
        let out = router(topo.backend_ns(i), &detach).unwrap();
        assert!(out.contains("detached"), "{out}");
        let again = router(topo.backend_ns(i), &detach);
        let err = format!("{:#}", again.unwrap_err());
        assert!(err.contains("decap is not attached"), "{err}");
    }
    // Every client packet of every connection went through a decap program.
    assert!(
        decapsulated >= (CONNECTIONS * 3) as u64,
        "{decapsulated} decapsulated"
    );
    drop(daemon);
}

/// The IPv6 VIP of the IPv6 test.
const VIP6: &str = "[2001:2:100::1]:8000";

#[test]
fn ipv6_dsr_connections_reach_the_backends_and_answers_bypass_the_lb() {
    let topo = Topology::one_arm(2).expect("topology");
    topo.enable_ipv6().expect("IPv6 in the topology");
    let fs = BpfFs::mount().expect("bpffs");
    let vip: SocketAddr = VIP6.parse().unwrap();
    let mut servers = Vec::new();
    for i in 0..2 {
        let ns = topo.backend_ns(i);
        // The VIP on lo: Neighbor Discovery answers only for addresses
        // of the interface asked on, so no arp_ignore twin is needed.
        netns::exec(
            ns,
            &["ip", "-6", "addr", "add", "2001:2:100::1/128", "dev", "lo"],
        )
        .unwrap();
        servers.push(
            netns::spawn_http_backend(ns, &format!("b{i}"), std::net::Ipv6Addr::UNSPECIFIED, 8000)
                .expect("backend"),
        );
        let pins = fs.pin_path().join(format!("decap6-b{i}"));
        let pins = pins.to_str().unwrap();
        let out = router(
            ns,
            &[
                "decap",
                "attach",
                "--interface",
                topo.backend_if(),
                "--pin-path",
                pins,
            ],
        )
        .expect("decap attach");
        let own = netns::ipv6_addr(topo.backend_addr(i));
        assert!(out.contains(&own.to_string()), "{out}");
        netns::wait_for_tcp(
            topo.lb_ns(),
            SocketAddr::from((own, 8000)),
            Duration::from_secs(5),
        )
        .unwrap();
    }

    let dir = ScratchDir::new("dsr6").unwrap();
    let socket = dir.0.join("router.sock");
    let config = dir.0.join("router.toml");
    let mut text = format!(
        "[daemon]\ninterface = \"{}\"\ncontrol_socket = \"{}\"\n\n[[service]]\nname = \"llama6\"\n\
         vip = \"{VIP6}\"\nforwarding = \"dsr\"\nencap = \"ipip\"\n",
        topo.lb_if(),
        socket.display()
    );
    for i in 0..2 {
        text.push_str(&format!(
            "\n[[service.backend]]\nname = \"b{i}\"\naddress = \"[{}]:8000\"\nweight = 1\n",
            netns::ipv6_addr(topo.backend_addr(i))
        ));
    }
    std::fs::write(&config, text).unwrap();
    let daemon = start_daemon(topo.lb_ns(), &config, &socket).expect("daemon");

    connections_reach_both_backends(&topo, vip);

    // Too large for the tunnel at 1,500 bytes: through after the LB's
    // "packet too big" lowers the client's path MTU.
    large_request_gets_through(&topo, vip);

    let st = status(&socket).unwrap();
    let svc = &st.datapath.services[0];
    assert_eq!(svc.counters.new_conns as usize, CONNECTIONS + 1, "{svc:?}");
    assert_eq!(svc.counters.reply_packets, 0, "answers went around the LB");
    let reasons: BTreeMap<_, _> = st.datapath.reasons.iter().cloned().collect();
    assert!(reasons["icmp_too_big"] >= 1, "{reasons:?}");
    assert_eq!(reasons["drop_no_backend"], 0);

    let mut decapsulated = 0;
    for i in 0..2 {
        let pins = fs.pin_path().join(format!("decap6-b{i}"));
        let json = router(
            topo.backend_ns(i),
            &[
                "decap",
                "status",
                "--json",
                "--pin-path",
                pins.to_str().unwrap(),
            ],
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        decapsulated += v[0]["decapsulated"].as_u64().unwrap();
    }
    assert!(
        decapsulated >= (CONNECTIONS * 3) as u64,
        "{decapsulated} decapsulated"
    );
    drop(daemon);
}
