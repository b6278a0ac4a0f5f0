//! Kubernetes discovery: a service written with `discovery.kubernetes`
//! takes its backends from the EndpointSlices of a Kubernetes Service. One
//! task per such service watches them (`kube::runtime::watcher`, which
//! re-lists after a 410 Gone and backs off on errors), coalesces bursts,
//! and sends the daemon each new backend list; the daemon applies it as a
//! reload would (see `DaemonState::apply_discovered`).

mod slices;

pub use slices::{Mapped, SliceError, backends_from_slices};

use std::{
    collections::BTreeMap,
    ffi::OsString,
    path::{Path, PathBuf},
    pin::pin,
    time::Duration,
};

use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};
use tracing::{debug, info, warn};

use crate::config::{BackendConfig, Config, ConfigError, KubernetesDiscovery};

/// How long a burst of slice changes (a rollout) is gathered before the
/// daemon gets one list for all of it.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// Where a daemon finds Kubernetes credentials, read once from its
/// environment; tests make their own.
#[derive(Clone, Debug, Default)]
pub struct CredentialEnv {
    /// `$KUBECONFIG`: one path or several, `:`-separated.
    pub kubeconfig: Option<OsString>,
    /// `$HOME`, for `~/.kube/config`.
    pub home: Option<PathBuf>,
    /// `KUBERNETES_SERVICE_HOST` is set: the daemon runs in a pod.
    pub in_cluster: bool,
}

impl CredentialEnv {
    pub fn from_process() -> CredentialEnv {
        CredentialEnv {
            kubeconfig: std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()),
            home: std::env::var_os("HOME").map(PathBuf::from),
            in_cluster: std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
        }
    }
}

/// Why a discovered service has no credentials to watch with.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The `kubeconfig` key names a file that cannot be used.
    #[error("kubeconfig {}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    /// `$KUBECONFIG` or `~/.kube/config` cannot be used.
    #[error("{source_name} {}: {reason}", path.display())]
    Found {
        source_name: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("in-cluster service account (KUBERNETES_SERVICE_HOST is set): {0}")]
    InCluster(String),
    #[error(
        "Kubernetes discovery with no credentials: no kubeconfig key, KUBECONFIG is unset, {} \
         does not exist, and KUBERNETES_SERVICE_HOST is unset (not in a pod); set \
         kubeconfig = \"/path/to/kubeconfig\" or run the daemon in a pod with a service account",
        home_config.as_deref().map_or_else(|| "~/.kube/config".into(), |p| p.display().to_string())
    )]
    None { home_config: Option<PathBuf> },
}

impl CredentialsError {
    /// Whether the error is about the `kubeconfig` key (else the table).
    fn names_key(&self) -> bool {
        matches!(self, CredentialsError::Key { .. })
    }
}

/// An error and its causes on one line.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s.lines().map(str::trim).collect::<Vec<_>>().join(" ")
}

/// A client config from a kubeconfig. kube's loader is async in signature
/// only (it reads files with std), so it completes on the first poll,
/// which lets the config check run it outside a runtime.
fn from_kubeconfig(kc: Kubeconfig) -> Result<kube::Config, String> {
    match kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).now_or_never() {
        Some(Ok(c)) => Ok(c),
        Some(Err(e)) => Err(one_line(&e)),
        None => Err("kube's kubeconfig loader did not complete at once".to_owned()),
    }
}

fn read_kubeconfig(paths: &[PathBuf]) -> Result<Kubeconfig, String> {
    let mut merged = Kubeconfig::default();
    for p in paths {
        let kc = Kubeconfig::read_from(p).map_err(|e| one_line(&e))?;
        merged = merged.merge(kc).map_err(|e| one_line(&e))?;
    }
    Ok(merged)
}

/// The client config a discovered service watches with: its `kubeconfig`
/// key, else `$KUBECONFIG`, else `~/.kube/config`, else the pod's service
/// account (kube's own order, with the key first).
pub fn client_config(
    spec: &KubernetesDiscovery,
    env: &CredentialEnv,
) -> Result<kube::Config, CredentialsError> {
    if let Some(path) = &spec.kubeconfig {
        return read_kubeconfig(std::slice::from_ref(path))
            .and_then(from_kubeconfig)
            .map_err(|reason| CredentialsError::Key {
                path: path.clone(),
                reason,
            });
    }
    if let Some(value) = &env.kubeconfig {
        let paths: Vec<PathBuf> = std::env::split_paths(value)
            .filter(|p| !p.as_os_str().is_empty())
            .collect();
        return read_kubeconfig(&paths)
            .and_then(from_kubeconfig)
            .map_err(|reason| CredentialsError::Found {
                source_name: "$KUBECONFIG",
                path: PathBuf::from(value),
                reason,
            });
    }
    let home_config = env.home.as_deref().map(|h| h.join(".kube").join("config"));
    if let Some(path) = home_config.as_deref().filter(|p| p.exists()) {
        return read_kubeconfig(&[path.to_owned()])
            .and_then(from_kubeconfig)
            .map_err(|reason| CredentialsError::Found {
                source_name: "kubeconfig",
                path: path.to_owned(),
                reason,
            });
    }
    if env.in_cluster {
        return kube::Config::incluster().map_err(|e| CredentialsError::InCluster(one_line(&e)));
    }
    Err(CredentialsError::None { home_config })
}

