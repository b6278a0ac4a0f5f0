//! The slice mapping, credentials, and the watcher against a mock API
//! server (tower-test): list, watch events, a bookmark, a 410 Gone and the
//! re-list after it.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};

use super::*;
use crate::config::EndpointPort;

fn spec(port: Option<EndpointPort>) -> KubernetesDiscovery {
    KubernetesDiscovery {
        namespace: "inference".into(),
        service: "llama".into(),
        port,
        kubeconfig: None,
        capacity: 1.0,
        weight: Some(100),
        telemetry: None,
    }
}

/// An endpoint: address, pod, and its ready/serving/terminating conditions
/// (None: the condition is missing).
struct Ep {
    addr: &'static str,
    pod: Option<&'static str>,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
}

fn ready(addr: &'static str, pod: &'static str) -> Ep {
    Ep {
        addr,
        pod: Some(pod),
        ready: Some(true),
        serving: Some(true),
        terminating: Some(false),
    }
}

fn terminating(addr: &'static str, pod: &'static str, serving: bool) -> Ep {
    Ep {
        addr,
        pod: Some(pod),
        ready: Some(false),
        serving: Some(serving),
        terminating: Some(true),
    }
}

fn slice_json(name: &str, rv: u64, kind: &str, eps: &[Ep], ports: &[(Option<&str>, i32)]) -> Value {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|e| {
            let mut conditions = serde_json::Map::new();
            for (k, v) in [
                ("ready", e.ready),
                ("serving", e.serving),
                ("terminating", e.terminating),
            ] {
                if let Some(v) = v {
                    conditions.insert(k.into(), json!(v));
                }
            }
            let mut ep = json!({ "addresses": [e.addr], "conditions": conditions });
            if let Some(pod) = e.pod {
                ep["targetRef"] = json!({ "kind": "Pod", "namespace": "inference", "name": pod });
            }
            ep
        })
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| match n {
            Some(n) => json!({ "name": n, "port": p, "protocol": "TCP" }),
            None => json!({ "port": p, "protocol": "TCP" }),
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "inference",
            "resourceVersion": rv.to_string(),
            "labels": { "kubernetes.io/service-name": "llama" },
        },
        "addressType": kind,
        "endpoints": endpoints,
        "ports": ports,
    })
}

fn slice(name: &str, eps: &[Ep], ports: &[(Option<&str>, i32)]) -> EndpointSlice {
    serde_json::from_value(slice_json(name, 1, "IPv4", eps, ports)).unwrap()
}

const HTTP: &[(Option<&str>, i32)] = &[(Some("http"), 8000)];

/// (name, address, drained) of each backend.
fn summary(m: &[BackendConfig]) -> Vec<(String, String, bool)> {
    m.iter()
        .map(|b| (b.name.clone(), b.address.to_string(), b.drain))
        .collect()
}

fn row(name: &str, addr: &str, drain: bool) -> (String, String, bool) {
    (name.to_owned(), addr.to_owned(), drain)
}

#[test]
fn serving_endpoints_become_backends_named_by_pod() {
    let s = slice(
        "llama-abc",
        &[ready("198.18.0.12", "pod-b"), ready("198.18.0.11", "pod-a")],
        HTTP,
    );
    let m = backends_from_slices([&s], &spec(None)).unwrap();
    assert_eq!(
        summary(&m.backends),
        vec![
            row("pod-a", "198.18.0.11:8000", false),
            row("pod-b", "198.18.0.12:8000", false)
        ],
        "ordered by address"
    );
    let b = &m.backends[0];
    assert_eq!((b.weight, b.capacity), (Some(100), 1.0));
    assert!(b.telemetry.is_none() && b.health.is_none());
    assert_eq!(m.skipped_not_ipv4, 0);
}

