//! What the host's own stack has, seen from XDP: whether a TCP packet for
//! one of the host's addresses has a socket to go to. Read for replies that
//! have lost their connection entry, and before a new flow takes its
//! client's port as SNAT port; it never changes a socket.

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock_tuple},
    helpers::generated::{bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::XdpContext,
};
use router_common::{ConnKey, PROTO_TCP, v6::ConnKey6};

use crate::{
    conn,
    parse::{Ipv4, L4},
};

/// Whether the host has a TCP socket (listening, connecting, established
/// or in TIME_WAIT) for this packet, in the namespace of the device it
/// arrived on.
#[inline(always)]
pub fn has_tcp_socket(ctx: &XdpContext, ip: &Ipv4, l4: &L4) -> bool {
    has_socket(
        ctx,
        &conn::key(ip.src, ip.dst, l4.src_port, l4.dst_port, PROTO_TCP),
    )
}

/// Whether the host has a socket that a packet with key `k` (as it would
/// arrive) goes to: TCP in any state but closed, or a bound UDP socket.
#[inline(always)]
pub fn has_socket(ctx: &XdpContext, k: &ConnKey) -> bool {
    // SAFETY: bpf_sock_tuple is plain old data; all-zero is a valid value.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    // SAFETY: writing the IPv4 member of a union of plain old data.
    let v4 = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
    v4.saddr = k.src_addr;
    v4.daddr = k.dst_addr;
    v4.sport = k.src_port;
    v4.dport = k.dst_port;
    let size = core::mem::size_of_val(v4) as u32;
    lookup(ctx, &mut tuple, size, k.proto)
}

/// `has_socket` for an IPv6 packet with key `k`.
#[inline(always)]
pub fn has_socket6(ctx: &XdpContext, k: &ConnKey6) -> bool {
    // SAFETY: as in `has_socket`.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    // SAFETY: writing the IPv6 member of a union of plain old data.
    let v6 = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
    v6.saddr = k.src_addr.words;
    v6.daddr = k.dst_addr.words;
    v6.sport = k.src_port;
    v6.dport = k.dst_port;
    let size = core::mem::size_of_val(v6) as u32;
    lookup(ctx, &mut tuple, size, k.proto)
}

/// Whether a socket answers `tuple` (the first `size` bytes of it: the
/// family's member) for protocol `proto`.
#[inline(always)]
fn lookup(ctx: &XdpContext, tuple: &mut bpf_sock_tuple, size: u32, proto: u8) -> bool {
    // SAFETY: the helpers read the first `size` bytes of `tuple`, which
    // lives on the caller's stack frame for the call; a non-null result
    // holds a reference that is released right away.
    let sk = unsafe {
        if proto == PROTO_TCP {
            bpf_skc_lookup_tcp(ctx.ctx.cast(), tuple, size, BPF_F_CURRENT_NETNS as u64, 0)
                .cast::<core::ffi::c_void>()
        } else {
            bpf_sk_lookup_udp(ctx.ctx.cast(), tuple, size, BPF_F_CURRENT_NETNS as u64, 0)
                .cast::<core::ffi::c_void>()
        }
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` came from a lookup helper and is released exactly once.
    unsafe { bpf_sk_release(sk.cast()) };
    true
}
