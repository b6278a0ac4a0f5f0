//! The daemon: validates the config against the host, loads the datapath
//! pinned under `pin_path` (adopting what an earlier daemon left there) and
//! attaches it, drops the capabilities it no longer needs, serves the
//! control socket, and reloads on SIGHUP or API request (validate first,
//! then apply all of it or none). SIGINT/SIGTERM stop the daemon only: the
//! pinned datapath keeps forwarding on the last weights until a new daemon
//! adopts it or `router daemon --cleanup` removes it.

mod overrides_file;
mod privileges;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Mutex,
};
use tracing::{info, warn};

use crate::{
    api::{
        Override, OverrideChange, OverrideError, ReloadReply, StatusReply,
        views::{self, BackendView, RateWindow, ServiceView},
    },
    config::{Config, XdpMode},
    control_loop::Controller,
    datapath::{AdoptedRoute, BackendRole, ConnScan, ConnTable, Datapath, LoadOptions, PinDir},
    fib_watch,
    health::ProbeFailure,
    host::{facts as host, settings as host_settings},
    policy::Measured,
    server::{bounded, control, metrics},
    telemetry::{Reading, TelemetryError},
};

pub fn load_options(cfg: &Config) -> LoadOptions {
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    LoadOptions {
        table_size: cfg.daemon.table_size,
        conn_table_size: cfg.daemon.conn_table_size,
        tcp_idle_ns: ns(cfg.daemon.tcp_idle_timeout),
        tcp_closing_ns: ns(cfg.daemon.tcp_closing_timeout),
        udp_idle_ns: ns(cfg.daemon.udp_idle_timeout),
        datapath_log: cfg.daemon.datapath_log,
    }
}

/// Loads a config and checks it against this host: interfaces exist, SNAT
/// addresses are on them, and the SNAT probe range stays clear of the
/// kernel's own ephemeral ports. Every error names file, line and key.
pub fn load_for_host(path: &Path) -> Result<Config> {
    let cfg = Config::load(path)?;
    let addrs = host::interface_addresses().context("listing interface addresses")?;
    cfg.check_host(&|name| addrs.get(name).cloned())?;
    let (lo, hi) = host::ephemeral_port_range().context("reading ip_local_port_range")?;
    if cfg.daemon.snat_port_min <= hi && lo <= cfg.daemon.snat_port_max {
        return Err(cfg
            .error_at(
                "daemon.snat_port_range",
                format!(
                    "{}-{} overlaps the kernel's ephemeral ports {lo}-{hi} (net.ipv4.ip_local_port_range); \
                     SNAT ports there would collide with the host's own connections",
                    cfg.daemon.snat_port_min, cfg.daemon.snat_port_max
                ),
            )
            .into());
    }
    Ok(cfg)
}

/// What the daemon would arrange on this host at start, one line each:
/// interface settings it sets and a BPF filesystem it mounts. `Err` names
/// a prerequisite it cannot arrange.
pub fn host_plan(cfg: &Config, pin_path: &Path) -> Result<Vec<String>> {
    use crate::datapath::pinning::{BpffsPlan, bpffs_plan};
    let mut lines = Vec::new();
    for iface in &cfg.daemon.interfaces {
        let changes = host_settings::needed(iface)
            .with_context(|| format!("reading the settings of {iface}"))?;
        lines.extend(
            changes
                .iter()
                .map(|c| format!("the daemon sets {}", c.describe())),
        );
    }
    match bpffs_plan(pin_path)? {
        BpffsPlan::Present => {}
        BpffsPlan::Mount(at) => lines.push(format!(
            "no BPF filesystem holds {}: the daemon mounts one at {}",
            pin_path.display(),
            at.display()
        )),
        BpffsPlan::Missing => anyhow::bail!(
            "pin_path {}: not on a BPF filesystem, and its parent is not an empty directory the \
             daemon could mount one on: mount one first (mount -t bpf bpf /sys/fs/bpf) or choose \
             a pin_path under one",
            pin_path.display()
        ),
    }
    Ok(lines)
}

