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

/// One interface's packet, drop and error counters (`ip -s link`), keyed
/// `{prefix}.rx_dropped` etc.; nothing when `ip` fails.
fn link_counters(ns: &str, dev: &str, prefix: &str, out: &mut BTreeMap<String, u64>) {
    let Some(v) = netns::exec(ns, &["ip", "-j", "-s", "link", "show", "dev", dev])
        .ok()
        .and_then(|o| serde_json::from_str::<Value>(&o).ok())
    else {
        return;
    };
    let s = &v[0]["stats64"];
    for dir in ["rx", "tx"] {
        for k in ["packets", "dropped", "errors"] {
            if let Some(n) = s[dir][k].as_u64() {
                out.insert(format!("{prefix}.{dir}_{k}"), n);
            }
        }
    }
}

/// Drop and error counters of the LB's interface and of its peer on the
/// bridge: where frames are lost on the way through the LB (a veth counts
/// frames it could not hand to its peer, e.g. XDP_TX into a full ring,
/// here).
pub(super) fn link_drops(topo: &Topology) -> Value {
    let mut m = BTreeMap::new();
    link_counters(topo.lb_ns(), netns::LB_IF, "lb", &mut m);
    link_counters(topo.switch_ns(), netns::LB_PEER_IF, "lb_peer", &mut m);
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
        link_counters(topo.lb_ns(), netns::LB_IF, "lb", &mut links);
        link_counters(topo.switch_ns(), netns::LB_PEER_IF, "lb_peer", &mut links);
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
                .map(|(k, v)| (k.clone(), v.saturating_sub(was.get(k).copied().unwrap_or(0))))
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
            "client": self.client.telling(),
            "lb": self.lb.telling(),
            "backends": self.backends.telling(),
            "links": nonzero(&self.links),
            "router_reasons": nonzero(&self.router),
        })
    }
}
