//! What every restart test starts from: a one-arm topology with fixture
//! backends, a config and a private bpffs ([`Setup`]), and streams that
//! report which backend served them and for how long ([`Stream`]).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use router::api::StatusReply;
use router_testkit::{
    bpffs::BpfFs,
    daemon_proc::{
        ScratchDir, cleanup_pins, one_arm_config, router_binary, start_daemon_pinned, status,
    },
    netns::{self, ChildGuard, Topology},
};

use super::{BACKENDS, VIP};

/// A one-arm topology with fixture HTTP backends, a config file and a
/// private bpffs for the pins.
pub(super) struct Setup {
    // Drop order: pins (after the daemons the tests hold), then backends,
    // then the namespaces.
    pub(super) pins: BpfFs,
    pub(super) dir: ScratchDir,
    pub(super) _servers: Vec<ChildGuard>,
    pub(super) topo: Topology,
}

impl Setup {
    pub(super) fn new(tag: &str) -> Setup {
        let topo = Topology::one_arm(BACKENDS).expect("topology");
        let servers = topo.spawn_fixture_backends(8000).expect("backend servers");
        // The LB reaches every backend once, which also resolves their
        // neighbours before the first balanced packet.
        for i in 0..BACKENDS {
            netns::wait_for_tcp(
                topo.lb_ns(),
                SocketAddr::new(netns::backend_addr(i).into(), 8000),
                Duration::from_secs(5),
            )
            .unwrap();
        }
        Setup {
            pins: BpfFs::mount().expect("private bpffs"),
            dir: ScratchDir::new(tag).unwrap(),
            _servers: servers,
            topo,
        }
    }

    pub(super) fn socket(&self) -> PathBuf {
        self.dir.0.join("router.sock")
    }

    pub(super) fn config_path(&self) -> PathBuf {
        self.dir.0.join("router.toml")
    }

    /// Writes the config with these weights and extra `[daemon]` lines.
    pub(super) fn write_config(&self, weights: &[u32], daemon_extra: &str) {
        let backends: Vec<(String, String, u32)> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                (
                    format!("b{i}"),
                    format!("{}:8000", netns::backend_addr(i)),
                    *w,
                )
            })
            .collect();
        let text = one_arm_config(
            &self.socket(),
            self.topo.lb_if(),
            VIP,
            netns::LB_ADDR,
            &backends,
        )
        .replace("[daemon]\n", &format!("[daemon]\n{daemon_extra}"));
        std::fs::write(self.config_path(), text).unwrap();
    }

    pub(super) fn start(&self) -> ChildGuard {
        start_daemon_pinned(
            self.topo.lb_ns(),
            &self.config_path(),
            &self.socket(),
            &self.pins.pin_path(),
        )
        .expect("daemon")
    }

    /// Runs the daemon to completion; returns (exit ok, stderr).
    pub(super) fn run_daemon_once(&self) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", self.topo.lb_ns()])
            .arg(router_binary().unwrap())
            .args(["daemon", "--config"])
            .arg(self.config_path())
            .arg("--pin-path")
            .arg(self.pins.pin_path())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `router daemon --cleanup`; returns (exit ok, stdout + stderr).
    pub(super) fn cleanup(&self) -> (bool, String) {
        let out = Command::new(router_binary().unwrap())
            .arg("--socket")
            .arg(self.socket())
            .args(["daemon", "--cleanup", "--pin-path"])
            .arg(self.pins.pin_path())
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    pub(super) fn status(&self) -> StatusReply {
        status(&self.socket()).unwrap()
    }

    pub(super) fn xdp_attached(&self) -> bool {
        netns::exec(
            self.topo.lb_ns(),
            &["ip", "link", "show", self.topo.lb_if()],
        )
        .unwrap()
        .contains("xdp")
    }

    /// `n` short HTTP connections to the VIP; answers per backend. Every
    /// one must succeed.
    pub(super) fn short_connections(&self, n: usize) -> BTreeMap<String, usize> {
        netns::answers_per_backend(self.topo.client_ns(), VIP.parse().unwrap(), n)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Opens `n` streams of `seconds` (a line every 100 ms); returns each
    /// with the backend that answers it.
    pub(super) fn open_streams(&self, n: usize, seconds: u32) -> Vec<Stream> {
        let vip: SocketAddr = VIP.parse().unwrap();
        let sockets: Vec<TcpStream> = netns::in_netns(self.topo.client_ns(), || {
            (0..n)
                .map(|_| {
                    let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(5)).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    write!(
                        s,
                        "GET /stream?seconds={seconds}&interval_ms=100 HTTP/1.0\r\n\r\n"
                    )
                    .unwrap();
                    s
                })
                .collect()
        })
        .unwrap();
        sockets
            .into_iter()
            .map(|s| {
                let mut reader = BufReader::new(s);
                let mut line = String::new();
                loop {
                    line.clear();
                    reader.read_line(&mut line).unwrap();
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                }
                line.clear();
                reader.read_line(&mut line).unwrap();
                Stream {
                    reader,
                    owner: line.trim().to_string(),
                    seconds,
                }
            })
            .collect()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Tests clean up themselves; this covers one that failed halfway.
        // The daemon a test holds is a local declared after the setup, so
        // it is already killed here.
        let _ = cleanup_pins(&self.socket(), &self.pins.pin_path());
    }
}

pub(super) struct Stream {
    pub(super) reader: BufReader<TcpStream>,
    pub(super) owner: String,
    pub(super) seconds: u32,
}

impl Stream {
    /// Reads to EOF: every line from the same backend, no reset, and
    /// (nearly) every line the backend meant to send.
    pub(super) fn finish(mut self) {
        let mut lines = 1;
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => break,
                Ok(_) => {
                    assert_eq!(line.trim(), self.owner, "stream changed backend");
                    lines += 1;
                }
                Err(e) => panic!("stream on {} broke after {lines} lines: {e}", self.owner),
            }
        }
        let expected = self.seconds * 10;
        assert!(
            lines * 10 >= expected * 9,
            "stream on {} ended early: {lines} of ~{expected} lines",
            self.owner
        );
    }
}

pub(super) fn new_conns(st: &StatusReply) -> u64 {
    st.datapath.services[0].counters.new_conns
}

/// Connecting to the VIP fails: nothing balances it any more (the LB has
/// no route for it and answers with an ICMP error, or nothing at all).
pub(super) fn vip_unreachable(s: &Setup) -> bool {
    let vip: SocketAddr = VIP.parse().unwrap();
    netns::in_netns(s.topo.client_ns(), move || {
        TcpStream::connect_timeout(&vip, Duration::from_secs(2)).is_err()
    })
    .unwrap()
}