#[test]
fn conditions_decide_active_drained_or_absent() {
    let s = slice(
        "s",
        &[
            ready("198.18.0.1", "active"),
            terminating("198.18.0.2", "terminating-serving", true),
            terminating("198.18.0.3", "terminating-not-serving", false),
            Ep {
                addr: "198.18.0.4",
                pod: Some("not-serving"),
                ready: Some(false),
                serving: Some(false),
                terminating: Some(false),
            },
            // `serving` missing: `ready` says.
            Ep {
                addr: "198.18.0.5",
                pod: Some("old-api-ready"),
                ready: Some(true),
                serving: None,
                terminating: None,
            },
            Ep {
                addr: "198.18.0.6",
                pod: Some("old-api-not-ready"),
                ready: Some(false),
                serving: None,
                terminating: None,
            },
            // No conditions at all: ready, as the API reads it.
            Ep {
                addr: "198.18.0.7",
                pod: Some("no-conditions"),
                ready: None,
                serving: None,
                terminating: None,
            },
        ],
        HTTP,
    );
    let m = backends_from_slices([&s], &spec(None)).unwrap();
    assert_eq!(
        summary(&m.backends),
        vec![
            row("active", "198.18.0.1:8000", false),
            row("terminating-serving", "198.18.0.2:8000", true),
            row("terminating-not-serving", "198.18.0.3:8000", true),
            row("old-api-ready", "198.18.0.5:8000", false),
            row("no-conditions", "198.18.0.7:8000", false),
        ]
    );
}

#[test]
fn an_endpoint_without_a_pod_is_named_by_its_address() {
    let s = slice(
        "s",
        &[Ep {
            addr: "198.18.0.9",
            pod: None,
            ready: Some(true),
            serving: None,
            terminating: None,
        }],
        HTTP,
    );
    let m = backends_from_slices([&s], &spec(None)).unwrap();
    assert_eq!(
        summary(&m.backends),
        vec![row("198.18.0.9", "198.18.0.9:8000", false)]
    );
}

#[test]
fn ipv6_and_fqdn_slices_are_skipped_and_counted() {
    let v4 = slice("v4", &[ready("198.18.0.1", "a")], HTTP);
    let v6: EndpointSlice = serde_json::from_value(slice_json(
        "v6",
        1,
        "IPv6",
        &[ready("2001:db8::1", "a"), ready("2001:db8::2", "b")],
        HTTP,
    ))
    .unwrap();
    let fqdn: EndpointSlice = serde_json::from_value(slice_json(
        "f",
        1,
        "FQDN",
        &[ready("example.test", "c")],
        HTTP,
    ))
    .unwrap();
    let m = backends_from_slices([&v4, &v6, &fqdn], &spec(None)).unwrap();
    assert_eq!(
        summary(&m.backends),
        vec![row("a", "198.18.0.1:8000", false)]
    );
    assert_eq!(m.skipped_not_ipv4, 3);
}

#[test]
fn an_address_in_two_slices_counts_once_active_if_either_says_so() {
    let old = slice("old", &[terminating("198.18.0.1", "a", true)], HTTP);
    let new = slice("new", &[ready("198.18.0.1", "a")], HTTP);
    for order in [[&old, &new], [&new, &old]] {
        let m = backends_from_slices(order, &spec(None)).unwrap();
        assert_eq!(
            summary(&m.backends),
            vec![row("a", "198.18.0.1:8000", false)]
        );
    }
}

#[test]
fn a_pod_name_used_twice_keeps_it_on_the_first_address() {
    let s = slice(
        "s",
        &[ready("198.18.0.2", "same"), ready("198.18.0.1", "same")],
        HTTP,
    );
    let m = backends_from_slices([&s], &spec(None)).unwrap();
    assert_eq!(
        summary(&m.backends),
        vec![
            row("same", "198.18.0.1:8000", false),
            row("198.18.0.2:8000", "198.18.0.2:8000", false)
        ]
    );
}

