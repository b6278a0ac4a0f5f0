//! The L4 benchmark's contenders: what each one is, and how its front is
//! set up on a fresh one-arm topology (the router's daemon, kube-proxy's
//! iptables or nftables rules, HAProxy, or for the routed hop only routes
//! and sysctls). Everything set up here lives in the topology's namespaces
//! and goes with them; nothing here measures.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use router_testkit::{
    daemon_proc::{Daemon, start_daemon},
    netns::{self, ChildGuard, Topology},
};

use crate::peers::{self, HAPROXY, IPTABLES, NFT, NGINX, WRK};

pub(super) const BACKENDS: usize = 4;
pub(super) const PORT: u16 = 80;
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
/// The router's dedicated SNAT address (see docs/operations.md).
const SNAT: Ipv4Addr = netns::SNAT_ADDR;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    Direct,
    Routed,
    Router,
    Iptables,
    Nftables,
    Haproxy,
}

impl Contender {
    pub const ALL: [Contender; 6] = [
        Contender::Direct,
        Contender::Routed,
        Contender::Router,
        Contender::Iptables,
        Contender::Nftables,
        Contender::Haproxy,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::Routed => "routed",
            Contender::Router => "router",
            Contender::Iptables => "iptables",
            Contender::Nftables => "nftables",
            Contender::Haproxy => "haproxy",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Contender::Direct => "direct to the backends (limit)",
            Contender::Routed => {
                "routed hop: kernel IP forwarding through the LB namespace, no NAT, no XDP"
            }
            Contender::Router => "router (XDP NAT + SNAT)",
            Contender::Iptables => "iptables DNAT, statistic random + masquerade",
            Contender::Nftables => "nftables DNAT, numgen + masquerade",
            Contender::Haproxy => "HAProxy 2.6, TCP mode, roundrobin",
        }
    }

    /// The references every ratio is taken against: always run, and a
    /// failure fails the benchmark.
    pub(super) fn is_reference(self) -> bool {
        matches!(self, Contender::Direct | Contender::Routed)
    }

    /// Whether the client connects to the backends' own addresses (and wrk
    /// gives each thread its own backend) rather than to the VIP.
    pub(super) fn to_backends(self) -> bool {
        matches!(self, Contender::Direct | Contender::Routed)
    }

    pub(super) fn peers(self) -> Vec<(&'static str, &'static str)> {
        match self {
            Contender::Direct | Contender::Routed | Contender::Router => vec![NGINX, WRK],
            Contender::Iptables => vec![NGINX, WRK, IPTABLES],
            Contender::Nftables => vec![NGINX, WRK, NFT],
            Contender::Haproxy => vec![NGINX, WRK, HAPROXY],
        }
    }
}

/// The front of one contender, torn down on drop (the daemon is asked to
/// detach first; the rules go with the namespace).
pub(super) enum Front {
    None,
    Router(Daemon, PathBuf),
    Proxy(#[expect(dead_code, reason = "held for its Drop, which stops HAProxy")] ChildGuard),
}

pub(super) fn backend_targets() -> Vec<SocketAddr> {
    (0..BACKENDS)
        .map(|i| SocketAddr::from((netns::backend_addr(i), PORT)))
        .collect()
}

pub(super) fn vip() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, PORT))
}

pub(super) fn router_config(socket: &Path) -> String {
    let mut s = format!(
        "[daemon]\ninterface = \"{}\"\ncontrol_socket = \"{}\"\n\
         # Sized per docs/operations.md: 2 entries a connection, and a closed\n\
         # connection keeps its entries for tcp_closing_timeout (10 s).\n\
         conn_table_size = 1048576\n\n\
         [[service]]\nname = \"web\"\nvip = \"{}\"\nprotocol = \"tcp\"\nsnat = \"{SNAT}\"\n",
        netns::LB_IF,
        socket.display(),
        vip()
    );
    for (i, t) in backend_targets().iter().enumerate() {
        s.push_str(&format!(
            "\n[[service.backend]]\nname = \"b{i}\"\naddress = \"{t}\"\nweight = 100\n"
        ));
    }
    s
}

/// kube-proxy's iptables mode for one ClusterIP service with four endpoints
/// and masquerading (KUBE-MARK-MASQ / KUBE-POSTROUTING, `--random-fully`).
pub(super) fn iptables_rules() -> String {
    let mut s = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-SVC-BENCH - [0:0]\n",
    );
    for i in 0..BACKENDS {
        s.push_str(&format!(":KUBE-SEP-{i} - [0:0]\n"));
    }
    s.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -j MASQUERADE --random-fully\n",
    );
    s.push_str(&format!(
        "-A KUBE-SERVICES -d {VIP}/32 -p tcp -m tcp --dport {PORT} -j KUBE-SVC-BENCH\n\
         -A KUBE-SVC-BENCH -d {VIP}/32 -p tcp -m tcp --dport {PORT} -j KUBE-MARK-MASQ\n"
    ));
    for (i, t) in backend_targets().iter().enumerate() {
        let left = BACKENDS - i;
        if left > 1 {
            s.push_str(&format!(
                "-A KUBE-SVC-BENCH -m statistic --mode random --probability {:.11} -j KUBE-SEP-{i}\n",
                1.0 / left as f64
            ));
        } else {
            s.push_str(&format!("-A KUBE-SVC-BENCH -j KUBE-SEP-{i}\n"));
        }
        s.push_str(&format!(
            "-A KUBE-SEP-{i} -p tcp -m tcp -j DNAT --to-destination {t}\n"
        ));
    }
    s.push_str("COMMIT\n");
    s
}

