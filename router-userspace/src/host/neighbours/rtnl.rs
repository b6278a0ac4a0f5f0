//! The rtnetlink messages behind managed neighbour entries: an output
//! route lookup (RTM_GETROUTE) for a backend's next hop, and reading,
//! adding and deleting one neighbour entry (RTM_{GET,NEW,DEL}NEIGH), for
//! IPv4 (ARP) and IPv6 (neighbour discovery) alike.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::OwnedFd,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::netlink::{
    HEADER_LEN, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NLMSG_ERROR,
    attributes, finish, first_message, message, push_attr, transact, u16_at, u32_at,
};

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const RTM_GETNEIGH: u16 = 30;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTN_UNICAST: u8 = 1;
const RTN_LOCAL: u8 = 2;
const NDA_DST: u16 = 1;
/// A u32 of flags beyond ndm_flags' eight bits (Linux 5.16+).
const NDA_FLAGS_EXT: u16 = 15;
/// In NDA_FLAGS_EXT: the kernel resolves the entry by itself and keeps it
/// refreshed (`ip neigh ... managed`).
const NTF_EXT_MANAGED: u32 = 1;
const NTF_EXT_LEARNED: u8 = 0x10;
const NUD_NOARP: u16 = 0x40;
const NUD_PERMANENT: u16 = 0x80;
/// `struct rtmsg` and `struct ndmsg` are both 12 bytes.
const RTMSG_LEN: usize = 12;
const NDMSG_LEN: usize = 12;

static SEQ: AtomicU32 = AtomicU32::new(1);

fn seq() -> u32 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// Where packets to a backend go: its route's gateway, or the backend
/// itself on a connected route, out of interface `ifindex`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NextHop {
    pub address: IpAddr,
    pub ifindex: u32,
}

/// What matters of a neighbour entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// NUD_* state.
    pub state: u16,
    /// NTF_* flags (`ndm_flags`).
    pub flags: u8,
    /// NTF_EXT_* flags (NDA_FLAGS_EXT).
    pub ext_flags: u32,
}

impl Entry {
    /// Set by an operator or another controller: never changed here.
    pub fn is_static(&self) -> bool {
        self.state & (NUD_PERMANENT | NUD_NOARP) != 0 || self.flags & NTF_EXT_LEARNED != 0
    }

    pub fn is_managed(&self) -> bool {
        self.ext_flags & NTF_EXT_MANAGED != 0
    }
}

/// The address family and the wire bytes of `a`.
fn family_and_octets(a: IpAddr) -> (u8, Vec<u8>) {
    match a {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    }
}

fn route_request(dst: IpAddr) -> Vec<u8> {
    let (family, octets) = family_and_octets(dst);
    let mut rtmsg = [0u8; RTMSG_LEN];
    rtmsg[0] = family;
    rtmsg[1] = (octets.len() * 8) as u8; // rtm_dst_len: a host route
    let mut m = message(RTM_GETROUTE, NLM_F_REQUEST, seq(), &rtmsg);
    push_attr(&mut m, RTA_DST, &octets);
    finish(m)
}

/// The next hop in a route reply; `None` for a local address, which needs
/// no neighbour.
fn parse_route(reply: &[u8], dst: IpAddr) -> io::Result<Option<NextHop>> {
    let (kind, msg) = first_message(reply)?;
    if kind != RTM_NEWROUTE {
        return Err(io::Error::other(format!("unexpected reply type {kind}")));
    }
    let rtm_type = msg
        .get(HEADER_LEN + 7)
        .copied()
        .ok_or_else(|| io::Error::other("short route reply"))?;
    match rtm_type {
        RTN_UNICAST => {}
        RTN_LOCAL => return Ok(None),
        t => return Err(io::Error::other(format!("route of type {t}, not unicast"))),
    }
    let mut hop = NextHop {
        address: dst,
        ifindex: 0,
    };
    for (t, payload) in attributes(msg.get(HEADER_LEN + RTMSG_LEN..).unwrap_or_default()) {
        match (t, payload.len()) {
            (RTA_OIF, 4) => hop.ifindex = u32_at(payload, 0).unwrap_or(0),
            (RTA_GATEWAY, 4) => {
                hop.address = Ipv4Addr::new(payload[0], payload[1], payload[2], payload[3]).into()
            }
            (RTA_GATEWAY, 16) => {
                let mut b = [0u8; 16];
                b.copy_from_slice(payload);
                hop.address = Ipv6Addr::from(b).into();
            }
            _ => {}
        }
    }
    if hop.ifindex == 0 {
        return Err(io::Error::other("route without an output interface"));
    }
    Ok(Some(hop))
}