#[test]
fn ports_by_name_number_or_the_only_one() {
    let two = slice(
        "two",
        &[ready("198.18.0.1", "a")],
        &[(Some("http"), 8000), (Some("metrics"), 9100)],
    );
    let by_name =
        backends_from_slices([&two], &spec(Some(EndpointPort::Name("metrics".into())))).unwrap();
    assert_eq!(by_name.backends[0].address.port(), 9100);
    let by_number = backends_from_slices([&two], &spec(Some(EndpointPort::Number(7000)))).unwrap();
    assert_eq!(by_number.backends[0].address.port(), 7000);
    let err = backends_from_slices([&two], &spec(None)).unwrap_err();
    assert!(
        matches!(&err, SliceError::AmbiguousPort { count: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("http=8000, metrics=9100"), "{err}");
    let err =
        backends_from_slices([&two], &spec(Some(EndpointPort::Name("grpc".into())))).unwrap_err();
    assert!(matches!(err, SliceError::NoSuchPort { .. }), "{err}");
    let none = slice("none", &[ready("198.18.0.1", "a")], &[]);
    assert_eq!(
        backends_from_slices([&none], &spec(None)).unwrap_err(),
        SliceError::NoPort {
            slice: "none".into()
        }
    );
    let unnamed = slice("u", &[ready("198.18.0.1", "a")], &[(None, 8080)]);
    assert_eq!(
        backends_from_slices([&unnamed], &spec(None))
            .unwrap()
            .backends[0]
            .address
            .port(),
        8080
    );
    let bad = slice("bad", &[ready("198.18.0.1", "a")], &[(None, 70000)]);
    assert!(matches!(
        backends_from_slices([&bad], &spec(None)).unwrap_err(),
        SliceError::BadPort { port: 70000, .. }
    ));
    // A slice with nothing to route needs no port.
    let empty = slice("e", &[], &[]);
    assert_eq!(
        backends_from_slices([&empty], &spec(None)).unwrap(),
        Mapped::default()
    );
}

#[test]
fn capacity_and_weight_come_from_the_spec() {
    let s = slice("s", &[ready("198.18.0.1", "a")], HTTP);
    let mut sp = spec(None);
    sp.capacity = 2.0;
    sp.weight = Some(200);
    let b = &backends_from_slices([&s], &sp).unwrap().backends[0];
    assert_eq!((b.capacity, b.weight), (2.0, Some(200)));
    assert_eq!(
        b.address,
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 8000).into()
    );
}

#[test]
fn credentials_come_from_the_key_then_kubeconfig_then_home() {
    /// Removes the scratch directory even when an assertion fails.
    struct Scratch(std::path::PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let scratch = Scratch(
        std::env::temp_dir().join(format!("router-discovery-creds-{}", std::process::id())),
    );
    let dir = scratch.0.clone();
    std::fs::create_dir_all(dir.join(".kube")).unwrap();
    let good = dir.join("good");
    write_kubeconfig(&good, "http://127.0.0.1:6443").unwrap();
    let mut sp = spec(None);
    sp.kubeconfig = Some(good.clone());
    let c = client_config(&sp, &CredentialEnv::default()).unwrap();
    assert_eq!(c.cluster_url.to_string(), "http://127.0.0.1:6443/");

    let missing = dir.join("missing");
    sp.kubeconfig = Some(missing.clone());
    let err = client_config(&sp, &CredentialEnv::default()).unwrap_err();
    assert!(err.names_key());
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );

    let garbage = dir.join("garbage");
    std::fs::write(&garbage, "clusters: [[[").unwrap();
    sp.kubeconfig = Some(garbage.clone());
    let err = client_config(&sp, &CredentialEnv::default()).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("kubeconfig {}: ", garbage.display())),
        "{err}"
    );

    let env = CredentialEnv {
        kubeconfig: Some(good.clone().into_os_string()),
        home: None,
        in_cluster: false,
    };
    assert!(client_config(&spec(None), &env).is_ok(), "$KUBECONFIG");
    let env = CredentialEnv {
        kubeconfig: Some(missing.clone().into_os_string()),
        ..env
    };
    let err = client_config(&spec(None), &env).unwrap_err();
    assert!(!err.names_key());
    assert!(err.to_string().starts_with("$KUBECONFIG "), "{err}");

    let home = CredentialEnv {
        kubeconfig: None,
        home: Some(dir.clone()),
        in_cluster: false,
    };
    let err = client_config(&spec(None), &home).unwrap_err();
    assert!(
        matches!(err, CredentialsError::None { .. }),
        "no ~/.kube/config yet: {err}"
    );
    assert!(
        err.to_string().contains(".kube/config does not exist"),
        "{err}"
    );
    write_kubeconfig(&dir.join(".kube").join("config"), "http://127.0.0.1:6444").unwrap();
    let c = client_config(&spec(None), &home).unwrap();
    assert_eq!(c.cluster_url.to_string(), "http://127.0.0.1:6444/");
}

