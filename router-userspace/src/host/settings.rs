//! The per-interface kernel settings the datapath needs, which the daemon
//! arranges when it attaches and `router daemon --cleanup` gives back.
//!
//! - `forwarding = 1`: `bpf_fib_lookup` refuses every next hop on an
//!   interface without it (BPF_FIB_LKUP_RET_FWD_DISABLED), and the stack
//!   will not forward what the program hands it either.
//! - `accept_local = 1` and an `rp_filter` that is not strict: a flow whose
//!   next hop has no neighbour entry yet is handed to the stack already
//!   translated (counter `pass_fib_failed`), so the stack resolves the
//!   neighbour. That packet's source is the LB's own SNAT address, which
//!   the stack drops as a martian unless `accept_local` is on; a strict
//!   reverse-path check drops it too, since the route back to a local
//!   address is `lo`. Loose mode (2) passes it.
//!
//! Only the interface's own keys are written. The kernel takes the larger
//! of `all` and the interface's `rp_filter`, so loose on the interface is
//! loose whatever `all` says (strict 1 < loose 2); `accept_local` and
//! `forwarding` of the interface decide by themselves. Other interfaces
//! are never touched, and host-wide keys only for IPv6 services:
//!
//! - `net.ipv6.conf.all.forwarding = 1`, with a config that has an IPv6
//!   service: a packet `router_v6` encapsulates but finds no neighbour for
//!   is passed to the stack to forward, and the stack forwards IPv6 only
//!   with the host-wide key on (ip6_forward reads `all`; setting it sets
//!   every interface's key too, which `bpf_fib_lookup` reads). The host
//!   then stops taking router advertisements where `accept_ra` is 1.
//!
//! What was changed, and the value before, is kept in a file beside the
//! control socket with the network namespace it applies to: sysctls are
//! per namespace, and `--cleanup` run from another namespace must not
//! write an interface of the same name there.

use std::{
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::state_file;

/// One setting the datapath needs on an interface, and what it is now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// An interface, or `all` (IPv6 `forwarding` only).
    pub iface: String,
    /// The key under `net.<family>.conf.<iface>.`.
    pub key: String,
    pub from: String,
    pub to: String,
    /// Left out of the record for IPv4, which is what a record without it
    /// (written before IPv6 services) means.
    #[serde(default, skip_serializing_if = "Family::is_ipv4")]
    pub family: Family,
}

/// Which `net.<family>.conf` tree a key is in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    Ipv4,
    Ipv6,
}

impl Family {
    fn is_ipv4(&self) -> bool {
        *self == Family::Ipv4
    }

    fn dir(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }
}

impl Change {
    /// `net.ipv4.conf.lb0.rp_filter 1 → 2 (why)`.
    pub fn describe(&self) -> String {
        format!(
            "{} {} → {} ({})",
            self.name(),
            self.from,
            self.to,
            why(self.family, &self.key)
        )
    }

    /// `net.ipv4.conf.lb0.rp_filter`.
    fn name(&self) -> String {
        format!("net.{}.conf.{}.{}", self.family.dir(), self.iface, self.key)
    }
}

fn why(family: Family, key: &str) -> &'static str {
    match (family, key) {
        (Family::Ipv6, _) => {
            "an IPv6 service's packet with an unresolved neighbour is forwarded by the stack, \
             which forwards IPv6 only with it; router advertisements are ignored where accept_ra \
             is 1"
        }
        (_, "forwarding") => "bpf_fib_lookup resolves no next hop without it",
        (_, "accept_local") => {
            "a flow with an unresolved neighbour reaches the stack with the LB's own source"
        }
        (_, "rp_filter") => {
            "a strict reverse-path check drops translated packets handed to the stack; loose passes them"
        }
        _ => "needed by the datapath",
    }
}

/// The keys this module writes: a record naming any other is refused.
const KEYS: [&str; 3] = ["forwarding", "accept_local", "rp_filter"];
/// The IPv6 keys it writes.
const KEYS6: [&str; 1] = ["forwarding"];

/// A name the kernel accepts for an interface (`dev_valid_name`): it is
/// joined into a path under /proc/sys, so `..` or a `/` would leave it.
fn valid_iface(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

/// Every value these keys take: forwarding and accept_local 0 or 1,
/// rp_filter 0 (off), 1 (strict) or 2 (loose).
fn valid_value(v: &str) -> bool {
    matches!(v, "0" | "1" | "2")
}

fn conf_path(family: Family, iface: &str, key: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/net/{}/conf/{iface}/{key}", family.dir()))
}

fn read(iface: &str, key: &str) -> io::Result<String> {
    read_in(Family::Ipv4, iface, key)
}

fn read_in(family: Family, iface: &str, key: &str) -> io::Result<String> {
    let path = conf_path(family, iface, key);
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))
}

fn write(c: &Change, value: &str) -> io::Result<()> {
    let path = conf_path(c.family, &c.iface, &c.key);
    std::fs::write(&path, value)
        .map_err(|e| io::Error::new(e.kind(), format!("writing {}: {e}", path.display())))
}

