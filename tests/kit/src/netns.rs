//! Network-namespace harness for end-to-end tests and the demo.
//!
//! Everything lives in namespaces this module creates: interfaces are created
//! inside them (`ip -n NS link add ... peer ... netns OTHER`), so the host's
//! namespace never gains or loses an interface and nothing attaches to a host
//! interface. [`Topology`] is an RAII guard: dropping it (also while a test
//! panics) kills what still runs in its namespaces and deletes them, which
//! destroys their veths and bridge.
//!
//! Addresses come from 198.18.0.0/15 (RFC 2544 benchmarking space), so they
//! cannot collide with real networks.

use std::{
    ffi::OsStr,
    fs::File,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

/// Prefix of every namespace this module creates: `rt<pid>x<n>-<role>`.
const NS_PREFIX: &str = "rt";

/// Interface names inside the namespaces. Interface names only need to be
/// unique per namespace, and each namespace is unique per run, so fixed
/// short names (≤ 15 bytes) are safe.
pub const BRIDGE_IF: &str = "br0";
/// The LB's interface (in [`Topology::lb_ns`]).
pub const LB_IF: &str = "lb0";
/// The LB's veth peer, enslaved to the bridge in [`Topology::switch_ns`].
pub const LB_PEER_IF: &str = "p-lb";
/// The client's interface (in [`Topology::client_ns`]).
pub const CLIENT_IF: &str = "eth0";
/// The client's veth peer in the switch namespace.
pub const CLIENT_PEER_IF: &str = "p-client";
/// Each backend's interface (in [`Topology::backend_ns`]).
pub const BACKEND_IF: &str = "eth0";

/// Prefix length of the shared segment 198.18.0.0/24.
pub const PREFIX_LEN: u8 = 24;
/// The LB's address on the segment.
pub const LB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// A second LB address that only translated flows use as their source: the
/// daemon's own polls and probes leave from [`LB_ADDR`], so they can never
/// take a port that a translated flow's SNAT needs (see docs/operations.md).
/// Added by [`Topology::add_snat_addr`].
pub const SNAT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// The client's address on the segment.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Backend `i` has address `198.18.0.(BACKEND_BASE + i)`.
const BACKEND_BASE: u8 = 11;
/// VIPs live in 198.18.100.0/24; the client routes it via the LB.
pub const VIP_NET: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 0);
/// Prefix length of [`VIP_NET`].
pub const VIP_PREFIX_LEN: u8 = 24;

/// How long [`spawn_http_backend`] waits for the backend to accept.
const BACKEND_START_TIMEOUT: Duration = Duration::from_secs(10);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Address of backend `i` (0-based): 198.18.0.11, .12, ...
///
/// # Panics
/// If `i` would leave the /24 (more than 244 backends).
/// Where IPv6 VIPs live: the client routes it through the LB (a network
/// of the IPv6 benchmarking range, 2001:2::/48, as `VIP_NET` is of IPv4's).
pub const VIP6_NET: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0x2001, 2, 0x100, 0, 0, 0, 0, 0);

/// The IPv6 twin of a topology address: 198.18.0.N is 2001:2::N (N in
/// hexadecimal digits that read as the decimal, so 198.18.0.11 is
/// 2001:2::11).
pub fn ipv6_addr(v4: Ipv4Addr) -> std::net::Ipv6Addr {
    let n = v4.octets()[3];
    let digits = u16::from(n / 100) << 8 | u16::from(n / 10 % 10) << 4 | u16::from(n % 10);
    std::net::Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, digits)
}

pub fn backend_addr(i: usize) -> Ipv4Addr {
    let host = u8::try_from(i)
        .ok()
        .and_then(|i| i.checked_add(BACKEND_BASE))
        .filter(|&h| h < 255)
        .expect("backend index out of the 198.18.0.0/24 range");
    Ipv4Addr::new(198, 18, 0, host)
}

/// A VIP in [`VIP_NET`]: `vip(10)` is 198.18.100.10.
pub fn vip(host: u8) -> Ipv4Addr {
    let [a, b, c, _] = VIP_NET.octets();
    Ipv4Addr::new(a, b, c, host)
}