#[test]
fn no_credentials_is_a_one_line_error_at_the_key() {
    let text = "[daemon]\ninterface = \"eth0\"\n\n[[service]]\nname = \"llama\"\n\
                vip = \"198.18.100.1:8000\"\nsnat = \"198.18.0.1\"\n\
                discovery = { kubernetes = { namespace = \"a\", service = \"b\" } }\n";
    let cfg = Config::parse(text, "t.toml").unwrap();
    let err = check_credentials(&cfg, &CredentialEnv::default()).unwrap_err();
    let shown = err.to_string();
    assert_eq!(
        err.key(),
        Some("service[0].discovery.kubernetes"),
        "{shown}"
    );
    assert!(
        shown.starts_with(
            "t.toml:8: service[0].discovery.kubernetes: Kubernetes discovery with no credentials"
        ),
        "{shown}"
    );
    assert_eq!(shown.lines().count(), 1, "{shown}");

    let text = text.replace(
        "service = \"b\" }",
        "service = \"b\", kubeconfig = \"/nonexistent/router-kubeconfig\" }",
    );
    let cfg = Config::parse(&text, "t.toml").unwrap();
    let err = check_credentials(&cfg, &CredentialEnv::default()).unwrap_err();
    let shown = err.to_string();
    assert_eq!(
        err.key(),
        Some("service[0].discovery.kubernetes.kubeconfig"),
        "{shown}"
    );
    assert!(shown.contains("/nonexistent/router-kubeconfig"), "{shown}");
    assert_eq!(shown.lines().count(), 1, "{shown}");

    // A config without discovery needs none.
    let plain = Config::parse(
        &text.replace(
            "discovery = { kubernetes = { namespace = \"a\", service = \"b\", kubeconfig = \"/nonexistent/router-kubeconfig\" } }\n",
            "[[service.backend]]\nname = \"a\"\naddress = \"198.18.0.11:8000\"\n",
        ),
        "t.toml",
    )
    .unwrap();
    check_credentials(&plain, &CredentialEnv::default()).unwrap();
}

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Answers the next request, which must be a list (`watch` false) or a
/// watch of the EndpointSlices of `llama`; returns its query.
async fn answer(handle: &mut Handle, watch: bool, body: Vec<u8>) -> String {
    let (req, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .expect("a request within 10 s")
        .expect("the client is alive");
    let uri = req.uri().clone();
    assert_eq!(
        uri.path(),
        "/apis/discovery.k8s.io/v1/namespaces/inference/endpointslices"
    );
    let query = uri.query().unwrap_or_default().to_owned();
    assert!(
        query.contains("labelSelector=kubernetes.io%2Fservice-name%3Dllama"),
        "{query}"
    );
    assert_eq!(query.contains("watch=true"), watch, "{query}");
    send.send_response(
        Response::builder()
            .status(200)
            .body(Body::from(body))
            .unwrap(),
    );
    query
}

fn list(rv: u64, items: Vec<Value>) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSliceList",
        "metadata": { "resourceVersion": rv.to_string() },
        "items": items,
    }))
    .unwrap()
}

fn events(evs: &[(&str, Value)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (t, obj) in evs {
        out.extend(serde_json::to_vec(&json!({ "type": t, "object": obj })).unwrap());
        out.push(b'\n');
    }
    out
}

fn bookmark(rv: u64) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": { "resourceVersion": rv.to_string() },
    })
}

async fn next_update(rx: &mut mpsc::Receiver<Update>) -> Vec<(String, String, bool)> {
    let u = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an update within 10 s")
        .expect("the watcher is alive");
    assert_eq!((u.service.as_str(), u.generation), ("svc", 7));
    summary(&u.backends)
}