pub struct DaemonState {
    dp: Datapath,
    ctl: Option<Controller>,
    config_path: PathBuf,
    config: Config,
    started: Instant,
    last_reload: Option<ReloadReply>,
    /// Latest connection-table scan, written by the scanner thread.
    scan: Arc<std::sync::Mutex<Option<ConnScan>>>,
    rates: RateWindow,
    last_rate_sample: Option<Instant>,
    /// Hands `/metrics` its snapshots, so scrapes never take this lock.
    metrics: metrics::Publisher,
}

/// How often new-connection counters are sampled for rates and cost.
const RATE_SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Shortest pause between connection-table scans; a scan that takes long
/// (a full table) stretches the pause so scanning stays under ~20% of a core.
const SCAN_EVERY: Duration = Duration::from_secs(2);

/// The datapath's counts of a backend, for the policy's speed estimate:
/// flows in flight, and flows the datapath saw end (the scan's corrections
/// for flows that vanished are left out: they are not completions).
fn measurer<'a>(
    dp: &'a Datapath,
    scan: &std::sync::Mutex<Option<ConnScan>>,
) -> impl Fn(&str, &str) -> Option<Measured> + 'a {
    let leaked: std::collections::BTreeMap<u32, u64> = scan
        .lock()
        .ok()
        .and_then(|s| {
            s.as_ref().map(|s| {
                s.corrections_total
                    .iter()
                    .map(|(id, c)| (*id, c.leaked))
                    .collect()
            })
        })
        .unwrap_or_default();
    let load = dp.load_counters();
    move |service, backend| {
        let id = dp.backend_id(service, backend)?;
        let l = load.get(id);
        Some(Measured {
            in_flight: l.in_flight(),
            ended: l
                .closed
                .saturating_sub(leaked.get(&id).copied().unwrap_or(0)),
        })
    }
}

/// Seconds since the Unix epoch (drain deadlines are wall-clock times).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The control server's handle on the daemon: the four things the API
/// may ask, each under the daemon's lock for no longer than it takes.
struct Handle(Arc<Mutex<DaemonState>>);

impl control::Control for Handle {
    async fn status(&self) -> Result<StatusReply> {
        self.0.lock().await.status()
    }

    async fn reload(&self) -> ReloadReply {
        self.0.lock().await.reload()
    }

    async fn views(&self) -> Result<(Vec<ServiceView>, Vec<BackendView>)> {
        let (services, backends, _) = self.0.lock().await.views()?;
        Ok((services, backends))
    }

    async fn change_override(
        &self,
        service: String,
        backend: String,
        change: OverrideChange,
    ) -> std::result::Result<Override, OverrideError> {
        self.0
            .lock()
            .await
            .override_backend(&service, &backend, change)
    }
}

/// Counts live flows per backend in the background, on its own descriptor
/// of the connection table, so a scan never holds the daemon's lock.
fn spawn_conn_scanner(
    table: ConnTable,
    out: Arc<std::sync::Mutex<Option<ConnScan>>>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("conn-scan".into())
        .spawn(move || {
            let mut total: std::collections::BTreeMap<u32, crate::datapath::Correction> =
                std::collections::BTreeMap::new();
            loop {
                let t = Instant::now();
                match table.scan() {
                    Ok(mut scan) => {
                        for (id, c) in &scan.corrections {
                            total.entry(*id).or_default().add(c);
                        }
                        scan.corrections_total = total.clone();
                        if let Ok(mut slot) = out.lock() {
                            *slot = Some(scan);
                        }
                    }
                    Err(e) => warn!("scanning the connection table: {e}"),
                }
                std::thread::sleep(SCAN_EVERY.max(t.elapsed() * 4));
            }
        })
        .map(drop)
}

impl DaemonState {
    pub fn status(&self) -> Result<StatusReply> {
        let datapath = self.dp.status()?;
        let fallback_connections = datapath
            .services
            .iter()
            .flat_map(|s| &s.backends)
            .filter(|b| b.role == BackendRole::Fallback)
            .map(|b| b.counters.new_conns)
            .sum();
        Ok(StatusReply {
            fallback_connections,
            config: self.config_path.display().to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            last_reload: self.last_reload.clone(),
            datapath,
            policy: self
                .ctl
                .as_ref()
                .map(|c| c.status(self.started.elapsed()))
                .unwrap_or_default(),
            all_saturated_ticks: self.ctl.as_ref().map_or(0, |c| c.all_saturated_ticks),
            health_local_errors: self.ctl.as_ref().map_or(0, |c| c.health_local_errors),
        })
    }

