//! Watches the kernel's routes, neighbours, links and addresses over
//! rtnetlink. Any change invalidates the next hops cached in connection
//! entries; the datapath then re-resolves each flow once.

use std::{
    io, mem,
    os::fd::{AsRawFd, OwnedFd},
};

use tokio::sync::mpsc;

const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;

fn open() -> io::Result<OwnedFd> {
    let fd = crate::netlink::route_socket()?;
    // SAFETY: bind(2) with a zeroed, then filled-in sockaddr_nl.
    let rc = unsafe {
        let mut sa: libc::sockaddr_nl = mem::zeroed();
        sa.nl_family = libc::AF_NETLINK as u16;
        sa.nl_groups = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE;
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

/// Starts a thread that sends `()` on every batch of rtnetlink events. The
/// socket is opened before returning, so no change after this call is missed.
pub fn spawn() -> io::Result<mpsc::Receiver<()>> {
    let fd = open()?;
    let (tx, rx) = mpsc::channel(1);
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
                    // ENOBUFS: events were dropped; invalidating is still right.
                    if e.raw_os_error() != Some(libc::ENOBUFS)
                        && e.kind() != io::ErrorKind::Interrupted
                    {
                        tracing::error!("rtnetlink watch stopped: {e}");
                        return;
                    }
                }
                // A full channel already holds a pending invalidation.
                match tx.try_send(()) {
                    Ok(()) | Err(mpsc::error::TrySendError::Full(())) => {}
                    Err(mpsc::error::TrySendError::Closed(())) => return,
                }
            }
        })?;
    Ok(rx)
}