#[tokio::test]
async fn the_watcher_lists_follows_events_and_relists_after_410() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let (tx, mut rx) = mpsc::channel(8);
    let sp = spec(None);
    let task = tokio::spawn(async move {
        watch(client, &sp, "svc", 7, Duration::from_millis(20), tx).await;
    });

    let s1 = |rv, eps: &[Ep]| slice_json("llama-1", rv, "IPv4", eps, HTTP);
    answer(
        &mut handle,
        false,
        list(
            1,
            vec![s1(1, &[ready("198.18.0.1", "a"), ready("198.18.0.2", "b")])],
        ),
    )
    .await;
    assert_eq!(
        next_update(&mut rx).await,
        vec![
            row("a", "198.18.0.1:8000", false),
            row("b", "198.18.0.2:8000", false)
        ],
        "the first list"
    );

    // b terminates; the watch ends as a server's timeout would end it.
    let q = answer(
        &mut handle,
        true,
        events(&[(
            "MODIFIED",
            s1(
                2,
                &[
                    ready("198.18.0.1", "a"),
                    terminating("198.18.0.2", "b", true),
                ],
            ),
        )]),
    )
    .await;
    assert!(q.contains("resourceVersion=1"), "{q}");
    assert!(q.contains("allowWatchBookmarks=true"), "{q}");
    assert_eq!(
        next_update(&mut rx).await,
        vec![
            row("a", "198.18.0.1:8000", false),
            row("b", "198.18.0.2:8000", true)
        ],
        "b drained"
    );

    // A second slice, then a bookmark: the next watch resumes from it.
    let q = answer(
        &mut handle,
        true,
        events(&[
            (
                "ADDED",
                slice_json("llama-2", 3, "IPv4", &[ready("198.18.0.3", "c")], HTTP),
            ),
            ("BOOKMARK", bookmark(9)),
        ]),
    )
    .await;
    assert!(q.contains("resourceVersion=2"), "{q}");
    assert_eq!(
        next_update(&mut rx).await,
        vec![
            row("a", "198.18.0.1:8000", false),
            row("b", "198.18.0.2:8000", true),
            row("c", "198.18.0.3:8000", false)
        ],
        "c added"
    );

    // The first slice is deleted and the history is compacted: 410 Gone.
    let q = answer(
        &mut handle,
        true,
        events(&[(
            "ERROR",
            json!({
                "apiVersion": "v1",
                "kind": "Status",
                "metadata": {},
                "status": "Failure",
                "message": "too old resource version: 9 (12)",
                "reason": "Expired",
                "code": 410,
            }),
        )]),
    )
    .await;
    assert!(q.contains("resourceVersion=9"), "after the bookmark: {q}");
    // The re-list (after the watcher's backoff) has llama-2 only, plus an
    // IPv6 slice that is left out.
    answer(
        &mut handle,
        false,
        list(
            12,
            vec![
                slice_json("llama-2", 3, "IPv4", &[ready("198.18.0.3", "c")], HTTP),
                slice_json("llama-v6", 11, "IPv6", &[ready("2001:db8::3", "c")], HTTP),
            ],
        ),
    )
    .await;
    assert_eq!(
        next_update(&mut rx).await,
        vec![row("c", "198.18.0.3:8000", false)],
        "a and b vanished with their slice"
    );

    // A watch event that changes nothing routable sends nothing; the
    // deletion after it does.
    answer(
        &mut handle,
        true,
        events(&[
            (
                "MODIFIED",
                slice_json("llama-v6", 13, "IPv6", &[ready("2001:db8::4", "d")], HTTP),
            ),
            ("DELETED", slice_json("llama-2", 14, "IPv4", &[], HTTP)),
        ]),
    )
    .await;
    assert_eq!(next_update(&mut rx).await, vec![], "c removed");
    task.abort();
}

#[tokio::test]
async fn an_ambiguous_port_keeps_the_last_list_and_is_not_sent() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let (tx, mut rx) = mpsc::channel(8);
    let sp = spec(None);
    let task = tokio::spawn(async move {
        watch(client, &sp, "svc", 7, Duration::from_millis(20), tx).await;
    });
    answer(
        &mut handle,
        false,
        list(
            1,
            vec![slice_json(
                "s",
                1,
                "IPv4",
                &[ready("198.18.0.1", "a")],
                HTTP,
            )],
        ),
    )
    .await;
    assert_eq!(
        next_update(&mut rx).await,
        vec![row("a", "198.18.0.1:8000", false)]
    );
    answer(
        &mut handle,
        true,
        events(&[(
            "MODIFIED",
            slice_json(
                "s",
                2,
                "IPv4",
                &[ready("198.18.0.1", "a"), ready("198.18.0.2", "b")],
                &[(Some("http"), 8000), (Some("grpc"), 9000)],
            ),
        )]),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        rx.try_recv().is_err(),
        "nothing sent for the ambiguous slice"
    );
    // Then a fix: the slice has one port again.
    answer(
        &mut handle,
        true,
        events(&[(
            "MODIFIED",
            slice_json("s", 3, "IPv4", &[ready("198.18.0.2", "b")], HTTP),
        )]),
    )
    .await;
    assert_eq!(
        next_update(&mut rx).await,
        vec![row("b", "198.18.0.2:8000", false)],
        "the fixed slice"
    );
    task.abort();
}

