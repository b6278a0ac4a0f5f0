//! A network namespace that the *current thread* enters for kernel tests
//! (BPF_PROG_TEST_RUN with a real ingress device and FIB), removed and left
//! again on drop, also when the test fails.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};

/// The client, second client and three backends that fixtures and the
/// datapath benchmark resolve on their first arm (198.18.0.0/24).
/// The IPv6 twins of `TEST_NEIGHBOURS` (from the benchmarking range
/// 2001:2::/48, as 198.18.0.0/15 is IPv4's).
pub const TEST_NEIGHBOURS6: [(&str, &str); 5] = [
    ("2001:2::2", "02:00:00:00:0c:02"),
    ("2001:2::3", "02:00:00:00:0c:03"),
    ("2001:2::11", "02:00:00:00:0b:00"),
    ("2001:2::12", "02:00:00:00:0b:01"),
    ("2001:2::13", "02:00:00:00:0b:02"),
];

pub const TEST_NEIGHBOURS: [(&str, &str); 5] = [
    ("198.18.0.2", "02:00:00:00:0c:02"),
    ("198.18.0.3", "02:00:00:00:0c:03"),
    ("198.18.0.11", "02:00:00:00:0b:00"),
    ("198.18.0.12", "02:00:00:00:0b:01"),
    ("198.18.0.13", "02:00:00:00:0b:02"),
];

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn setns(f: &File) -> Result<()> {
    // SAFETY: plain syscall on a valid namespace fd.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

pub struct EnteredNs {
    pub name: String,
    original: File,
}

impl EnteredNs {
    /// Creates a namespace named `<prefix><pid>-<n>` and moves this thread into it.
    pub fn new(prefix: &str) -> Result<Self> {
        remove_stale(prefix);
        let name = format!(
            "{prefix}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let original =
            File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
        run(&["ip", "netns", "add", &name])?;
        let guard = Self { name, original };
        let target = File::open(format!("/run/netns/{}", guard.name))
            .with_context(|| format!("opening netns {}", guard.name))?;
        setns(&target)?;
        Ok(guard)
    }

    /// Runs `ip` with arguments inside this namespace (the thread is already in it).
    pub fn ip(&self, args: &str) -> Result<String> {
        let mut v = vec!["ip"];
        v.extend(args.split_whitespace());
        run(&v)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        std::fs::write(&path, value).with_context(|| format!("writing {path}"))
    }

    /// One arm for BPF_PROG_TEST_RUN: a veth `dev` (with peer `peer`) with
    /// `mac` and `cidr`, forwarding on, and permanent neighbours, so
    /// `bpf_fib_lookup` resolves fixed next hops. Returns `dev`'s ifindex.
    pub fn test_arm(
        &self,
        (dev, peer): (&str, &str),
        mac: &str,
        cidr: &str,
        neighbours: &[(&str, &str)],
    ) -> Result<u32> {
        self.ip(&format!("link add {dev} type veth peer name {peer}"))?;
        self.ip(&format!("link set {dev} address {mac} up"))?;
        self.ip(&format!("link set {peer} up"))?;
        self.ip("link set lo up")?;
        self.ip(&format!("addr add {cidr} dev {dev}"))?;
        self.sysctl("net.ipv4.ip_forward", "1")?;
        for (addr, lladdr) in neighbours {
            self.ip(&format!(
                "neigh replace {addr} lladdr {lladdr} dev {dev} nud permanent"
            ))?;
        }
        self.ifindex(dev)
    }

    /// IPv6 on an arm `test_arm` made: `cidr` without duplicate address
    /// detection (the address is usable at once), IPv6 forwarding on (the
    /// FIB helper answers nothing without it), permanent neighbours.
    pub fn test_arm6(&self, dev: &str, cidr: &str, neighbours: &[(&str, &str)]) -> Result<()> {
        self.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        self.ip(&format!("-6 addr add {cidr} dev {dev} nodad"))?;
        for (addr, lladdr) in neighbours {
            self.ip(&format!(
                "-6 neigh replace {addr} lladdr {lladdr} dev {dev} nud permanent"
            ))?;
        }
        Ok(())
    }

    pub fn ifindex(&self, name: &str) -> Result<u32> {
        let c = std::ffi::CString::new(name)?;
        // SAFETY: valid NUL-terminated name.
        let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if i == 0 {
            bail!("no interface {name} in {}", self.name);
        }
        Ok(i)
    }
}

impl Drop for EnteredNs {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.original) {
            eprintln!("could not leave netns {}: {e}", self.name);
        }
        if let Err(e) = run(&["ip", "netns", "del", &self.name]) {
            eprintln!("could not remove netns {}: {e}", self.name);
        }
    }
}

/// Deletes `<prefix><pid>-<n>` namespaces whose process is gone: a run that
/// was SIGKILLed could not run its guards.
fn remove_stale(prefix: &str) {
    let Ok(list) = run(&["ip", "netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, n)| n.parse::<u32>().ok().and(pid.parse::<u32>().ok()))
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(&["ip", "netns", "del", name]);
        }
    }
}
