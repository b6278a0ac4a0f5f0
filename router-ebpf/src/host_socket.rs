//! What the host's own stack has, seen from XDP: whether a TCP packet for
//! one of the host's addresses has a socket to go to. Read only for replies
//! that have lost their connection entry; it never changes a socket.

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock_tuple},
    helpers::generated::{bpf_sk_release, bpf_skc_lookup_tcp},
    programs::XdpContext,
};

use crate::parse::{Ipv4, L4};

/// Whether the host has a TCP socket (listening, connecting, established
/// or in TIME_WAIT) for this packet, in the namespace of the device it
/// arrived on.
#[inline(always)]
pub fn has_tcp_socket(ctx: &XdpContext, ip: &Ipv4, l4: &L4) -> bool {
    // SAFETY: bpf_sock_tuple is plain old data; all-zero is a valid value.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    // SAFETY: writing the IPv4 member of a union of plain old data.
    let v4 = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
    v4.saddr = ip.src;
    v4.daddr = ip.dst;
    v4.sport = l4.src_port;
    v4.dport = l4.dst_port;
    let size = core::mem::size_of_val(v4) as u32;
    // SAFETY: the helper reads the IPv4 part of `tuple`, which lives on this
    // stack frame for the call; a non-null result holds a reference that is
    // released right away.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.ctx.cast(),
            &mut tuple,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` came from a lookup helper and is released exactly once.
    unsafe { bpf_sk_release(sk.cast()) };
    true
}
