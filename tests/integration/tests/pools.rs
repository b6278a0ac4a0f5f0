//! Pools end to end: the real daemon in namespaces, three HTTP backends
//! (b0, b1, b2), one per pool (stable 80%, canary 20%, spare 0% as
//! stable's fallback), a segment for 198.19.2.0/24, and clients on 220
//! source addresses. What a client sees is which backend answered it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    process::Command,
    time::Duration,
};

use router::api::views::PoolView;
use router_testkit::{
    daemon_proc::{ScratchDir, cli, router_binary, start_daemon},
    netns::{self, Topology},
};

const VIP: &str = "198.18.100.1:8000";
/// Client addresses: 198.19.1.1–200 take the shares, 198.19.2.1–20 are
/// the segment's.
const SHARE_CLIENTS: u8 = 200;
const SEGMENT_CLIENTS: u8 = 20;

fn config(socket: &std::path::Path, lb_if: &str) -> String {
    let mut s = format!(
        "[daemon]\ninterface = \"{lb_if}\"\ncontrol_socket = \"{}\"\ntable_size = 65537\n\n\
         [[service]]\nname = \"llama\"\nvip = \"{VIP}\"\nsnat = \"{}\"\n",
        socket.display(),
        netns::LB_ADDR
    );
    for (name, addr, weight) in netns::fixture_backends(&[100, 100, 100]) {
        s.push_str(&format!(
            "\n[[service.backend]]\nname = \"{name}\"\naddress = \"{addr}\"\nweight = {weight}\n"
        ));
    }
    s.push_str(
        "
[[service.pool]]
name = \"stable\"
backends = [\"b0\"]
share = 80
fallback = \"spare\"

[[service.pool]]
name = \"canary\"
backends = [\"b1\"]
share = 20

[[service.pool]]
name = \"spare\"
backends = [\"b2\"]

[[service.segment]]
cidr = \"198.19.2.0/24\"
pool = \"canary\"
",
    );
    s
}

fn share_client(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 1, i)
}

fn segment_client(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 2, i)
}

/// Every client address, on the client's interface and routed back to it.
fn add_client_addresses(topo: &Topology) {
    let addrs: Vec<Ipv4Addr> = (1..=SHARE_CLIENTS)
        .map(share_client)
        .chain((1..=SEGMENT_CLIENTS).map(segment_client))
        .collect();
    topo.add_client_addresses(&addrs, "198.19.0.0/16")
        .expect("client addresses");
}

/// One HTTP GET to the VIP from `src`; the answering backend's name.
async fn get_from(src: Ipv4Addr) -> anyhow::Result<String> {
    let request = format!("GET / HTTP/1.0\r\nHost: {VIP}\r\n\r\n");
    let text = exchange(src, &request, Duration::from_secs(5)).await?;
    let (_, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("malformed response {text:?}"))?;
    Ok(body.to_string())
}

/// Sends `request` to the VIP from `src` and reads the whole reply, within
/// `timeout` (a hang guard, not a measured goal).
async fn exchange(src: Ipv4Addr, request: &str, timeout: Duration) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::V4(SocketAddrV4::new(src, 0)))?;
    let vip: SocketAddr = VIP.parse()?;
    let mut stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(vip)).await??;
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(timeout, stream.read_to_end(&mut raw)).await??;
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

/// `request` from each address of `jobs`, 16 at a time, in the client's
/// namespace: each job's address and the replica or backend that answered,
/// and the failures. A current-thread runtime: every task, and so every
/// socket, runs on this thread, inside that namespace.
fn from_each<F, Fut>(
    topo: &Topology,
    jobs: Vec<Ipv4Addr>,
    request: F,
) -> (Vec<(Ipv4Addr, String)>, Vec<String>)
where
    F: Fn(Ipv4Addr) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<String>> + Send + 'static,
{
    netns::in_netns(topo.client_ns(), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let (mut answered, mut failures) = (Vec::new(), Vec::new());
            for chunk in jobs.chunks(16) {
                let mut set = tokio::task::JoinSet::new();
                for &c in chunk {
                    let f = request(c);
                    set.spawn(async move { (c, f.await) });
                }
                for (c, r) in set.join_all().await {
                    match r {
                        Ok(b) => answered.push((c, b)),
                        Err(e) => failures.push(format!("{c}: {e:#}")),
                    }
                }
            }
            (answered, failures)
        })
    })
    .expect("clients")
}