/// One LB on a stick: client, LB and backends share one L2 segment (a bridge
/// in its own namespace). The client reaches VIPs through the LB's address.
///
/// ```text
///  client ns            switch ns (br0)              lb ns
///  eth0 198.18.0.2 ---- p-client   p-lb ------------ lb0 198.18.0.1
///                       p-b0 p-b1 ...
///  backend ns i: eth0 198.18.0.(11+i)
/// ```
#[derive(Debug)]
pub struct Topology {
    /// Every namespace created so far, deleted on drop (also when building
    /// fails halfway).
    namespaces: Vec<String>,
    switch: String,
    client: String,
    lb: String,
    backends: Vec<String>,
    /// XDP_PASS on the LB's peer, so native XDP_TX from the LB is received.
    peer_xdp: Option<crate::veth_xdp::XdpPassGuard>,
}

impl Topology {
    /// Builds the one-arm topology with `n_backends` backends.
    pub fn one_arm(n_backends: usize) -> Result<Topology> {
        Self::one_arm_with(n_backends, true)
    }

    /// [`Topology::one_arm`] with an LB namespace as a host that nobody
    /// prepared leaves it: forwarding off, `accept_local` off, strict
    /// reverse-path filtering (a distribution's default) on every level.
    /// What the datapath needs there, the daemon must arrange.
    pub fn one_arm_unprepared(n_backends: usize) -> Result<Topology> {
        Self::one_arm_with(n_backends, false)
    }

    fn one_arm_with(n_backends: usize, prepared: bool) -> Result<Topology> {
        ensure!(
            n_backends <= usize::from(255 - BACKEND_BASE),
            "at most {} backends fit in 198.18.0.0/24",
            255 - BACKEND_BASE
        );
        remove_stale_namespaces();
        let id = format!(
            "{NS_PREFIX}{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut topo = Topology {
            namespaces: Vec::new(),
            switch: format!("{id}-sw"),
            client: format!("{id}-cl"),
            lb: format!("{id}-lb"),
            backends: (0..n_backends).map(|i| format!("{id}-b{i}")).collect(),
            peer_xdp: None,
        };
        // On error `topo` drops here and removes whatever was created.
        topo.build(prepared)
            .context("building the one-arm topology")?;
        Ok(topo)
    }

    fn build(&mut self, prepared: bool) -> Result<()> {
        let switch = self.switch.clone();
        self.add_namespace(&switch)?;
        ip(&switch, &["link", "add", BRIDGE_IF, "type", "bridge"])?;
        ip(&switch, &["link", "set", BRIDGE_IF, "up"])?;
        // A switch forwards frames; it does not judge them. With
        // br_netfilter in the kernel, a bridge in a fresh namespace checks
        // IPv4 headers (checksum, lengths) and silently drops bad ones, so
        // malformed test traffic would never reach the LB. Kernels without
        // br_netfilter have no such key and nothing to turn off.
        if let Err(err) = sysctl(&switch, "bridge/bridge-nf-call-iptables", "0") {
            let absent = err
                .root_cause()
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound);
            if !absent {
                return Err(err.context("letting the test switch forward malformed frames"));
            }
        }

        let client = self.client.clone();
        self.add_namespace(&client)?;
        self.attach_to_bridge(&client, CLIENT_PEER_IF, CLIENT_IF, CLIENT_ADDR)?;
        let vip_net = format!("{VIP_NET}/{VIP_PREFIX_LEN}");
        ip(
            &client,
            &["route", "add", &vip_net, "via", &LB_ADDR.to_string()],
        )?;

        let lb = self.lb.clone();
        self.add_namespace(&lb)?;
        // Prepared: forwarding and permissive source checks: the LB may
        // route traffic back out the interface it came in on, and sees
        // packets sourced from addresses (VIPs) it owns. Unprepared: the
        // opposite of each, as a host left alone has them.
        let (forward, rp_filter, accept_local) = if prepared {
            ("1", "0", "1")
        } else {
            ("0", "1", "0")
        };
        for (key, value) in [
            ("ipv4/ip_forward", forward),
            ("ipv4/conf/all/rp_filter", rp_filter),
            ("ipv4/conf/default/rp_filter", rp_filter),
            ("ipv4/conf/all/accept_local", accept_local),
            ("ipv4/conf/default/accept_local", accept_local),
        ] {
            sysctl(&lb, key, value)?;
        }
        self.attach_to_bridge(&lb, LB_PEER_IF, LB_IF, LB_ADDR)?;
        sysctl(&lb, &format!("ipv4/conf/{LB_IF}/rp_filter"), rp_filter)?;
        sysctl(
            &lb,
            &format!("ipv4/conf/{LB_IF}/accept_local"),
            accept_local,
        )?;
        sysctl(&lb, &format!("ipv4/conf/{LB_IF}/forwarding"), forward)?;