/// The settings of `iface` that differ from what the datapath needs, read
/// from this process's network namespace.
pub fn needed(iface: &str) -> io::Result<Vec<Change>> {
    let all = |key: &str| read("all", key);
    let mut out = Vec::new();
    let forwarding = read(iface, "forwarding")?;
    if forwarding != "1" {
        out.push(change(iface, "forwarding", forwarding, "1"));
    }
    let accept_local = read(iface, "accept_local")?;
    if accept_local != "1" && all("accept_local")? != "1" {
        out.push(change(iface, "accept_local", accept_local, "1"));
    }
    let rp_filter = read(iface, "rp_filter")?;
    let effective = rp_filter
        .parse::<u8>()
        .unwrap_or(0)
        .max(all("rp_filter")?.parse::<u8>().unwrap_or(0));
    if effective == 1 {
        out.push(change(iface, "rp_filter", rp_filter, "2"));
    }
    Ok(out)
}

/// What IPv6 services need on this host with the datapath on `ifaces`:
/// IPv6 forwarding host-wide, or, where that is on already, on each
/// interface that was turned off since.
pub fn needed_ipv6(ifaces: &[String]) -> io::Result<Vec<Change>> {
    let all = read_in(Family::Ipv6, "all", "forwarding")?;
    if all != "1" {
        return Ok(vec![Change {
            family: Family::Ipv6,
            ..change("all", "forwarding", all, "1")
        }]);
    }
    let mut out = Vec::new();
    for iface in ifaces {
        let v = read_in(Family::Ipv6, iface, "forwarding")?;
        if v != "1" {
            out.push(Change {
                family: Family::Ipv6,
                ..change(iface, "forwarding", v, "1")
            });
        }
    }
    Ok(out)
}

fn change(iface: &str, key: &str, from: String, to: &str) -> Change {
    Change {
        iface: iface.to_string(),
        key: key.to_string(),
        from,
        to: to.to_string(),
        family: Family::Ipv4,
    }
}

/// The record of what the daemon changed, for `--cleanup`.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// `readlink /proc/self/ns/net` where the changes were made.
    pub netns: String,
    /// The first value each key had before any daemon changed it.
    pub changes: Vec<Change>,
}

impl Record {
    /// Whether every change is one this module makes. `--cleanup` runs as
    /// root and writes what a record says, while the daemon that wrote it
    /// may run as its own user (see `state_file`): a record is never more
    /// than these keys of a real interface name, set to 0, 1 or 2.
    fn check(&self, path: &Path) -> anyhow::Result<()> {
        for (i, c) in self.changes.iter().enumerate() {
            let problem = if !valid_iface(&c.iface) {
                format!("interface {:?} is not an interface name", c.iface)
            } else if !match c.family {
                Family::Ipv4 => &KEYS[..],
                Family::Ipv6 => &KEYS6[..],
            }
            .contains(&c.key.as_str())
            {
                format!(
                    "key {:?} is not one the daemon sets ({}; {} for IPv6)",
                    c.key,
                    KEYS.join(", "),
                    KEYS6.join(", ")
                )
            } else if !valid_value(&c.from) || !valid_value(&c.to) {
                format!("values {:?} → {:?} are not 0, 1 or 2", c.from, c.to)
            } else {
                continue;
            };
            anyhow::bail!(
                "{}: change {i}: {problem}; refusing to use the record, nothing was changed \
                 (remove it and check the interface settings by hand)",
                path.display()
            );
        }
        Ok(())
    }
}

/// The record at `path`, checked (see [`Record::check`]); `None` when there
/// is none. Read before anything is changed, so that a record that cannot
/// be used stops `--cleanup` with nothing removed.
pub fn load_record(path: &Path) -> anyhow::Result<Option<Record>> {
    let Some(bytes) = state_file::read(path)? else {
        return Ok(None);
    };
    let record: Record = serde_json::from_slice(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: corrupt ({e}); remove it", path.display()))?;
    record.check(path)?;
    Ok(Some(record))
}

/// `<control socket's directory>/<socket name>.host.json`.
pub fn record_path(control_socket: &Path) -> PathBuf {
    state_file::beside(control_socket, "host.json")
}

/// `readlink /proc/self/ns/net`: what a record says it applies to.
pub fn current_netns() -> io::Result<String> {
    std::fs::read_link("/proc/self/ns/net").map(|p| p.display().to_string())
}

/// Applies `changes`, recording each value before the first change so that
/// a restarted daemon (which finds its own values in place) does not
/// record those as the originals. The record is written before any
/// setting, so a crash in between leaves nothing unrecorded.
pub fn apply(record_at: &Path, changes: &[Change]) -> anyhow::Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    let netns = current_netns()?;
    let mut record = load_record(record_at)?.unwrap_or_default();
    if record.netns != netns {
        // A record of another namespace is of no use here; a daemon moved
        // between namespaces starts a new one.
        record = Record {
            netns,
            changes: Vec::new(),
        };
    }
    for c in changes {
        if !record
            .changes
            .iter()
            .any(|r| r.iface == c.iface && r.key == c.key && r.family == c.family)
        {
            record.changes.push(c.clone());
        }
    }
    state_file::write(record_at, &serde_json::to_vec_pretty(&record)?)?;
    for c in changes {
        write(c, &c.to)?;
    }
    Ok(())
}

