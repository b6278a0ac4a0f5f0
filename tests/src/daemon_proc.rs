//! Running the real `router` binary as a daemon inside a test namespace.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

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
    snat: Ipv4Addr,
    backends: &[(String, String, u32)],
) -> String {
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
    if !out.status.success() {
        bail!(
            "router daemon --cleanup exited {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts `router daemon` in `ns` with its pins on a private bpffs and
/// waits until its control socket answers.
pub fn start_daemon(ns: &str, config: &Path, socket: &Path) -> Result<Daemon> {
    let pins = BpfFs::mount()?;
    let child = start_daemon_pinned(ns, config, socket, &pins.pin_path())?;
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
    let bin = router_binary()?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(&bin)
        .args(["daemon", "--config"])
        .arg(config)
        .arg("--pin-path")
        .arg(pin_path)
        .stdin(std::process::Stdio::null());
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

/// Runs the `router` CLI against a control socket; returns stdout, or an
/// error with stderr when it exits non-zero.
pub fn cli(socket: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(router_binary()?)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .context("running router CLI")?;
    if !out.status.success() {
        bail!(
            "router {args:?} exited {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