        // Native XDP_TX / XDP_REDIRECT onto a veth hands frames straight to
        // the peer's NAPI instance; a veth only has one when an XDP program is
        // attached to it or GRO is on. Without either, those frames are
        // silently dropped. Turning GRO on for the LB's peer makes the switch
        // accept XDP_TX from lb0; a test may additionally attach an XDP_PASS
        // program to the peer. This uses the ethtool ioctl directly, which is
        // what `ethtool -K p-lb gro on` does, so ethtool need not be installed.
        set_gro(&switch, LB_PEER_IF, true)
            .with_context(|| format!("enabling GRO on {LB_PEER_IF} in {switch}"))?;
        // GRO alone was not enough for native XDP_TX on this kernel's veth:
        // the peer also runs XDP_PASS, which always gives it a NAPI instance.
        self.peer_xdp = Some(crate::veth_xdp::XdpPassGuard::attach(&switch, LB_PEER_IF)?);

        for i in 0..self.backends.len() {
            let backend = self.backends[i].clone();
            self.add_namespace(&backend)?;
            self.attach_to_bridge(&backend, &format!("p-b{i}"), BACKEND_IF, backend_addr(i))?;
        }
        Ok(())
    }

    /// Creates a namespace, records it for cleanup, brings up `lo` and turns
    /// IPv6 off so router solicitations, DAD and MLD do not add noise to what
    /// the XDP programs and tests see.
    fn add_namespace(&mut self, ns: &str) -> Result<()> {
        run_ip(&["netns", "add", ns])?;
        self.namespaces.push(ns.to_owned());
        ip(ns, &["link", "set", "lo", "up"])?;
        for key in [
            "ipv6/conf/all/disable_ipv6",
            "ipv6/conf/default/disable_ipv6",
        ] {
            // Kernels without IPv6 have no such keys; nothing to silence then.
            if let Err(err) = sysctl(ns, key, "1") {
                eprintln!("netns: could not disable IPv6 in {ns}: {err:#}");
            }
        }
        Ok(())
    }

    /// Creates a veth pair in the switch namespace with `peer` enslaved to
    /// the bridge and `inner` moved into `ns` with `addr`/24.
    fn attach_to_bridge(&self, ns: &str, peer: &str, inner: &str, addr: Ipv4Addr) -> Result<()> {
        let sw = &self.switch;
        ip(
            sw,
            &[
                "link", "add", peer, "type", "veth", "peer", "name", inner, "netns", ns,
            ],
        )?;
        ip(sw, &["link", "set", peer, "master", BRIDGE_IF])?;
        ip(sw, &["link", "set", peer, "up"])?;
        let cidr = format!("{addr}/{PREFIX_LEN}");
        ip(ns, &["addr", "add", &cidr, "dev", inner])?;
        ip(ns, &["link", "set", inner, "up"])?;
        // Full software checksums from every host: see `set_tx_checksum`.
        set_tx_checksum(ns, inner, false)
            .with_context(|| format!("turning off TX checksum offload on {inner} in {ns}"))?;
        Ok(())
    }

    /// IPv6 beside IPv4, for IPv6 services: the client, the LB and the
    /// backends get `ipv6_addr`'s addresses on their interfaces (without
    /// duplicate address detection, so they are usable at once), the
    /// client a route to `VIP6_NET` through the LB, and the LB forwarding.
    pub fn enable_ipv6(&self) -> Result<()> {
        let mut hosts = vec![
            (self.client.clone(), CLIENT_IF, CLIENT_ADDR),
            (self.lb.clone(), LB_IF, LB_ADDR),
        ];
        for (i, b) in self.backends.iter().enumerate() {
            hosts.push((b.clone(), BACKEND_IF, backend_addr(i)));
        }
        for (ns, dev, v4) in &hosts {
            for key in [
                "ipv6/conf/all/disable_ipv6",
                "ipv6/conf/default/disable_ipv6",
                &format!("ipv6/conf/{dev}/disable_ipv6"),
                "ipv6/conf/lo/disable_ipv6",
            ] {
                sysctl(ns, key, "0")?;
            }
            let cidr = format!("{}/64", ipv6_addr(*v4));
            ip(ns, &["-6", "addr", "add", &cidr, "dev", dev, "nodad"])?;
        }
        sysctl(&self.lb, "ipv6/conf/all/forwarding", "1")?;
        let net = format!("{VIP6_NET}/64");
        let via = ipv6_addr(LB_ADDR).to_string();
        ip(&self.client, &["-6", "route", "add", &net, "via", &via])?;
        Ok(())
    }

    /// The namespace holding the bridge.
    pub fn switch_ns(&self) -> &str {
        &self.switch
    }

    /// The client namespace (198.18.0.2, route to VIPs via the LB).
    pub fn client_ns(&self) -> &str {
        &self.client
    }

    /// The LB namespace (198.18.0.1 on [`LB_IF`]).
    pub fn lb_ns(&self) -> &str {
        &self.lb
    }

    /// Backend `i`'s namespace.
    ///
    /// # Panics
    /// If `i >= self.backend_count()`, like slice indexing.
    pub fn backend_ns(&self, i: usize) -> &str {
        &self.backends[i]
    }

    /// The fixture HTTP backend (`tests/fixtures/backend.py`) in every
    /// backend namespace, named `b0`, `b1`, ... and listening on `port` of
    /// its backend address; each answers with its name.
    pub fn spawn_fixture_backends(&self, port: u16) -> Result<Vec<ChildGuard>> {
        (0..self.backend_count())
            .map(|i| {
                spawn_http_backend(self.backend_ns(i), &format!("b{i}"), backend_addr(i), port)
            })
            .collect()
    }

    /// The fixture backends, once each accepts connections from the LB's
    /// namespace. Reaching them resolves their neighbours there too, as a
    /// health check would: a test of an unprepared host spawns them with
    /// [`Self::spawn_fixture_backends`] instead.
    pub fn spawn_ready_fixture_backends(&self, port: u16) -> Result<Vec<ChildGuard>> {
        let guards = self.spawn_fixture_backends(port)?;
        for i in 0..self.backend_count() {
            wait_for_tcp(
                self.lb_ns(),
                std::net::SocketAddr::new(backend_addr(i).into(), port),
                std::time::Duration::from_secs(5),
            )?;
        }
        Ok(guards)
    }

    /// Number of backends.
    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// The LB's interface name in [`Self::lb_ns`].
    pub fn lb_if(&self) -> &str {
        LB_IF
    }

    /// Adds [`SNAT_ADDR`] to the LB's interface.
    pub fn add_snat_addr(&self) -> Result<()> {
        let addr = format!("{SNAT_ADDR}/{PREFIX_LEN}");
        exec(
            self.lb_ns(),
            &["ip", "addr", "add", &addr, "dev", self.lb_if()],
        )
        .context("adding the SNAT address to the LB")?;
        Ok(())
    }

    /// Puts `addrs` on the client's interface (as /32s, in one `ip -batch`)
    /// and routes `net` back to the client from the LB, so clients can
    /// connect from many source addresses: the XDP program forwards replies
    /// by the LB's FIB, which needs the route.
    pub fn add_client_addresses(&self, addrs: &[Ipv4Addr], net: &str) -> Result<()> {
        let batch: String = addrs
            .iter()
            .map(|a| format!("addr add {a}/32 dev {}\n", self.client_if()))
            .collect();
        let file = std::env::temp_dir().join(format!(
            "client-addrs-{}-{}",
            std::process::id(),
            self.client_ns()
        ));
        std::fs::write(&file, batch).context("writing the address batch")?;
        let path = file.display().to_string();
        let added = exec(self.client_ns(), &["ip", "-batch", &path]);
        let _ = std::fs::remove_file(&file);
        added.context("adding the client addresses")?;
        let via = self.client_addr().to_string();
        exec(self.lb_ns(), &["ip", "route", "add", net, "via", &via])
            .with_context(|| format!("routing {net} to the client"))?;
        Ok(())
    }

    /// The LB's veth peer in [`Self::switch_ns`] (GRO on; attach XDP_PASS
    /// here if a test wants it).
    pub fn lb_peer(&self) -> &str {
        LB_PEER_IF
    }

    /// The client's interface name in [`Self::client_ns`].
    pub fn client_if(&self) -> &str {
        CLIENT_IF
    }

    /// Backend interface name, the same in every backend namespace.
    pub fn backend_if(&self) -> &str {
        BACKEND_IF
    }

    /// The LB's address.
    pub fn lb_addr(&self) -> Ipv4Addr {
        LB_ADDR
    }

    /// The client's address.
    pub fn client_addr(&self) -> Ipv4Addr {
        CLIENT_ADDR
    }

    /// Backend `i`'s address (see [`backend_addr`]).
    pub fn backend_addr(&self, i: usize) -> Ipv4Addr {
        backend_addr(i)
    }

    /// Every namespace of this topology, in creation order.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        drop(self.peer_xdp.take());
        // Reverse order: backends, LB and client before the switch.
        for ns in self.namespaces.iter().rev() {
            if let Err(err) = delete_namespace(ns) {
                eprintln!("netns: cleaning up {ns}: {err:#}");
            }
        }
    }
}

