//! Several ingress nodes and what a node's death costs: the topology of
//! `topology` with two LBs running the real daemon (one `hash_seed`, a DSR
//! service, `[bgp]` to the upstream BIRD), long streams through the VIP,
//! and the moment an LB goes. Shared by the multi-node test (which asserts)
//! and `bench failover` (which records).

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use router_testkit::{
    bpffs::BpfFs,
    daemon_proc::{Daemon, ScratchDir, router_binary, start_daemon},
    netns::{self, ChildGuard},
};
use serde::Serialize;

mod page;
pub mod topology;

pub use page::run_bench;
use topology::*;

/// One seed on every node.
pub const SEED: &str = "5eedf00dcafe0001";
/// The hold time each LB offers (and BIRD uses): the longest a dead node's
/// paths may stay when nothing closes its sessions.
pub const HOLD_S: u64 = 3;
/// Streams open across each failover.
pub const STREAMS: usize = 50;

/// How the LBs forward: DSR (what fails over), or NAT (the negative
/// control: a moved flow reaches its backend from another SNAT address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Dsr,
    Nat,
    /// DSR of an IPv6 VIP to IPv6 backends (IPv6 in IPv6), announced as
    /// a /128 over the same sessions.
    Dsr6,
}

/// LB `i`'s config: the service over both backends (DSR over IPIP, or NAT
/// from the LB's own address), `[bgp]` to the upstream router, control
/// socket `socket`.
pub fn lb_config(socket: &Path, i: usize, mode: Mode) -> String {
    let v6 = mode == Mode::Dsr6;
    let mut s = format!(
        "[daemon]\ninterface = \"eth0\"\ncontrol_socket = \"{}\"\nhash_seed = \"{SEED}\"\n\n\
         [bgp]\nlocal_as = {LB_AS}\nrouter_id = \"{}\"\n\
         peers = [{{ address = \"{ROUTER_LAN}\", as = {ROUTER_AS} }}]\n\
         hold_time = \"{HOLD_S}s\"\ndrain = \"2s\"\n{}\n\
         [[service]]\nname = \"llama\"\nvip = \"{}\"\n{}\n",
        socket.display(),
        lb_addr(i),
        if v6 {
            format!("next_hop6 = \"{}\"\n", lb_addr6(i))
        } else {
            String::new()
        },
        if v6 { VIP6 } else { VIP },
        match mode {
            Mode::Dsr | Mode::Dsr6 => "forwarding = \"dsr\"\nencap = \"ipip\"".to_string(),
            Mode::Nat => format!("snat = \"{}\"", lb_addr(i)),
        }
    );
    for b in 0..2 {
        let address = if v6 {
            format!("[{}]:8000", backend_addr6(b))
        } else {
            format!("{}:8000", backend_addr(b))
        };
        s.push_str(&format!(
            "\n[[service.backend]]\nname = \"b{b}\"\naddress = \"{address}\"\nweight = 1\n"
        ));
    }
    s
}

/// The running set-up: topology, backends with decap, two LB daemons.
pub struct Rig {
    pub daemons: Vec<Daemon>,
    pub sockets: Vec<PathBuf>,
    pub dir: ScratchDir,
    /// How long the router took to hold the ECMP route over both LBs.
    pub converged: Duration,
    _servers: Vec<ChildGuard>,
    _decap_pins: BpfFs,
    // Dropped last: the namespaces.
    pub topo: MultiNode,
}

impl Rig {
    pub fn start(tag: &str, mode: Mode) -> Result<Self> {
        let topo = MultiNode::build(2, 2, mode == Mode::Dsr6)?;
        let dir = ScratchDir::new(tag)?;
        let mut servers = Vec::new();
        let decap_pins = BpfFs::mount()?;
        let bin = router_binary()?;
        for (i, b) in topo.backends.iter().enumerate() {
            let bind: IpAddr = if topo.ipv6 {
                Ipv6Addr::UNSPECIFIED.into()
            } else {
                Ipv4Addr::UNSPECIFIED.into()
            };
            servers.push(netns::spawn_http_backend(b, &format!("b{i}"), bind, 8000)?);
            let pins = decap_pins.pin_path().join(format!("decap-{i}"));
            netns::exec(
                b,
                &[
                    bin.as_os_str(),
                    "decap".as_ref(),
                    "attach".as_ref(),
                    "--interface".as_ref(),
                    "eth0".as_ref(),
                    "--pin-path".as_ref(),
                    pins.as_os_str(),
                ],
            )
            .context("router decap attach")?;
        }
        let mut daemons = Vec::new();
        let mut sockets = Vec::new();
        for (i, lb) in topo.lbs.iter().enumerate() {
            // Each LB reaches the backends once: their neighbours resolve.
            for b in 0..2 {
                let address = if topo.ipv6 {
                    format!("[{}]:8000", backend_addr6(b))
                } else {
                    format!("{}:8000", backend_addr(b))
                };
                netns::wait_for_tcp(lb, address.parse()?, Duration::from_secs(5))?;
            }
            let socket = dir.0.join(format!("lb{i}.sock"));
            let cfg = dir.0.join(format!("lb{i}.toml"));
            std::fs::write(&cfg, lb_config(&socket, i, mode))?;
            daemons.push(start_daemon(lb, &cfg, &socket)?);
            sockets.push(socket);
        }
        let converged = topo
            .await_next_hops(&[topo.lb_hop(0), topo.lb_hop(1)], Duration::from_secs(5))
            .with_context(|| topo.bird_show())?;
        Ok(Rig {
            daemons,
            sockets,
            dir,
            converged,
            _servers: servers,
            _decap_pins: decap_pins,
            topo,
        })
    }

