//! A private BPF filesystem for each test daemon's pins.
//!
//! `ip netns exec` gives the daemon a mount namespace with a fresh /sys, so
//! the host's /sys/fs/bpf is out of its reach; a bpffs mounted under the
//! temp dir before the daemon starts is copied into that namespace, and
//! pins made there are visible here. Each mount is its own instance, so a
//! test's pins never meet another run's or the host's, and unmounting frees
//! every object pinned in it (links included) even when a test fails before
//! `router daemon --cleanup`. Mount points carry the creating pid, so a run
//! killed before its guards dropped is cleaned up by the next one.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result};

const PREFIX: &str = "router-bpffs-";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A bpffs mounted at `<tmp>/router-bpffs-<pid>-<n>`, unmounted and removed
/// on drop.
#[derive(Debug)]
pub struct BpfFs {
    mount: PathBuf,
}

impl BpfFs {
    pub fn mount() -> Result<Self> {
        remove_stale();
        let mount = std::env::temp_dir().join(format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&mount).with_context(|| format!("creating {}", mount.display()))?;
        let target = cstr(&mount)?;
        let fstype = c"bpf";
        // SAFETY: mount(2) with NUL-terminated strings that outlive the call
        // and no data argument.
        let rc = unsafe {
            libc::mount(
                fstype.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            let _ = std::fs::remove_dir(&mount);
            return Err(err).with_context(|| format!("mounting bpffs on {}", mount.display()));
        }
        Ok(Self { mount })
    }

    /// The daemon's `pin_path` inside this filesystem (created by the daemon).
    pub fn pin_path(&self) -> PathBuf {
        self.mount.join("router")
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        unmount(&self.mount);
    }
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).context("path holds a NUL byte")
}

fn unmount(mount: &Path) {
    if let Ok(c) = cstr(mount) {
        // SAFETY: umount2(2) on a NUL-terminated path; MNT_DETACH so a copy
        // still held by a dying daemon's namespace does not make it fail.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    if let Err(e) = std::fs::remove_dir(mount) {
        eprintln!("bpffs: removing {}: {e}", mount.display());
    }
}

/// Unmounts our bpffs instances whose creating process is gone.
fn remove_stale() {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let tmp = std::env::temp_dir();
    for line in info.lines() {
        // Field 5 is the mount point; ours hold no characters that
        // mountinfo would escape.
        let Some(point) = line.split(' ').nth(4).map(PathBuf::from) else {
            continue;
        };
        if point.parent() != Some(tmp.as_path()) {
            continue;
        }
        let Some(pid) = point
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            unmount(&point);
        }
    }
}

/// What is pinned under `pin_path`, as `prog`, `maps/NAME`, `links/IF`.
pub fn pinned_objects(pin_path: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    if !pin_path.exists() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(pin_path)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_dir() {
            for sub in std::fs::read_dir(entry.path())? {
                out.push(format!("{name}/{}", sub?.file_name().to_string_lossy()));
            }
        } else {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}