/// Kills every process still in `ns` (our backends, a daemon) and deletes it.
/// A namespace outlives its name while processes or sockets hold it, and
/// with it its veths, so the processes go first.
fn delete_namespace(ns: &str) -> Result<()> {
    let own_pid = std::process::id();
    if let Ok(pids) = run_ip(&["netns", "pids", ns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            if u32::try_from(pid).is_ok_and(|p| p == own_pid) {
                continue;
            }
            // SAFETY: kill(2) has no memory-safety preconditions; the pid was
            // just listed as living in a namespace this harness created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    run_ip(&["netns", "del", ns]).map(drop)
}

/// Deletes namespaces left by an earlier run that was killed before its
/// guards could drop (e.g. SIGKILL or an aborted CI job). Only names of our
/// exact pattern whose creating process no longer exists are touched.
fn remove_stale_namespaces() {
    let Ok(list) = run_ip(&["netns", "list"]) else {
        return;
    };
    for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = ns
            .strip_prefix(NS_PREFIX)
            .and_then(|rest| rest.split_once('x'))
            .and_then(|(pid, rest)| rest.contains('-').then_some(pid))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let creator_alive =
            pid == std::process::id() || PathBuf::from(format!("/proc/{pid}")).exists();
        if creator_alive {
            continue;
        }
        if let Err(err) = delete_namespace(ns) {
            eprintln!("netns: removing stale {ns}: {err:#}");
        }
    }
}

/// Runs `ip ARGS` in the current (host) namespace; used only for `ip netns`
/// management, never to change host interfaces.
fn run_ip(args: &[&str]) -> Result<String> {
    output(Command::new("ip").args(args))
}

/// Runs `ip -n NS ARGS`.
fn ip(ns: &str, args: &[&str]) -> Result<String> {
    output(Command::new("ip").arg("-n").arg(ns).args(args))
}

/// Writes `/proc/sys/net/<key>` inside `ns`. /proc/sys/net resolves against
/// the calling thread's namespace, so a thread inside `ns` sees its values.
fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/net/{key}");
    in_netns(ns, || std::fs::write(&path, value))?
        .with_context(|| format!("setting {path}={value} in {ns}"))
}

fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to start {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{shown} printed non-UTF-8 output"))
}

/// Runs `ip netns exec NS ARGS...` and returns its stdout; the error includes
/// the exit status and stderr.
pub fn exec<S: AsRef<OsStr>>(ns: &str, args: &[S]) -> Result<String> {
    output(Command::new("ip").args(["netns", "exec", ns]).args(args))
}

/// Starts `ip netns exec NS ARGS...` (stdin null, stdout/stderr inherited).
/// `ip netns exec` execs the program in place, so the guard's pid is the
/// program's own; the guard kills it on drop.
pub fn spawn<S: AsRef<OsStr>>(ns: &str, args: &[S]) -> Result<ChildGuard> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null());
    spawn_command(cmd).with_context(|| format!("in namespace {ns}"))
}

/// Spawns a fully configured command (stdio, env, cwd) and guards it. Wrap
/// the program in `ip netns exec NS` yourself to place it in a namespace.
pub fn spawn_command(mut cmd: Command) -> Result<ChildGuard> {
    let name = format!("{cmd:?}");
    let child = cmd
        .spawn()
        .with_context(|| format!("failed to start {name}"))?;
    Ok(ChildGuard { child, name })
}

/// A child process that is killed (SIGKILL) and reaped on drop. Derefs to
/// [`Child`] for pid, stdio and `try_wait`.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    name: String,
}