/// Restores what the record at `record_at` says was changed, in this
/// network namespace only, and removes the record. Returns one line per
/// setting, or says why nothing was restored.
pub fn restore(record_at: &Path) -> anyhow::Result<Vec<String>> {
    match load_record(record_at)? {
        Some(record) => restore_record(record_at, &record, &current_netns()?),
        None => Ok(Vec::new()),
    }
}

/// [`restore`] with the record already loaded (by [`load_record`]), in the
/// network namespace `here` (from [`current_netns`]).
pub fn restore_record(
    record_at: &Path,
    record: &Record,
    here: &str,
) -> anyhow::Result<Vec<String>> {
    if record.netns != here {
        return Ok(vec![format!(
            "interface settings not restored: the daemon changed them in network namespace {} \
             and this is {here}; run --cleanup there ({} kept)",
            record.netns,
            record_at.display()
        )]);
    }
    let mut lines = Vec::new();
    for c in &record.changes {
        match write(c, &c.from) {
            Ok(()) => lines.push(format!("restored {} to {}", c.name(), c.from)),
            // The interface went away, and its settings with it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    std::fs::remove_file(record_at)
        .map_err(|e| anyhow::anyhow!("removing {}: {e}", record_at.display()))?;
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_say_what_and_why() {
        let c = change("lb0", "rp_filter", "1".into(), "2");
        let line = c.describe();
        assert!(
            line.starts_with("net.ipv4.conf.lb0.rp_filter 1 → 2 (") && line.contains("loose"),
            "{line}"
        );
    }

    #[test]
    fn ipv6_changes_name_their_tree_and_old_records_read_as_ipv4() {
        let c = Change {
            family: Family::Ipv6,
            ..change("all", "forwarding", "0".into(), "1")
        };
        let line = c.describe();
        assert!(
            line.starts_with("net.ipv6.conf.all.forwarding 0 → 1 (") && line.contains("accept_ra"),
            "{line}"
        );
        let v4 = change("lb0", "forwarding", "0".into(), "1");
        let json = serde_json::to_string(&v4).unwrap();
        assert!(!json.contains("family"), "IPv4 records as before: {json}");
        let old = r#"{"iface":"lb0","key":"forwarding","from":"0","to":"1"}"#;
        assert_eq!(serde_json::from_str::<Change>(old).unwrap(), v4);
        let back: Change = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn a_record_that_asks_for_more_than_these_settings_is_refused() {
        let dir = std::env::temp_dir().join(format!("router-host-bad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = record_path(&dir.join("router.sock"));
        let here = current_netns().unwrap();
        // Each would make root write somewhere else than a net.ipv4.conf
        // key of an interface, or something else than 0, 1 or 2. The valid
        // change beside it names an interface that does not exist, so that
        // even a broken check could not change this host.
        for (iface, key, from, why) in [
            (
                "../../../kernel",
                "core_pattern",
                "1",
                "not an interface name",
            ),
            ("..", "forwarding", "0", "not an interface name"),
            (
                "rt-none0",
                "../../all/forwarding",
                "0",
                "not one the daemon sets",
            ),
            ("rt-none0", "arp_announce", "0", "not one the daemon sets"),
            ("rt-none0", "forwarding", "|/tmp/x", "not 0, 1 or 2"),
        ] {
            let record = Record {
                netns: here.clone(),
                changes: vec![
                    change("rt-none0", "rp_filter", "0".into(), "2"),
                    change(iface, key, from.into(), "1"),
                ],
            };
            let body = serde_json::to_vec(&record).unwrap();
            state_file::write(&path, &body).unwrap();
            let err = format!("{:#}", restore(&path).unwrap_err());
            assert!(
                err.contains(why) && err.contains("nothing was changed"),
                "{iface}/{key}: {err}"
            );
            // Not even the valid first change was made, and the record stays.
            assert_eq!(std::fs::read(&path).unwrap(), body);
            let err = format!("{:#}", apply(&path, &record.changes[..1]).unwrap_err());
            assert!(err.contains(why), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_record_from_another_namespace_restores_nothing() {
        let dir = std::env::temp_dir().join(format!("router-host-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = record_path(&dir.join("router.sock"));
        let record = Record {
            netns: "net:[1]".into(),
            changes: vec![change("lo", "forwarding", "0".into(), "1")],
        };
        state_file::write(&path, &serde_json::to_vec(&record).unwrap()).unwrap();
        let lines = restore(&path).unwrap();
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("not restored") && lines[0].contains("net:[1]"));
        assert!(path.exists(), "kept for a --cleanup in the right namespace");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