/// The next hop for `dst` in this namespace's routes.
pub fn next_hop(fd: &OwnedFd, dst: IpAddr) -> io::Result<Option<NextHop>> {
    parse_route(&transact(fd, &route_request(dst))?, dst)
}

fn ndmsg(family: u8, ifindex: u32) -> [u8; NDMSG_LEN] {
    let mut b = [0u8; NDMSG_LEN];
    b[0] = family;
    b[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    // ndm_state NUD_NONE, ndm_flags 0, ndm_type 0.
    b
}

/// A neighbour message of `kind` naming `hop`'s entry.
fn neigh_message(kind: u16, flags: u16, hop: &NextHop) -> Vec<u8> {
    let (family, octets) = family_and_octets(hop.address);
    let mut m = message(kind, flags, seq(), &ndmsg(family, hop.ifindex));
    push_attr(&mut m, NDA_DST, &octets);
    m
}

fn get_request(hop: &NextHop) -> Vec<u8> {
    finish(neigh_message(RTM_GETNEIGH, NLM_F_REQUEST, hop))
}

/// Adds a managed entry, or with `existing` makes the one there managed:
/// with state NUD_NONE and no link-layer address the kernel keeps an
/// existing entry's address and state, and resolves a new one itself.
fn add_request(hop: &NextHop, existing: bool) -> Vec<u8> {
    let how = if existing { NLM_F_REPLACE } else { NLM_F_EXCL };
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | how;
    let mut m = neigh_message(RTM_NEWNEIGH, flags, hop);
    push_attr(&mut m, NDA_FLAGS_EXT, &NTF_EXT_MANAGED.to_ne_bytes());
    finish(m)
}

fn delete_request(hop: &NextHop) -> Vec<u8> {
    finish(neigh_message(RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK, hop))
}

fn parse_entry(reply: &[u8]) -> io::Result<Option<Entry>> {
    let (kind, msg) = match first_message(reply) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        r => r?,
    };
    if kind != RTM_NEWNEIGH {
        return Err(io::Error::other(format!("unexpected reply type {kind}")));
    }
    let short = || io::Error::other("short neighbour reply");
    let mut e = Entry {
        state: u16_at(msg, HEADER_LEN + 8).ok_or_else(short)?,
        flags: *msg.get(HEADER_LEN + 10).ok_or_else(short)?,
        ext_flags: 0,
    };
    let attrs = msg.get(HEADER_LEN + NDMSG_LEN..).unwrap_or_default();
    if let Some((_, f)) = attributes(attrs).find(|(t, _)| *t == NDA_FLAGS_EXT) {
        e.ext_flags = u32_at(f, 0).unwrap_or(0);
    }
    Ok(Some(e))
}

fn expect_ack(reply: &[u8]) -> io::Result<()> {
    match first_message(reply)? {
        (NLMSG_ERROR, _) => Ok(()),
        (kind, _) => Err(io::Error::other(format!("unexpected reply type {kind}"))),
    }
}

/// The entry for `hop`, `None` when there is none.
pub fn entry(fd: &OwnedFd, hop: &NextHop) -> io::Result<Option<Entry>> {
    parse_entry(&transact(fd, &get_request(hop))?)
}

/// See [`add_request`].
pub fn add_managed(fd: &OwnedFd, hop: &NextHop, existing: bool) -> io::Result<()> {
    expect_ack(&transact(fd, &add_request(hop, existing))?)
}

