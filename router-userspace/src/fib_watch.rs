//! Watches the kernel's routes, policy rules, neighbours, links and
//! addresses over rtnetlink. Any change invalidates the next hops cached in
//! connection entries; the datapath then re-resolves each flow once. A
//! change of routes or rules may also change whether next hops can be
//! shared per backend (`host::route_shape`), so it is flagged.

use std::{
    io, mem,
    os::fd::{AsRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::sync::mpsc;

const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV4_RULE: u32 = 0x80;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;

/// A batch of changes: `routes` when routes or rules were among them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FibChange {
    pub routes: bool,
}

/// The watcher's side of the channel.
pub struct FibEvents {
    rx: mpsc::Receiver<()>,
    routes: Arc<AtomicBool>,
}

impl FibEvents {
    /// The next batch of changes (all since the last one, merged).
    pub async fn recv(&mut self) -> Option<FibChange> {
        self.rx.recv().await?;
        Some(FibChange {
            routes: self.routes.swap(false, Ordering::AcqRel),
        })
    }
}

/// Whether a datagram of rtnetlink messages holds a route or rule change.
fn touches_routes(mut datagram: &[u8]) -> bool {
    while datagram.len() >= 16 {
        let len = u32::from_ne_bytes([datagram[0], datagram[1], datagram[2], datagram[3]]) as usize;
        let kind = u16::from_ne_bytes([datagram[4], datagram[5]]);
        if matches!(
            kind,
            RTM_NEWROUTE | RTM_DELROUTE | RTM_NEWRULE | RTM_DELRULE
        ) {
            return true;
        }
        if len < 16 {
            return false;
        }
        datagram = datagram.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    false
}

fn open() -> io::Result<OwnedFd> {
    let fd = crate::netlink::route_socket()?;
    // SAFETY: bind(2) with a zeroed, then filled-in sockaddr_nl.
    let rc = unsafe {
        let mut sa: libc::sockaddr_nl = mem::zeroed();
        sa.nl_family = libc::AF_NETLINK as u16;
        sa.nl_groups =
            RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_RULE;
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_nl).cast(),
            mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Starts a thread that reports every batch of rtnetlink events. The
/// socket is opened before returning, so no change after this call is missed.
pub fn spawn() -> io::Result<FibEvents> {
    let fd = open()?;
    let (tx, rx) = mpsc::channel(1);
    let routes = Arc::new(AtomicBool::new(false));
    let flag = routes.clone();
    std::thread::Builder::new()
        .name("fib-watch".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                // SAFETY: reading into a buffer we own.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    // ENOBUFS: events were dropped; invalidating is still right,
                    // and any of them may have been a route.
                    if e.raw_os_error() != Some(libc::ENOBUFS)
                        && e.kind() != io::ErrorKind::Interrupted
                    {
                        tracing::error!("rtnetlink watch stopped: {e}");
                        return;
                    }
                    flag.store(true, Ordering::Release);
                } else if touches_routes(&buf[..n as usize]) {
                    flag.store(true, Ordering::Release);
                }
                // A full channel already holds a pending invalidation.
                match tx.try_send(()) {
                    Ok(()) | Err(mpsc::error::TrySendError::Full(())) => {}
                    Err(mpsc::error::TrySendError::Closed(())) => return,
                }
            }
        })?;
    Ok(FibEvents { rx, routes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16) -> Vec<u8> {
        let mut m = 20u32.to_ne_bytes().to_vec();
        m.extend_from_slice(&kind.to_ne_bytes());
        m.resize(20, 0);
        m
    }

    #[test]
    fn route_and_rule_messages_are_told_from_the_rest() {
        const RTM_NEWNEIGH: u16 = 28;
        let neighbours = [message(RTM_NEWNEIGH), message(RTM_NEWNEIGH)].concat();
        assert!(!touches_routes(&neighbours));
        for kind in [RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWRULE, RTM_DELRULE] {
            assert!(touches_routes(
                &[neighbours.clone(), message(kind)].concat()
            ));
        }
    }
}