/// kube-proxy's nftables mode for the same service: a verdict map from
/// destination to the service chain, `numgen random mod N` over endpoint
/// chains, masquerade of marked packets.
pub(super) fn nft_rules() -> String {
    let mut endpoints = String::new();
    let mut vmap = Vec::new();
    for (i, t) in backend_targets().iter().enumerate() {
        endpoints.push_str(&format!(
            "  chain endpoint-{i} {{\n    meta l4proto tcp dnat to {t}\n  }}\n"
        ));
        vmap.push(format!("{i} : goto endpoint-{i}"));
    }
    format!(
        "table ip kube-proxy {{\n\
         \x20 map service-ips {{\n    type ipv4_addr . inet_proto . inet_service : verdict\n    \
         elements = {{ {VIP} . tcp . {PORT} : goto service-bench }}\n  }}\n\
         \x20 chain mark-for-masquerade {{\n    mark set mark or 0x4000\n  }}\n\
         \x20 chain masquerading {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
         mark and 0x4000 == 0 return\n    mark set mark xor 0x4000\n    masquerade fully-random\n  }}\n\
         \x20 chain nat-prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         jump services\n  }}\n\
         \x20 chain services {{\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }}\n\
         \x20 chain service-bench {{\n    ip daddr {VIP} tcp dport {PORT} jump mark-for-masquerade\n    \
         numgen random mod {BACKENDS} vmap {{ {} }}\n  }}\n{endpoints}}}\n",
        vmap.join(", ")
    )
}

/// HAProxy as its documentation's TCP-mode examples set it up: the
/// defaults' timeouts, roundrobin, no health checks needed here.
pub(super) fn haproxy_config() -> String {
    let mut s = format!(
        "global\n    # maxconn: HAProxy derives it from the file-descriptor limit.\n\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\n\
         frontend fe\n    bind {}\n    default_backend be\n\n\
         backend be\n    balance roundrobin\n",
        vip()
    );
    for (i, t) in backend_targets().iter().enumerate() {
        s.push_str(&format!("    server b{i} {t}\n"));
    }
    s
}

pub(super) fn setup_front(c: Contender, topo: &Topology, dir: &Path) -> Result<Front> {
    let lb = topo.lb_ns();
    Ok(match c {
        Contender::Direct => Front::None,
        Contender::Routed => {
            route_through_lb(topo)?;
            Front::None
        }
        Contender::Router => {
            topo.add_snat_addr()?;
            let socket = dir.join("router.sock");
            let config = dir.join("router.toml");
            std::fs::write(&config, router_config(&socket))?;
            Front::Router(start_daemon(lb, &config, &socket)?, socket)
        }
        Contender::Iptables => {
            peers::exec_with_input(lb, "iptables-restore", &[], &iptables_rules())?;
            Front::None
        }
        Contender::Nftables => {
            peers::exec_with_input(lb, "nft", &["-f", "-"], &nft_rules())?;
            Front::None
        }
        Contender::Haproxy => {
            // The proxy host's sysctls HAProxy's own tuning notes recommend
            // for high connection rates (source-port reuse and range, SYN
            // backlog): it opens a connection of its own to a backend for
            // every client connection.
            netns::in_netns(lb, || -> std::io::Result<()> {
                std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")?;
                std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65023")?;
                std::fs::write("/proc/sys/net/ipv4/tcp_max_syn_backlog", "60000")
            })?
            .context("setting HAProxy's recommended sysctls in the LB namespace")?;
            netns::exec(
                lb,
                &["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"],
            )?;
            Front::Proxy(peers::start_haproxy(lb, &haproxy_config(), dir, vip())?)
        }
    })
}

/// The routed hop: the client reaches each backend, and each backend the
/// client, by a /32 route via the LB's address, and the LB namespace
/// forwards (no NAT, no XDP, no rules). The LB must not send ICMP
/// redirects (`send_redirects` is or'ed over `all` and the interface):
/// client and backends share its segment, so the kernel would otherwise
/// tell the client to go direct and the hop would disappear. Reverse-path
/// filtering is off in the LB namespace (the prepared topology) and in
/// the others (a fresh namespace's default); the benchmark checks the LB's
/// `IpForwDatagrams` after every run, so a bypassed hop fails loudly.
fn route_through_lb(topo: &Topology) -> Result<()> {
    let lb_ns = topo.lb_ns();
    netns::in_netns(lb_ns, || -> std::io::Result<()> {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
        for conf in ["all", "default", netns::LB_IF] {
            let dir = format!("/proc/sys/net/ipv4/conf/{conf}");
            std::fs::write(format!("{dir}/send_redirects"), "0")?;
            std::fs::write(format!("{dir}/rp_filter"), "0")?;
        }
        std::fs::write(
            format!("/proc/sys/net/ipv4/conf/{}/forwarding", netns::LB_IF),
            "1",
        )
    })?
    .context("making the LB namespace a router that sends no redirects")?;
    let via = netns::LB_ADDR.to_string();
    for i in 0..BACKENDS {
        let backend = format!("{}/32", netns::backend_addr(i));
        netns::exec(
            topo.client_ns(),
            &["ip", "route", "add", &backend, "via", &via],
        )?;
        let client = format!("{}/32", netns::CLIENT_ADDR);
        netns::exec(
            topo.backend_ns(i),
            &["ip", "route", "add", &client, "via", &via],
        )?;
    }
    Ok(())
}
