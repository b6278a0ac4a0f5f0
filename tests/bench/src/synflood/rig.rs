//! The rig every flood scenario starts from: a one-arm topology, HTTP
//! backends, a blackhole for spoofed sources and the daemon; and the SYN
//! the flood varies.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use router::api::StatusReply;
use router_testkit::{
    daemon_proc::{self, ScratchDir, one_arm_config, start_daemon},
    netns::{self, ChildGuard, Topology},
    packet::{Packet, TCP_SYN},
};

use super::{SPOOF_NET, VIP, VIP_ADDR};

/// A SYN to the VIP from the client's interface to the LB's, for
/// [`spoofed_syn`](router_testkit::packet::spoofed_syn) to vary.
pub fn syn_template(lb_mac: [u8; 6], client_mac: [u8; 6]) -> Vec<u8> {
    let src = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 1), 1024);
    Packet::tcp(src, VIP_ADDR, TCP_SYN)
        .with_macs(lb_mac, client_mac)
        .build()
}

/// The rig every flood scenario starts from: topology, HTTP backends, a
/// blackhole for spoofed sources, and the daemon.
pub struct Rig {
    pub topo: Topology,
    pub socket: std::path::PathBuf,
    pub lb_mac: [u8; 6],
    pub client_mac: [u8; 6],
    daemon: Option<router_testkit::daemon_proc::Daemon>,
    _backends: Vec<ChildGuard>,
    _dir: ScratchDir,
}

impl Rig {
    /// Builds the rig; `daemon_extra` is inserted into the config's
    /// `[daemon]` table (e.g. `conn_table_size = 8192`). The service
    /// translates to the LB's address and, with `snat_extra`, to further
    /// addresses that are added to the LB's interface.
    pub fn new(
        tag: &str,
        backends: usize,
        daemon_extra: &str,
        snat_extra: &[Ipv4Addr],
    ) -> Result<Rig> {
        let topo = Topology::one_arm(backends)?;
        for a in snat_extra {
            netns::exec(
                topo.lb_ns(),
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{a}/{}", netns::PREFIX_LEN),
                    "dev",
                    topo.lb_if(),
                ],
            )?;
        }
        let guards = topo.spawn_fixture_backends(8000)?;
        // Replies to spoofed sources die here, silently (no ICMP).
        netns::exec(
            topo.lb_ns(),
            &["ip", "route", "add", "blackhole", SPOOF_NET],
        )?;
        // The LB reaches every backend once, which also resolves their
        // neighbours before the first balanced packet.
        for i in 0..backends {
            netns::wait_for_tcp(
                topo.lb_ns(),
                SocketAddr::new(netns::backend_addr(i).into(), 8000),
                Duration::from_secs(5),
            )?;
        }
        let dir = ScratchDir::new(tag)?;
        let socket = dir.0.join("router.sock");
        let config = dir.0.join("router.toml");
        let list: Vec<(String, String, u32)> = (0..backends)
            .map(|i| {
                (
                    format!("b{i}"),
                    format!("{}:8000", netns::backend_addr(i)),
                    100,
                )
            })
            .collect();
        let mut text = one_arm_config(&socket, topo.lb_if(), VIP, netns::LB_ADDR, &list).replacen(
            "[daemon]\n",
            &format!("[daemon]\n{daemon_extra}"),
            1,
        );
        if !snat_extra.is_empty() {
            let all: Vec<String> = std::iter::once(netns::LB_ADDR)
                .chain(snat_extra.iter().copied())
                .map(|a| format!("\"{a}\""))
                .collect();
            text = text.replacen(
                &format!("snat = \"{}\"", netns::LB_ADDR),
                &format!("snat = [{}]", all.join(", ")),
                1,
            );
        }
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        let daemon = start_daemon(topo.lb_ns(), &config, &socket)?;
        let lb_mac = netns::mac_address(topo.lb_ns(), topo.lb_if())?;
        let client_mac = netns::mac_address(topo.client_ns(), topo.client_if())?;
        Ok(Rig {
            topo,
            socket,
            lb_mac,
            client_mac,
            daemon: Some(daemon),
            _backends: guards,
            _dir: dir,
        })
    }

    pub fn status(&self) -> Result<StatusReply> {
        daemon_proc::status(&self.socket)
    }

    /// `n` short GETs through the VIP from the client; returns (attempts,
    /// failures, first errors).
    pub fn short_gets(&self, n: usize) -> Result<(u64, u64, Vec<String>)> {
        let vip = SocketAddr::V4(VIP_ADDR);
        netns::in_netns(self.topo.client_ns(), move || {
            let mut failures = 0u64;
            let mut errors = Vec::new();
            for _ in 0..n {
                if let Err(e) = get_ok(vip) {
                    failures += 1;
                    if errors.len() < 5 {
                        errors.push(format!("{e:#}"));
                    }
                }
            }
            (n as u64, failures, errors)
        })
    }

    /// One unlabelled gauge or counter from the daemon's `/metrics` (served
    /// in the LB's namespace on the default 127.0.0.1:9090).
    pub fn metric(&self, name: &str) -> Result<f64> {
        let addr = SocketAddr::from(([127, 0, 0, 1], 9090));
        let r = netns::in_netns(self.topo.lb_ns(), move || {
            netns::http_get(addr, "/metrics", Duration::from_secs(5))
        })??;
        ensure!(r.status == 200, "/metrics answered {}", r.status);
        // An unlabelled sample reads `name{} value` or `name value`.
        r.body
            .lines()
            .find_map(|l| {
                let rest = l.strip_prefix(name)?;
                let value = rest.strip_prefix("{}").unwrap_or(rest).strip_prefix(' ')?;
                value.trim().parse().ok()
            })
            .with_context(|| format!("no {name} in /metrics"))
    }

    /// Stops the daemon (SIGTERM, so it detaches) and checks it exited cleanly.
    pub fn stop(mut self) -> Result<()> {
        if let Some(d) = self.daemon.take() {
            let code = d.stop(Duration::from_secs(10))?;
            ensure!(code.success(), "daemon exit status {code}");
        }
        Ok(())
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            let _ = d.stop(Duration::from_secs(10));
        }
    }
}

/// One GET / through the VIP that must answer 200 with a backend's name.
/// The timeout covers connect (and each read): 10 s lets TCP retransmit a
/// SYN lost to congestion three times (after 1, 3 and 7 s).
pub(super) fn get_ok(vip: SocketAddr) -> Result<()> {
    let r = netns::http_get(vip, "/", Duration::from_secs(10))?;
    ensure!(
        r.status == 200 && r.body.starts_with('b'),
        "unexpected answer {} {:?}",
        r.status,
        r.body
    );
    Ok(())
}