/// `per_client` connections from each of `clients`; the backends that
/// answered each client, and the failures.
fn connect_all(
    topo: &Topology,
    clients: &[Ipv4Addr],
    per_client: usize,
) -> (BTreeMap<Ipv4Addr, BTreeSet<String>>, Vec<String>) {
    let jobs: Vec<Ipv4Addr> = clients
        .iter()
        .flat_map(|c| std::iter::repeat_n(*c, per_client))
        .collect();
    let (answered, failures) = from_each(topo, jobs, get_from);
    let mut by_client: BTreeMap<Ipv4Addr, BTreeSet<String>> = BTreeMap::new();
    for (c, b) in answered {
        by_client.entry(c).or_default().insert(b);
    }
    (by_client, failures)
}

fn pools(socket: &std::path::Path) -> BTreeMap<String, PoolView> {
    let out = cli(socket, &["pools", "--json"]).expect("router pools --json");
    let list: Vec<PoolView> = serde_json::from_str(&out).expect("pools JSON");
    list.into_iter().map(|p| (p.name.clone(), p)).collect()
}

/// The one backend each client reached (a client that reached two fails).
fn single(answered: &BTreeMap<Ipv4Addr, BTreeSet<String>>) -> BTreeMap<Ipv4Addr, String> {
    answered
        .iter()
        .map(|(c, set)| {
            assert_eq!(
                set.len(),
                1,
                "{c} reached {set:?}: a client stays in one pool"
            );
            (*c, set.first().cloned().unwrap_or_default())
        })
        .collect()
}

