//! Several ingress nodes: two LB namespaces, each running the real `router
//! daemon` with one `hash_seed`, a DSR service and `[bgp]` towards an
//! upstream router running BIRD 2, which installs an ECMP route over both
//! (see `multi_node/topology.rs`). The route appears with both next hops,
//! flows split over both LBs, both report one table fingerprint; a kill -9
//! of one LB during long streams withdraws its next hop and no stream is
//! reset or moves backend (the survivor re-hashes them: `lru_miss`); a
//! SIGTERM withdraws first and loses no connection either; an LB with every
//! backend drained withdraws, and announces again when they come back.

#[path = "multi_node/topology.rs"]
mod topology;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use router_testkit::{
    daemon_proc::{Daemon, ScratchDir, start_daemon},
    netns,
};
use topology::*;

const SEED: &str = "5eedf00dcafe0001";
const HOLD_S: u64 = 3;
const STREAMS: usize = 50;

fn config(socket: &std::path::Path, i: usize) -> String {
    let mut s = format!(
        "[daemon]\ninterface = \"eth0\"\ncontrol_socket = \"{}\"\nhash_seed = \"{SEED}\"\n\n\
         [bgp]\nlocal_as = {LB_AS}\nrouter_id = \"{}\"\npeers = [{{ address = \"{ROUTER_LAN}\", as = {ROUTER_AS} }}]\n\
         hold_time = \"{HOLD_S}s\"\ndrain = \"2s\"\n\n\
         [[service]]\nname = \"llama\"\nvip = \"{VIP}\"\nforwarding = \"dsr\"\nencap = \"ipip\"\n",
        socket.display(),
        lb_addr(i)
    );
    for b in 0..2 {
        s.push_str(&format!(
            "\n[[service.backend]]\nname = \"b{b}\"\naddress = \"{}:8000\"\nweight = 1\n",
            backend_addr(b)
        ));
    }
    s
}

fn lb_new_conns(d: &Daemon) -> u64 {
    d.status().unwrap().datapath.services[0].counters.new_conns
}

/// `n` long streams from the client: each reads its first line (the
/// backend's name) and keeps the rest for later.
fn open_streams(t: &MultiNode, n: usize) -> Vec<(BufReader<TcpStream>, String)> {
    let vip: SocketAddr = VIP.parse().unwrap();
    netns::in_netns(&t.client, || {
        (0..n)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(5)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(b"GET /stream?seconds=8&interval_ms=100 HTTP/1.0\r\n\r\n")
                    .unwrap();
                let mut r = BufReader::new(s);
                let mut line = String::new();
                loop {
                    line.clear();
                    r.read_line(&mut line).unwrap();
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                }
                line.clear();
                r.read_line(&mut line).unwrap();
                (r, line.trim().to_string())
            })
            .collect()
    })
    .unwrap()
}

/// Reads every stream to its end: each line from its first backend, then
/// a clean EOF (no reset).
fn finish_streams(streams: Vec<(BufReader<TcpStream>, String)>) {
    for (i, (mut r, owner)) in streams.into_iter().enumerate() {
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) => break,
                Ok(_) => assert_eq!(line.trim(), owner, "stream {i} changed backend"),
                Err(e) => panic!("stream {i} (on {owner}) broke: {e}"),
            }
        }
    }
}

