//! The daemon: validates the config against the host, loads the datapath
//! pinned under `pin_path` (adopting what an earlier daemon left there) and
//! attaches it, drops the capabilities it no longer needs, serves the
//! control socket, and reloads on SIGHUP or API request (validate first,
//! then apply all of it or none). SIGINT/SIGTERM stop the daemon only: the
//! pinned datapath keeps forwarding on the last weights until a new daemon
//! adopts it or `router daemon --cleanup` removes it.

mod discovered_file;
mod neighbour_helper;
mod overrides_file;
mod pools;
mod privileges;
mod state;

pub use state::DaemonState;
use state::{Handle, poll_round, spawn_conn_scanner};

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
    api::views::RateWindow,
    config::{Config, XdpMode},
    control_loop::Controller,
    datapath::{AdoptedRoute, Datapath, DatapathError, LoadOptions, PinDir},
    fib_watch,
    host::{self, facts, neighbours, settings as host_settings},
    server::{bounded, control, metrics},
};

/// The datapath's load-time settings for `cfg` on this host. The host's
/// ephemeral range is read here; unreadable, every port counts as one the
/// host may use (the program then looks for a host socket each time).
pub fn load_options(cfg: &Config) -> LoadOptions {
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    LoadOptions {
        ephemeral_ports: facts::ephemeral_port_range().unwrap_or((0, u16::MAX)),
        // The configured seed; else the pinned key, or a new one when the
        // maps are new.
        flow_hash_key: cfg
            .daemon
            .hash_seed
            .map(crate::datapath::flow_hash_key_of_seed),
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
    crate::discovery::check_credentials(&cfg, &crate::discovery::CredentialEnv::from_process())?;
    let addrs = facts::interface_addresses().context("listing interface addresses")?;
    cfg.check_host(&|name| addrs.get(name).cloned())?;
    let (lo, hi) = facts::ephemeral_port_range().context("reading ip_local_port_range")?;
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
/// interface settings it sets, a BPF filesystem it mounts, what a veth
/// needs from its peer, the managed neighbour entries it adds and each
/// backend whose next hop cannot have one. `Err` names a prerequisite it
/// cannot arrange.
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
        lines.extend(veth_note(iface));
    }
    if cfg.has_ipv6_service() {
        let changes = host_settings::needed_ipv6(&cfg.daemon.interfaces)
            .context("reading the IPv6 forwarding settings")?;
        lines.extend(
            changes
                .iter()
                .map(|c| format!("the daemon sets {}", c.describe())),
        );
    }
    lines.extend(nat6_notes(cfg));
    lines.extend(neighbours::plan(&neighbours::targets(cfg)));
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

/// What each IPv6 NAT service needs beyond what the daemon arranges: its
/// backends answer to its SNAT addresses, so those must stay on the
/// interfaces and be routed to this host from the backends (the IPv6
/// forwarding settings and neighbour entries are in the lines around).
fn nat6_notes(cfg: &Config) -> Vec<String> {
    cfg.services
        .iter()
        .filter(|s| s.vip.is_ipv6() && !s.forwarding.is_dsr())
        .map(|s| {
            let snat: Vec<String> = s.snat.iter().map(|a| a.to_string()).collect();
            format!(
                "service {}: IPv6 NAT, placed by Maglev; its backends answer to {} {}, which \
                 must stay on {} and be routed to this host from them",
                s.name,
                if snat.len() == 1 {
                    "SNAT address"
                } else {
                    "SNAT addresses"
                },
                snat.join(", "),
                cfg.daemon.interfaces.join(" or ")
            )
        })
        .collect()
}

/// What a veth interface needs from its peer, if `iface` is one; an
/// interface whose kind cannot be read gets no line (attaching reports it).
fn veth_note(iface: &str) -> Option<String> {
    let kind = host::link_kind::interface_kind(iface).ok()?;
    host::link_kind::veth_note(iface, kind.as_deref())
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
    if let Some(note) = veth_note(iface) {
        info!("{note}");
    }
    match host_settings::needed(iface) {
        Ok(changes) => apply_settings(iface, record, &changes),
        Err(e) => warn!("{iface}: cannot read the settings NAT mode needs: {e}"),
    }
}

/// Sets what IPv6 services need (see `host_settings::needed_ipv6`), as
/// `arrange_interface` does for an interface.
fn arrange_ipv6(ifaces: &[String], record: &Path) {
    match host_settings::needed_ipv6(ifaces) {
        Ok(changes) => apply_settings("ipv6", record, &changes),
        Err(e) => warn!("cannot read the IPv6 forwarding settings IPv6 services need: {e}"),
    }
}

fn apply_settings(what: &str, record: &Path, changes: &[host_settings::Change]) {
    match host_settings::apply(record, changes) {
        Ok(()) => {
            for c in changes {
                info!("{what}: set {} (restored by --cleanup)", c.describe());
            }
        }
        Err(e) => {
            for c in changes {
                warn!(
                    "{what}: could not set {}: {e:#}; set it by hand",
                    c.describe()
                );
            }
        }
    }
}

/// Gives every backend's next hop a managed neighbour entry now, and
/// starts the helper that does it again after capabilities are dropped
/// (see `neighbour_helper`). Nothing here stops the daemon: a next hop
/// without one is resolved by the stack on first use, as before.
fn keep_next_hops_resolved(cfg: &Config) -> Option<neighbour_helper::Helper> {
    let record = neighbours::record_path(&cfg.daemon.control_socket);
    let problems = match neighbours::sync(&neighbours::targets(cfg), &record) {
        Ok(report) => {
            neighbour_helper::log_report(&report, &[]);
            report.problems
        }
        Err(e) => {
            warn!("managed neighbour entries: {e}");
            Vec::new()
        }
    };
    match neighbour_helper::Helper::spawn(record, problems) {
        Ok(Some(h)) => Some(h),
        Ok(None) => {
            warn!(
                "no CAP_NET_ADMIN: the backends' next hops get no managed neighbour entries \
                 after a reload or a link change"
            );
            None
        }
        Err(e) => {
            warn!(
                "starting the neighbour helper: {e}; the backends' next hops get no managed \
                 neighbour entries after a reload or a link change"
            );
            None
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
    // A restart serves discovered services on what the adopted datapath
    // served (and keeps their overrides) until their watchers list afresh.
    let saved_lists = discovered_file::path_for(&cfg.daemon.control_socket);
    let cfg = if adopted {
        let (cfg, seeded) = discovered_file::seed(cfg, &discovered_file::load(&saved_lists)?);
        if !seeded.is_empty() {
            info!(
                "discovered services {seeded:?} start on the backends saved in {} until their                  first list",
                saved_lists.display()
            );
        }
        cfg
    } else {
        cfg
    };
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
    let saved_pools = overrides_file::pools_path_for(&cfg.daemon.control_socket);
    let dropped = ctl.restore_pool_shares(&cfg, overrides_file::load_pool_shares(&saved_pools)?);
    if !ctl.pool_shares().is_empty() {
        info!(
            "kept pool shares from {}: {:?}",
            saved_pools.display(),
            ctl.pool_shares()
        );
    }
    if !dropped.is_empty() {
        warn!("saved pool shares of services whose pools changed dropped: {dropped:?}");
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
    if cfg.has_ipv6_service() {
        arrange_ipv6(&cfg.daemon.interfaces, &host_record);
    }
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

    let neighbour_helper = keep_next_hops_resolved(&cfg);
    // Before the capabilities go: the speaker is a process of its own, and
    // it must die with this one (see `bgp`).
    let speaker = match &cfg.bgp {
        Some(b) => {
            let sp = crate::bgp::Speaker::start(b, &cfg.daemon.control_socket)
                .context("starting the BGP speaker")?;
            info!(
                "bgp: gobgpd started (AS {}, router id {}, {} peers)",
                b.local_as,
                b.router_id,
                b.peers.len()
            );
            Some(sp)
        }
        None => None,
    };

    let kept =
        privileges::drop_to_minimum(|| dp.probe_map_access()).context("dropping capabilities")?;
    info!("capabilities dropped; kept: {kept}");

    // The watcher starts after the drop, so its thread holds nothing; the
    // bump after it covers any route change made before it was listening.
    let fib_events = fib_watch::spawn().context("watching routes and neighbours")?;
    follow_route_shape(&mut dp, true).context("invalidating cached next hops")?;

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
        HostWatch {
            fib_events,
            neighbour_helper,
            speaker,
        },
    ))
}

/// Reads whether the host routes by more than the destination and tells
/// the datapath (see `FIB_GEN_PER_FLOW`), which invalidates every cached
/// next hop. Says so when the mode changes, or at `start`. Tables that
/// cannot be read are taken to route per flow: always correct, only slower.
fn follow_route_shape(dp: &mut Datapath, start: bool) -> Result<(), DatapathError> {
    let reason = crate::host::route_shape::per_flow_reason()
        .unwrap_or_else(|e| Some(format!("the routing tables could not be read ({e})")));
    let per_flow = reason.is_some();
    if start || per_flow != dp.per_flow_next_hops() {
        match &reason {
            Some(why) => info!("next hops looked up per flow: {why}"),
            None => info!("next hops shared per backend (no policy rules, no multipath routes)"),
        }
    }
    dp.set_per_flow_next_hops(per_flow)
}

/// What runs beside the control loop after start: the rtnetlink watch,
/// the helper that keeps next hops resolved, and the BGP speaker.
struct HostWatch {
    fib_events: fib_watch::FibEvents,
    neighbour_helper: Option<neighbour_helper::Helper>,
    speaker: Option<crate::bgp::Speaker>,
}

async fn serve(
    config_path: &Path,
    cfg: Config,
    dp: Datapath,
    ctl: Controller,
    listener: std::os::unix::net::UnixListener,
    mut logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    host: HostWatch,
) -> Result<()> {
    let HostWatch {
        mut fib_events,
        neighbour_helper,
        speaker,
    } = host;
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
    let (discovered_tx, mut discovered) = tokio::sync::mpsc::channel(16);
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
        neighbours: neighbour_helper,
        bgp: speaker,
        discovery: crate::discovery::Watchers::new(discovered_tx),
    }));
    // Before the control socket answers: whoever sees it answer may stop
    // the daemon, and a SIGTERM without a handler kills it unclean.
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
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
    // The datapath is attached and the services applied: announce now.
    // A discovered service has no backend until its first list, so it is
    // announced only once one serves.
    state.lock().await.sync_bgp();
    {
        let mut st = state.lock().await;
        let cfg = st.config.clone();
        st.discovery.reconcile(&cfg);
        // Lists seeded from the saved file count as applied: a reload
        // before the first list keeps them.
        for svc in cfg.services.iter().filter(|s| s.discovery.is_some()) {
            if !svc.backends.is_empty() {
                st.discovery.record(&svc.name, svc.backends.clone());
            }
        }
    }

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
            Some(()) = fib_events.changes.recv() => {
                let mut st = state.lock().await;
                let bumped = if fib_events.take_routes() {
                    follow_route_shape(&mut st.dp, false)
                } else {
                    st.dp.bump_fib_generation()
                };
                if let Err(e) = bumped {
                    warn!("invalidating cached next hops: {e}");
                }
                if fib_events.take_topology() {
                    st.keep_next_hops_resolved();
                }
            }
            Some(update) = discovered.recv() => { state.lock().await.apply_discovered(update); }
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
    // Withdraw, let the peers move new flows elsewhere, then end the
    // sessions; the datapath forwards meanwhile and after.
    if let Some(sp) = state.lock().await.bgp.take() {
        tokio::task::spawn_blocking(move || sp.shut_down())
            .await
            .context("stopping the BGP speaker")?;
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

/// `router daemon --prepare-for USER`, as root before a daemon that runs
/// as USER (the unit's `ExecStartPre=+`): hands pin_path and everything
/// pinned under it to USER (see `pinning::hand_over`). USER is a name, or
/// a uid whose group is its passwd entry's, or the same number when it has
/// none. It mounts no bpffs: under systemd even `+` commands get a mount
/// namespace of their own, where a mount would not outlive them.
pub fn prepare_for(pin_path: &Path, user: &str) -> Result<String> {
    let (uid, gid, name) = resolve_user(user)?;
    let done = crate::datapath::pinning::hand_over(&PinDir::new(pin_path), uid, gid)
        .with_context(|| format!("handing {} to {name}", pin_path.display()))?;
    Ok(format!(
        "{} {}owned by {name} (uid {uid}, gid {gid}), mode 0700{}",
        pin_path.display(),
        if done.created { "created, " } else { "" },
        match done.entries {
            0 => String::new(),
            n => format!(", with the {n} pinned objects and directories under it"),
        }
    ))
}

/// `(uid, gid, name for messages)` of a user name or numeric uid.
fn resolve_user(user: &str) -> Result<(u32, u32, String)> {
    use nix::unistd::{Uid, User};
    if let Ok(uid) = user.parse::<u32>() {
        let entry =
            User::from_uid(Uid::from_raw(uid)).with_context(|| format!("looking up uid {uid}"))?;
        return Ok(match entry {
            Some(u) => (uid, u.gid.as_raw(), u.name),
            None => (uid, uid, format!("uid {uid}")),
        });
    }
    match User::from_name(user).with_context(|| format!("looking up user {user:?}"))? {
        Some(u) => Ok((u.uid.as_raw(), u.gid.as_raw(), u.name)),
        None => anyhow::bail!(
            "user {user:?} does not exist: create it first (systemd-sysusers \
             /usr/lib/sysusers.d/router.conf, from packaging/sysusers.d/router.conf)"
        ),
    }
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
    // Read first: a record that cannot be trusted or used (see
    // `host_settings::load_record`) stops the cleanup with nothing removed.
    let record_at = host_settings::record_path(socket);
    let record = host_settings::load_record(&record_at)
        .context("reading the interface settings the daemon changed")?;
    let netns = match record {
        Some(_) => Some(
            host_settings::current_netns()
                .context("reading this process's network namespace (/proc/self/ns/net)")?,
        ),
        None => None,
    };
    let neighbour_record = neighbours::record_path(socket);
    neighbours::load_record(&neighbour_record)
        .context("reading the neighbour entries the daemon added")?;
    let pins = PinDir::new(pin_path);
    let removed = crate::datapath::pinning::remove_all(&pins)
        .with_context(|| format!("removing the datapath pinned under {}", pin_path.display()))?;
    // Overrides belong to the datapath they steered, and the interface
    // settings were made for it: both go once it has gone, not before.
    for saved in [
        overrides_file::path_for(socket),
        overrides_file::pools_path_for(socket),
        discovered_file::path_for(socket),
    ] {
        if let Err(e) = std::fs::remove_file(&saved)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!("removing {}: {e}", saved.display());
        }
    }
    let mut restored = match (&record, &netns) {
        (Some(r), Some(here)) => host_settings::restore_record(&record_at, r, here)
            .context("restoring interface settings")?
            .join("\n"),
        _ => String::new(),
    };
    let neighbours_removed = neighbours::restore(&neighbour_record)
        .context("removing the neighbour entries the daemon added")?;
    for line in neighbours_removed {
        if !restored.is_empty() {
            restored.push('\n');
        }
        restored.push_str(&line);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_check_names_what_an_ipv6_nat_service_needs() {
        let text = "[daemon]\ninterface = \"eth0\"\n\n[[service]]\nname = \"v6\"\n\
                    vip = \"[2001:db8::1]:80\"\nsnat = [\"2001:db8::a\", \"2001:db8::b\"]\n\n\
                    [[service.backend]]\nname = \"a\"\naddress = \"[2001:db8::11]:80\"\n\n\
                    [[service]]\nname = \"v4\"\nvip = \"198.18.0.1:80\"\nsnat = \"198.18.0.2\"\n\n\
                    [[service.backend]]\nname = \"a\"\naddress = \"198.18.0.11:80\"\n";
        let cfg = Config::parse(text, "t.toml").unwrap();
        assert_eq!(
            nat6_notes(&cfg),
            [
                "service v6: IPv6 NAT, placed by Maglev; its backends answer to SNAT addresses \
              2001:db8::a, 2001:db8::b, which must stay on eth0 and be routed to this host from \
              them"
            ]
        );
    }
}