#[test]
fn shares_segments_runtime_changes_and_fallback() {
    let topo = Topology::one_arm(3).expect("topology");
    let _servers = topo
        .spawn_ready_fixture_backends(8000)
        .expect("backend servers");
    add_client_addresses(&topo);
    let dir = ScratchDir::new("pools").unwrap();
    let socket = dir.0.join("router.sock");
    let config_path = dir.0.join("router.toml");
    std::fs::write(&config_path, config(&socket, topo.lb_if())).unwrap();
    let _daemon = start_daemon(topo.lb_ns(), &config_path, &socket).expect("daemon");

    // 2,000 connections from 200 addresses: each address in one pool,
    // about 80/20, the spare pool (share 0) never.
    let share_clients: Vec<Ipv4Addr> = (1..=SHARE_CLIENTS).map(share_client).collect();
    let (answered, failures) = connect_all(&topo, &share_clients, 10);
    assert!(failures.is_empty(), "{failures:?}");
    let before = single(&answered);
    assert_eq!(before.len(), usize::from(SHARE_CLIENTS));
    let canary = before.values().filter(|b| *b == "b1").count();
    assert!(before.values().all(|b| b != "b2"), "share 0 took a client");
    // 200 addresses at 20%: binomial σ = 5.7 addresses; ±3σ.
    assert!((23..=57).contains(&canary), "{canary} of 200 in canary");

    // The segment's clients all land in its pool.
    let segment: Vec<Ipv4Addr> = (1..=SEGMENT_CLIENTS).map(segment_client).collect();
    let (answered, failures) = connect_all(&topo, &segment, 3);
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        single(&answered).values().all(|b| b == "b1"),
        "segment clients outside canary: {answered:?}"
    );

    // pool set moves only the clients it must: into canary, none out.
    let line = cli(
        &socket,
        &["pool", "set", "llama", "canary", "--share", "40"],
    )
    .unwrap();
    assert_eq!(line.trim(), "llama: stable 60%, canary 40%, spare 0%");
    let (answered, failures) = connect_all(&topo, &share_clients, 2);
    assert!(failures.is_empty(), "{failures:?}");
    let after = single(&answered);
    let mut moved = 0;
    for (c, was) in &before {
        let now = &after[c];
        if now != was {
            assert_eq!(
                (was.as_str(), now.as_str()),
                ("b0", "b1"),
                "{c} moved the wrong way"
            );
            moved += 1;
        }
    }
    let stable_before = before.values().filter(|b| *b == "b0").count();
    // 80 → 60: a quarter of stable's clients move; binomial, ±3σ.
    let expected = stable_before as f64 * 0.25;
    let sigma = (stable_before as f64 * 0.25 * 0.75).sqrt();
    assert!(
        (moved as f64 - expected).abs() <= 3.0 * sigma + 1.0,
        "{moved} of {stable_before} stable clients moved (expected {expected:.0} ± {:.0})",
        3.0 * sigma
    );

    // Refused changes are one line and change nothing.
    for (args, fragment) in [
        (
            vec!["pool", "set", "llama", "canary", "--share", "101"],
            "share 101 is above 100 percent",
        ),
        (
            vec!["pool", "set", "llama", "blue", "--share", "5"],
            "no pool named \"blue\"",
        ),
        (
            vec!["canary", "promote", "nope", "canary"],
            "no service named \"nope\"",
        ),
    ] {
        let out = Command::new(router_binary().unwrap())
            .arg("--socket")
            .arg(&socket)
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(fragment), "{args:?}: {err}");
    }
    let p = pools(&socket);
    assert_eq!(
        (p["stable"].share, p["canary"].share, p["spare"].share),
        (60, 40, 0)
    );

    // A reload keeps the run-time shares.
    cli(&socket, &["reload"]).unwrap();
    assert_eq!(pools(&socket)["canary"].share, 40);

    // stable's only backend drained: its clients go to spare, none fails.
    cli(&socket, &["drain", "llama", "b0"]).unwrap();
    let stable_clients: Vec<Ipv4Addr> = after
        .iter()
        .filter(|(_, b)| *b == "b0")
        .map(|(c, _)| *c)
        .collect();
    let (answered, failures) = connect_all(&topo, &stable_clients, 2);
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        single(&answered).values().all(|b| b == "b2"),
        "stable's clients outside spare: {answered:?}"
    );
    let p = pools(&socket);
    assert!(p["stable"].no_room, "{:?}", p["stable"]);
    assert_eq!(
        p["stable"].fallback_connections.get("spare").copied(),
        Some(2 * stable_clients.len() as u64),
        "{:?}",
        p["stable"]
    );
}

/// One streamed completion (2 tokens) to the VIP from `src`; the replica
/// that served it (`X-Replica`).
async fn complete_from(src: Ipv4Addr) -> anyhow::Result<String> {
    let body = r#"{"prompt":"hi","max_tokens":2,"stream":true}"#;
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {VIP}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let text = exchange(src, &request, Duration::from_secs(20)).await?;
    anyhow::ensure!(text.contains("[DONE]"), "no [DONE] in {text:?}");
    text.lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("x-replica"))
                .map(|(_, v)| v.trim().to_string())
        })
        .ok_or_else(|| anyhow::anyhow!("no X-Replica in {text:?}"))
}

/// One completion from each client; the replicas that served them, and
/// the failures.
fn completions(topo: &Topology, clients: &[Ipv4Addr]) -> (Vec<String>, Vec<String>) {
    let (served, failures) = from_each(topo, clients.to_vec(), complete_from);
    (served.into_iter().map(|(_, r)| r).collect(), failures)
}

/// Rounds of one completion per client until `done` holds for the
/// canary's pool view; at most `rounds` (the hang guard: a verdict needs
/// 60 first bytes on each side, which the first two or three rounds give).
fn until_judged(
    topo: &Topology,
    socket: &std::path::Path,
    clients: &[Ipv4Addr],
    rounds: usize,
    done: impl Fn(&PoolView) -> bool,
) -> BTreeMap<String, PoolView> {
    for round in 0..rounds {
        let (_, failures) = completions(topo, clients);
        assert!(failures.is_empty(), "round {round}: {failures:?}");
        let p = pools(socket);
        if done(&p["canary"]) {
            return p;
        }
    }
    panic!(
        "no guard verdict after {rounds} rounds: {:?}",
        pools(socket)["canary"]
    );
}