    /// Services and backends as operators see them (API, CLI, top, metrics).
    pub fn views(&self) -> Result<(Vec<ServiceView>, Vec<BackendView>, StatusReply)> {
        let st = self.status()?;
        let scan = self.scan.lock().ok().and_then(|s| s.clone());
        let backends = views::backends(&st, scan.as_ref(), &self.rates.rates());
        let services = views::services(&st, &backends);
        Ok((services, backends, st))
    }

    /// Connection-table occupancy from the latest scan.
    pub fn conn_entries(&self) -> Option<u64> {
        self.scan
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|s| s.entries))
    }

    pub fn conn_table_size(&self) -> u32 {
        self.dp.options().conn_table_size
    }

    /// Publishes what `/metrics` serves: after a poll round (`force` false,
    /// at most every quarter second) and after anything an operator
    /// changed (`force` true), and only while a metrics server runs.
    fn publish_metrics(&mut self, force: bool) {
        if self.metrics.due(force) {
            let snapshot = self.snapshot();
            self.metrics.publish(snapshot);
        }
    }

    /// What a scrape reports, captured under the daemon's lock and
    /// published, so the metrics server never takes it.
    fn snapshot(&self) -> Result<metrics::Snapshot> {
        let (services, backends, status) = self.views()?;
        Ok(metrics::Snapshot {
            services,
            backends,
            status,
            conn_entries: self.conn_entries(),
            conn_capacity: self.conn_table_size(),
        })
    }

    fn sample_rates(&mut self) {
        let now = Instant::now();
        if self
            .last_rate_sample
            .is_some_and(|t| now.duration_since(t) < RATE_SAMPLE_EVERY)
        {
            return;
        }
        match self.dp.status() {
            Ok(st) => {
                let counts = st
                    .services
                    .iter()
                    .flat_map(|s| {
                        s.backends
                            .iter()
                            .map(|b| ((s.name.clone(), b.name.clone()), b.counters.new_conns))
                    })
                    .collect();
                self.rates.push(now, counts);
                self.last_rate_sample = Some(now);
            }
            Err(e) => warn!("sampling connection counters: {e}"),
        }
    }

    /// Ends the flows of drained backends whose deadline has passed.
    fn enforce_drain_deadlines(&mut self) {
        let Some(ctl) = self.ctl.as_mut() else { return };
        let mut ended_any = false;
        for (service, backend) in ctl.due_drains(unix_now()) {
            let ended = match self.dp.backend_id(&service, &backend) {
                None => Ok(0),
                Some(id) => self
                    .dp
                    .conn_table()
                    .and_then(|mut t| t.end_backend_flows(id)),
            };
            match ended {
                Ok(n) => {
                    info!(
                        service,
                        backend, "drain deadline passed: {n} connections ended"
                    );
                    ctl.mark_flows_ended(&service, &backend, n);
                    ended_any = true;
                }
                Err(e) => warn!(service, backend, "ending drained flows: {e}"),
            }
        }
        if ended_any {
            self.persist_overrides();
        }
    }

    /// Applies an operator override at once (not at the next poll), so a
    /// drain takes effect for the very next new connection.
    pub fn override_backend(
        &mut self,
        service: &str,
        backend: &str,
        change: OverrideChange,
    ) -> std::result::Result<Override, OverrideError> {
        let now = self.started.elapsed();
        let ctl = self.ctl.as_mut().ok_or(OverrideError::NotRunning)?;
        let before = ctl.overrides().clone();
        let ov = ctl.set_override(service, backend, change, unix_now())?;
        let (specs, _) = ctl.decide(now, &self.config, &measurer(&self.dp, &self.scan));
        if let Err(e) = self.dp.apply(&specs) {
            // Nothing half-applied: the override goes back to what it was.
            if let Some(c) = self.ctl.as_mut() {
                c.restore_overrides_exactly(before);
            }
            return Err(OverrideError::Datapath(e));
        }
        self.persist_overrides();
        self.publish_metrics(true);
        info!(service, backend, "override now {ov:?}");
        Ok(ov)
    }

    /// Saves the operator overrides beside the control socket, so a
    /// restarted daemon keeps them (see `overrides_file`).
    fn persist_overrides(&self) {
        let Some(ctl) = self.ctl.as_ref() else { return };
        let path = overrides_file::path_for(&self.config.daemon.control_socket);
        if let Err(e) = overrides_file::save(&path, ctl.overrides()) {
            warn!("saving overrides: {e:#}; a restarted daemon would not keep them");
        }
    }

    /// Records a poll round's results, runs the policy and writes the
    /// datapath if any weight changed.
    fn finish_round(&mut self, generation: u64, results: Vec<RoundResult>) {
        let now = self.started.elapsed();
        let Some(ctl) = self.ctl.as_mut() else { return };
        if ctl.generation() != generation {
            return;
        }
        for r in results {
            match r {
                RoundResult::Reading(s, b, res) => ctl.record_reading(s, b, now, res),
                RoundResult::Probe(s, b, res) => ctl.record_probe(s, b, res),
            }
        }
        let (specs, changed) = ctl.decide(now, &self.config, &measurer(&self.dp, &self.scan));
        if changed && let Err(e) = self.dp.apply(&specs) {
            warn!("writing weights to the datapath: {e}");
        }
        self.enforce_drain_deadlines();
        self.sample_rates();
    }

    /// Validate-then-swap: a config that fails any check changes nothing.
    pub fn reload(&mut self) -> ReloadReply {
        let reply = match self.try_reload() {
            Ok(msg) => {
                info!("reload: {msg}");
                ReloadReply {
                    ok: true,
                    message: msg,
                }
            }
            Err(e) => {
                warn!("reload refused: {e:#}");
                ReloadReply {
                    ok: false,
                    message: format!("{e:#}"),
                }
            }
        };
        self.last_reload = Some(reply.clone());
        self.publish_metrics(true);
        reply
    }

    fn try_reload(&mut self) -> Result<String> {
        let cfg = load_for_host(&self.config_path)?;
        if load_options(&cfg) != *self.dp.options() {
            anyhow::bail!(
                "{}: table_size, conn_table_size, timeouts and datapath_log are fixed at load time; \
                 a restart changes timeouts and datapath_log hitlessly, the sizes only after \
                 `router daemon --cleanup`",
                cfg.origin()
            );
        }
        // Attaching needs capabilities the daemon dropped after start, and
        // the pins are where the running program lives.
        if cfg.daemon.interfaces != self.config.daemon.interfaces
            || cfg.daemon.xdp_mode != self.config.daemon.xdp_mode
            || cfg.daemon.pin_path != self.config.daemon.pin_path
        {
            anyhow::bail!(
                "{}: interface, xdp_mode and pin_path changes need a restart (interfaces: \
                 hitless; xdp_mode and pin_path: after `router daemon --cleanup`)",
                cfg.origin()
            );
        }
        let mut ctl = Controller::new(&cfg, self.ctl.take());
        let (specs, _) = ctl.decide(
            self.started.elapsed(),
            &cfg,
            &measurer(&self.dp, &self.scan),
        );
        let applied = self.dp.apply(&specs);
        self.ctl = Some(ctl);
        let report = applied?;
        self.config = cfg;
        // Overrides of backends the new config dropped are gone now.
        self.persist_overrides();
        Ok(format!(
            "applied {}: {} added, {} removed, {} tables swapped",
            self.config_path.display(),
            report.added.len(),
            report.removed.len(),
            report.swapped.len()
        ))
    }
}

