//! A fake Kubernetes API server for discovery tests: plain HTTP on
//! loopback, serving only what the router's watcher asks for, the list and
//! the watch of `discovery.k8s.io/v1` EndpointSlices in one namespace.
//! Watches stream newline-delimited JSON events (chunked, as the real
//! server sends them), BOOKMARK events on request, and an in-stream 410
//! Gone after `expire`, which makes a client re-list. The test drives it
//! through [`FakeKube`]: add, modify and delete slices, and count the
//! requests. Threads and std sockets only, so sync and async tests alike
//! can use it.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::{Value, json};

/// An endpoint of a slice, as the test sets it.
#[derive(Clone, Debug)]
pub struct FakeEndpoint {
    pub address: String,
    /// The targetRef pod; None: no targetRef.
    pub pod: Option<String>,
    pub serving: bool,
    pub terminating: bool,
}

impl FakeEndpoint {
    /// A ready pod.
    pub fn ready(address: Ipv4Addr, pod: &str) -> FakeEndpoint {
        FakeEndpoint {
            address: address.to_string(),
            pod: Some(pod.to_owned()),
            serving: true,
            terminating: false,
        }
    }

    /// A terminating pod, still serving.
    pub fn terminating(address: Ipv4Addr, pod: &str) -> FakeEndpoint {
        FakeEndpoint {
            terminating: true,
            ..FakeEndpoint::ready(address, pod)
        }
    }
}

/// An IPv4 EndpointSlice of `service` in `namespace` with one port.
pub fn endpoint_slice(
    namespace: &str,
    name: &str,
    service: &str,
    port: (&str, u16),
    endpoints: &[FakeEndpoint],
) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|e| {
            let mut v = json!({
                "addresses": [e.address],
                "conditions": {
                    "ready": e.serving && !e.terminating,
                    "serving": e.serving,
                    "terminating": e.terminating,
                },
            });
            if let Some(pod) = &e.pod {
                v["targetRef"] = json!({ "kind": "Pod", "namespace": namespace, "name": pod });
            }
            v
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": { "kubernetes.io/service-name": service },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{ "name": port.0, "port": port.1, "protocol": "TCP" }],
    })
}

#[derive(Default)]
struct State {
    rv: u64,
    slices: BTreeMap<String, Value>,
    /// (resourceVersion, type, object), oldest first.
    events: Vec<(u64, &'static str, Value)>,
    /// A watch from a resourceVersion below this one gets 410 Gone.
    compacted: u64,
    /// Bumped by `expire`: open watches end.
    epoch: u64,
    lists: usize,
    watches: usize,
    gone: usize,
}

struct Shared {
    namespace: String,
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Requests served so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    pub lists: usize,
    pub watches: usize,
    /// Watches answered with 410 Gone.
    pub gone: usize,
}

/// The running fake server; stopped on drop.
pub struct FakeKube {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FakeKube {
    /// Serves `namespace` on an ephemeral loopback port.
    pub fn start(namespace: &str) -> Result<FakeKube> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the fake API server")?;
        FakeKube::serve_on(listener, namespace)
    }

    /// Serves `namespace` on the loopback of network namespace `netns`,
    /// where a daemon under test runs.
    pub fn start_in_netns(netns: &str, namespace: &str) -> Result<FakeKube> {
        let listener = crate::netns::in_netns(netns, || TcpListener::bind("127.0.0.1:0"))?
            .with_context(|| format!("binding the fake API server in {netns}"))?;
        FakeKube::serve_on(listener, namespace)
    }