impl ChildGuard {
    /// Asks the process to exit with SIGTERM (so a daemon can detach its
    /// programs), waits up to `timeout`, then SIGKILLs it.
    pub fn stop(mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let pid = i32::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: kill(2) has no memory-safety preconditions; the child is
        // ours and not yet reaped, so the pid cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.child
            .kill()
            .with_context(|| format!("killing {}", self.name))?;
        self.child
            .wait()
            .with_context(|| format!("reaping {}", self.name))
    }
}

impl std::ops::Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl std::ops::DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Errors only mean it already exited.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Runs `f` on a fresh thread that has joined network namespace `ns`
/// (`setns(CLONE_NEWNET)` on `/run/netns/<ns>`) and returns its result.
/// Sockets created inside `f` belong to `ns` and keep working after it
/// returns. The thread ends with `f`, so no other code runs in `ns`. A panic
/// in `f` is resumed on the caller's thread.
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    thread::scope(|scope| {
        let handle = scope.spawn(|| -> Result<T> {
            // SAFETY: setns(2) on a valid fd we own; it only changes this
            // thread's network namespace, which ends with the thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("setns into {path}"));
            }
            Ok(f())
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Waits until a TCP connection to `addr` from inside `ns` succeeds.
pub fn wait_for_tcp(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<()> {
    in_netns(ns, || {
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = Duration::from_millis(200).min(timeout);
            match TcpStream::connect_timeout(&addr, attempt) {
                Ok(_) => return Ok(()),
                Err(err) if Instant::now() >= deadline => {
                    return Err(err)
                        .with_context(|| format!("{addr} not reachable within {timeout:?}"));
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    })?
    .with_context(|| format!("waiting for {addr} in {ns}"))
}

/// Path of the fixture HTTP backend (tests/fixtures/backend.py).
pub fn backend_script() -> PathBuf {
    crate::fixtures::fixture("backend.py")
}

/// Starts the fixture HTTP backend in `ns`, answering with `name`, and waits
/// until it accepts connections.
pub fn spawn_http_backend(
    ns: &str,
    name: &str,
    bind: impl Into<std::net::IpAddr>,
    port: u16,
) -> Result<ChildGuard> {
    let bind: std::net::IpAddr = bind.into();
    let script = backend_script();
    let bind_arg = bind.to_string();
    let port_arg = port.to_string();
    let guard = spawn(
        ns,
        &[
            OsStr::new("python3"),
            script.as_os_str(),
            OsStr::new("--name"),
            OsStr::new(name),
            OsStr::new("--bind"),
            OsStr::new(&bind_arg),
            OsStr::new("--port"),
            OsStr::new(&port_arg),
        ],
    )?;
    // Probe an address that reaches the listener even for 0.0.0.0 binds.
    let probe = match bind {
        std::net::IpAddr::V4(a) if a.is_unspecified() => Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(a) if a.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        a => a,
    };
    wait_for_tcp(ns, SocketAddr::from((probe, port)), BACKEND_START_TIMEOUT)
        .with_context(|| format!("backend {name} did not start"))?;
    Ok(guard)
}

/// A parsed HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

/// A hand-written HTTP/1.0 GET over a fresh TCP connection, in the calling
/// thread's namespace (wrap it in [`in_netns`]). Reads until the server
/// closes the connection.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    // One write, so the request leaves in one segment as real clients send
    // it: `write!` would write each piece of the format string on its own,
    // and if the handshake's ACK and the first piece are lost to a server
    // answering with SYN cookies, the later piece fails the cookie check
    // (the server derives the client's ISN from the first segment it gets)
    // and the server resets the connection.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .with_context(|| format!("sending request to {addr}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading response from {addr}"))?;
    let text = String::from_utf8(raw).context("response is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed response from {addr}: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status code in {head:?}"))?;
    Ok(HttpResponse {
        status,
        body: body.to_owned(),
    })
}

/// Reads a MAC address from `ip -n NS link show IFNAME`.
pub fn mac_address(ns: &str, ifname: &str) -> Result<[u8; 6]> {
    let out = ip(ns, &["-o", "link", "show", "dev", ifname])?;
    let text = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .with_context(|| format!("no link/ether address for {ifname} in {ns}: {out}"))?;
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts
            .next()
            .with_context(|| format!("short MAC {text:?}"))?;
        *byte = u8::from_str_radix(part, 16).with_context(|| format!("bad MAC {text:?}"))?;
    }
    ensure!(parts.next().is_none(), "long MAC {text:?}");
    Ok(mac)
}

/// `struct ethtool_value` from linux/ethtool.h.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_GGRO: u32 = 0x2b;
const ETHTOOL_SGRO: u32 = 0x2c;

fn ethtool_gro(ns: &str, ifname: &str, set: Option<bool>) -> Result<bool> {
    ethtool_flag(ns, ifname, (ETHTOOL_GGRO, ETHTOOL_SGRO), set)
}

/// `ethtool -K IFNAME tx off` inside `ns`. A veth otherwise leaves TCP/UDP
/// checksums partial (offloaded); an XDP program that forwards such a frame
/// with XDP_TX drops the offload metadata with the skb, so the receiver
/// sees a wrong checksum. Real NICs deliver full checksums; test senders
/// must compute theirs in software.
pub fn set_tx_checksum(ns: &str, ifname: &str, on: bool) -> Result<()> {
    ethtool_flag(ns, ifname, (ETHTOOL_GTXCSUM, ETHTOOL_STXCSUM), Some(on)).map(drop)
}

/// Sets or reads one legacy ethtool on/off value (GRO, TX checksumming) of
/// `ifname` in `ns` with the SIOCETHTOOL ioctl.
fn ethtool_flag(
    ns: &str,
    ifname: &str,
    (get_cmd, set_cmd): (u32, u32),
    set: Option<bool>,
) -> Result<bool> {
    let name = ifname.to_owned();
    in_netns(ns, move || -> Result<bool> {
        ensure!(
            name.len() < libc::IFNAMSIZ,
            "interface name {name} too long"
        );
        // SAFETY: plain socket(2); the fd is closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket for ethtool ioctl");
        }
        let mut value = EthtoolValue {
            cmd: if set.is_some() { set_cmd } else { get_cmd },
            data: u32::from(set.unwrap_or(false)),
        };
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_data = (&raw mut value).cast();
        // SAFETY: SIOCETHTOOL reads the interface name and the
        // ethtool_value that ifru_data points to, both alive for the call.
        let rc = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL, &raw mut req) };
        let err = std::io::Error::last_os_error();
        // SAFETY: closing the fd created above, exactly once.
        unsafe { libc::close(fd) };
        if rc != 0 {
            return Err(err).with_context(|| format!("SIOCETHTOOL on {name}"));
        }
        Ok(set.unwrap_or(value.data != 0))
    })?
}