fn aya_mode(m: XdpMode) -> aya::programs::XdpMode {
    match m {
        XdpMode::Auto => aya::programs::XdpMode::Default,
        XdpMode::Driver => aya::programs::XdpMode::Driver,
        XdpMode::Skb => aya::programs::XdpMode::Skb,
    }
}

/// What `router daemon` was asked for besides the config.
#[derive(Clone, Debug, Default)]
pub struct DaemonOptions {
    /// Overrides `[daemon] pin_path`.
    pub pin_path: Option<PathBuf>,
}

/// Removes the control socket unless the daemon got as far as serving it.
struct SocketGuard(Option<PathBuf>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The configured (service, backend) names of adopted routes: a service by
/// where it listens, a backend by address.
fn routed_by_name(cfg: &Config, routes: &[AdoptedRoute]) -> BTreeSet<(String, String)> {
    let mut names = BTreeSet::new();
    for s in &cfg.services {
        for b in &s.backends {
            let routed = routes.iter().any(|r| {
                r.vip == s.vip && r.proto == s.protocol.number() && r.backend == b.address
            });
            if routed {
                names.insert((s.name.clone(), b.name.clone()));
            }
        }
    }
    names
}

/// Sets what the datapath needs on `iface` (see `host_settings`), logging
/// each change. A setting that cannot be read or written is logged with
/// what to set by hand, and the daemon goes on: forwarding still works for
/// every flow whose neighbour is resolved.
fn arrange_interface(iface: &str, record: &Path) {
    let changes = match host_settings::needed(iface) {
        Ok(c) => c,
        Err(e) => {
            warn!("{iface}: cannot read the settings NAT mode needs: {e}");
            return;
        }
    };
    match host_settings::apply(record, &changes) {
        Ok(()) => {
            for c in &changes {
                info!("{iface}: set {} (restored by --cleanup)", c.describe());
            }
        }
        Err(e) => {
            for c in &changes {
                warn!(
                    "{iface}: could not set {}: {e:#}; set it by hand",
                    c.describe()
                );
            }
        }
    }
}

/// Runs the daemon. Everything privileged (binding, loading, adopting,
/// attaching, pinning) happens on this thread before any other thread
/// exists; then capabilities are dropped for the whole process and only
/// then does the async runtime start its threads.
pub fn run(config_path: &Path, opts: &DaemonOptions) -> Result<()> {
    let cfg = load_for_host(config_path)?;
    // Bind first: a second daemon must fail before it touches any pin or
    // interface.
    let listener = control::bind_std(&cfg.daemon.control_socket)?;
    let socket_path = cfg.daemon.control_socket.clone();
    let mut socket_guard = SocketGuard(Some(socket_path.clone()));
    let pins = PinDir::new(
        opts.pin_path
            .clone()
            .unwrap_or_else(|| cfg.daemon.pin_path.clone()),
    );

    if let Some(m) = crate::datapath::pinning::mount_bpffs_if_missing(pins.root())
        .context("preparing the BPF filesystem for pin_path")?
    {
        info!(
            "no BPF filesystem held {}: mounted one at {}",
            pins.root().display(),
            m.at.display()
        );
        if m.private_namespace {
            warn!(
                "{} is mounted in this process's own mount namespace (ip netns exec makes one): \
                 the datapath goes when the daemon exits, so restarts are not hitless; mount a \
                 BPF filesystem in the host's namespace for that",
                m.at.display()
            );
        }
    }
    let (mut dp, adopted) =
        Datapath::open_pinned(load_options(&cfg), &pins).with_context(|| {
            format!(
                "loading the XDP datapath pinned under {}",
                pins.root().display()
            )
        })?;
    if adopted {
        info!(
            "adopting the datapath pinned under {}: connections, counters and tables carry on",
            pins.root().display()
        );
    }
    let mut ctl = Controller::new(&cfg, None);
    let saved = overrides_file::path_for(&cfg.daemon.control_socket);
    let dropped = ctl.restore_overrides(overrides_file::load(&saved)?);
    if !ctl.overrides().is_empty() {
        info!(
            "kept operator overrides from {}: {:?}",
            saved.display(),
            ctl.overrides()
        );
    }
    if !dropped.is_empty() {
        warn!("saved overrides for backends no longer configured dropped: {dropped:?}");
    }
    let routed = routed_by_name(&cfg, &dp.adopted_routes());
    let assumed = ctl.assume_routable(&routed);
    if assumed > 0 {
        info!(
            "{assumed} health-checked backends the adopted datapath routes to stay routable until their first probe"
        );
    }
    // Nothing measured yet: the policy's speed estimates start at the first poll.
    let (specs, _) = ctl.decide(Duration::ZERO, &cfg, &|_, _| None);
    let report = dp
        .apply(&specs)
        .context("writing services to the datapath")?;
    info!(
        "services: {} added, {} removed, {} tables swapped",
        report.added.len(),
        report.removed.len(),
        report.swapped.len()
    );

    let logger = if cfg.daemon.datapath_log {
        Some(aya_log::EbpfLogger::init(dp.ebpf_mut()).context("starting the datapath logger")?)
    } else {
        None
    };

    let host_record = host_settings::record_path(&cfg.daemon.control_socket);
    for iface in &cfg.daemon.interfaces {
        arrange_interface(iface, &host_record);
        let took_over = dp
            .attach(iface, aya_mode(cfg.daemon.xdp_mode))
            .with_context(|| format!("attaching XDP to {iface}"))?;
        if took_over {
            info!("{iface}: this program replaced the pinned one in its XDP link");
        } else {
            info!(
                "attached to {iface} ({} mode)",
                cfg.daemon.xdp_mode.as_str()
            );
        }
    }
    for gone in dp.finish_pinning().context("pinning the datapath")? {
        info!("removed pinned {gone} (no longer configured)");
    }
    info!("datapath pinned under {}", pins.root().display());

    let kept =
        privileges::drop_to_minimum(|| dp.probe_map_access()).context("dropping capabilities")?;
    info!("capabilities dropped; kept: {kept}");

    // The watcher starts after the drop, so its thread holds nothing; the
    // bump after it covers any route change made before it was listening.
    let fib_events = fib_watch::spawn().context("watching routes and neighbours")?;
    dp.bump_fib_generation()
        .context("invalidating cached next hops")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    socket_guard.0 = None;
    runtime.block_on(serve(
        config_path,
        cfg,
        dp,
        ctl,
        listener,
        logger,
        fib_events,
    ))
}

async fn serve(
    config_path: &Path,
    cfg: Config,
    dp: Datapath,
    ctl: Controller,
    listener: std::os::unix::net::UnixListener,
    mut logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    mut fib_events: tokio::sync::mpsc::Receiver<()>,
) -> Result<()> {
    let socket_path = cfg.daemon.control_socket.clone();
    let pin_root = dp
        .pins()
        .map(|p| p.root().display().to_string())
        .unwrap_or_default();
    listener
        .set_nonblocking(true)
        .context("control socket: non-blocking mode")?;
    let listener =
        tokio::net::UnixListener::from_std(listener).context("control socket: registering")?;
    let poll_interval = ctl.poll_interval();
    let scan = Arc::new(std::sync::Mutex::new(None));
    spawn_conn_scanner(
        dp.conn_table().context("opening the connection table")?,
        scan.clone(),
    )
    .context("starting the connection-table scanner")?;
    let metrics_listen = cfg.daemon.metrics_listen;
    let (publisher, snapshots) = metrics::Publisher::new();
    let servers = metrics::ServerCounters::default();
    let state = Arc::new(Mutex::new(DaemonState {
        dp,
        ctl: Some(ctl),
        config_path: config_path.to_path_buf(),
        config: cfg,
        started: Instant::now(),
        last_reload: None,
        scan,
        rates: RateWindow::default(),
        last_rate_sample: None,
        metrics: publisher,
    }));
    let api = control::router(Arc::new(Handle(state.clone())));
    let server = tokio::spawn(bounded::serve(
        "control socket",
        listener,
        api,
        control::LIMITS,
        Arc::clone(&servers.control),
        std::future::pending(),
    ));
    let metrics_server = match metrics_listen {
        Some(addr) => Some(metrics::serve(addr, snapshots, servers).await?),
        None => {
            // Nobody reads snapshots then, and the control loop builds none.
            drop(snapshots);
            None
        }
    };
    state.lock().await.publish_metrics(true);

    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut log_tick = tokio::time::interval(Duration::from_millis(200));
    let mut poll_tick = tokio::time::interval(poll_interval);
    poll_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(
        "router daemon running; control socket {}",
        socket_path.display()
    );
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM"); break; }
            _ = int.recv() => { info!("SIGINT"); break; }
            _ = hup.recv() => { state.lock().await.reload(); }
            Some(()) = fib_events.recv() => {
                if let Err(e) = state.lock().await.dp.bump_fib_generation() {
                    warn!("invalidating cached next hops: {e}");
                }
            }
            _ = poll_tick.tick() => { poll_round(&state).await; }
            _ = log_tick.tick() => {
                if let Some(l) = logger.as_mut() { l.flush(); }
            }
        }
    }
    server.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    info!(
        "stopping; the datapath stays attached and forwards on the last weights \
         (pinned under {pin_root}; `router daemon --cleanup` removes it)"
    );
    if let Err(e) = std::fs::remove_file(&socket_path) {
        warn!("removing {}: {e}", socket_path.display());
    }
    Ok(())
}