fn discovered_config(service: &str) -> Config {
    let text = format!(
        "[daemon]\ninterface = \"eth0\"\n\n[[service]]\nname = \"llama\"\n\
         vip = \"198.18.100.1:8000\"\nsnat = \"198.18.0.1\"\n\
         discovery = {{ kubernetes = {{ namespace = \"a\", service = \"{service}\", \
         kubeconfig = \"/nonexistent/router-kubeconfig\" }} }}\n"
    );
    Config::parse(&text, "t.toml").unwrap()
}

fn update(generation: u64) -> Update {
    Update {
        service: "llama".into(),
        generation,
        backends: Vec::new(),
    }
}

#[tokio::test]
async fn watchers_follow_reloads_and_keep_what_was_discovered() {
    let (tx, _rx) = mpsc::channel(8);
    let mut w = Watchers::new(tx);
    let first = discovered_config("llama");
    w.reconcile(&first);
    assert!(w.is_current(&update(1)));
    assert!(!w.is_current(&update(2)));
    let s = slice("s", &[ready("198.18.0.1", "a")], HTTP);
    let found = backends_from_slices([&s], &spec(None)).unwrap().backends;
    w.record("llama", found.clone());

    // The same file again: its (empty) service gets what was discovered,
    // and the watcher goes on.
    let mut same = discovered_config("llama");
    w.keep_discovered(&mut same);
    assert_eq!(same.services[0].backends, found);
    w.reconcile(&same);
    assert!(w.is_current(&update(1)), "the same watcher");

    // Another Kubernetes Service: nothing kept, a new watcher, and what the
    // old one still sends is ignored.
    let mut other = discovered_config("mistral");
    w.keep_discovered(&mut other);
    assert!(other.services[0].backends.is_empty());
    w.reconcile(&other);
    assert!(!w.is_current(&update(1)));
    assert!(w.is_current(&update(2)));
    let mut again = discovered_config("mistral");
    w.keep_discovered(&mut again);
    assert!(
        again.services[0].backends.is_empty(),
        "nothing recorded since"
    );

    // No discovery left: no watcher.
    let plain = Config::parse(
        "[daemon]\ninterface = \"eth0\"\n\n[[service]]\nname = \"llama\"\n\
         vip = \"198.18.100.1:8000\"\nsnat = \"198.18.0.1\"\n\n[[service.backend]]\n\
         name = \"a\"\naddress = \"198.18.0.11:8000\"\n",
        "t.toml",
    )
    .unwrap();
    w.reconcile(&plain);
    assert!(!w.is_current(&update(2)));
}

#[test]
fn discovered_backends_get_telemetry_at_their_address() {
    let mut sp = spec(None);
    sp.weight = None;
    sp.telemetry = Some(crate::config::TelemetryConfig::Prometheus {
        url: "http://{ip}:8000/metrics".into(),
        format: crate::config::PromFormat::Vllm,
        labels: Default::default(),
    });
    let s = slice(
        "s",
        &[ready("198.18.0.1", "a"), ready("198.18.0.2", "b")],
        HTTP,
    );
    let m = backends_from_slices([&s], &sp).unwrap();
    let urls: Vec<Option<String>> = m
        .backends
        .iter()
        .map(|b| match &b.telemetry {
            Some(crate::config::TelemetryConfig::Prometheus { url, .. }) => Some(url.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        urls,
        vec![
            Some("http://198.18.0.1:8000/metrics".to_owned()),
            Some("http://198.18.0.2:8000/metrics".to_owned())
        ]
    );
    assert!(m.backends.iter().all(|b| b.weight.is_none()));
}
