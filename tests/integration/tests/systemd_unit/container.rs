//! systemd booted as PID 1 of namespaces of its own, on the host's file
//! system: a container without an image. What the unit does is then done
//! by systemd itself, not emulated.
//!
//! - PID, mount, cgroup, UTS and IPC namespaces (`unshare`); the network
//!   stays the host's, and the unit under test joins the test's LB
//!   namespace through `NetworkNamespacePath=`.
//! - A cgroup below the test's own in every hierarchy, the cgroup
//!   namespace's root: systemd builds its tree there and nowhere else.
//! - Private mounts: /proc, cgroupfs, a tmpfs /run (the test's network
//!   namespaces carried over), a fresh bpffs on /sys/fs/bpf, mode 0700 as
//!   systemd mounts it, and overlays on /etc and /usr/local/bin, so that
//!   installing the packaging changes no file of the host's.
//! - `--unit=router-test.target`, which starts journald and nothing else.
//!
//! Dropping the guard kills systemd, and with it every process in its PID
//! namespace, then removes its cgroups.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use router_testkit::daemon_proc::{ScratchDir, router_binary};

/// Where an installed systemd keeps PID 1's binary.
const SYSTEMD: [&str; 2] = ["/lib/systemd/systemd", "/usr/lib/systemd/systemd"];

/// systemd's binary, if installed.
pub fn systemd_binary() -> Option<&'static str> {
    SYSTEMD.into_iter().find(|p| Path::new(p).exists())
}

/// What is installed, from the repository: paths on the host.
pub struct Install<'a> {
    pub unit: &'a Path,
    pub sysusers: &'a Path,
    /// The config, installed as /etc/router/router.toml.
    pub config: &'a str,
    /// The test's drop-in, installed as router.service.d/test.conf.
    pub drop_in: &'a str,
}

pub struct Container {
    /// `unshare`, whose only child is systemd.
    unshare: Option<Child>,
    /// systemd's pid on the host.
    pub pid: u32,
    cgroups: Vec<PathBuf>,
    scratch: ScratchDir,
}

/// One line of /proc/self/mountinfo: mount point, file system type, super
/// block options.
struct Mount {
    point: String,
    fstype: String,
    options: String,
}

fn mounts() -> Result<Vec<Mount>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in info.lines() {
        let (left, right) = line
            .split_once(" - ")
            .context("mountinfo line without ' - '")?;
        let point = left
            .split(' ')
            .nth(4)
            .context("mountinfo: no mount point")?;
        let mut right = right.split(' ');
        let fstype = right.next().unwrap_or_default();
        let options = right.nth(1).unwrap_or_default();
        out.push(Mount {
            point: point.to_owned(),
            fstype: fstype.to_owned(),
            options: options.to_owned(),
        });
    }
    Ok(out)
}

/// The shell lines that mount, inside the new cgroup namespace, what the
/// host has at and under /sys/fs/cgroup, in the host's order: each cgroup
/// hierarchy then shows the namespace's root, the cgroup made for it.
fn cgroupfs_lines(mounts: &[Mount]) -> Vec<String> {
    let mut lines = Vec::new();
    for m in mounts {
        if !(m.point == "/sys/fs/cgroup" || m.point.starts_with("/sys/fs/cgroup/")) {
            continue;
        }
        match m.fstype.as_str() {
            "tmpfs" => lines.push(format!("mount -t tmpfs -o mode=755 tmpfs {}", m.point)),
            "cgroup2" => lines.push(format!(
                "mkdir -p {0} && mount -t cgroup2 cgroup2 {0}",
                m.point
            )),
            "cgroup" => {
                let opts: Vec<&str> = m
                    .options
                    .split(',')
                    .filter(|o| !matches!(*o, "rw" | "ro"))
                    .collect();
                lines.push(format!(
                    "mkdir -p {0} && mount -t cgroup -o {1} cgroup {0}",
                    m.point,
                    opts.join(",")
                ));
            }
            _ => {}
        }
    }
    lines
}