    fn serve_on(listener: TcpListener, namespace: &str) -> Result<FakeKube> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            namespace: namespace.to_owned(),
            state: Mutex::new(State {
                rv: 1,
                ..State::default()
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("fake-kube".into())
            .spawn(move || accept_loop(&listener, &s))?;
        Ok(FakeKube {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig whose current context is this server.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        router::discovery::write_kubeconfig(path, &self.url())
            .with_context(|| format!("writing {}", path.display()))
    }

    fn record(&self, kind: &'static str, object: Value) {
        let mut st = self.shared.lock();
        st.rv += 1;
        let rv = st.rv;
        st.events.push((rv, kind, object));
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Adds the slice, or replaces the one of its name (ADDED or MODIFIED).
    pub fn apply(&self, mut slice: Value) {
        let name = slice["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let mut st = self.shared.lock();
        st.rv += 1;
        let rv = st.rv;
        slice["metadata"]["resourceVersion"] = json!(rv.to_string());
        let kind = if st.slices.contains_key(&name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.slices.insert(name, slice.clone());
        st.events.push((rv, kind, slice));
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Deletes the slice of that name, if there is one.
    pub fn delete(&self, name: &str) {
        let mut st = self.shared.lock();
        let Some(mut slice) = st.slices.remove(name) else {
            return;
        };
        st.rv += 1;
        let rv = st.rv;
        slice["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.events.push((rv, "DELETED", slice));
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Sends open watches a BOOKMARK at a new resourceVersion.
    pub fn bookmark(&self) {
        let rv = self.shared.lock().rv + 1;
        self.record(
            "BOOKMARK",
            json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": { "resourceVersion": rv.to_string() },
            }),
        );
    }

    /// Compacts the history past every client's resourceVersion (as etcd
    /// does) and ends open watches: the next watch gets 410 Gone, and only
    /// a new list goes on.
    pub fn expire(&self) {
        let mut st = self.shared.lock();
        st.rv += 1;
        st.compacted = st.rv;
        st.epoch += 1;
        st.events.clear();
        drop(st);
        self.shared.changed.notify_all();
    }

    pub fn requests(&self) -> Requests {
        let st = self.shared.lock();
        Requests {
            lists: st.lists,
            watches: st.watches,
            gone: st.gone,
        }
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut conns = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let s = Arc::clone(shared);
                if let Ok(t) = std::thread::Builder::new()
                    .name("fake-kube-conn".into())
                    .spawn(move || {
                        let _ = serve(stream, &s);
                    })
                {
                    conns.push(t);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
        conns.retain(|t| !t.is_finished());
    }
    for t in conns {
        let _ = t.join();
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    write!(
        stream,
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        if code == 200 { "OK" } else { "Error" },
        body.len()
    )?;
    stream.flush()
}

/// Whether `obj` matches a `key=value` label selector (the only form the
/// router sends).
fn selected(obj: &Value, selector: Option<&str>) -> bool {
    let Some((k, v)) = selector.and_then(|s| s.split_once('=')) else {
        return true;
    };
    obj["metadata"]["labels"][k].as_str() == Some(v)
}

fn serve(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    // A client that connects and says nothing must not hold up the drop.
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params: BTreeMap<String, String> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect();
    let expected = format!(
        "/apis/discovery.k8s.io/v1/namespaces/{}/endpointslices",
        shared.namespace
    );
    if path != expected {
        return respond(
            &mut stream,
            404,
            &status(404, "NotFound", &format!("the fake serves only {expected}")),
        );
    }
    let selector = params.get("labelSelector").map(String::as_str);
    if params.get("watch").map(String::as_str) != Some("true") {
        let mut st = shared.lock();
        st.lists += 1;
        let items: Vec<Value> = st
            .slices
            .values()
            .filter(|s| selected(s, selector))
            .cloned()
            .collect();
        let body = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSliceList",
            "metadata": { "resourceVersion": st.rv.to_string() },
            "items": items,
        });
        drop(st);
        return respond(&mut stream, 200, &body);
    }
    watch(stream, shared, &params, selector)
}

fn chunk(stream: &mut TcpStream, kind: &str, object: &Value) -> std::io::Result<()> {
    let mut line = json!({ "type": kind, "object": object }).to_string();
    line.push('\n');
    write!(stream, "{:x}\r\n{line}\r\n", line.len())?;
    stream.flush()
}

fn watch(
    mut stream: TcpStream,
    shared: &Shared,
    params: &BTreeMap<String, String>,
    selector: Option<&str>,
) -> std::io::Result<()> {
    let mut from: u64 = params
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = params.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = Duration::from_secs(
        params
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(290),
    );
    let started = Instant::now();
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n"
    )?;
    let mut st = shared.lock();
    st.watches += 1;
    let epoch = st.epoch;
    if from < st.compacted {
        st.gone += 1;
        let msg = format!("too old resource version: {from} ({})", st.compacted);
        drop(st);
        chunk(&mut stream, "ERROR", &status(410, "Expired", &msg))?;
        return write!(stream, "0\r\n\r\n");
    }
    loop {
        // Before anything is sent: a watch open across `expire` must not
        // deliver what changed after it, only end.
        if shared.stop.load(Ordering::SeqCst) || st.epoch != epoch || started.elapsed() > timeout {
            break;
        }
        let due: Vec<(u64, &'static str, Value)> = st
            .events
            .iter()
            .filter(|(rv, kind, obj)| {
                *rv > from
                    && if *kind == "BOOKMARK" {
                        bookmarks
                    } else {
                        selected(obj, selector)
                    }
            })
            .cloned()
            .collect();
        if let Some(last) = st.events.last() {
            from = from.max(last.0);
        }
        if due.is_empty() {
            st = shared
                .changed
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            continue;
        }
        drop(st);
        for (_, kind, obj) in &due {
            chunk(&mut stream, kind, obj)?;
        }
        st = shared.lock();
    }
    drop(st);
    write!(stream, "0\r\n\r\n")?;
    stream.flush()
}
