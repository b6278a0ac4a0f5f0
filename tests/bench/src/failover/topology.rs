//! The multi-node topology (see `failover`): a client behind an upstream router running
//! BIRD 2 (ECMP over what it learns: `merge paths on`, layer-4 multipath
//! hashing), two LB namespaces on the router's LAN, and backends that hold
//! the VIP on `lo` and run `router decap`. Every namespace is removed on
//! drop, also when building fails halfway.

use std::time::Duration;

use anyhow::{Context, Result};
use router_testkit::{
    netns::{self, ChildGuard},
    veth_xdp::XdpPassGuard,
};

pub const VIP: &str = "198.18.100.1:8000";
pub const VIP_ADDR: &str = "198.18.100.1";
pub const ROUTER_LAN: &str = "198.18.1.254";
pub const ROUTER_AS: u32 = 65000;
pub const LB_AS: u32 = 65001;
pub const CLIENT: &str = "198.18.2.2";
/// The IPv6 twins (the benchmarking range 2001:2::/48, as 198.18.0.0/15
/// is IPv4's), for the IPv6 rig.
pub const VIP6: &str = "[2001:2:100::1]:8000";
pub const VIP6_ADDR: &str = "2001:2:100::1";
pub const ROUTER_LAN6: &str = "2001:2:1::fe";
pub const CLIENT6: &str = "2001:2:2::2";

pub fn lb_addr6(i: usize) -> String {
    format!("2001:2:1::{}", i + 1)
}

pub fn backend_addr6(i: usize) -> String {
    format!("2001:2:1::{}", i + 11)
}

pub fn lb_addr(i: usize) -> String {
    format!("198.18.1.{}", i + 1)
}

pub fn backend_addr(i: usize) -> String {
    format!("198.18.1.{}", i + 11)
}

pub struct MultiNode {
    namespaces: Vec<String>,
    pub switch: String,
    pub router: String,
    pub client: String,
    pub lbs: Vec<String>,
    pub backends: Vec<String>,
    pub bird_socket: String,
    /// IPv6 beside IPv4 on every link, the VIP's route an IPv6 one.
    pub ipv6: bool,
    // Dropped before the namespaces go.
    pub bird: Option<ChildGuard>,
    peer_xdp: Vec<XdpPassGuard>,
}

