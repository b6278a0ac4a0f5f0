//! Attaching the trivial XDP_PASS program to a veth inside a namespace.
//!
//! Native XDP_TX or XDP_REDIRECT onto a veth hands the frame to the peer's
//! NAPI instance, which exists only while the peer runs an XDP program (or
//! has GRO on). Without it the kernel drops those frames silently, so test
//! topologies put XDP_PASS on the peer of every interface the router uses.

use std::{fs::File, os::fd::AsRawFd, sync::mpsc, thread::JoinHandle};

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf,
    programs::{Xdp, XdpMode},
};

/// Keeps XDP_PASS attached to `ifname` in `ns` until dropped. The program is
/// loaded, attached and finally detached on a thread that lives in `ns`, so
/// the interface name and index always refer to that namespace.
#[derive(Debug)]
pub struct XdpPassGuard {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl XdpPassGuard {
    pub fn attach(ns: &str, ifname: &str) -> Result<Self> {
        let path = format!("/run/netns/{ns}");
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        let ifname = ifname.to_string();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // SAFETY: setns(2) on a valid fd; affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let _ = ready_tx.send(Err(anyhow!("setns: {}", std::io::Error::last_os_error())));
                return;
            }
            let attached = (|| -> Result<Ebpf> {
                let mut ebpf = Ebpf::load(router::datapath::XDP_PASS_OBJ)?;
                let prog: &mut Xdp = ebpf
                    .program_mut("xdp_pass")
                    .context("xdp_pass program missing")?
                    .try_into()?;
                prog.load()?;
                prog.attach(&ifname, XdpMode::Driver)
                    .with_context(|| format!("attaching XDP_PASS to {ifname}"))?;
                Ok(ebpf)
            })();
            match attached {
                Ok(ebpf) => {
                    let _ = ready_tx.send(Ok(()));
                    let _ = stop_rx.recv();
                    drop(ebpf);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        });
        ready_rx.recv().context("XDP_PASS attach thread died")??;
        Ok(Self {
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for XdpPassGuard {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
