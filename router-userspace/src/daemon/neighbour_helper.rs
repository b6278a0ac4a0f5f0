//! The one process that keeps CAP_NET_ADMIN after start, and only it: a
//! child forked before the daemon drops its capabilities, which keeps
//! every backend's next hop a managed neighbour entry (`host::neighbours`)
//! when the daemon asks, on reload and on link or route changes.
//!
//! Adding a neighbour entry needs CAP_NET_ADMIN in the calling thread, not
//! only in whoever opened the netlink socket, so a descriptor kept across
//! the drop would not do. Keeping the capability in the daemon would let a
//! compromised daemon change interfaces, addresses and routes; the helper
//! reads nothing but the daemon's list of backend addresses over a socket
//! pair, closes every other descriptor it inherited, and holds no other
//! capability. Holding more than the daemon, it cannot be ptraced by it.
//! It exits when the daemon's end closes (the daemon exited) or the daemon
//! dies (`PR_SET_PDEATHSIG`).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
};

use caps::{CapSet, Capability, CapsHashSet};
use tracing::{info, warn};

use crate::host::neighbours::{self, Target};

/// A request is one datagram: the JSON list of targets. 1 MiB holds far
/// more backends than a table does.
const MAX_REQUEST: usize = 1 << 20;

/// The daemon's end of the socket pair.
pub struct Helper {
    sock: OwnedFd,
}

impl Helper {
    /// Forks the helper. Must run while the process has one thread (a fork
    /// copies only the calling one) and before capabilities are dropped.
    /// `None` when the process has no CAP_NET_ADMIN to hand it.
    /// `warned`: the problems already logged, not to be repeated.
    pub fn spawn(record_at: PathBuf, warned: Vec<String>) -> io::Result<Option<Helper>> {
        let permitted = caps::read(None, CapSet::Permitted).map_err(io::Error::other)?;
        if !permitted.contains(&Capability::CAP_NET_ADMIN) {
            return Ok(None);
        }
        let mut fds = [0 as RawFd; 2];
        // SAFETY: socketpair(2) fills two descriptors on success.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both were just returned by socketpair(2).
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: getpid(2) cannot fail.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the caller guarantees one thread, so the child is a whole
        // copy of this process.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                drop(ours);
                let code = match child(parent, theirs, &record_at, warned) {
                    Ok(()) => 0,
                    Err(e) => {
                        warn!(
                            "neighbour helper stopped: {e}; new backends get no managed neighbour entry until a restart"
                        );
                        1
                    }
                };
                // SAFETY: _exit(2), so none of the daemon's exit handlers run here.
                unsafe { libc::_exit(code) }
            }
            _ => Ok(Some(Helper { sock: ours })),
        }
    }

    /// Asks for every target's next hop to be kept resolved, and entries no
    /// target needs any more removed. Never blocks: a helper that is behind
    /// takes the latest request it has queued.
    pub fn request(&self, targets: &[Target]) {
        let body = match serde_json::to_vec(targets) {
            Ok(b) => b,
            Err(e) => {
                warn!("neighbour entries: encoding the request: {e}");
                return;
            }
        };
        // SAFETY: sending a buffer we own, within its length.
        let n = unsafe {
            libc::send(
                self.sock.as_raw_fd(),
                body.as_ptr().cast(),
                body.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            warn!(
                "neighbour entries not updated: the helper cannot be reached ({}); they are \
                 again at the daemon's next start",
                io::Error::last_os_error()
            );
        }
    }
}

/// Closes every descriptor but the standard three and `keep`.
fn close_others(keep: RawFd) -> io::Result<()> {
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if fd > 2 && fd != keep {
            // SAFETY: closing a descriptor this process inherited and no
            // longer uses; one that is already gone (the directory's own)
            // fails harmlessly.
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

fn keep_only_net_admin() -> io::Result<()> {
    let keep: CapsHashSet = [Capability::CAP_NET_ADMIN].into_iter().collect();
    let permitted = caps::read(None, CapSet::Permitted).map_err(io::Error::other)?;
    if permitted.contains(&Capability::CAP_SETPCAP) {
        for c in caps::all() {
            if !keep.contains(&c) && caps::has_cap(None, CapSet::Bounding, c).unwrap_or(false) {
                caps::drop(None, CapSet::Bounding, c).map_err(io::Error::other)?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(io::Error::other)?;
    caps::clear(None, CapSet::Inheritable).map_err(io::Error::other)?;
    caps::set(None, CapSet::Effective, &keep).map_err(io::Error::other)?;
    caps::set(None, CapSet::Permitted, &keep).map_err(io::Error::other)?;
    // SAFETY: prctl(2) with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn child(
    parent: libc::pid_t,
    sock: OwnedFd,
    record_at: &Path,
    mut warned: Vec<String>,
) -> io::Result<()> {
    // SAFETY: prctl(2) with integer arguments and a NUL-terminated name.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        libc::prctl(libc::PR_SET_NAME, c"router-neigh".as_ptr(), 0, 0, 0);
    }
    // The daemon may have died before PR_SET_PDEATHSIG took effect.
    // SAFETY: getppid(2) cannot fail.
    if unsafe { libc::getppid() } != parent {
        return Ok(());
    }
    // Above all the control socket's listener: --cleanup takes a socket
    // that answers for a running daemon.
    close_others(sock.as_raw_fd())?;
    keep_only_net_admin()?;
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        let Some(mut len) = recv(&sock, &mut buf, 0)? else {
            return Ok(());
        };
        // Only the latest request matters.
        while let Ok(Some(n)) = recv(&sock, &mut buf, libc::MSG_DONTWAIT) {
            len = n;
        }
        let targets: Vec<Target> = match serde_json::from_slice(&buf[..len]) {
            Ok(t) => t,
            Err(e) => {
                warn!("neighbour helper: unreadable request ({e}); ignored");
                continue;
            }
        };
        match neighbours::sync(&targets, record_at) {
            Ok(report) => {
                log_report(&report, &warned);
                warned = report.problems;
            }
            Err(e) => warn!("neighbour entries: {e}"),
        }
    }
}

/// One datagram into `buf`; `None` at the end (the daemon closed its end).
fn recv(sock: &OwnedFd, buf: &mut [u8], flags: i32) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: receiving into a buffer we own, within its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n > 0 {
            return Ok(Some(n as usize));
        }
        if n == 0 {
            return Ok(None);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Logs a sync: every entry added or removed, and each problem once while
/// it lasts (link changes re-apply often, the same problem each time).
pub fn log_report(report: &neighbours::Report, already_warned: &[String]) {
    for line in &report.added {
        info!("{line}");
    }
    for line in &report.removed {
        info!("{line}");
    }
    for line in &report.problems {
        if !already_warned.contains(line) {
            warn!("{line}");
        }
    }
}