/// Every discovered service has credentials: checked when the config is
/// loaded, before anything is attached or announced, and named at the key.
pub fn check_credentials(cfg: &Config, env: &CredentialEnv) -> Result<(), ConfigError> {
    for (i, svc) in cfg.services.iter().enumerate() {
        let Some(spec) = &svc.discovery else { continue };
        if let Err(e) = client_config(spec, env) {
            let key = if e.names_key() {
                format!("service[{i}].discovery.kubernetes.kubeconfig")
            } else {
                format!("service[{i}].discovery.kubernetes")
            };
            return Err(cfg.error_at(&key, e.to_string()));
        }
    }
    Ok(())
}

/// A discovered service's new backends, from the watcher of `generation`
/// (a watcher replaced by a reload may still send one).
#[derive(Debug)]
pub struct Update {
    pub service: String,
    pub generation: u64,
    pub backends: Vec<BackendConfig>,
}

fn slice_key(s: &EndpointSlice) -> String {
    s.metadata.name.clone().unwrap_or_default()
}

/// Watches the EndpointSlices of `spec.service` and sends a backend list
/// after the first complete list and after each change (gathered for
/// `debounce`); a list equal to the last one sent is not sent again.
/// Returns when the receiver is gone.
pub async fn watch(
    client: kube::Client,
    spec: &KubernetesDiscovery,
    service: &str,
    generation: u64,
    debounce: Duration,
    tx: mpsc::Sender<Update>,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &spec.namespace);
    let selector = format!("kubernetes.io/service-name={}", spec.service);
    let mut events =
        pin!(watcher(api, watcher::Config::default().labels(&selector)).default_backoff());
    let mut store: BTreeMap<String, EndpointSlice> = BTreeMap::new();
    // Slices of a list in progress: the store changes once it is complete,
    // so a re-list never shows a half-listed service.
    let mut listing: Option<BTreeMap<String, EndpointSlice>> = None;
    let mut listed = false;
    let mut due: Option<Instant> = None;
    let mut last: Option<Vec<BackendConfig>> = None;
    let mut warned_not_ipv4 = false;
    loop {
        tokio::select! {
            ev = events.next() => {
                let Some(ev) = ev else { return };
                let changed = match ev {
                    Err(e) => {
                        warn!(service, "watching EndpointSlices of {}/{}: {}", spec.namespace, spec.service, one_line(&e));
                        false
                    }
                    Ok(watcher::Event::Init) => {
                        listing = Some(BTreeMap::new());
                        false
                    }
                    Ok(watcher::Event::InitApply(s)) => {
                        if let Some(l) = listing.as_mut() {
                            l.insert(slice_key(&s), s);
                        }
                        false
                    }
                    Ok(watcher::Event::InitDone) => {
                        if let Some(l) = listing.take() {
                            store = l;
                        }
                        listed = true;
                        true
                    }
                    Ok(watcher::Event::Apply(s)) => {
                        store.insert(slice_key(&s), s);
                        listed
                    }
                    Ok(watcher::Event::Delete(s)) => {
                        store.remove(&slice_key(&s));
                        listed
                    }
                };
                if changed && due.is_none() {
                    due = Some(Instant::now() + debounce);
                }
            }
            () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                due = None;
                match backends_from_slices(store.values(), spec) {
                    Ok(m) => {
                        if m.skipped_not_ipv4 > 0 && !warned_not_ipv4 {
                            warn!(service, "{} addresses that are not IPv4 left out: the datapath forwards IPv4", m.skipped_not_ipv4);
                            warned_not_ipv4 = true;
                        }
                        if last.as_ref() != Some(&m.backends) {
                            debug!(service, "discovered {} backends", m.backends.len());
                            last = Some(m.backends.clone());
                            let update = Update { service: service.to_owned(), generation, backends: m.backends };
                            if tx.send(update).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => warn!(service, "{e}; the backends stay as they were"),
                }
            }
        }
    }
}