/// Makes a cgroup below this process's own in every mounted hierarchy;
/// returns their directories.
fn make_cgroups(mounts: &[Mount], name: &str) -> Result<Vec<PathBuf>> {
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    let mut made = Vec::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(id), Some(c), Some(p)) => (id, c, p),
            _ => bail!("/proc/self/cgroup: {line:?}"),
        };
        let mount = mounts.iter().find(|m| {
            if controllers.is_empty() {
                m.fstype == "cgroup2"
            } else {
                m.fstype == "cgroup"
                    && controllers
                        .split(',')
                        .all(|c| m.options.split(',').any(|o| o == c))
            }
        });
        let Some(mount) = mount else { continue };
        let parent = PathBuf::from(format!("{}{}", mount.point, path));
        let dir = parent.join(name);
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        made.push(dir.clone());
        // cgroup v1 cpusets start empty, and an empty one takes no process.
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if dir.join(file).exists() {
                let from = std::fs::read_to_string(parent.join(file))?;
                std::fs::write(dir.join(file), from.trim())?;
            }
        }
    }
    ensure!(!made.is_empty(), "no cgroup hierarchy is mounted");
    Ok(made)
}

impl Container {
    /// Boots systemd with `install` in place and waits until it runs.
    pub fn boot(tag: &str, install: &Install) -> Result<Container> {
        let systemd = systemd_binary().context("systemd is not installed")?;
        let scratch = ScratchDir::new(&format!("systemd-{tag}"))?;
        let s = scratch.0.clone();
        let mounts = mounts()?;
        let cgroups = make_cgroups(
            &mounts,
            &format!("router-test-{}-{tag}", std::process::id()),
        )?;
        let mut container = Container {
            unshare: None,
            pid: 0,
            cgroups,
            scratch,
        };
        let files = [
            ("router.toml", install.config),
            ("test.conf", install.drop_in),
            (
                "router-test.target",
                "[Unit]\nDescription=router test: journald and nothing else until asked\n\
                 DefaultDependencies=no\nWants=systemd-journald.service\n",
            ),
        ];
        for (name, text) in files {
            std::fs::write(s.join(name), text)?;
        }
        let bin = router_binary()?;
        let script = format!(
            "set -eu\n\
             S={s}\n\
             mount -t proc proc /proc\n\
             {cgroupfs}\n\
             mkdir -p $S/netns && mount --rbind /run/netns $S/netns\n\
             mount -t tmpfs -o mode=755 tmpfs /run\n\
             mkdir /run/netns && mount --move $S/netns /run/netns\n\
             mount -t bpf -o mode=700 bpf /sys/fs/bpf\n\
             for d in /etc /usr/local/bin; do\n\
             \x20 mkdir -p $S/upper$d $S/work$d\n\
             \x20 mount -t overlay overlay -o lowerdir=$d,upperdir=$S/upper$d,workdir=$S/work$d $d\n\
             done\n\
             # docs/operations.md, Packaging.\n\
             install -m 0755 {bin} /usr/local/bin/router\n\
             systemd-sysusers {sysusers}\n\
             install -d -m 0755 /etc/router\n\
             install -m 0644 $S/router.toml /etc/router/router.toml\n\
             install -m 0644 {unit} /etc/systemd/system/router.service\n\
             install -D -m 0644 $S/test.conf /etc/systemd/system/router.service.d/test.conf\n\
             install -m 0644 $S/router-test.target /etc/systemd/system/router-test.target\n\
             exec env container=router-test {systemd} --unit=router-test.target\n",
            s = s.display(),
            cgroupfs = cgroupfs_lines(&mounts).join("\n"),
            bin = bin.display(),
            sysusers = install.sysusers.display(),
            unit = install.unit.display(),
        );
        std::fs::write(s.join("boot.sh"), script)?;
        let procs: Vec<PathBuf> = container
            .cgroups
            .iter()
            .map(|c| c.join("cgroup.procs"))
            .collect();
        // The shell moves itself into the new cgroups, so that unshare's
        // cgroup namespace is rooted there.
        let enter = s.join("enter.sh");
        std::fs::write(
            &enter,
            format!(
                "for f in \"$@\"; do echo $$ > \"$f\"; done\n\
                 exec unshare --cgroup --mount --pid --fork --uts --ipc --propagation private \
                 /bin/sh {}\n",
                s.join("boot.sh").display()
            ),
        )?;
        std::fs::set_permissions(&enter, std::fs::Permissions::from_mode(0o755))?;
        let log = std::fs::File::create(s.join("boot.log"))?;
        let child = Command::new("/bin/sh")
            .arg(&enter)
            .args(&procs)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting unshare")?;
        let unshare = child.id();
        container.unshare = Some(child);

        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(pid) = child_of(unshare)
                && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "systemd")
            {
                container.pid = pid;
                let state = container.sh("systemctl is-system-running")?;
                let state = String::from_utf8_lossy(&state.stdout);
                if matches!(state.trim(), "running" | "degraded") {
                    return Ok(container);
                }
            }
            if let Some(status) = container.unshare.as_mut().and_then(|c| c.try_wait().ok()?) {
                bail!("systemd did not boot ({status}):\n{}", container.boot_log());
            }
            if Instant::now() > deadline {
                bail!(
                    "systemd did not reach running within 30 s:\n{}",
                    container.boot_log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn boot_log(&self) -> String {
        std::fs::read_to_string(self.scratch.0.join("boot.log")).unwrap_or_default()
    }

    /// `sh -c CMD` inside the container (its mount and PID namespaces), as
    /// root; the host's network namespace.
    pub fn sh(&self, cmd: &str) -> Result<Output> {
        Command::new("nsenter")
            .args([
                "-t",
                &self.pid.to_string(),
                "-m",
                "-p",
                "--",
                "sh",
                "-c",
                cmd,
            ])
            .output()
            .with_context(|| format!("nsenter … {cmd}"))
    }

    /// [`Container::sh`] that must succeed; its stdout.
    pub fn run(&self, cmd: &str) -> Result<String> {
        let out = self.sh(cmd)?;
        ensure!(
            out.status.success(),
            "{cmd}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `CMD` as root inside the container and in network namespace `ns`
    /// (`/run/netns/NS`), as an operator would run it on the host.
    pub fn run_in_netns(&self, ns: &str, cmd: &[&str]) -> Result<String> {
        let out = Command::new("nsenter")
            .arg(format!("--mount=/proc/{}/ns/mnt", self.pid))
            .arg(format!("--pid=/proc/{}/ns/pid", self.pid))
            .arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .args(cmd)
            .output()?;
        ensure!(
            out.status.success(),
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A path inside the container, as the host reaches it.
    pub fn path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{inside}", self.pid))
    }

    /// The host pid of a process whose pid in the container is `inner`.
    pub fn host_pid(&self, inner: u32) -> Result<u32> {
        let ns = std::fs::read_link(format!("/proc/{}/ns/pid", self.pid))?;
        for entry in std::fs::read_dir("/proc")? {
            let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok() != Some(ns.clone()) {
                continue;
            }
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                continue;
            };
            let last = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|ids| ids.split_whitespace().last()?.parse::<u32>().ok());
            if last == Some(inner) {
                return Ok(pid);
            }
        }
        bail!("no process is pid {inner} in the container")
    }

    /// A cgroup file of `unit` in the hierarchy whose directory ends with
    /// `hierarchy` (a v1 controller such as `devices`), if mounted.
    pub fn cgroup_file(&self, hierarchy: &str, unit: &str, file: &str) -> Option<PathBuf> {
        self.cgroups
            .iter()
            .find(|c| {
                c.strip_prefix("/sys/fs/cgroup")
                    .ok()
                    .and_then(|rest| rest.components().next())
                    .is_some_and(|first| first.as_os_str() == hierarchy)
            })
            .map(|c| c.join("system.slice").join(unit).join(file))
            .filter(|p| p.exists())
    }
}

/// The one child of `pid`.
fn child_of(pid: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

/// Removes `dir` and the cgroups below it, deepest first.
fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    // A cgroup empties a moment after its last process is reaped.
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    eprintln!(
        "systemd container: could not remove cgroup {}",
        dir.display()
    );
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.pid != 0 {
            // SAFETY: kill(2) has no memory-safety preconditions. The pid
            // is systemd's: as PID 1 of its namespace it exits only when
            // killed, and this is the only kill. Killing a PID namespace's
            // init kills everything in it.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
        }
        if let Some(mut child) = self.unshare.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for c in self.cgroups.iter().rev() {
            remove_cgroup(c);
        }
    }
}
