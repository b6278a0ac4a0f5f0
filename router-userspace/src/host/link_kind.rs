//! An interface's link kind (`veth`, `bridge`, …; none for a physical NIC)
//! from rtnetlink, as `ip -d link` shows it. A veth needs something from
//! its peer that the daemon cannot arrange from this side (see
//! `veth_note`), so `config check` and the daemon's start say so.

use std::io;

use crate::netlink::{NLMSG_ERROR, attributes, finish, message, u16_at, u32_at};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;

/// The link kind of the interface named `iface` (see [`link_kind`]).
pub fn interface_kind(iface: &str) -> io::Result<Option<String>> {
    let name = std::ffi::CString::new(iface).map_err(io::Error::other)?;
    // SAFETY: a NUL-terminated name that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    link_kind(index)
}

/// The link kind of interface `ifindex`, `None` for a device without one.
pub fn link_kind(ifindex: u32) -> io::Result<Option<String>> {
    let fd = crate::netlink::route_socket()?;
    let index = i32::try_from(ifindex).map_err(|_| io::Error::other("ifindex out of range"))?;
    // struct ifinfomsg: family, padding, type, then the index; flags and
    // change stay zero.
    let mut body = [0u8; 16];
    body[0] = libc::AF_UNSPEC as u8;
    body[4..8].copy_from_slice(&index.to_ne_bytes());
    let reply = crate::netlink::transact(
        &fd,
        &finish(message(
            RTM_GETLINK,
            crate::netlink::NLM_F_REQUEST,
            1,
            &body,
        )),
    )?;
    parse_reply(&reply)
}

fn parse_reply(msg: &[u8]) -> io::Result<Option<String>> {
    let malformed = || io::Error::other("malformed rtnetlink reply");
    let len = u32_at(msg, 0).ok_or_else(malformed)? as usize;
    let kind = u16_at(msg, 4).ok_or_else(malformed)?;
    if kind == NLMSG_ERROR {
        let errno = u32_at(msg, 16).ok_or_else(malformed)? as i32;
        return Err(io::Error::from_raw_os_error(-errno));
    }
    if kind != RTM_NEWLINK {
        return Err(malformed());
    }
    // nlmsghdr (16) + ifinfomsg (16), then the link's attributes.
    let attrs = msg.get(32..len.min(msg.len())).ok_or_else(malformed)?;
    let Some((_, info)) = attributes(attrs).find(|(t, _)| *t == IFLA_LINKINFO) else {
        return Ok(None);
    };
    Ok(attributes(info)
        .find(|(t, _)| *t == IFLA_INFO_KIND)
        .map(|(_, k)| String::from_utf8_lossy(k.split(|b| *b == 0).next().unwrap_or(k)).into()))
}

/// What a veth interface needs from its peer, in one line; `None` for any
/// other kind of interface.
pub fn veth_note(iface: &str, kind: Option<&str>) -> Option<String> {
    (kind == Some("veth")).then(|| {
        format!(
            "{iface} is a veth: frames the router sends out of it (XDP_TX, XDP_REDIRECT) are \
             delivered only while its peer has an XDP program attached (the daemon cannot \
             attach one from this side; see docs/operations.md, XDP modes and veth)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_no_kind_and_a_missing_index_is_an_error() {
        assert_eq!(link_kind(1).unwrap(), None);
        let e = link_kind(0x7fff_fff0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENODEV), "{e}");
    }

    #[test]
    fn attributes_are_walked_with_padding_and_nesting() {
        // IFLA_IFNAME "lo" (padded), then IFLA_LINKINFO { IFLA_INFO_KIND "veth\0" }.
        let mut attrs = vec![7, 0, 3, 0, b'l', b'o', 0, 0];
        let kind = [9u8, 0, 1, 0, b'v', b'e', b't', b'h', 0, 0, 0, 0];
        attrs.extend_from_slice(&[16, 0, 18, 0]);
        attrs.extend_from_slice(&kind);
        let mut msg = vec![0u8; 32];
        msg[0..4].copy_from_slice(&((32 + attrs.len()) as u32).to_ne_bytes());
        msg[4..6].copy_from_slice(&RTM_NEWLINK.to_ne_bytes());
        msg.extend_from_slice(&attrs);
        assert_eq!(parse_reply(&msg).unwrap().as_deref(), Some("veth"));
        assert!(veth_note("lb0", Some("veth")).unwrap().contains("peer"));
        assert_eq!(veth_note("eth0", None), None);
    }
}