/// A running watcher.
struct Running {
    spec: KubernetesDiscovery,
    generation: u64,
    task: JoinHandle<()>,
}

/// The daemon's watchers, one per discovered service, and the backend
/// lists last applied, which a reload of the file keeps.
pub struct Watchers {
    tx: mpsc::Sender<Update>,
    running: BTreeMap<String, Running>,
    applied: BTreeMap<String, Vec<BackendConfig>>,
    next_generation: u64,
}

impl Watchers {
    pub fn new(tx: mpsc::Sender<Update>) -> Watchers {
        Watchers {
            tx,
            running: BTreeMap::new(),
            applied: BTreeMap::new(),
            next_generation: 0,
        }
    }

    /// Runs one watcher per discovered service of `cfg` (inside a tokio
    /// runtime): those already running with the same settings go on,
    /// others stop, and their backends with them.
    pub fn reconcile(&mut self, cfg: &Config) {
        let wanted: BTreeMap<&str, &KubernetesDiscovery> = cfg
            .services
            .iter()
            .filter_map(|s| s.discovery.as_ref().map(|d| (s.name.as_str(), d)))
            .collect();
        self.running.retain(|name, r| {
            let keep = wanted.get(name.as_str()) == Some(&&r.spec);
            if !keep {
                r.task.abort();
            }
            keep
        });
        self.applied
            .retain(|name, _| self.running.contains_key(name));
        for (name, spec) in wanted {
            if self.running.contains_key(name) {
                continue;
            }
            self.next_generation += 1;
            let generation = self.next_generation;
            let task = tokio::spawn(run_watcher(
                name.to_owned(),
                generation,
                spec.clone(),
                self.tx.clone(),
            ));
            info!(
                service = name,
                "watching EndpointSlices of {}/{}", spec.namespace, spec.service
            );
            self.running.insert(
                name.to_owned(),
                Running {
                    spec: spec.clone(),
                    generation,
                    task,
                },
            );
        }
    }

    /// Gives each discovered service of `cfg` (a reloaded file) the
    /// backends applied last, where its watcher goes on unchanged.
    pub fn keep_discovered(&self, cfg: &mut Config) {
        for svc in &mut cfg.services {
            let Some(spec) = &svc.discovery else { continue };
            let same = self.running.get(&svc.name).is_some_and(|r| &r.spec == spec);
            if let (true, Some(b)) = (same, self.applied.get(&svc.name)) {
                svc.backends = b.clone();
            }
        }
    }

    /// Whether `u` comes from a watcher still running.
    pub fn is_current(&self, u: &Update) -> bool {
        self.running
            .get(&u.service)
            .is_some_and(|r| r.generation == u.generation)
    }

    pub fn record(&mut self, service: &str, backends: Vec<BackendConfig>) {
        self.applied.insert(service.to_owned(), backends);
    }

    /// The backends applied last, by service.
    pub fn applied(&self) -> &BTreeMap<String, Vec<BackendConfig>> {
        &self.applied
    }
}

impl Drop for Watchers {
    fn drop(&mut self) {
        for r in self.running.values() {
            r.task.abort();
        }
    }
}

/// A watcher task: credentials and client, then `watch` until the daemon
/// stops listening. Credentials were checked at load; if they fail now
/// (a file removed since), the service keeps what it has and says why.
pub async fn run_watcher(
    service: String,
    generation: u64,
    spec: KubernetesDiscovery,
    tx: mpsc::Sender<Update>,
) {
    let config = match client_config(&spec, &CredentialEnv::from_process()) {
        Ok(c) => c,
        Err(e) => {
            warn!(service, "discovery stopped: {e}");
            return;
        }
    };
    let client = match kube::Client::try_from(config) {
        Ok(c) => c,
        Err(e) => {
            warn!(
                service,
                "discovery stopped: Kubernetes client: {}",
                one_line(&e)
            );
            return;
        }
    };
    watch(client, &spec, &service, generation, DEBOUNCE, tx).await;
}

/// Where a kubeconfig for `server` (plain http, no user) is written: a
/// helper for tests and for trying discovery against a local API proxy
/// (`kubectl proxy`), which needs no credentials of its own.
pub fn write_kubeconfig(path: &Path, server: &str) -> std::io::Result<()> {
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: local\nclusters:\n- name: local\n  \
             cluster:\n    server: {server}\ncontexts:\n- name: local\n  context:\n    cluster: \
             local\n    user: local\nusers:\n- name: local\n  user: {{}}\n"
        ),
    )
}

#[cfg(test)]
mod tests;