#[test]
fn a_guard_rolls_back_a_slowed_canary_and_not_a_healthy_one() {
    let topo = Topology::one_arm(3).expect("topology");
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(
            router_testkit::replica::spawn_mock_replica(
                topo.backend_ns(i),
                &format!("r{i}"),
                netns::backend_addr(i),
                8000,
                // Headers with the first token: the datapath's first byte is TTFT.
                &[
                    "--max-batch",
                    "8",
                    "--step-ms",
                    "20",
                    "--headers-with-first-token",
                ],
            )
            .expect("mock replica"),
        );
    }
    add_client_addresses(&topo);
    let dir = ScratchDir::new("pools-guard").unwrap();
    let socket = dir.0.join("router.sock");
    let config_path = dir.0.join("router.toml");
    let mut text = format!(
        "[daemon]\ninterface = \"{}\"\ncontrol_socket = \"{}\"\n\n\
         [[service]]\nname = \"llama\"\nvip = \"{VIP}\"\nsnat = \"{}\"\n",
        topo.lb_if(),
        socket.display(),
        netns::LB_ADDR
    );
    for i in 0..3 {
        text.push_str(&format!(
            "\n[[service.backend]]\nname = \"r{i}\"\naddress = \"{}:8000\"\nweight = 100\n",
            netns::backend_addr(i)
        ));
    }
    // A ratio of 3 with 60 samples a side: the slowed canary's first bytes
    // come 10× later (speed 0.1), a healthy canary's in the same power-of-two
    // bucket as the others', so only a stall of one connection in sixty
    // past three times the others' p99 could trip it.
    text.push_str(
        "
[[service.pool]]
name = \"stable\"
backends = [\"r0\", \"r1\"]
share = 50

[[service.pool]]
name = \"canary\"
backends = [\"r2\"]
share = 50
guard = { ttft_p99_ratio = 3.0, min_connections = 60 }
",
    );
    std::fs::write(&config_path, text).unwrap();
    let _daemon = start_daemon(topo.lb_ns(), &config_path, &socket).expect("daemon");
    let clients: Vec<Ipv4Addr> = (1..=SHARE_CLIENTS).map(share_client).collect();

    // Healthy: a verdict, and no trip.
    let p = until_judged(&topo, &socket, &clients, 12, |c| {
        c.guard.as_ref().is_some_and(|g| g.last_connections > 0)
    });
    let g = p["canary"].guard.clone().expect("guard");
    assert_eq!(g.trips, 0, "{g:?}");
    assert_eq!(p["canary"].share, 50);

    // Slowed ten times: the next verdicts trip it, and its share goes to 0.
    let r2 = SocketAddr::from((netns::backend_addr(2), 8000));
    netns::in_netns(topo.backend_ns(2), move || {
        router_testkit::replica::control(r2, r#"{"speed": 0.1}"#)
    })
    .expect("entering r2's namespace")
    .expect("slowing r2");
    let p = until_judged(&topo, &socket, &clients, 12, |c| {
        c.guard.as_ref().is_some_and(|g| g.trips > 0)
    });
    let g = p["canary"].guard.clone().expect("guard");
    assert_eq!(g.trips, 1, "{g:?}");
    let (mine, others) = (
        g.last_p99_ms.expect("p99"),
        g.last_others_p99_ms.expect("others' p99"),
    );
    assert!(mine > 3.0 * others, "{mine} ms against {others} ms");
    assert_eq!((p["stable"].share, p["canary"].share), (100, 0));

    // Every client now lands in stable.
    let (served, failures) = completions(&topo, &clients);
    assert!(failures.is_empty(), "{failures:?}");
    assert!(served.iter().all(|r| r != "r2"), "{served:?}");
}
