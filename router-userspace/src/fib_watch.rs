//! Watches the kernel's routes, neighbours, links and addresses over
//! rtnetlink. Any change invalidates the next hops cached in connection
//! entries; the datapath then re-resolves each flow once. A change to
//! anything but a neighbour also flags `topology`, on which the daemon
//! re-applies the backends' managed neighbour entries (a link that goes
//! down takes them with it; a route change can move a next hop). A change
//! of routes or policy rules flags `routes`, on which it reads again
//! whether next hops may be shared per backend (`host::route_shape`).

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
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;

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

/// The message types in a batch of rtnetlink messages.
fn kinds(mut batch: &[u8]) -> impl Iterator<Item = u16> + '_ {
    use crate::netlink::{u16_at, u32_at};
    std::iter::from_fn(move || {
        let (len, kind) = (u32_at(batch, 0)?, u16_at(batch, 4)?);
        let next = (len as usize).next_multiple_of(4);
        batch = if next == 0 {
            &[]
        } else {
            batch.get(next..).unwrap_or_default()
        };
        Some(kind)
    })
}

/// Whether a batch of rtnetlink messages holds anything but neighbour
/// changes. The daemon's own neighbour entries make neighbour events, so
/// re-applying them on those would never settle.
fn beyond_neighbours(batch: &[u8]) -> bool {
    kinds(batch).any(|k| k != RTM_NEWNEIGH && k != RTM_DELNEIGH)
}

/// Whether a batch of rtnetlink messages holds a route or rule change.
fn touches_routes(batch: &[u8]) -> bool {
    kinds(batch).any(|k| matches!(k, RTM_NEWROUTE | RTM_DELROUTE | RTM_NEWRULE | RTM_DELRULE))
}

/// What the watch reports.
pub struct FibEvents {
    /// `()` on every batch of rtnetlink events.
    pub changes: mpsc::Receiver<()>,
    /// Set with a change to links, addresses or routes; the reader clears it.
    pub topology: Arc<AtomicBool>,
    /// Set with a change to routes or policy rules; the reader clears it.
    pub routes: Arc<AtomicBool>,
}

impl FibEvents {
    /// Whether links, addresses or routes changed since the last call.
    pub fn take_topology(&self) -> bool {
        self.topology.swap(false, Ordering::Relaxed)
    }

    /// Whether routes or policy rules changed since the last call.
    pub fn take_routes(&self) -> bool {
        self.routes.swap(false, Ordering::Relaxed)
    }
}

/// Starts a thread that reports every batch of rtnetlink events. The
/// socket is opened before returning, so no change after this call is missed.
pub fn spawn() -> io::Result<FibEvents> {
    let fd = open()?;
    let (tx, rx) = mpsc::channel(1);
    let topology = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&topology);
    let routes = Arc::new(AtomicBool::new(false));
    let routes_flag = Arc::clone(&routes);
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
                    // ENOBUFS: events were dropped; invalidating is still
                    // right, and any of them may have been a link's.
                    if e.raw_os_error() == Some(libc::ENOBUFS) {
                        flag.store(true, Ordering::Relaxed);
                        routes_flag.store(true, Ordering::Relaxed);
                    } else if e.kind() != io::ErrorKind::Interrupted {
                        tracing::error!("rtnetlink watch stopped: {e}");
                        return;
                    }
                } else if beyond_neighbours(&buf[..n as usize]) {
                    flag.store(true, Ordering::Relaxed);
                    if touches_routes(&buf[..n as usize]) {
                        routes_flag.store(true, Ordering::Relaxed);
                    }
                }
                // A full channel already holds a pending invalidation.
                match tx.try_send(()) {
                    Ok(()) | Err(mpsc::error::TrySendError::Full(())) => {}
                    Err(mpsc::error::TrySendError::Closed(())) => return,
                }
            }
        })?;
    Ok(FibEvents {
        changes: rx,
        topology,
        routes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u16) -> Vec<u8> {
        crate::netlink::finish(crate::netlink::message(kind, 0, 0, &[0u8; 12]))
    }

    #[test]
    fn only_a_batch_of_neighbour_changes_leaves_the_topology_alone() {
        let mut neigh = msg(RTM_NEWNEIGH);
        neigh.extend(msg(RTM_DELNEIGH));
        assert!(!beyond_neighbours(&neigh));
        let mut mixed = neigh.clone();
        mixed.extend(msg(16)); // RTM_NEWLINK
        assert!(beyond_neighbours(&mixed));
        assert!(beyond_neighbours(&msg(24)), "RTM_NEWROUTE");
        assert!(!beyond_neighbours(&[]));
    }

    #[test]
    fn route_and_rule_messages_are_told_from_the_rest() {
        let mut neigh = msg(RTM_NEWNEIGH);
        neigh.extend(msg(16)); // RTM_NEWLINK
        assert!(!touches_routes(&neigh));
        for kind in [RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWRULE, RTM_DELRULE] {
            let mut batch = neigh.clone();
            batch.extend(msg(kind));
            assert!(touches_routes(&batch), "{kind}");
        }
    }
}