/// `router daemon --cleanup`: detaches the pinned datapath from every
/// interface and removes every pinned object. Refused while a daemon
/// answers on `socket`, which would go on writing maps nobody reads.
pub fn cleanup(pin_path: &Path, socket: &Path) -> Result<String> {
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        anyhow::bail!(
            "a router daemon answers on {}: stop it first (SIGTERM leaves the datapath pinned; \
             --cleanup then removes it)",
            socket.display()
        );
    }
    let pins = PinDir::new(pin_path);
    let removed = crate::datapath::pinning::remove_all(&pins)
        .with_context(|| format!("removing the datapath pinned under {}", pin_path.display()))?;
    // Overrides belong to the datapath they steered, and the interface
    // settings were made for it: both go once it has gone, not before.
    let saved = overrides_file::path_for(socket);
    if let Err(e) = std::fs::remove_file(&saved)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!("removing {}: {e}", saved.display());
    }
    let mut restored = host_settings::restore(&host_settings::record_path(socket))
        .context("restoring interface settings")?
        .join("\n");
    if !restored.is_empty() {
        restored.insert(0, '\n');
    }
    if removed.links.is_empty() && !removed.program && removed.maps.is_empty() {
        return Ok(format!(
            "nothing pinned under {}{restored}",
            pin_path.display()
        ));
    }
    Ok(format!(
        "removed {}: detached from {}, program {}, {} maps{restored}",
        pin_path.display(),
        if removed.links.is_empty() {
            "no interface".to_string()
        } else {
            removed.links.join(", ")
        },
        if removed.program {
            "unpinned"
        } else {
            "not pinned"
        },
        removed.maps.len()
    ))
}

