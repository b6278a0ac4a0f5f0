//! Dropping capabilities once the datapath is attached. Afterwards the
//! daemon only writes maps through fds it already holds, serves its bound
//! sockets, reads rtnetlink and makes outbound connections; it keeps no
//! capability that it cannot show it needs. What the kernel asks for map
//! access through an open fd varies (since Linux 6.5, nothing; before, with
//! `kernel.unprivileged_bpf_disabled`, CAP_BPF or CAP_SYS_ADMIN), so it is
//! measured here, not assumed.
//!
//! Capabilities belong to threads, not processes: this must run while the
//! calling thread is the process's only one, and every thread started later
//! inherits what is left.

use std::fmt;

use caps::{CapSet, Capability, CapsHashSet};

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error(
        "capabilities can only be dropped for the whole process while it has one thread; it has {0}"
    )]
    Threads(usize),
    #[error("{what}: {source}")]
    Caps {
        what: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
    #[error("prctl(PR_SET_NO_NEW_PRIVS): {0}")]
    NoNewPrivs(std::io::Error),
    #[error("map access through an open fd fails with every capability set tried ({0})")]
    MapAccess(#[source] crate::datapath::DatapathError),
    #[error("none of the capability sets to try (none, CAP_BPF, CAP_SYS_ADMIN) is permitted")]
    NoCandidate,
    #[error("after dropping, the {set} set holds {have}, not {want}")]
    Verify {
        set: &'static str,
        have: String,
        want: String,
    },
}

/// The capabilities kept, for the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kept(pub Vec<Capability>);

impl fmt::Display for Kept {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let names: Vec<String> = self.0.iter().map(|c| c.to_string()).collect();
        f.write_str(&names.join(", "))
    }
}

fn caps_err(what: &'static str) -> impl FnOnce(caps::errors::CapsError) -> PrivilegeError {
    move |source| PrivilegeError::Caps { what, source }
}

fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(usize::MAX)
}

/// Sets effective, permitted and bounding sets to the smallest of the
/// candidates under which `map_access` succeeds, clears the inheritable
/// and ambient sets, and sets no_new_privs so no later exec can gain any.
pub fn drop_to_minimum(
    mut map_access: impl FnMut() -> Result<(), crate::datapath::DatapathError>,
) -> Result<Kept, PrivilegeError> {
    let n = threads();
    if n != 1 {
        return Err(PrivilegeError::Threads(n));
    }
    let permitted =
        caps::read(None, CapSet::Permitted).map_err(caps_err("reading capabilities"))?;
    let candidates: [&[Capability]; 3] = [
        &[],
        &[Capability::CAP_BPF],
        // Kernels before 5.8 know no CAP_BPF.
        &[Capability::CAP_SYS_ADMIN],
    ];
    let mut keep = None;
    let mut last_err = None;
    for c in candidates {
        let set: CapsHashSet = c.iter().copied().collect();
        if !set.is_subset(&permitted) {
            continue;
        }
        caps::set(None, CapSet::Effective, &set).map_err(caps_err("trying a capability set"))?;
        match map_access() {
            Ok(()) => {
                keep = Some(set);
                break;
            }
            Err(e) => last_err = Some(e),
        }
    }
    // Back to everything permitted: dropping the bounding set needs CAP_SETPCAP.
    caps::set(None, CapSet::Effective, &permitted).map_err(caps_err("restoring capabilities"))?;
    let keep = match (keep, last_err) {
        (Some(keep), _) => keep,
        (None, Some(e)) => return Err(PrivilegeError::MapAccess(e)),
        (None, None) => return Err(PrivilegeError::NoCandidate),
    };

    // Without CAP_SETPCAP (a non-root daemon with ambient capabilities)
    // the bounding set cannot shrink; no_new_privs below still stops any
    // exec from gaining what it holds.
    if permitted.contains(&Capability::CAP_SETPCAP) {
        for c in caps::all() {
            if !keep.contains(&c) && caps::has_cap(None, CapSet::Bounding, c).unwrap_or(false) {
                caps::drop(None, CapSet::Bounding, c)
                    .map_err(caps_err("dropping from the bounding set"))?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(caps_err("clearing the ambient set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_err("clearing the inheritable set"))?;
    caps::set(None, CapSet::Effective, &keep).map_err(caps_err("setting the effective set"))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(caps_err("setting the permitted set"))?;
    // SAFETY: prctl(2) with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(PrivilegeError::NoNewPrivs(std::io::Error::last_os_error()));
    }

    let show = |s: &CapsHashSet| {
        let mut v: Vec<String> = s.iter().map(|c| c.to_string()).collect();
        v.sort();
        format!("[{}]", v.join(", "))
    };
    for (set, name) in [
        (CapSet::Effective, "effective"),
        (CapSet::Permitted, "permitted"),
    ] {
        let have = caps::read(None, set).map_err(caps_err("reading capabilities back"))?;
        if have != keep {
            return Err(PrivilegeError::Verify {
                set: name,
                have: show(&have),
                want: show(&keep),
            });
        }
    }
    let mut kept: Vec<Capability> = keep.into_iter().collect();
    kept.sort_by_key(|c| c.index());
    Ok(Kept(kept))
}