    /// Starts LB `i` again, after a stop, and waits for its next hop.
    pub fn restart(&mut self, i: usize) -> Result<Duration> {
        let cfg = self.dir.0.join(format!("lb{i}.toml"));
        let d = start_daemon(&self.topo.lbs[i], &cfg, &self.sockets[i])?;
        self.daemons.insert(i, d);
        self.topo.await_next_hops(
            &[self.topo.lb_hop(0), self.topo.lb_hop(1)],
            Duration::from_secs(5),
        )
    }

    /// A datapath counter of LB `i`.
    pub fn reason(&self, i: usize, name: &str) -> Result<u64> {
        self.daemons[i]
            .status()?
            .datapath
            .reasons
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .with_context(|| format!("no counter {name}"))
    }
}

/// A long stream through the VIP: its reader and the backend that answers.
pub struct Stream {
    reader: BufReader<TcpStream>,
    pub backend: String,
}

/// `n` streams of `seconds` from the client, each past its first line.
pub fn open_streams(t: &MultiNode, n: usize, seconds: u32) -> Result<Vec<Stream>> {
    let vip: SocketAddr = t.vip().parse()?;
    netns::in_netns(&t.client, move || {
        (0..n)
            .map(|_| -> Result<Stream> {
                let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(5))?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                s.write_all(
                    format!("GET /stream?seconds={seconds}&interval_ms=100 HTTP/1.0\r\n\r\n")
                        .as_bytes(),
                )?;
                let mut reader = BufReader::new(s);
                let mut line = String::new();
                loop {
                    line.clear();
                    reader.read_line(&mut line)?;
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                }
                line.clear();
                reader.read_line(&mut line)?;
                Ok(Stream {
                    reader,
                    backend: line.trim().to_string(),
                })
            })
            .collect()
    })?
}

/// How a set of streams ended.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StreamOutcome {
    /// Ran to their end and closed cleanly.
    pub clean: usize,
    /// Broke: a reset, a timeout, or another error.
    pub broken: usize,
    /// Carried a line from a backend other than their first.
    pub moved_backend: usize,
}

/// Reads every stream to its end.
pub fn finish_streams(streams: Vec<Stream>) -> StreamOutcome {
    let mut out = StreamOutcome::default();
    for mut s in streams {
        let mut line = String::new();
        let mut moved = false;
        let ended = loop {
            line.clear();
            match s.reader.read_line(&mut line) {
                Ok(0) => break true,
                Ok(_) => moved |= line.trim() != s.backend,
                Err(_) => break false,
            }
        };
        if ended {
            out.clean += 1;
        } else {
            out.broken += 1;
        }
        if moved {
            out.moved_backend += 1;
        }
    }
    out
}

/// One failover: LB `victim` killed (or stopped) while `STREAMS` streams run.
#[derive(Clone, Debug, Serialize)]
pub struct Failover {
    /// `kill -9` or `SIGTERM`.
    pub how: &'static str,
    /// From the signal to the router holding only the survivor's next hop.
    pub withdrawn_ms: f64,
    pub streams: StreamOutcome,
    /// Flows the survivor picked up with no entry of its own (`lru_miss`).
    pub survivor_lru_misses: u64,
}

/// Kills LB `victim` with SIGKILL (`term`: stops it with SIGTERM instead,
/// in a thread) during `STREAMS` streams; measures the withdrawal and how
/// the streams ended.
pub fn fail_over(rig: &mut Rig, victim: usize, term: bool) -> Result<Failover> {
    let survivor = 1 - victim;
    let streams = open_streams(&rig.topo, STREAMS, 6)?;
    let before = rig.reason(survivor, "lru_miss")?;
    let started = Instant::now();
    let stopping = if term {
        let d = rig.daemons.remove(victim);
        Some(std::thread::spawn(move || d.stop(Duration::from_secs(10))))
    } else {
        let pid = i32::try_from(rig.daemons[victim].id())?;
        // SAFETY: kill(2) on a daemon this process started.
        ensure!(
            unsafe { libc::kill(pid, libc::SIGKILL) } == 0,
            "kill -9 failed"
        );
        None
    };
    let hop = rig.topo.lb_hop(survivor);
    rig.topo
        .await_next_hops(&[hop], Duration::from_secs(HOLD_S + 5))?;
    let withdrawn = started.elapsed();
    let outcome = finish_streams(streams);
    if let Some(h) = stopping {
        let status = h
            .join()
            .map_err(|_| anyhow::anyhow!("the stopping thread panicked"))??;
        ensure!(status.success(), "the stopped LB exited with {status}");
    } else {
        // The killed daemon's guard removes its pins.
        drop(rig.daemons.remove(victim));
    }
    // The survivor is the one daemon left.
    Ok(Failover {
        how: if term { "SIGTERM" } else { "kill -9" },
        withdrawn_ms: withdrawn.as_secs_f64() * 1e3,
        streams: outcome,
        survivor_lru_misses: rig.reason(0, "lru_miss")? - before,
    })
}