enum RoundResult {
    Reading(usize, usize, Result<Reading, TelemetryError>),
    Probe(usize, usize, Result<(), ProbeFailure>),
}

/// One poll round: every source and due probe runs concurrently, each with
/// its own deadline, and without the state lock, so a slow backend delays
/// nobody and the control API stays responsive.
async fn poll_round(state: &Mutex<DaemonState>) {
    let (generation, polls, probes, timeout) = {
        let mut st = state.lock().await;
        let now = st.started.elapsed();
        let Some(ctl) = st.ctl.as_mut() else { return };
        // Leave a fifth of the interval for the policy and the map writes.
        let timeout = ctl.poll_interval().mul_f64(0.8);
        (
            ctl.generation(),
            ctl.poll_jobs(),
            ctl.probe_jobs(now),
            timeout,
        )
    };
    let mut set = tokio::task::JoinSet::new();
    for j in polls {
        set.spawn(async move {
            RoundResult::Reading(j.service, j.backend, j.source.read(timeout).await)
        });
    }
    for p in probes {
        set.spawn(async move { RoundResult::Probe(p.service, p.backend, p.check.probe().await) });
    }
    let mut results = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(r) => results.push(r),
            Err(e) => warn!("poll task failed: {e}"),
        }
    }
    let mut st = state.lock().await;
    st.finish_round(generation, results);
    st.publish_metrics(false);
}