impl Drop for MultiNode {
    fn drop(&mut self) {
        self.bird.take();
        self.peer_xdp.clear();
        for ns in self.namespaces.iter().rev() {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
        let _ = std::fs::remove_file(&self.bird_socket);
    }
}

fn sh(ns: &str, cmd: &str) -> Result<String> {
    let args: Vec<&str> = cmd.split_whitespace().collect();
    netns::exec(ns, &args).with_context(|| format!("{ns}: {cmd}"))
}

impl MultiNode {
    /// The topology; with `ipv6`, every link carries IPv6 too and BIRD
    /// learns IPv6 paths (the VIP is then `VIP6`).
    pub fn build(lbs: usize, backends: usize, ipv6: bool) -> Result<Self> {
        let id = format!("rtmn{}", std::process::id());
        let mut t = MultiNode {
            namespaces: Vec::new(),
            switch: format!("{id}-sw"),
            router: format!("{id}-rt"),
            client: format!("{id}-cl"),
            lbs: (0..lbs).map(|i| format!("{id}-lb{i}")).collect(),
            backends: (0..backends).map(|i| format!("{id}-b{i}")).collect(),
            bird_socket: format!("/tmp/{id}-bird.ctl"),
            ipv6,
            bird: None,
            peer_xdp: Vec::new(),
        };
        for ns in [&t.switch, &t.router, &t.client]
            .into_iter()
            .chain(&t.lbs)
            .chain(&t.backends)
            .cloned()
            .collect::<Vec<_>>()
        {
            std::process::Command::new("ip")
                .args(["netns", "add", &ns])
                .status()
                .context("ip netns add")?;
            t.namespaces.push(ns.clone());
            sh(&ns, "ip link set lo up")?;
            if ipv6 {
                // Addresses usable at once: no duplicate address detection.
                sh(&ns, "sysctl -q -w net.ipv6.conf.all.accept_dad=0")?;
                sh(&ns, "sysctl -q -w net.ipv6.conf.default.accept_dad=0")?;
            } else {
                let _ = sh(&ns, "sysctl -q -w net.ipv6.conf.all.disable_ipv6=1");
            }
        }
        let sw = t.switch.clone();
        sh(&sw, "ip link add br0 type bridge")?;
        sh(&sw, "ip link set br0 up")?;
        // The router's LAN side, the LBs and the backends share the bridge.
        let mut lan = vec![(
            t.router.clone(),
            "p-rt".to_string(),
            ROUTER_LAN.to_string(),
            ROUTER_LAN6.to_string(),
        )];
        for (i, lb) in t.lbs.iter().enumerate() {
            lan.push((lb.clone(), format!("p-lb{i}"), lb_addr(i), lb_addr6(i)));
        }
        for (i, b) in t.backends.iter().enumerate() {
            lan.push((
                b.clone(),
                format!("p-b{i}"),
                backend_addr(i),
                backend_addr6(i),
            ));
        }
        for (ns, peer, addr, addr6) in &lan {
            sh(
                &sw,
                &format!("ip link add {peer} type veth peer name eth0 netns {ns}"),
            )?;
            sh(&sw, &format!("ip link set {peer} master br0 up"))?;
            sh(ns, &format!("ip addr add {addr}/24 dev eth0"))?;
            if ipv6 {
                sh(ns, &format!("ip -6 addr add {addr6}/64 dev eth0 nodad"))?;
            }
            sh(ns, "ip link set eth0 up")?;
            netns::set_tx_checksum(ns, "eth0", false)?;
        }
        // An LB sends with native XDP_TX: its bridge port must run XDP.
        for i in 0..t.lbs.len() {
            t.peer_xdp
                .push(XdpPassGuard::attach(&sw, &format!("p-lb{i}"))?);
        }
        // Client ↔ router.
        let (rt, cl) = (t.router.clone(), t.client.clone());
        sh(
            &rt,
            &format!("ip link add r-cl type veth peer name eth0 netns {cl}"),
        )?;
        sh(&rt, "ip addr add 198.18.2.1/24 dev r-cl")?;
        sh(&rt, "ip link set r-cl up")?;
        sh(&cl, &format!("ip addr add {CLIENT}/24 dev eth0"))?;
        sh(&cl, "ip link set eth0 up")?;
        sh(&cl, "ip route add default via 198.18.2.1")?;
        for key in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.fib_multipath_hash_policy=1",
        ] {
            sh(&rt, &format!("sysctl -q -w {key}"))?;
        }
        if ipv6 {
            sh(&rt, "ip -6 addr add 2001:2:2::1/64 dev r-cl nodad")?;
            sh(&cl, &format!("ip -6 addr add {CLIENT6}/64 dev eth0 nodad"))?;
            sh(&cl, "ip -6 route add default via 2001:2:2::1")?;
            for key in [
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv6.fib_multipath_hash_policy=1",
            ] {
                sh(&rt, &format!("sysctl -q -w {key}"))?;
            }
        }
        // Backends: the VIP on lo, never answered for by ARP; replies to
        // clients through the router.
        for b in &t.backends {
            sh(b, &format!("ip addr add {VIP_ADDR}/32 dev lo"))?;
            sh(b, "sysctl -q -w net.ipv4.conf.all.arp_ignore=1")?;
            sh(b, "sysctl -q -w net.ipv4.conf.all.arp_announce=2")?;
            sh(b, &format!("ip route add default via {ROUTER_LAN}"))?;
            if ipv6 {
                // Neighbor Discovery answers only for the interface's own
                // addresses: the VIP on lo needs no arp_ignore twin.
                sh(b, &format!("ip -6 addr add {VIP6_ADDR}/128 dev lo"))?;
                sh(b, &format!("ip -6 route add default via {ROUTER_LAN6}"))?;
            }
        }
        for lb in &t.lbs {
            sh(lb, &format!("ip route add default via {ROUTER_LAN}"))?;
            if ipv6 {
                sh(lb, &format!("ip -6 route add default via {ROUTER_LAN6}"))?;
            }
        }
        t.start_bird()?;
        Ok(t)
    }

