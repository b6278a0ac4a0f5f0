//! Kernel-managed neighbour entries (`NTF_MANAGED`, Linux 5.16+) for every
//! backend's next hop. The kernel resolves such an entry by itself and
//! keeps it refreshed, so `bpf_fib_lookup` finds the next hop resolved and
//! a flow is rarely handed to the stack for it (`pass_fib_failed`).
//!
//! The next hop is what an output route lookup for the backend says: its
//! gateway, else the backend itself, on the route's interface. For each:
//!
//! - no entry: one is added, managed, without a link-layer address;
//! - a dynamic entry (what the stack learnt, in any state): made managed,
//!   keeping its address and state, since a resolved entry is what we want;
//! - a permanent, `noarp` or externally learnt entry, or one already
//!   managed by someone else: left as it is.
//!
//! Entries added or made managed here are recorded beside the control
//! socket with the network namespace (see `settings` for why), and removed
//! when their backend leaves the config or by `router daemon --cleanup`,
//! and then only while they are still managed: an entry someone replaced
//! since is theirs. Removing a dynamic entry made managed only drops a
//! cache; the stack resolves it again on use. No other entry is touched.

mod rtnl;

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::IpAddr,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub use rtnl::{Entry, NextHop};

use crate::{config::Config, host::settings::current_netns, state_file};

/// A backend address and the names of the backends at it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub address: IpAddr,
    pub backends: Vec<String>,
}

/// Every backend address of every service (a fallback service's backends
/// are those of another service, so they are among them), in order: IPv4
/// ones first, then IPv6 ones (whose next hops get managed entries in the
/// neighbour discovery table alike).
pub fn targets(cfg: &Config) -> Vec<Target> {
    let mut by_addr: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
    for s in &cfg.services {
        for b in &s.backends {
            let names = by_addr.entry(b.address.ip()).or_default();
            if !names.contains(&b.name) {
                names.push(b.name.clone());
            }
        }
    }
    by_addr
        .into_iter()
        .map(|(address, backends)| Target { address, backends })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum NeighbourError {
    #[error("rtnetlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("no route ({0})")]
    Route(#[source] io::Error),
    #[error("reading the neighbour entry of {hop}: {source}")]
    Read {
        hop: String,
        #[source]
        source: io::Error,
    },
    #[error("{hop} cannot get a managed neighbour entry: {source}{hint}")]
    Write {
        hop: String,
        #[source]
        source: io::Error,
        hint: &'static str,
    },
    #[error("{0}")]
    Record(String),
}

fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) => " (adding one needs CAP_NET_ADMIN)",
        Some(libc::EINVAL | libc::EOPNOTSUPP) => {
            " (managed entries need Linux 5.16 or later and an interface that uses ARP)"
        }
        _ => "",
    }
}

/// `198.18.0.11 dev lb0`, by interface name where it has one.
fn show(hop: &NextHop) -> String {
    format!("{} dev {}", hop.address, ifname(hop.ifindex))
}

fn ifname(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes into buf.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("#{ifindex}");
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// An entry the daemon leaves alone, and why; `None` for one it may make
/// managed (a dynamic one).
fn not_ours(e: &Entry) -> Option<&'static str> {
    if e.is_static() {
        Some("a static entry")
    } else if e.is_managed() {
        Some("already managed")
    } else {
        None
    }
}

/// What a sync did or could not do, for the log: `added` one line per
/// entry added or made managed, `removed` per entry removed, `problems`
/// one line per backend that has no managed next hop.
#[derive(Debug, Default)]
pub struct Report {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub problems: Vec<String>,
}

/// The next hop of each target that has one, grouped, and a problem line
/// for each that has none. A target on a local address needs no neighbour.
fn next_hops(
    fd: &OwnedFd,
    targets: &[Target],
    problems: &mut Vec<String>,
) -> BTreeMap<NextHop, Vec<String>> {
    let mut hops: BTreeMap<NextHop, Vec<String>> = BTreeMap::new();
    for t in targets {
        match rtnl::next_hop(fd, t.address) {
            Ok(Some(hop)) => hops.entry(hop).or_default().extend(t.backends.clone()),
            Ok(None) => {}
            Err(e) => problems.push(backend_problem(t, &NeighbourError::Route(e))),
        }
    }
    hops
}

