//! Where a connection's packets went during one run: the counters read
//! before and after it, so that a SYN the client had to retransmit can be
//! placed. The client's `TcpExtTCPSynRetrans` says that one was lost; the
//! LB's interface and its bridge peer (frames dropped on the way to or from
//! the LB), the LB namespace's IP counters (`IpForwDatagrams` for the
//! routed hop, `IpOutNoRoutes` for a packet the router passed up that the
//! kernel could not route), the router's per-reason counters (what the
//! program did with each packet) and the backends' TCP counters
//! (`ListenOverflows`, `ListenDrops`, `TCPReqQFullDrop`, PAWS rejects of a
//! SYN that met a TIME_WAIT socket) say where. Only reads.

use std::{collections::BTreeMap, path::Path};

use anyhow::Result;
use serde_json::{Value, json};

use router_testkit::{
    daemon_proc::status,
    netns::{self, Topology},
};

use crate::netstat::Netstat;

/// The counters of one moment.
pub(super) struct Snapshot {
    client: Netstat,
    lb: Netstat,
    /// Summed over the backends' namespaces.
    backends: Netstat,
    links: BTreeMap<String, u64>,
    /// The router's reason counters (empty for other fronts).
    router: BTreeMap<String, u64>,
}

/// What changed during one run.
#[derive(Clone)]
pub(super) struct RunCounters {
    pub client: Netstat,
    pub lb: Netstat,
    pub backends: Netstat,
    pub links: BTreeMap<String, u64>,
    pub router: BTreeMap<String, u64>,
}

/// `ip -j -s link show [dev DEV]` in `ns`, parsed; null when `ip` fails.
fn ip_links(ns: &str, dev: Option<&str>) -> Value {
    let mut args = vec!["ip", "-j", "-s", "link", "show"];
    if let Some(d) = dev {
        args.extend(["dev", d]);
    }
    netns::exec(ns, &args)
        .ok()
        .and_then(|o| serde_json::from_str::<Value>(&o).ok())
        .unwrap_or(Value::Null)
}

/// One interface's packet (`packets`), drop and error counters from `ip
/// -j -s link`, keyed `{prefix}.rx_dropped` etc.
fn link_stats(link: &Value, prefix: &str, drops_only: bool, out: &mut BTreeMap<String, u64>) {
    let s = &link["stats64"];
    for dir in ["rx", "tx"] {
        for k in ["packets", "dropped", "errors"] {
            if drops_only && k == "packets" {
                continue;
            }
            if let Some(n) = s[dir][k].as_u64() {
                out.insert(format!("{prefix}.{dir}_{k}"), n);
            }
        }
    }
}

/// The LB's interface and its bridge peer (packets, drops, errors), and
/// the drops and errors of every other port of the bridge (`switch.p-b0`,
/// `switch.p-client`...): a veth counts as its own `tx_dropped` a frame its
/// peer's queue had no room for.
fn link_counters(topo: &Topology, out: &mut BTreeMap<String, u64>) {
    link_stats(
        &ip_links(topo.lb_ns(), Some(netns::LB_IF))[0],
        "lb",
        false,
        out,
    );
    for link in ip_links(topo.switch_ns(), None)
        .as_array()
        .into_iter()
        .flatten()
    {
        match link["ifname"].as_str() {
            Some(netns::LB_PEER_IF) => link_stats(link, "lb_peer", false, out),
            Some(name) if name != "lo" => {
                link_stats(link, &format!("switch.{name}"), true, out);
            }
            _ => {}
        }
    }
}

/// Packets the host's per-CPU input backlogs dropped (`/proc/net/softnet_stat`,
/// second column, summed over CPUs). Host-wide, not per namespace: a veth
/// without NAPI hands its frames to this backlog, and when it is full
/// (`netdev_max_backlog`) the frame is gone without a trace in any
/// namespace's counters.
fn softnet_dropped() -> u64 {
    std::fs::read_to_string("/proc/net/softnet_stat").map_or(0, |s| parse_softnet_dropped(&s))
}

fn parse_softnet_dropped(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|v| u64::from_str_radix(v, 16).ok())
        .sum()
}

/// Drop and error counters of the LB's interface and of its peer on the
/// bridge: where frames are lost on the way through the LB (a veth counts
/// frames it could not hand to its peer, e.g. XDP_TX into a full ring,
/// here).
pub(super) fn link_drops(topo: &Topology) -> Value {
    let mut m = BTreeMap::new();
    link_counters(topo, &mut m);
    let side = |p: &str| -> Value {
        if !m.contains_key(&format!("{p}.rx_packets")) {
            return Value::Null;
        }
        let g = |k: &str| m.get(&format!("{p}.{k}")).copied().unwrap_or(0);
        json!({
            "rx_dropped": g("rx_dropped"), "rx_errors": g("rx_errors"),
            "tx_dropped": g("tx_dropped"), "tx_errors": g("tx_errors"),
        })
    };
    json!({ "lb": side("lb"), "lb_peer": side("lb_peer") })
}