/// `ethtool -K IFNAME gro on|off` inside `ns`.
pub fn set_gro(ns: &str, ifname: &str, on: bool) -> Result<()> {
    ethtool_gro(ns, ifname, Some(on)).map(drop)
}

/// Whether GRO is on for `ifname` in `ns` (`ethtool -k`).
pub fn gro_enabled(ns: &str, ifname: &str) -> Result<bool> {
    ethtool_gro(ns, ifname, None)
}

/// `n` short HTTP GETs of `/` to `vip` from namespace `ns`, one connection
/// each, in sequence; returns how many answers each backend (the fixture
/// backend answers with its name) gave. The first failure is an error.
pub fn answers_per_backend(
    ns: &str,
    vip: SocketAddr,
    n: usize,
) -> Result<std::collections::BTreeMap<String, usize>> {
    let bodies = in_netns(ns, move || -> Result<Vec<String>> {
        (0..n)
            .map(|i| {
                http_get(vip, "/", Duration::from_secs(5))
                    .map(|r| r.body)
                    .with_context(|| format!("connection {i} of {n} through {vip}"))
            })
            .collect()
    })??;
    let mut counts = std::collections::BTreeMap::new();
    for b in bodies {
        *counts.entry(b).or_insert(0) += 1;
    }
    Ok(counts)
}

/// The fixture backends of a one-arm topology as `(name, address, weight)`:
/// `b<i>` on backend `i`'s address, port 8000.
pub fn fixture_backends(weights: &[u32]) -> Vec<(String, String, u32)> {
    weights
        .iter()
        .enumerate()
        .map(|(i, w)| (format!("b{i}"), format!("{}:8000", backend_addr(i)), *w))
        .collect()
}