fn backend_problem(t: &Target, e: &NeighbourError) -> String {
    format!(
        "backend {} ({}): {e}: its next hop gets no managed neighbour entry, so flows to it \
         are handed to the stack (pass_fib_failed) until the stack resolves it",
        t.backends.join(", "),
        t.address
    )
}

fn hop_problem(hop: &NextHop, backends: &[String], e: &NeighbourError) -> String {
    format!(
        "backend {} (next hop {}): {e}; flows to it are handed to the stack (pass_fib_failed) \
         until the stack resolves it",
        backends.join(", "),
        show(hop)
    )
}

/// What `router config check` reports: one line per next hop the daemon
/// would give a managed entry, one per backend it could not.
pub fn plan(targets: &[Target]) -> Vec<String> {
    let mut lines = Vec::new();
    let fd = match crate::netlink::route_socket() {
        Ok(fd) => fd,
        Err(e) => return vec![format!("neighbours: {}", NeighbourError::Socket(e))],
    };
    let hops = next_hops(&fd, targets, &mut lines);
    let can_write = caps::has_cap(
        None,
        caps::CapSet::Effective,
        caps::Capability::CAP_NET_ADMIN,
    )
    .unwrap_or(false);
    for (hop, backends) in &hops {
        match rtnl::entry(&fd, hop) {
            Ok(Some(e)) if not_ours(&e).is_some() => {}
            Ok(_) if can_write => lines.push(format!(
                "the daemon adds neighbour {} managed (next hop of backend {})",
                show(hop),
                backends.join(", ")
            )),
            Ok(_) => lines.push(hop_problem(
                hop,
                backends,
                &NeighbourError::Write {
                    hop: show(hop),
                    source: io::Error::from_raw_os_error(libc::EPERM),
                    hint: hint(&io::Error::from_raw_os_error(libc::EPERM)),
                },
            )),
            Err(source) => lines.push(hop_problem(
                hop,
                backends,
                &NeighbourError::Read {
                    hop: show(hop),
                    source,
                },
            )),
        }
    }
    lines
}

/// One entry the daemon added or made managed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Added {
    pub address: IpAddr,
    pub ifindex: u32,
    /// The interface's name then: an index can be reused by a new one.
    pub dev: String,
}

impl Added {
    fn hop(&self) -> NextHop {
        NextHop {
            address: self.address,
            ifindex: self.ifindex,
        }
    }
}

/// The record of what the daemon added, for removal.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// `readlink /proc/self/ns/net` where the entries were added.
    pub netns: String,
    pub entries: BTreeSet<Added>,
}

/// `<control socket's directory>/<socket name>.neighbours.json`.
pub fn record_path(control_socket: &Path) -> PathBuf {
    state_file::beside(control_socket, "neighbours.json")
}

/// The record at `path`; `None` when there is none. What it can ask of
/// root's `--cleanup` is typed (an IP address, an index and a name
/// checked against the interface), and removes only managed entries.
pub fn load_record(path: &Path) -> Result<Option<Record>, NeighbourError> {
    let bytes = state_file::read(path).map_err(|e| NeighbourError::Record(format!("{e:#}")))?;
    let Some(bytes) = bytes else { return Ok(None) };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        NeighbourError::Record(format!("{}: corrupt ({e}); remove it", path.display()))
    })
}

fn save(path: &Path, record: &Record) -> Result<(), NeighbourError> {
    let body =
        serde_json::to_vec_pretty(record).map_err(|e| NeighbourError::Record(e.to_string()))?;
    state_file::write(path, &body).map_err(|e| NeighbourError::Record(format!("{e:#}")))
}

/// Removes `a` if it is still a managed entry on the interface recorded.
fn remove(fd: &OwnedFd, a: &Added) -> io::Result<bool> {
    if ifname(a.ifindex) != a.dev {
        return Ok(false);
    }
    match rtnl::entry(fd, &a.hop())? {
        Some(e) if e.is_managed() && !e.is_static() => rtnl::delete(fd, &a.hop()).map(|()| true),
        _ => Ok(false),
    }
}

