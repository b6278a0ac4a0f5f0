//! Kubernetes discovery against the test kit's fake API server: the
//! watcher task in process, and a real `router daemon` in the one-arm
//! topology picking its backends up, draining a terminating one, removing
//! a deleted one, refusing a list the datapath has no room for, keeping
//! them across a SIGHUP reload and re-listing after a 410 Gone; a restart
//! that adopts the pinned datapath keeps the discovered backends while the
//! API server is away; a daemon without credentials refuses to start.

use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use router::{
    api::StatusReply,
    config::KubernetesDiscovery,
    discovery::{Update, run_watcher},
};
use router_testkit::{
    bpffs::BpfFs,
    daemon_proc::{
        ScratchDir, cli, one_arm_config, router_binary, start_daemon, start_daemon_pinned,
    },
    fake_kube::{FakeEndpoint, FakeKube, endpoint_slice},
    netns::{self, Topology},
};

const NS: &str = "inference";

fn slice(name: &str, endpoints: &[FakeEndpoint]) -> serde_json::Value {
    endpoint_slice(NS, name, "llama", ("http", 8000), endpoints)
}

/// (name, address, drained) of each backend of an update.
fn summary(u: &Update) -> Vec<(String, String, bool)> {
    u.backends
        .iter()
        .map(|b| (b.name.clone(), b.address.to_string(), b.drain))
        .collect()
}

fn row(name: &str, addr: &str, drain: bool) -> (String, String, bool) {
    (name.to_owned(), addr.to_owned(), drain)
}

async fn next(rx: &mut tokio::sync::mpsc::Receiver<Update>) -> Vec<(String, String, bool)> {
    let u = tokio::time::timeout(Duration::from_secs(15), rx.recv())
        .await
        .expect("an update within 15 s")
        .expect("the watcher runs");
    summary(&u)
}

