//! VIP announcement through an existing BGP speaker: the daemon runs
//! `gobgpd` as its child and adds and withdraws the VIPs' /32 paths (/128
//! for IPv6, with `bgp.next_hop6` as next hop) with the `gobgp` CLI over
//! the speaker's Unix socket.
//!
//! The speaker dies with the daemon (`PR_SET_PDEATHSIG`), so a daemon
//! killed outright drops its sessions at once and its peers withdraw
//! every path it announced; no hold timer has to run out. gobgpd listens
//! on port 179 as well as connecting out: GoBGP waits at least 5 s (plus
//! jitter) between its own connection attempts, so a peer that connects
//! first (BIRD retries every second if told to) brings the session up
//! sooner. It is started before the daemon drops its capabilities, so it
//! may bind the privileged port.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::config::BgpConfig;

#[derive(Debug, thiserror::Error)]
pub enum BgpError {
    #[error(
        "bgp.gobgpd: starting {path}: {source} (install the gobgpd package, or set bgp.gobgpd)"
    )]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("gobgpd exited before its API answered: {0}")]
    Exited(String),
    #[error("gobgpd's API did not answer on {0} within 10 s")]
    NoApi(PathBuf),
    #[error("{what}: {detail}")]
    Cli { what: String, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A session as `router status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpSession {
    pub peer: Ipv4Addr,
    pub peer_as: u32,
    /// `established`, `active`, `connect`, …
    pub state: String,
}

/// The speaker's state for `router status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpStatus {
    pub local_as: u32,
    pub router_id: String,
    pub sessions: Vec<BgpSession>,
    /// VIPs announced, as /32 (IPv6: /128) prefixes.
    pub announced: Vec<String>,
}

/// The gobgpd config for `cfg`: the global section and one neighbour per
/// peer, with `cfg.hold_time` (keepalives at a third of it). With an IPv6
/// next hop the sessions carry IPv6 unicast too; without, gobgpd's default
/// (IPv4 unicast) is left as it was.
pub fn gobgpd_config(cfg: &BgpConfig) -> String {
    let hold = cfg.hold_time.as_secs().max(3);
    let mut s = format!(
        "[global.config]\n  as = {}\n  router-id = \"{}\"\n  port = 179\n",
        cfg.local_as, cfg.router_id
    );
    for p in &cfg.peers {
        let _ = write!(
            s,
            "\n[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{}\"\n    peer-as = {}\n  \
             [neighbors.timers.config]\n    hold-time = {hold}\n    keepalive-interval = {}\n    \
             connect-retry = 1\n",
            p.address,
            p.asn,
            (hold / 3).max(1)
        );
        if cfg.next_hop6.is_some() {
            for family in ["ipv4-unicast", "ipv6-unicast"] {
                let _ = write!(
                    s,
                    "  [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      \
                     afi-safi-name = \"{family}\"\n"
                );
            }
        }
    }
    s
}

/// A VIP's path: `198.18.0.1/32` or `2001:db8::1/128`.
fn prefix(vip: IpAddr) -> String {
    match vip {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

/// The `gobgp` arguments that add (`verb` "add") or withdraw ("del") the
/// path of `vip`; an IPv6 path is added with `next_hop6`, which the
/// config requires whenever a service listens on IPv6.
fn rib_args(verb: &str, vip: IpAddr, next_hop6: Option<std::net::Ipv6Addr>) -> Vec<String> {
    let family = if vip.is_ipv6() { "ipv6" } else { "ipv4" };
    let mut args: Vec<String> = ["global", "rib", verb, "-a", family, &prefix(vip)]
        .map(String::from)
        .to_vec();
    if let (true, "add", Some(nh)) = (vip.is_ipv6(), verb, next_hop6) {
        args.extend(["nexthop".to_string(), nh.to_string()]);
    }
    args
}

/// The running speaker.
pub struct Speaker {
    child: Child,
    socket: PathBuf,
    gobgp: PathBuf,
    cfg: BgpConfig,
    announced: BTreeSet<IpAddr>,
}

impl Speaker {
    /// Writes the config beside the daemon's `control_socket` and starts
    /// gobgpd with its API on a socket there too; returns once it answers.
    pub fn start(cfg: &BgpConfig, control_socket: &Path) -> Result<Self, BgpError> {
        let conf = crate::state_file::beside(control_socket, "gobgpd.toml");
        let socket = crate::state_file::beside(control_socket, "gobgpd.sock");
        std::fs::write(&conf, gobgpd_config(cfg)).map_err(|source| BgpError::Io {
            path: conf.clone(),
            source,
        })?;
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new(&cfg.gobgpd);
        cmd.arg("-f")
            .arg(&conf)
            .arg("--api-hosts")
            .arg(format!("unix://{}", socket.display()))
            .arg("--pprof-disable")
            .arg("--log-plain")
            .arg("--log-level")
            .arg("warn")
            .stdin(Stdio::null());
        // SAFETY: prctl(2) with integer arguments only, between fork and
        // exec: async-signal-safe, touching no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| BgpError::Spawn {
            path: cfg.gobgpd.clone(),
            source,
        })?;
        let mut sp = Speaker {
            child,
            socket,
            gobgp: cfg.gobgp.clone(),
            cfg: cfg.clone(),
            announced: BTreeSet::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = sp.child.try_wait() {
                return Err(BgpError::Exited(status.to_string()));
            }
            if sp.socket.exists() && sp.cli("gobgp global", &["global"]).is_ok() {
                return Ok(sp);
            }
            if Instant::now() > deadline {
                return Err(BgpError::NoApi(sp.socket.clone()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn cli(&self, what: &str, args: &[&str]) -> Result<String, BgpError> {
        let out = Command::new(&self.gobgp)
            .arg("--target")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| BgpError::Cli {
                what: what.into(),
                detail: format!("running {}: {e}", self.gobgp.display()),
            })?;
        if !out.status.success() {
            return Err(BgpError::Cli {
                what: what.into(),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Announces exactly `want`: adds the new VIPs and withdraws the rest.
    /// Returns one line per change, for the log.
    pub fn sync(&mut self, want: &BTreeSet<IpAddr>) -> Result<Vec<String>, BgpError> {
        let add: Vec<IpAddr> = want.difference(&self.announced).copied().collect();
        let del: Vec<IpAddr> = self.announced.difference(want).copied().collect();
        let mut lines = Vec::new();
        for (vips, verb, done) in [(add, "add", "announced"), (del, "del", "withdrew")] {
            for vip in vips {
                let prefix = prefix(vip);
                let args = rib_args(verb, vip, self.cfg.next_hop6);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                self.cli(&format!("{done} {prefix}"), &args)?;
                // Recorded path by path: a failure part-way leaves the set
                // true to what the speaker holds, and the next round retries.
                if verb == "add" {
                    self.announced.insert(vip);
                } else {
                    self.announced.remove(&vip);
                }
                lines.push(format!("{done} {prefix}"));
            }
        }
        Ok(lines)
    }

    /// Sessions and announced prefixes.
    pub fn status(&self) -> BgpStatus {
        #[derive(Deserialize)]
        struct Neighbor {
            state: NeighborState,
        }
        #[derive(Deserialize)]
        struct NeighborState {
            neighbor_address: String,
            #[serde(default)]
            peer_asn: u32,
            #[serde(default)]
            session_state: u32,
        }
        let sessions = self
            .cli("gobgp neighbor", &["-j", "neighbor"])
            .ok()
            .and_then(|j| serde_json::from_str::<Vec<Neighbor>>(&j).ok())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|n| {
                Some(BgpSession {
                    peer: n.state.neighbor_address.parse().ok()?,
                    peer_as: n.state.peer_asn,
                    state: session_state(n.state.session_state).into(),
                })
            })
            .collect();
        BgpStatus {
            local_as: self.cfg.local_as,
            router_id: self.cfg.router_id.to_string(),
            sessions,
            announced: self.announced.iter().map(|v| prefix(*v)).collect(),
        }
    }

    /// SIGTERM's order: withdraw every VIP, wait `drain` so the peers move
    /// new flows elsewhere, then end the sessions.
    pub fn shut_down(mut self) {
        match self.sync(&BTreeSet::new()) {
            Ok(lines) => {
                for l in lines {
                    tracing::info!("bgp: {l}");
                }
                tracing::info!(
                    "bgp: waiting {:?} before ending the sessions",
                    self.cfg.drain
                );
                std::thread::sleep(self.cfg.drain);
            }
            Err(e) => tracing::warn!("bgp: withdrawing on stop: {e}"),
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// gobgp's `SessionState` enum, by name.
fn session_state(code: u32) -> &'static str {
    match code {
        1 => "idle",
        2 => "connect",
        3 => "active",
        4 => "opensent",
        5 => "openconfirm",
        6 => "established",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gobgpd_config_holds_every_peer_and_the_hold_time() {
        let cfg = BgpConfig {
            local_as: 65001,
            router_id: Ipv4Addr::new(198, 18, 0, 1),
            peers: vec![
                crate::config::BgpPeer {
                    address: Ipv4Addr::new(198, 18, 0, 254),
                    asn: 65000,
                },
                crate::config::BgpPeer {
                    address: Ipv4Addr::new(198, 18, 0, 253),
                    asn: 65002,
                },
            ],
            hold_time: Duration::from_secs(6),
            drain: Duration::from_secs(1),
            next_hop6: None,
            gobgpd: "gobgpd".into(),
            gobgp: "gobgp".into(),
        };
        let text = gobgpd_config(&cfg);
        let doc: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(doc["global"]["config"]["as"].as_integer(), Some(65001));
        assert_eq!(doc["global"]["config"]["port"].as_integer(), Some(179));
        let n = doc["neighbors"].as_array().unwrap();
        assert_eq!(n.len(), 2);
        assert_eq!(
            n[1]["config"]["neighbor-address"].as_str(),
            Some("198.18.0.253")
        );
        assert_eq!(n[1]["config"]["peer-as"].as_integer(), Some(65002));
        assert_eq!(n[0]["timers"]["config"]["hold-time"].as_integer(), Some(6));
        assert_eq!(
            n[0]["timers"]["config"]["keepalive-interval"].as_integer(),
            Some(2)
        );
        assert_eq!(session_state(6), "established");
        assert!(
            n[0].get("afi-safis").is_none(),
            "IPv4 only: gobgpd's default"
        );

        let v6 = gobgpd_config(&BgpConfig {
            next_hop6: Some("2001:db8::2".parse().unwrap()),
            ..cfg
        });
        let doc: toml::Value = toml::from_str(&v6).unwrap();
        for n in doc["neighbors"].as_array().unwrap() {
            let families: Vec<&str> = n["afi-safis"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["config"]["afi-safi-name"].as_str().unwrap())
                .collect();
            assert_eq!(families, ["ipv4-unicast", "ipv6-unicast"]);
            assert_eq!(n["timers"]["config"]["hold-time"].as_integer(), Some(6));
        }
    }

    #[test]
    fn an_ipv6_vip_is_a_128_path_with_the_ipv6_next_hop() {
        let nh = Some("2001:db8::2".parse().unwrap());
        let v4: IpAddr = "198.18.0.10".parse().unwrap();
        let v6: IpAddr = "2001:db8::10".parse().unwrap();
        assert_eq!(
            rib_args("add", v4, nh),
            ["global", "rib", "add", "-a", "ipv4", "198.18.0.10/32"]
        );
        assert_eq!(
            rib_args("add", v6, nh),
            [
                "global",
                "rib",
                "add",
                "-a",
                "ipv6",
                "2001:db8::10/128",
                "nexthop",
                "2001:db8::2"
            ]
        );
        assert_eq!(
            rib_args("del", v6, nh),
            ["global", "rib", "del", "-a", "ipv6", "2001:db8::10/128"]
        );
    }
}
