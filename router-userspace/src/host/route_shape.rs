//! Whether the host routes IPv4 by more than the destination: policy rules
//! beyond the kernel's three defaults, or multipath routes. Either makes the
//! next hop the kernel picks for a backend depend on the flow (its source,
//! its mark, its hash), so the datapath must not share one backend's hop
//! among its flows (`FIB_GEN_PER_FLOW`). Read from rtnetlink dumps, which
//! need no privilege.

use std::{io, os::fd::AsRawFd};

use crate::netlink::{NLM_F_REQUEST, NLMSG_ERROR, attributes, finish, message, u16_at, u32_at};

const NLMSG_DONE: u16 = 3;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWRULE: u16 = 32;
const RTM_GETRULE: u16 = 34;
const NLM_F_DUMP: u16 = 0x300;

const RTA_DST: u16 = 1;
const RTA_MULTIPATH: u16 = 9;
const RTA_TABLE: u16 = 15;
const RTA_NH_ID: u16 = 30;
const FRA_PRIORITY: u16 = 6;
const FRA_TABLE: u16 = 15;

const RT_TABLE_DEFAULT: u32 = 253;
const RT_TABLE_MAIN: u32 = 254;
const RT_TABLE_LOCAL: u32 = 255;
/// The rules every IPv4 namespace starts with: (priority, table).
const DEFAULT_RULES: [(u32, u32); 3] = [
    (0, RT_TABLE_LOCAL),
    (32766, RT_TABLE_MAIN),
    (32767, RT_TABLE_DEFAULT),
];

/// Why next hops must be looked up per flow, in a few words; `None` when
/// the destination alone decides.
pub fn per_flow_reason() -> io::Result<Option<String>> {
    let rules = dump(RTM_GETRULE)?;
    if let Some(reason) = first_policy_rule(&rules) {
        return Ok(Some(reason));
    }
    Ok(first_multipath_route(&dump(RTM_GETROUTE)?))
}

/// A rule that is not one of the defaults, named by priority and table.
fn first_policy_rule(messages: &[Vec<u8>]) -> Option<String> {
    messages.iter().find_map(|m| {
        let (header, attrs) = (m.get(..12)?, m.get(12..)?);
        let mut priority = 0;
        let mut table = u32::from(header[4]);
        for (kind, payload) in attributes(attrs) {
            match kind {
                FRA_PRIORITY => priority = u32_at(payload, 0)?,
                FRA_TABLE => table = u32_at(payload, 0)?,
                _ => {}
            }
        }
        (!DEFAULT_RULES.contains(&(priority, table)))
            .then(|| format!("policy routing rule {priority} (table {table})"))
    })
}

/// A route with several next hops (or a next-hop object, which may be a
/// group), named by its destination.
fn first_multipath_route(messages: &[Vec<u8>]) -> Option<String> {
    messages.iter().find_map(|m| {
        let (header, attrs) = (m.get(..12)?, m.get(12..)?);
        let dst_len = header[1];
        let mut dst = [0u8; 4];
        let mut table = u32::from(header[4]);
        let mut multipath = false;
        for (kind, payload) in attributes(attrs) {
            match kind {
                RTA_DST => dst.copy_from_slice(payload.get(..4)?),
                RTA_TABLE => table = u32_at(payload, 0)?,
                RTA_MULTIPATH | RTA_NH_ID => multipath = true,
                _ => {}
            }
        }
        multipath.then(|| {
            format!(
                "multipath route {}/{dst_len} (table {table})",
                std::net::Ipv4Addr::from(dst)
            )
        })
    })
}

/// The payloads (after the netlink header) of every IPv4 object that a
/// `kind` dump returns.
fn dump(kind: u16) -> io::Result<Vec<Vec<u8>>> {
    let fd = crate::netlink::route_socket()?;
    // struct rtmsg and fib_rule_hdr alike: 12 bytes, the family first.
    let mut header = [0u8; 12];
    header[0] = libc::AF_INET as u8;
    crate::netlink::send(
        &fd,
        &finish(message(kind, NLM_F_REQUEST | NLM_F_DUMP, 1, &header)),
    )?;
    let reply_kind = if kind == RTM_GETRULE {
        RTM_NEWRULE
    } else {
        RTM_NEWROUTE
    };
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // SAFETY: receiving into a buffer we own, within its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 || split(&buf[..n as usize], reply_kind, &mut out)? {
            return Ok(out);
        }
    }
}