impl Snapshot {
    /// Reads everything now; `router` is the daemon's control socket when
    /// the front is the router.
    pub(super) fn take(topo: &Topology, router: Option<&Path>) -> Result<Snapshot> {
        let mut backends = Netstat::default();
        for i in 0..topo.backend_count() {
            backends.add(&Netstat::read(topo.backend_ns(i))?);
        }
        let mut links = BTreeMap::new();
        link_counters(topo, &mut links);
        links.insert("host.softnet_dropped".to_owned(), softnet_dropped());
        let router = match router {
            Some(socket) => status(socket)?.datapath.reasons.into_iter().collect(),
            None => BTreeMap::new(),
        };
        Ok(Snapshot {
            client: Netstat::read(topo.client_ns())?,
            lb: Netstat::read(topo.lb_ns())?,
            backends,
            links,
            router,
        })
    }

    /// What grew between `before` and this snapshot.
    pub(super) fn since(&self, before: &Snapshot) -> RunCounters {
        let grew = |now: &BTreeMap<String, u64>, was: &BTreeMap<String, u64>| {
            now.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.saturating_sub(was.get(k).copied().unwrap_or(0)),
                    )
                })
                .collect::<BTreeMap<_, _>>()
        };
        RunCounters {
            client: self.client.since(&before.client),
            lb: self.lb.since(&before.lb),
            backends: self.backends.since(&before.backends),
            links: grew(&self.links, &before.links),
            router: grew(&self.router, &before.router),
        }
    }
}

impl RunCounters {
    /// SYNs the client sent again (`TcpExtTCPSynRetrans`).
    pub(super) fn syn_retrans(&self) -> u64 {
        self.client.get("TcpExtTCPSynRetrans")
    }

    /// Every segment the client sent again (`TcpRetransSegs`).
    pub(super) fn retrans_segs(&self) -> u64 {
        self.client.get("TcpRetransSegs")
    }

    /// Datagrams the LB namespace's kernel forwarded (`IpForwDatagrams`).
    pub(super) fn forwarded(&self) -> u64 {
        self.lb.get("IpForwDatagrams")
    }

    /// IP packets the client namespace sent and received
    /// (`IpOutRequests` + `IpInReceives`).
    pub(super) fn client_packets(&self) -> u64 {
        self.client.get("IpOutRequests") + self.client.get("IpInReceives")
    }

    /// The run's counters as the JSON records them: the headline client
    /// figures, then the non-zero telling counters of each place.
    pub(super) fn json(&self) -> Value {
        let nonzero = |m: &BTreeMap<String, u64>| -> BTreeMap<String, u64> {
            m.iter()
                .filter(|(_, v)| **v > 0)
                .map(|(k, v)| (k.clone(), *v))
                .collect()
        };
        json!({
            "client_syn_retrans": self.syn_retrans(),
            "client_retrans_segs": self.retrans_segs(),
            "lb_forwarded": self.forwarded(),
            "client_ip_packets": self.client_packets(),
            "client": self.client.telling(),
            "lb": self.lb.telling(),
            "backends": self.backends.telling(),
            "links": nonzero(&self.links),
            "router_reasons": nonzero(&self.router),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_softnet_drop_column_over_cpus() {
        // Two CPUs of a 6.18 host's /proc/net/softnet_stat (processed,
        // dropped, time_squeeze, ...; hexadecimal).
        let sample = "\
0036a5b1 00000000 0000001c 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000
0029f3c0 0000000a 00000009 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000001 00000000
";
        assert_eq!(parse_softnet_dropped(sample), 10);
        assert_eq!(parse_softnet_dropped(""), 0);
    }

    #[test]
    fn reads_links_from_ip_json() {
        let links: Value = serde_json::from_str(
            r#"[{"ifname":"p-b0","stats64":{"rx":{"packets":5,"dropped":1,"errors":0},
                "tx":{"packets":7,"dropped":2,"errors":0}}}]"#,
        )
        .unwrap();
        let mut m = BTreeMap::new();
        link_stats(&links[0], "switch.p-b0", true, &mut m);
        assert_eq!(m.get("switch.p-b0.tx_dropped"), Some(&2));
        assert_eq!(m.get("switch.p-b0.rx_dropped"), Some(&1));
        assert!(!m.contains_key("switch.p-b0.tx_packets"), "drops only");
        link_stats(&links[0], "lb", false, &mut m);
        assert_eq!(m.get("lb.tx_packets"), Some(&7));
    }
}