#[test]
fn two_lbs_share_the_vip_and_a_killed_one_loses_no_stream() {
    let t = MultiNode::build(2, 2).expect("topology");
    let dir = ScratchDir::new("multinode").unwrap();
    let mut servers = Vec::new();
    for (i, b) in t.backends.iter().enumerate() {
        servers.push(
            netns::spawn_http_backend(b, &format!("b{i}"), std::net::Ipv4Addr::UNSPECIFIED, 8000)
                .expect("backend"),
        );
    }
    let bpffs = router_testkit::bpffs::BpfFs::mount().unwrap();
    for (i, b) in t.backends.iter().enumerate() {
        let bin = router_testkit::daemon_proc::router_binary().unwrap();
        let pins = bpffs.pin_path().join(format!("decap-{i}"));
        netns::exec(
            b,
            &[
                bin.to_str().unwrap(),
                "decap",
                "attach",
                "--interface",
                "eth0",
                "--pin-path",
                pins.to_str().unwrap(),
            ],
        )
        .expect("decap attach");
    }
    let mut daemons = Vec::new();
    let mut sockets = Vec::new();
    for (i, lb) in t.lbs.iter().enumerate() {
        // Each LB reaches the backends once (their neighbours resolved).
        for b in 0..2 {
            netns::wait_for_tcp(
                lb,
                format!("{}:8000", backend_addr(b)).parse().unwrap(),
                Duration::from_secs(5),
            )
            .unwrap();
        }
        let socket = dir.0.join(format!("lb{i}.sock"));
        let cfg = dir.0.join(format!("lb{i}.toml"));
        std::fs::write(&cfg, config(&socket, i)).unwrap();
        daemons.push(start_daemon(lb, &cfg, &socket).expect("daemon"));
        sockets.push(socket);
    }

    // Both sessions up and both paths merged, within 5 s.
    let both = vec![lb_addr(0), lb_addr(1)];
    let took = t
        .await_next_hops(&both, Duration::from_secs(5))
        .map_err(|e| {
            eprintln!("{}", t.bird_show());
            e
        })
        .unwrap();
    eprintln!("ECMP route over both LBs after {took:?}");
    let st0 = daemons[0].status().unwrap();
    let bgp = st0.bgp.expect("bgp status");
    assert_eq!(bgp.announced, vec![format!("{VIP_ADDR}/32")]);
    assert!(
        bgp.sessions.iter().all(|s| s.state == "established"),
        "{bgp:?}"
    );

    // One fingerprint: the same Maglev placement on both nodes.
    let f0 = daemons[0].status().unwrap().table_fingerprint;
    let f1 = daemons[1].status().unwrap().table_fingerprint;
    assert!(f0.is_some() && f0 == f1, "{f0:?} vs {f1:?}");

    // 200 flows split over both LBs.
    let vip: SocketAddr = VIP.parse().unwrap();
    let bodies: Vec<String> = netns::in_netns(&t.client, || {
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
    let (n0, n1) = (lb_new_conns(&daemons[0]), lb_new_conns(&daemons[1]));
    assert_eq!(n0 + n1, 200, "every flow through one LB or the other");
    assert!(n0 >= 40 && n1 >= 40, "ECMP split {n0}/{n1}");
    assert_eq!(per_backend.len(), 2, "{per_backend:?}");

    // Every backend of LB 0 drained: it has nothing to serve and withdraws;
    // undrained, it announces again.
    let cli = |i: usize, args: &[&str]| {
        router_testkit::daemon_proc::cli(&sockets[i], args).expect("router CLI")
    };
    cli(0, &["drain", "llama", "b0"]);
    cli(0, &["drain", "llama", "b1"]);
    t.await_next_hops(&[lb_addr(1)], Duration::from_secs(5))
        .expect("LB 0 withdraws with no backend to serve");
    cli(0, &["undrain", "llama", "b0"]);
    cli(0, &["undrain", "llama", "b1"]);
    t.await_next_hops(&both, Duration::from_secs(5))
        .expect("LB 0 announces again");

    // SIGTERM of LB 0 while 50 streams run: it withdraws first, the router
    // moves the streams to LB 1, and none breaks.
    let streams = open_streams(&t, STREAMS);
    let misses_before = reason(&daemons[1], "lru_miss");
    let lb0 = daemons.remove(0);
    let stopping = std::thread::spawn(move || lb0.stop(Duration::from_secs(10)));
    let took = t
        .await_next_hops(&[lb_addr(1)], Duration::from_secs(2))
        .expect("SIGTERM withdraws before the daemon goes");
    eprintln!("SIGTERM: VIP withdrawn after {took:?}");
    finish_streams(streams);
    assert!(
        stopping.join().unwrap().unwrap().success(),
        "LB 0 stopped cleanly"
    );
    let moved = reason(&daemons[0], "lru_miss") - misses_before;
    eprintln!("SIGTERM: LB 1 picked up {moved} flows");

    // LB 0 back, then kill -9 of LB 1 while 50 streams run.
    daemons.insert(
        0,
        start_daemon(&t.lbs[0], &dir.0.join("lb0.toml"), &sockets[0]).expect("LB 0 again"),
    );
    t.await_next_hops(&both, Duration::from_secs(5))
        .expect("LB 0 announces after its restart");
    let streams = open_streams(&t, STREAMS);
    let misses_before = reason(&daemons[0], "lru_miss");
    let killed_at = Instant::now();
    // SAFETY: kill(2) on the daemon's pid, a child of this test.
    assert_eq!(
        unsafe { libc::kill(daemons[1].id() as i32, libc::SIGKILL) },
        0
    );
    // One LB left: a single next hop.
    let withdrawn = t
        .await_next_hops(&[lb_addr(0)], Duration::from_secs(HOLD_S + 1))
        .map(|_| killed_at.elapsed())
        .expect("the killed LB's next hop goes within the hold time and a second");
    eprintln!("kill -9: VIP withdrawn after {withdrawn:?}");
    finish_streams(streams);
    let moved = reason(&daemons[0], "lru_miss") - misses_before;
    assert!(moved > 0, "the survivor picked up the killed LB's streams");
    eprintln!("kill -9: survivor re-hashed {moved} flows");
    drop(daemons);
}

fn reason(d: &Daemon, name: &str) -> u64 {
    d.status()
        .unwrap()
        .datapath
        .reasons
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .unwrap()
}