    fn start_bird(&mut self) -> Result<()> {
        let mut conf = String::from(
            "router id 198.18.1.254;\nprotocol device { scan time 1; }\n\
             protocol kernel { ipv4 { export all; }; merge paths on; scan time 1; }\n",
        );
        // IPv6 paths ride the same sessions (multiprotocol BGP), into the
        // kernel's IPv6 table with the same multipath merge.
        let v6 = if self.ipv6 {
            conf.push_str(
                "protocol kernel k6 { ipv6 { export all; }; merge paths on; scan time 1; }\n",
            );
            "  ipv6 { import all; export none; };\n"
        } else {
            ""
        };
        for i in 0..self.lbs.len() {
            conf.push_str(&format!(
                "protocol bgp lb{i} {{\n  local {ROUTER_LAN} as {ROUTER_AS};\n  \
                 neighbor {} as {LB_AS};\n  hold time 3;\n  keepalive time 1;\n  \
                 connect retry time 1;\n  ipv4 {{ import all; export none; }};\n{v6}}}\n",
                lb_addr(i)
            ));
        }
        let path = format!("{}.conf", self.bird_socket);
        std::fs::write(&path, conf)?;
        self.bird = Some(netns::spawn(
            &self.router,
            &["bird", "-f", "-c", &path, "-s", &self.bird_socket],
        )?);
        Ok(())
    }

    /// LB `i`'s address as the router's next hop for the VIP: its IPv6
    /// one in an IPv6 rig.
    pub fn lb_hop(&self, i: usize) -> String {
        if self.ipv6 { lb_addr6(i) } else { lb_addr(i) }
    }

    /// The VIP clients connect to.
    pub fn vip(&self) -> &'static str {
        if self.ipv6 { VIP6 } else { VIP }
    }

    /// The next hops the router's kernel holds for the VIP.
    pub fn vip_next_hops(&self) -> Vec<String> {
        let show = if self.ipv6 {
            format!("ip -6 route show {VIP6_ADDR}")
        } else {
            format!("ip route show {VIP_ADDR}")
        };
        let out = sh(&self.router, &show).unwrap_or_default();
        let mut hops: Vec<String> = out
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "via")
            .map(|w| w[1].to_string())
            .collect();
        hops.sort();
        hops
    }

    /// Waits until the router holds exactly `want` next hops for the VIP;
    /// returns how long that took.
    pub fn await_next_hops(&self, want: &[String], limit: Duration) -> Result<Duration> {
        let start = std::time::Instant::now();
        loop {
            if self.vip_next_hops() == want {
                return Ok(start.elapsed());
            }
            anyhow::ensure!(
                start.elapsed() < limit,
                "the router's VIP route is via {:?}, not {want:?}, after {limit:?}",
                self.vip_next_hops()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl MultiNode {
    /// BIRD's protocols and routes, for a failure's message.
    pub fn bird_show(&self) -> String {
        let mut out = String::new();
        for cmd in ["show protocols", "show route all"] {
            let mut args = vec!["birdc", "-s", self.bird_socket.as_str()];
            args.extend(cmd.split_whitespace());
            out.push_str(&netns::exec(&self.router, &args).unwrap_or_else(|e| format!("{e:#}")));
        }
        out
    }
}