#[tokio::test]
async fn the_watcher_follows_the_fake_api_server_through_a_410() {
    let dir = ScratchDir::new("kube-watch").unwrap();
    let kube = FakeKube::start(NS).unwrap();
    let kubeconfig = dir.0.join("kubeconfig");
    kube.write_kubeconfig(&kubeconfig).unwrap();
    let a = "198.18.0.11".parse().unwrap();
    let b = "198.18.0.12".parse().unwrap();
    kube.apply(slice(
        "llama-1",
        &[
            FakeEndpoint::ready(a, "pod-a"),
            FakeEndpoint::ready(b, "pod-b"),
        ],
    ));
    // Another Service's slice in the namespace is not ours.
    kube.apply(endpoint_slice(
        NS,
        "other-1",
        "other",
        ("http", 8000),
        &[FakeEndpoint::ready("198.18.0.99".parse().unwrap(), "x")],
    ));
    let spec = KubernetesDiscovery {
        namespace: NS.into(),
        service: "llama".into(),
        port: None,
        kubeconfig: Some(kubeconfig),
        capacity: 1.0,
        weight: Some(100),
        telemetry: None,
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let task = tokio::spawn(run_watcher("llama".into(), 1, spec, tx));

    assert_eq!(
        next(&mut rx).await,
        vec![
            row("pod-a", "198.18.0.11:8000", false),
            row("pod-b", "198.18.0.12:8000", false)
        ],
        "the first list"
    );
    kube.apply(slice(
        "llama-1",
        &[
            FakeEndpoint::ready(a, "pod-a"),
            FakeEndpoint::terminating(b, "pod-b"),
        ],
    ));
    assert_eq!(
        next(&mut rx).await,
        vec![
            row("pod-a", "198.18.0.11:8000", false),
            row("pod-b", "198.18.0.12:8000", true)
        ],
        "pod-b drained"
    );
    kube.bookmark();
    kube.apply(slice("llama-1", &[FakeEndpoint::ready(a, "pod-a")]));
    assert_eq!(
        next(&mut rx).await,
        vec![row("pod-a", "198.18.0.11:8000", false)],
        "pod-b removed"
    );
    // History compacted: what changes before the re-list arrives with it.
    kube.expire();
    kube.apply(slice("llama-2", &[FakeEndpoint::ready(b, "pod-c")]));
    assert_eq!(
        next(&mut rx).await,
        vec![
            row("pod-a", "198.18.0.11:8000", false),
            row("pod-c", "198.18.0.12:8000", false)
        ],
        "after the 410, the re-list"
    );
    let r = kube.requests();
    assert!(r.gone >= 1 && r.lists >= 2, "{r:?}");
    kube.delete("llama-1");
    kube.delete("llama-2");
    assert_eq!(next(&mut rx).await, vec![], "every slice deleted");
    task.abort();
}

/// Runs `router` with `args` in `ns` without any Kubernetes credentials in
/// its environment; returns (exit ok, stderr).
fn run_without_credentials(ns: &str, home: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(router_binary().unwrap())
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", home)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn discovered_config(topo: &Topology, socket: &Path, discovery: &str) -> String {
    let mut text = one_arm_config(
        socket,
        topo.lb_if(),
        "198.18.100.1:8000",
        netns::LB_ADDR,
        &[],
    );
    text.push_str(discovery);
    text.push('\n');
    text
}

#[test]
fn discovery_without_credentials_is_refused_before_anything_is_attached() {
    let topo = Topology::one_arm(1).unwrap();
    let dir = ScratchDir::new("kube-nocreds").unwrap();
    let socket = dir.0.join("router.sock");
    let text = discovered_config(
        &topo,
        &socket,
        "discovery = { kubernetes = { namespace = \"inference\", service = \"llama\" } }",
    );
    let line = text.lines().count();
    let path = dir.0.join("router.toml");
    std::fs::write(&path, &text).unwrap();
    let config = path.to_str().unwrap();
    let expected = format!(
        "router.toml:{line}: service[0].discovery.kubernetes: Kubernetes discovery with no credentials"
    );
    for args in [
        &["daemon", "--config", config][..],
        &["config", "check", config],
    ] {
        let (ok, stderr) = run_without_credentials(topo.lb_ns(), &dir.0, args);
        assert!(!ok, "{args:?} must fail");
        assert!(stderr.contains(&expected), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(!socket.exists(), "{args:?}: no control socket may be left");
    }
    let link = netns::exec(topo.lb_ns(), &["ip", "link", "show", topo.lb_if()]).unwrap();
    assert!(!link.contains("xdp"), "XDP must not be attached: {link}");

    // A kubeconfig key naming a missing file names the file.
    let missing = dir.0.join("no-such-kubeconfig");
    let text = discovered_config(
        &topo,
        &socket,
        &format!(
            "discovery = {{ kubernetes = {{ namespace = \"inference\", service = \"llama\", \
             kubeconfig = \"{}\" }} }}",
            missing.display()
        ),
    );
    std::fs::write(&path, &text).unwrap();
    let (ok, stderr) = run_without_credentials(topo.lb_ns(), &dir.0, &["config", "check", config]);
    assert!(!ok);
    assert!(
        stderr.contains("service[0].discovery.kubernetes.kubeconfig: kubeconfig ")
            && stderr.contains(&missing.display().to_string()),
        "{stderr}"
    );
}

/// (address, datapath weight) of each backend of service 0, by name.
fn backends(st: &StatusReply) -> BTreeMap<String, (String, u32)> {
    st.datapath.services[0]
        .backends
        .iter()
        .map(|b| (b.name.clone(), (b.address.clone(), b.weight)))
        .collect()
}

fn wait_for(
    socket: &Path,
    what: &str,
    want: impl Fn(&BTreeMap<String, (String, u32)>) -> bool,
) -> BTreeMap<String, (String, u32)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = router_testkit::daemon_proc::status(socket).unwrap();
        let got = backends(&st);
        if want(&got) {
            return got;
        }
        assert!(Instant::now() < deadline, "{what}: backends are {got:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The one-arm topology with two backends, a fake API server in the LB's
/// namespace and a config whose service `llama` is discovered from it.
struct Watched {
    // Dropped in order: the scratch files, then the server, then the namespaces.
    dir: ScratchDir,
    socket: std::path::PathBuf,
    path: std::path::PathBuf,
    kube: FakeKube,
    topo: Topology,
}

impl Watched {
    fn new(tag: &str) -> Watched {
        let topo = Topology::one_arm(2).unwrap();
        let dir = ScratchDir::new(tag).unwrap();
        let socket = dir.0.join("router.sock");
        let kube = FakeKube::start_in_netns(topo.lb_ns(), NS).unwrap();
        let kubeconfig = dir.0.join("kubeconfig");
        kube.write_kubeconfig(&kubeconfig).unwrap();
        let text = discovered_config(
            &topo,
            &socket,
            &format!(
                "discovery = {{ kubernetes = {{ namespace = \"{NS}\", service = \"llama\", \
                 kubeconfig = \"{}\" }} }}",
                kubeconfig.display()
            ),
        );
        let path = dir.0.join("router.toml");
        std::fs::write(&path, &text).unwrap();
        Watched {
            dir,
            socket,
            path,
            kube,
            topo,
        }
    }
}

#[test]
fn a_daemon_discovers_drains_and_removes_backends_and_survives_a_410() {
    let Watched {
        topo,
        dir: _dir,
        socket,
        kube,
        path,
    } = Watched::new("kube-daemon");
    let router = router_binary().unwrap();
    let check = netns::exec(
        topo.lb_ns(),
        &[
            router.to_str().unwrap(),
            "config",
            "check",
            path.to_str().unwrap(),
        ],
    )
    .unwrap();
    assert!(
        check.contains(": ok (1 services, 0 backends)")
            && check.contains(
                "service llama: backends from the EndpointSlices of Kubernetes Service inference/llama"
            ),
        "{check}"
    );
    let daemon = start_daemon(topo.lb_ns(), &path, &socket).unwrap();
    // No slices yet: a service with no backends.
    let st = daemon.status().unwrap();
    assert!(backends(&st).is_empty(), "{:?}", backends(&st));

    let (b0, b1) = (topo.backend_addr(0), topo.backend_addr(1));
    kube.apply(slice(
        "llama-1",
        &[
            FakeEndpoint::ready(b0, "pod-0"),
            FakeEndpoint::ready(b1, "pod-1"),
        ],
    ));
    let got = wait_for(&socket, "both pods", |b| {
        b.len() == 2 && b.values().all(|(_, w)| *w > 0)
    });
    assert_eq!(got["pod-0"].0, format!("{b0}:8000"));
    assert_eq!(got["pod-1"].0, format!("{b1}:8000"));
    let text_status = cli(&socket, &["status"]).unwrap();
    assert!(text_status.contains("pod-1"), "{text_status}");

    kube.apply(slice(
        "llama-1",
        &[
            FakeEndpoint::ready(b0, "pod-0"),
            FakeEndpoint::terminating(b1, "pod-1"),
        ],
    ));
    wait_for(&socket, "pod-1 drained", |b| {
        b.get("pod-1").is_some_and(|(_, w)| *w == 0) && b.get("pod-0").is_some_and(|(_, w)| *w > 0)
    });

    kube.apply(slice("llama-1", &[FakeEndpoint::ready(b0, "pod-0")]));
    wait_for(&socket, "pod-1 removed", |b| {
        b.len() == 1 && b.contains_key("pod-0")
    });

    // More pods than the table has room for (65537 slots, 100 per
    // backend): refused whole, the service keeps what it has.
    let crowd: Vec<FakeEndpoint> = (0..700u32)
        .map(|i| {
            let ip = std::net::Ipv4Addr::new(198, 19, (i / 200) as u8, (i % 200) as u8 + 1);
            FakeEndpoint::ready(ip, &format!("crowd-{i}"))
        })
        .collect();
    kube.apply(slice("llama-crowd", &crowd));
    std::thread::sleep(Duration::from_millis(1500));
    let got = backends(&daemon.status().unwrap());
    assert_eq!(got.keys().collect::<Vec<_>>(), ["pod-0"], "{got:?}");
    kube.delete("llama-crowd");

    // A SIGHUP reload of the file keeps what was discovered.
    // SAFETY: kill(2) on the daemon's pid, which this test started.
    assert_eq!(
        unsafe { libc::kill(daemon.id() as libc::pid_t, libc::SIGHUP) },
        0
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = daemon.status().unwrap();
        if st.last_reload.as_ref().is_some_and(|r| r.ok) {
            assert_eq!(backends(&st).len(), 1, "{:?}", backends(&st));
            break;
        }
        assert!(Instant::now() < deadline, "no reload: {:?}", st.last_reload);
        std::thread::sleep(Duration::from_millis(100));
    }

    // History compacted, and pod-1 comes back meanwhile: the 410 makes the
    // daemon's watcher re-list, which finds it.
    kube.expire();
    kube.apply(slice(
        "llama-1",
        &[
            FakeEndpoint::ready(b0, "pod-0"),
            FakeEndpoint::ready(b1, "pod-1b"),
        ],
    ));
    wait_for(&socket, "after the 410", |b| {
        b.len() == 2 && b.contains_key("pod-1b")
    });
    let r = kube.requests();
    assert!(r.gone >= 1 && r.lists >= 2, "{r:?}");

    kube.delete("llama-1");
    wait_for(&socket, "every slice deleted", BTreeMap::is_empty);
    daemon.stop(Duration::from_secs(10)).unwrap();
}

/// A restarted daemon that adopts its pinned datapath serves a discovered
/// service on the list it saved, drain included, while the API server is
/// away (an operator's pin on one of them kept); one that loads a new
/// datapath starts from the first list.
#[test]
fn a_restart_keeps_the_discovered_backends_while_the_api_server_is_away() {
    let pins = BpfFs::mount().unwrap();
    let Watched {
        topo,
        dir: _dir,
        socket,
        kube,
        path,
    } = Watched::new("kube-restart");
    let start = || start_daemon_pinned(topo.lb_ns(), &path, &socket, &pins.pin_path()).unwrap();

    let daemon = start();
    let (b0, b1) = (topo.backend_addr(0), topo.backend_addr(1));
    kube.apply(slice(
        "llama-1",
        &[
            FakeEndpoint::ready(b0, "pod-0"),
            FakeEndpoint::terminating(b1, "pod-1"),
        ],
    ));
    wait_for(&socket, "pod-0 serving, pod-1 draining", |b| {
        b.get("pod-0").is_some_and(|(_, w)| *w > 0) && b.get("pod-1").is_some_and(|(_, w)| *w == 0)
    });
    // An operator's pin on a discovered backend is kept across the restart too.
    cli(&socket, &["weight", "set", "llama", "pod-0", "7"]).unwrap();
    let before = wait_for(&socket, "pod-0 pinned at 7", |b| {
        b.get("pod-0").is_some_and(|(_, w)| *w == 7)
    });
    assert!(daemon.stop(Duration::from_secs(10)).unwrap().success());
    drop(kube);

    let daemon = start();
    let after = backends(&router_testkit::daemon_proc::status(&socket).unwrap());
    assert_eq!(after, before, "the restarted daemon serves what it saved");
    assert!(daemon.stop(Duration::from_secs(10)).unwrap().success());

    // Without the pinned datapath the saved list is not used.
    std::fs::remove_dir_all(pins.pin_path()).unwrap();
    let daemon = start();
    let fresh = backends(&router_testkit::daemon_proc::status(&socket).unwrap());
    assert!(
        fresh.is_empty(),
        "a new datapath waits for a list: {fresh:?}"
    );
    assert!(daemon.stop(Duration::from_secs(10)).unwrap().success());
}
