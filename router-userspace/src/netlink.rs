//! The rtnetlink socket that the route watch and the link-kind query both
//! speak over.

use std::{
    io,
    os::fd::{FromRawFd, OwnedFd},
};

/// A new, unbound `NETLINK_ROUTE` socket (close-on-exec).
pub fn route_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor socket(2) just returned.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