/// Gives every target's next hop a managed entry and removes the entries
/// recorded at `record_at` that are no longer any target's next hop. Each
/// problem is a line of the report, never an error: only a record that
/// cannot be read or written is one.
pub fn sync(targets: &[Target], record_at: &Path) -> Result<Report, NeighbourError> {
    let mut report = Report::default();
    let fd = crate::netlink::route_socket().map_err(NeighbourError::Socket)?;
    let netns = current_netns().map_err(|e| NeighbourError::Record(format!("netns: {e}")))?;
    let mut record = load_record(record_at)?.unwrap_or_default();
    if record.netns != netns {
        // Entries of another namespace are not ours to manage from here.
        record = Record {
            netns,
            entries: BTreeSet::new(),
        };
    }
    let hops = next_hops(&fd, targets, &mut report.problems);

    let mut to_make = Vec::new();
    for (hop, backends) in &hops {
        match rtnl::entry(&fd, hop) {
            Ok(None) => to_make.push((hop, backends, false)),
            Ok(Some(e)) if not_ours(&e).is_none() => to_make.push((hop, backends, true)),
            Ok(Some(_)) => {}
            Err(source) => report.problems.push(hop_problem(
                hop,
                backends,
                &NeighbourError::Read {
                    hop: show(hop),
                    source,
                },
            )),
        }
    }
    // Recorded before it is added, so a crash in between leaves nothing
    // unrecorded.
    let planned: Vec<Added> = to_make
        .iter()
        .map(|(hop, _, _)| Added {
            address: hop.address,
            ifindex: hop.ifindex,
            dev: ifname(hop.ifindex),
        })
        .collect();
    if !planned.is_empty() {
        let mut ahead = Record {
            netns: record.netns.clone(),
            entries: record.entries.clone(),
        };
        ahead.entries.extend(planned.iter().cloned());
        save(record_at, &ahead)?;
    }
    for ((hop, backends, existing), added) in to_make.into_iter().zip(planned) {
        match rtnl::add_managed(&fd, hop, existing) {
            Ok(()) => {
                report.added.push(format!(
                    "neighbour {} managed (next hop of backend {}){}",
                    show(hop),
                    backends.join(", "),
                    if existing {
                        "; was a dynamic entry"
                    } else {
                        ""
                    }
                ));
                record.entries.insert(added);
            }
            Err(source) => report.problems.push(hop_problem(
                hop,
                backends,
                &NeighbourError::Write {
                    hop: show(hop),
                    hint: hint(&source),
                    source,
                },
            )),
        }
    }

    // A recorded entry whose hop is wanted stays recorded, whatever state
    // it is in now; the others go.
    let stale: Vec<Added> = record
        .entries
        .iter()
        .filter(|a| !hops.contains_key(&a.hop()))
        .cloned()
        .collect();
    for a in stale {
        match remove(&fd, &a) {
            Ok(true) => report.removed.push(format!(
                "neighbour {} dev {} removed (no backend's next hop now)",
                a.address, a.dev
            )),
            Ok(false) => {}
            Err(e) => {
                report.problems.push(format!(
                    "neighbour {} dev {}: no backend's next hop now, but removing it failed: {e}",
                    a.address, a.dev
                ));
                continue;
            }
        }
        record.entries.remove(&a);
    }
    save(record_at, &record)?;
    Ok(report)
}

/// `--cleanup`: removes the entries the record at `record_at` names that
/// are still managed, in this network namespace only, and the record.
/// One line per entry removed, or says why nothing was.
pub fn restore(record_at: &Path) -> anyhow::Result<Vec<String>> {
    let Some(record) = load_record(record_at)? else {
        return Ok(Vec::new());
    };
    let here = current_netns()?;
    if record.netns != here {
        return Ok(vec![format!(
            "neighbour entries not removed: the daemon added them in network namespace {} and \
             this is {here}; run --cleanup there ({} kept)",
            record.netns,
            record_at.display()
        )]);
    }
    let fd = crate::netlink::route_socket()?;
    let mut lines = Vec::new();
    for a in &record.entries {
        match remove(&fd, a) {
            Ok(true) => lines.push(format!("removed neighbour {} dev {}", a.address, a.dev)),
            Ok(false) => {}
            Err(e) => anyhow::bail!("removing neighbour {} dev {}: {e}", a.address, a.dev),
        }
    }
    std::fs::remove_file(record_at)
        .map_err(|e| anyhow::anyhow!("removing {}: {e}", record_at.display()))?;
    Ok(lines)
}