/// Appends the payloads of `reply_kind` messages in one datagram to `out`;
/// true once the dump's end is seen.
fn split(mut datagram: &[u8], reply_kind: u16, out: &mut Vec<Vec<u8>>) -> io::Result<bool> {
    let malformed = || io::Error::other("malformed rtnetlink dump");
    while datagram.len() >= 16 {
        let len = u32_at(datagram, 0).ok_or_else(malformed)? as usize;
        let kind = u16_at(datagram, 4).ok_or_else(malformed)?;
        if len < 16 || len > datagram.len() {
            return Err(malformed());
        }
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = u32_at(datagram, 16).ok_or_else(malformed)? as i32;
                return Err(io::Error::from_raw_os_error(-errno));
            }
            k if k == reply_kind => out.push(datagram[16..len].to_vec()),
            _ => {}
        }
        datagram = datagram.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        crate::netlink::push_attr(&mut a, kind, payload);
        a
    }

    fn object(table: u8, dst_len: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut m = vec![
            libc::AF_INET as u8,
            dst_len,
            0,
            0,
            table,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        for a in attrs {
            m.extend_from_slice(a);
        }
        m
    }

    fn rule(priority: u32, table: u32) -> Vec<u8> {
        object(
            table.min(252) as u8,
            0,
            &[
                attr(FRA_PRIORITY, &priority.to_ne_bytes()),
                attr(FRA_TABLE, &table.to_ne_bytes()),
            ],
        )
    }

    #[test]
    fn the_three_default_rules_are_not_policy_routing() {
        let defaults = vec![rule(0, 255), rule(32766, 254), rule(32767, 253)];
        assert_eq!(first_policy_rule(&defaults), None);
        let mut more = defaults;
        more.push(rule(100, 10));
        assert_eq!(
            first_policy_rule(&more).as_deref(),
            Some("policy routing rule 100 (table 10)")
        );
        // The main table at another priority is a rule someone added.
        assert!(first_policy_rule(&[rule(1000, 254)]).is_some());
    }

    #[test]
    fn a_route_with_several_next_hops_or_a_next_hop_object_is_multipath() {
        let plain = object(254, 24, &[attr(RTA_DST, &[198, 18, 0, 0])]);
        assert_eq!(first_multipath_route(std::slice::from_ref(&plain)), None);
        let ecmp = object(
            254,
            16,
            &[
                attr(RTA_DST, &[198, 19, 0, 0]),
                attr(RTA_MULTIPATH, &[0; 16]),
            ],
        );
        assert_eq!(
            first_multipath_route(&[plain.clone(), ecmp]).as_deref(),
            Some("multipath route 198.19.0.0/16 (table 254)")
        );
        let nh = object(254, 0, &[attr(RTA_NH_ID, &7u32.to_ne_bytes())]);
        assert_eq!(
            first_multipath_route(&[nh]).as_deref(),
            Some("multipath route 0.0.0.0/0 (table 254)")
        );
    }

    #[test]
    fn a_dump_is_split_into_its_messages_until_done() {
        let mut datagram = Vec::new();
        for (kind, payload) in [(RTM_NEWRULE, rule(0, 255)), (NLMSG_DONE, vec![0; 4])] {
            datagram.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
            datagram.extend_from_slice(&kind.to_ne_bytes());
            datagram.extend_from_slice(&[0; 10]);
            datagram.extend_from_slice(&payload);
        }
        let mut out = Vec::new();
        assert!(split(&datagram, RTM_NEWRULE, &mut out).unwrap());
        assert_eq!(out, vec![rule(0, 255)]);
        assert!(split(&datagram[..8], RTM_NEWRULE, &mut out).is_ok());
        let mut truncated = datagram.clone();
        truncated[0] = 200;
        assert!(split(&truncated, RTM_NEWRULE, &mut Vec::new()).is_err());
    }

    /// This process's own namespace, read for real: the dumps parse.
    #[test]
    fn the_hosts_own_tables_can_be_read() {
        per_flow_reason().expect("rtnetlink dumps");
    }
}