pub fn delete(fd: &OwnedFd, hop: &NextHop) -> io::Result<()> {
    expect_ack(&transact(fd, &delete_request(hop))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOP: NextHop = NextHop {
        address: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 11)),
        ifindex: 3,
    };

    fn header(m: &[u8]) -> (u32, u16, u16) {
        (
            u32_at(m, 0).unwrap(),
            u16_at(m, 4).unwrap(),
            u16_at(m, 6).unwrap(),
        )
    }

    /// A reply of `kind` with `body` after the header.
    fn reply(kind: u16, body: &[u8]) -> Vec<u8> {
        finish(message(kind, 0, 1, body))
    }

    #[test]
    fn a_new_managed_entry_is_what_ip_neigh_add_managed_sends() {
        // iproute2 6.1 `ip neigh add 198.18.0.11 dev <ifindex 3> managed`,
        // read with strace: ndmsg, NDA_DST, NDA_FLAGS_EXT = NTF_EXT_MANAGED.
        let want_body: [u8; 28] = [
            2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 8, 0, 1, 0, 198, 18, 0, 11, 8, 0, 15, 0, 1, 0, 0, 0,
        ];
        let m = add_request(&HOP, false);
        assert_eq!(header(&m), (44, RTM_NEWNEIGH, 0x605));
        assert_eq!(&m[HEADER_LEN..], &want_body);
        // Making an existing entry managed replaces instead of failing on it.
        let m = add_request(&HOP, true);
        assert_eq!(header(&m), (44, RTM_NEWNEIGH, 0x505));
        assert_eq!(&m[HEADER_LEN..], &want_body);
    }

    #[test]
    fn get_and_delete_name_the_entry_by_interface_and_address() {
        for (m, kind, flags) in [
            (get_request(&HOP), RTM_GETNEIGH, NLM_F_REQUEST),
            (
                delete_request(&HOP),
                RTM_DELNEIGH,
                NLM_F_REQUEST | NLM_F_ACK,
            ),
        ] {
            assert_eq!(header(&m), (36, kind, flags));
            assert_eq!(
                &m[HEADER_LEN..],
                &[
                    2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 8, 0, 1, 0, 198, 18, 0, 11
                ]
            );
        }
        let m = route_request(HOP.address);
        assert_eq!(header(&m), (36, RTM_GETROUTE, NLM_F_REQUEST));
        assert_eq!(m[HEADER_LEN], 2, "AF_INET");
        assert_eq!(m[HEADER_LEN + 1], 32, "a host route's length");
        assert_eq!(&m[HEADER_LEN + 12..], &[8, 0, 1, 0, 198, 18, 0, 11]);
    }

    fn route_reply(rtm_type: u8, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![2, 32, 0, 0, 254, 0, 0, rtm_type, 0, 0, 0, 0];
        for (t, p) in attrs {
            push_attr(&mut body, *t, p);
        }
        reply(RTM_NEWROUTE, &body)
    }

    #[test]
    fn a_route_gives_its_gateway_or_the_destination_and_its_interface() {
        let dst = HOP.address;
        let oif = 7u32.to_ne_bytes();
        let connected = route_reply(
            RTN_UNICAST,
            &[(RTA_DST, &family_and_octets(dst).1), (RTA_OIF, &oif)],
        );
        assert_eq!(
            parse_route(&connected, dst).unwrap(),
            Some(NextHop {
                address: dst,
                ifindex: 7
            })
        );
        let via = route_reply(
            RTN_UNICAST,
            &[(RTA_OIF, &oif), (RTA_GATEWAY, &[198, 18, 0, 1])],
        );
        assert_eq!(
            parse_route(&via, dst).unwrap(),
            Some(NextHop {
                address: Ipv4Addr::new(198, 18, 0, 1).into(),
                ifindex: 7
            })
        );
        assert_eq!(
            parse_route(
                &route_reply(RTN_LOCAL, &[(RTA_OIF, &1u32.to_ne_bytes())]),
                dst
            )
            .unwrap(),
            None
        );
        let blackhole = parse_route(&route_reply(6, &[]), dst).unwrap_err();
        assert!(blackhole.to_string().contains("type 6"), "{blackhole}");
        assert!(parse_route(&route_reply(RTN_UNICAST, &[]), dst).is_err());
        // What the kernel answers when nothing routes there.
        let err = reply(NLMSG_ERROR, &(-libc::ENETUNREACH).to_ne_bytes());
        assert_eq!(
            parse_route(&err, dst).unwrap_err().raw_os_error(),
            Some(libc::ENETUNREACH)
        );
    }

    #[test]
    fn ipv6_next_hops_are_asked_and_named_in_their_family() {
        let dst: IpAddr = "2001:db8::11".parse().unwrap();
        let m = route_request(dst);
        assert_eq!(m[HEADER_LEN], libc::AF_INET6 as u8);
        assert_eq!(m[HEADER_LEN + 1], 128, "a host route's length");
        assert_eq!(&m[HEADER_LEN + 12..HEADER_LEN + 16], &[20, 0, 1, 0]);
        assert_eq!(&m[HEADER_LEN + 16..], &family_and_octets(dst).1[..]);

        let gw: Ipv6Addr = "fe80::1".parse().unwrap();
        let mut body = vec![libc::AF_INET6 as u8, 128, 0, 0, 254, 0, 0, RTN_UNICAST];
        body.extend([0; 4]);
        push_attr(&mut body, RTA_OIF, &4u32.to_ne_bytes());
        push_attr(&mut body, RTA_GATEWAY, &gw.octets());
        assert_eq!(
            parse_route(&reply(RTM_NEWROUTE, &body), dst).unwrap(),
            Some(NextHop {
                address: gw.into(),
                ifindex: 4
            })
        );

        let hop = NextHop {
            address: gw.into(),
            ifindex: 4,
        };
        let m = add_request(&hop, false);
        assert_eq!(m[HEADER_LEN], libc::AF_INET6 as u8, "ndm_family");
        assert_eq!(u32_at(&m, HEADER_LEN + 4), Some(4), "ndm_ifindex");
        let attrs: Vec<(u16, Vec<u8>)> = attributes(&m[HEADER_LEN + NDMSG_LEN..])
            .map(|(t, p)| (t, p.to_vec()))
            .collect();
        assert_eq!(
            attrs,
            [
                (NDA_DST, gw.octets().to_vec()),
                (NDA_FLAGS_EXT, NTF_EXT_MANAGED.to_ne_bytes().to_vec())
            ]
        );
    }

    fn neigh_reply(state: u16, flags: u8, ext: Option<u32>) -> Vec<u8> {
        let mut body = ndmsg(libc::AF_INET as u8, 3).to_vec();
        body[8..10].copy_from_slice(&state.to_ne_bytes());
        body[10] = flags;
        push_attr(&mut body, NDA_DST, &family_and_octets(HOP.address).1);
        push_attr(&mut body, 2, &[2, 0, 0, 0, 0, 11]); // NDA_LLADDR
        if let Some(ext) = ext {
            push_attr(&mut body, NDA_FLAGS_EXT, &ext.to_ne_bytes());
        }
        reply(RTM_NEWNEIGH, &body)
    }

    #[test]
    fn entries_are_read_as_static_managed_or_dynamic() {
        let e = parse_entry(&neigh_reply(0x02, 0, Some(1)))
            .unwrap()
            .unwrap();
        assert!(e.is_managed() && !e.is_static(), "{e:?}");
        let e = parse_entry(&neigh_reply(0x04, 0, None)).unwrap().unwrap();
        assert!(!e.is_managed() && !e.is_static(), "stale, dynamic: {e:?}");
        for (state, flags) in [(NUD_PERMANENT, 0), (NUD_NOARP, 0), (0x02, NTF_EXT_LEARNED)] {
            let e = parse_entry(&neigh_reply(state, flags, None))
                .unwrap()
                .unwrap();
            assert!(e.is_static(), "{e:?}");
        }
        let none = reply(NLMSG_ERROR, &(-libc::ENOENT).to_ne_bytes());
        assert_eq!(parse_entry(&none).unwrap(), None);
        let eperm = reply(NLMSG_ERROR, &(-libc::EPERM).to_ne_bytes());
        assert_eq!(
            expect_ack(&eperm).unwrap_err().raw_os_error(),
            Some(libc::EPERM)
        );
        expect_ack(&reply(NLMSG_ERROR, &0i32.to_ne_bytes())).unwrap();
    }
}
