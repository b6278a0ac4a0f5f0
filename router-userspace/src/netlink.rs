//! The rtnetlink socket that the route watch, the link-kind query and the
//! neighbour entries all speak over, and the message framing they share.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

pub const NLMSG_ERROR: u16 = 2;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
/// Attribute types carry flag bits above these.
const NLA_TYPE_MASK: u16 = 0x3fff;
/// `struct nlmsghdr`.
pub const HEADER_LEN: usize = 16;

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

/// A request: `nlmsghdr` (its length filled in by [`finish`]), then `body`.
pub fn message(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(64);
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(body);
    m
}

/// Appends attribute `kind` with `payload`, padded to 4 bytes.
pub fn push_attr(m: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(payload);
    m.resize(m.len().next_multiple_of(4), 0);
}

/// Writes the total length into the header of a [`message`].
pub fn finish(mut m: Vec<u8>) -> Vec<u8> {
    let len = u32::try_from(m.len()).unwrap_or(u32::MAX);
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m
}

pub fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Netlink attributes in `b`: (type, payload), each padded to 4 bytes.
pub fn attributes(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16_at(b, 0)?);
        let kind = u16_at(b, 2)? & NLA_TYPE_MASK;
        let payload = b.get(4..len)?;
        b = b.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some((kind, payload))
    })
}

/// The first message of a reply: its type and its bytes (header included,
/// cut to its length). An error reply is the errno it carries; an
/// acknowledgement (error 0) is `NLMSG_ERROR` with its bytes.
pub fn first_message(reply: &[u8]) -> io::Result<(u16, &[u8])> {
    let malformed = || io::Error::other("malformed rtnetlink reply");
    let len = u32_at(reply, 0).ok_or_else(malformed)? as usize;
    let kind = u16_at(reply, 4).ok_or_else(malformed)?;
    let msg = reply.get(..len).ok_or_else(malformed)?;
    if kind == NLMSG_ERROR {
        let errno = u32_at(msg, HEADER_LEN).ok_or_else(malformed)? as i32;
        if errno != 0 {
            return Err(io::Error::from_raw_os_error(-errno));
        }
    }
    Ok((kind, msg))
}

/// Sends one request on `fd` and reads the kernel's one-message answer
/// (the object asked for, or an error or acknowledgement).
pub fn transact(fd: &OwnedFd, request: &[u8]) -> io::Result<Vec<u8>> {
    send(fd, request)?;
    let mut buf = vec![0u8; 32 << 10];
    // SAFETY: receiving into a buffer we own, within its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Sends one request on `fd`.
pub fn send(fd: &OwnedFd, request: &[u8]) -> io::Result<()> {
    // SAFETY: sending a buffer we own, within its length.
    let sent = unsafe { libc::send(fd.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
