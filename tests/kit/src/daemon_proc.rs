//! Running the real `router` binary as a daemon inside a test namespace.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use router::api::StatusReply;

use crate::{
    bpffs::BpfFs,
    netns::{self, ChildGuard},
};

/// The `router` binary built next to the running test or tool
/// (`target/<profile>/router`); `cargo xtask test` builds it first.
pub fn router_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test binary")?;
    let mut dir = exe.parent().context("test binary has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("no profile directory")?;
    }
    let bin = dir.join("router");
    if !bin.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p router-userspace` (cargo xtask test does)",
            bin.display()
        );
    }
    Ok(bin)
}

/// A scratch directory removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(tag: &str) -> Result<Self> {
        let p = std::env::temp_dir().join(format!("router-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Self(p))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A one-arm config: service `llama` on `vip`, SNAT to the LB address.
pub fn one_arm_config(
    socket: &Path,
    interface: &str,
    vip: &str,
    snat: impl Into<IpAddr>,
    backends: &[(String, String, u32)],
) -> String {
    let snat = snat.into();
    let mut s = format!(
        "[daemon]\ninterface = \"{interface}\"\ncontrol_socket = \"{}\"\ntable_size = 65537\n\n\
         [[service]]\nname = \"llama\"\nvip = \"{vip}\"\nprotocol = \"tcp\"\nsnat = \"{snat}\"\n",
        socket.display()
    );
    for (name, addr, weight) in backends {
        s.push_str(&format!(
            "\n[[service.backend]]\nname = \"{name}\"\naddress = \"{addr}\"\nweight = {weight}\n"
        ));
    }
    s
}

/// A daemon with pins of its own. On `stop` or drop it is stopped (or
/// killed), then `router daemon --cleanup` detaches the datapath it leaves
/// behind and its bpffs is unmounted.
#[derive(Debug)]
pub struct Daemon {
    child: Option<ChildGuard>,
    pid: u32,
    socket: PathBuf,
    pins: Option<BpfFs>,
}

impl Daemon {
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// The daemon's status ([`status`] on its control socket).
    pub fn status(&self) -> Result<StatusReply> {
        status(&self.socket)
    }

    /// Sets the running daemon's soft limit on open files (prlimit(2));
    /// returns the one it had. A limit at or below the descriptors it holds
    /// keeps those open and fails every new one with EMFILE.
    pub fn set_nofile(&self, soft: u64) -> Result<u64> {
        let pid = libc::pid_t::try_from(self.pid).context("pid out of range")?;
        nofile(pid, Some(soft)).map(|(old, _)| old)
    }

    /// The daemon's exit status if it has exited (it never should on its own).
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => bail!("daemon already stopped"),
        }
    }

    /// SIGTERM, wait up to `timeout`, SIGKILL; then the datapath that
    /// SIGTERM leaves running is removed.
    pub fn stop(mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let status = match self.child.take() {
            Some(child) => child.stop(timeout),
            None => bail!("daemon already stopped"),
        };
        self.remove_pins();
        status
    }

    fn remove_pins(&mut self) {
        if let Some(pins) = self.pins.take() {
            if let Err(e) = cleanup_pins(&self.socket, &pins.pin_path()) {
                eprintln!("daemon: {e:#}");
            }
            drop(pins);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        drop(self.child.take());
        self.remove_pins();
    }
}

/// `router --socket SOCKET daemon --cleanup --pin-path PIN_PATH`: detaches
/// at once, where unmounting the bpffs alone would detach from a kernel
/// workqueue a moment later.
pub fn cleanup_pins(socket: &Path, pin_path: &Path) -> Result<String> {
    let out = Command::new(router_binary()?)
        .arg("--socket")
        .arg(socket)
        .args(["daemon", "--cleanup", "--pin-path"])
        .arg(pin_path)
        .output()
        .context("running router daemon --cleanup")?;
    stdout_of("router daemon --cleanup", out)
}

/// The stdout of a finished command, or an error naming `what`, its exit
/// status and its stderr when it failed.
fn stdout_of(what: &str, out: std::process::Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} exited {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// systemd's default soft limit on open files: what the daemon gets
/// without `LimitNOFILE=`. Tests about descriptors start it with this.
pub const SYSTEMD_DEFAULT_NOFILE: u64 = 1024;

/// `(soft, hard)` RLIMIT_NOFILE of process `pid` (0: this one), after
/// setting the soft one to `soft` if given; the hard one never changes.
pub fn nofile(pid: libc::pid_t, soft: Option<u64>) -> Result<(u64, u64)> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit(2) with a valid out-pointer and no new limit only reads.
    if unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &raw mut old) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("reading RLIMIT_NOFILE of pid {pid}"));
    }
    if let Some(soft) = soft {
        let new = libc::rlimit {
            rlim_cur: soft.min(old.rlim_max),
            rlim_max: old.rlim_max,
        };
        // SAFETY: as above, with a valid limit to set.
        if unsafe {
            libc::prlimit(
                pid,
                libc::RLIMIT_NOFILE,
                &raw const new,
                std::ptr::null_mut(),
            )
        } != 0
        {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("setting RLIMIT_NOFILE of pid {pid} to {soft}"));
        }
    }
    Ok((old.rlim_cur, old.rlim_max))
}

/// Starts `router daemon` in `ns` with its pins on a private bpffs and
/// waits until its control socket answers.
pub fn start_daemon(ns: &str, config: &Path, socket: &Path) -> Result<Daemon> {
    start_daemon_with(ns, config, socket, None, None)
}

/// Appends `cmd`'s stdout and stderr to `log` (created if missing), for a
/// caller that owns the terminal or wants the log as a file.
pub fn log_output_to(cmd: &mut Command, log: &Path) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    cmd.stdout(file.try_clone()?).stderr(file);
    Ok(())
}

/// [`start_daemon`] with the daemon's output (its log) appended to `log`
/// instead of this process's stderr: for a caller that owns the terminal,
/// such as the demo while `router top` is on screen.
pub fn start_daemon_logging_to(
    ns: &str,
    config: &Path,
    socket: &Path,
    log: &Path,
) -> Result<Daemon> {
    start_daemon_with(ns, config, socket, None, Some(log))
}

/// [`start_daemon`] with the daemon's soft limit on open files set to
/// `nofile` (its hard limit stays this process's), as `LimitNOFILE=` or
/// systemd's default would set it.
pub fn start_daemon_with_nofile(
    ns: &str,
    config: &Path,
    socket: &Path,
    nofile: u64,
) -> Result<Daemon> {
    start_daemon_with(ns, config, socket, Some(nofile), None)
}

fn start_daemon_with(
    ns: &str,
    config: &Path,
    socket: &Path,
    nofile: Option<u64>,
    log: Option<&Path>,
) -> Result<Daemon> {
    let pins = BpfFs::mount()?;
    let child = spawn_daemon(ns, config, socket, &pins.pin_path(), nofile, log)?;
    Ok(Daemon {
        pid: child.id(),
        child: Some(child),
        socket: socket.to_path_buf(),
        pins: Some(pins),
    })
}

/// Starts `router daemon --pin-path PIN_PATH` in `ns` and waits until its
/// control socket answers. The pins outlive the returned guard: that is
/// what restarts are made of; the caller removes them.
pub fn start_daemon_pinned(
    ns: &str,
    config: &Path,
    socket: &Path,
    pin_path: &Path,
) -> Result<ChildGuard> {
    spawn_daemon(ns, config, socket, pin_path, None, None)
}

/// [`start_daemon_pinned`] with the daemon's log appended to `log`.
pub fn start_daemon_pinned_logging_to(
    ns: &str,
    config: &Path,
    socket: &Path,
    pin_path: &Path,
    log: &Path,
) -> Result<ChildGuard> {
    spawn_daemon(ns, config, socket, pin_path, None, Some(log))
}

fn spawn_daemon(
    ns: &str,
    config: &Path,
    socket: &Path,
    pin_path: &Path,
    nofile: Option<u64>,
    log: Option<&Path>,
) -> Result<ChildGuard> {
    let bin = router_binary()?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(&bin)
        .args(["daemon", "--config"])
        .arg(config)
        .arg("--pin-path")
        .arg(pin_path)
        .stdin(Stdio::null());
    if let Some(log) = log {
        log_output_to(&mut cmd, log)?;
    }
    if let Some(soft) = nofile {
        let (_, hard) = nofile_of_self()?;
        let limit = libc::rlimit {
            rlim_cur: soft.min(hard),
            rlim_max: hard,
        };
        // SAFETY: setrlimit(2) is async-signal-safe and touches only the
        // child; `ip netns exec` then execs the daemon in place, which
        // keeps the limit.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = netns::spawn_command(cmd)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("router daemon exited early: {status}");
        }
        if cli(socket, &["status", "--json"]).is_ok() {
            return Ok(child);
        }
        if Instant::now() > deadline {
            bail!(
                "router daemon did not answer on {} within 30 s",
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn nofile_of_self() -> Result<(u64, u64)> {
    nofile(0, None)
}

/// Raises this process's soft limit on open files to its hard limit (a test
/// that holds thousands of connections needs them); returns the new limit.
pub fn raise_own_nofile() -> Result<u64> {
    let (_, hard) = nofile_of_self()?;
    nofile(0, Some(hard))?;
    Ok(hard)
}

/// [`cli`] that gives up after `timeout` (killing the CLI): for a daemon
/// that may not answer at all.
pub fn cli_within(socket: &Path, args: &[&str], timeout: Duration) -> Result<String> {
    let child = Command::new(router_binary()?)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running router CLI")?;
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads both pipes to the end, so a long answer cannot block the CLI.
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    let out = match rx.recv_timeout(timeout) {
        Ok(out) => out?,
        Err(_) => {
            // SAFETY: kill(2) on our own child, not reaped until the
            // thread's wait returns, so the pid cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = rx.recv();
            bail!("router {args:?} did not finish within {timeout:?}");
        }
    };
    stdout_of(&format!("router {args:?}"), out)
}

/// Runs the `router` CLI against a control socket; returns stdout, or an
/// error with stderr when it exits non-zero.
pub fn cli(socket: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(router_binary()?)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .context("running router CLI")?;
    stdout_of(&format!("router {args:?}"), out)
}

/// `router status --json` on the control socket `socket`, parsed: what an
/// operator's script would read.
pub fn status(socket: &Path) -> Result<StatusReply> {
    let out = cli(socket, &["status", "--json"])?;
    serde_json::from_str(&out).context("parsing `router status --json`")
}

/// Each backend's weight as the policy set it (`policy[].weight`), by
/// backend name: what the controller decided, before the datapath has it.
pub fn policy_weights(st: &StatusReply) -> BTreeMap<String, u32> {
    st.policy
        .iter()
        .map(|p| (p.backend.clone(), p.weight))
        .collect()
}

/// Each backend's weight in the datapath's tables
/// (`datapath.services[0].backends[].weight`), by backend name: what new
/// connections are balanced on. The tests using it run one service.
pub fn datapath_weights(st: &StatusReply) -> BTreeMap<String, u32> {
    st.datapath.services[0]
        .backends
        .iter()
        .map(|b| (b.name.clone(), b.weight))
        .collect()
}
