//! Next-hop resolution with `bpf_fib_lookup`, cached in the connection entry
//! so an established packet needs no FIB lookup while `FIB_GEN` is unchanged,
//! and per backend (`NEXT_HOPS`) so a new flow to a backend needs none either.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SRC,
        bpf_fib_lookup as FibParams,
    },
    helpers::generated::bpf_fib_lookup,
    programs::XdpContext,
};
use router_common::{
    ConnEntry, FIB_GEN_PER_FLOW, PROTO_UDP,
    dsr::{DsrFlow, PROTO_IPIP},
    v6::{DsrFlow6, PROTO_IPV6},
};

use crate::maps::NEXT_HOPS;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

pub struct NextHop {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub ifindex: u32,
}

/// Resolves the next hop of `e` for a packet of total length `tot_len`
/// (host order) after translation to `e`'s tuple, `fib_gen` the live
/// `FIB_GEN` (0: nothing may be cached), and caches it in `e`. Returns
/// false when the kernel has no usable next hop.
///
/// Toward a backend the hop is the backend's: without policy rules or
/// multipath routes (`FIB_GEN_PER_FLOW` clear) the kernel's answer depends
/// on the destination alone, so one lookup serves every flow to it until
/// the generation changes. A reply goes to its client, whose hop only the
/// flow itself caches. Written straight into `e`: a hop returned by value
/// costs the program stack it does not have.
#[inline(always)]
pub fn resolve(ctx: &XdpContext, e: &mut ConnEntry, proto: u8, tot_len: u16, fib_gen: u32) -> bool {
    let shared = fib_gen != 0 && !e.is_reply() && fib_gen & FIB_GEN_PER_FLOW == 0;
    if shared
        && let Some(c) = NEXT_HOPS.get(e.backend_id)
        && c.fib_gen == fib_gen
        && c.addr == e.new_dst_addr
        && tot_len <= c.ok_len
    {
        e.dmac = c.dmac;
        e.smac = c.smac;
        e.ifindex = c.ifindex;
        e.fib_gen = fib_gen;
        return true;
    }
    let Some(hop) = lookup(ctx, e, proto, tot_len) else {
        return false;
    };
    // Concurrent writers on other CPUs store the same values.
    e.dmac = hop.dmac;
    e.smac = hop.smac;
    e.ifindex = hop.ifindex;
    e.fib_gen = fib_gen;
    if shared && let Some(c) = NEXT_HOPS.get_ptr_mut(e.backend_id) {
        // SAFETY: this CPU's element of a per-CPU array: nothing else
        // writes it while the program runs here.
        let c = unsafe { &mut *c };
        // The length the route accepted grows; a new hop starts over.
        let ok_len = if c.fib_gen == fib_gen && c.addr == e.new_dst_addr && c.ok_len > tot_len {
            c.ok_len
        } else {
            tot_len
        };
        c.dmac = e.dmac;
        c.smac = e.smac;
        c.ifindex = e.ifindex;
        c.addr = e.new_dst_addr;
        c.fib_gen = fib_gen;
        c.ok_len = ok_len;
    }
    true
}

/// Looks up the next hop for a packet after translation to `e`'s tuple.
#[inline(always)]
fn lookup(ctx: &XdpContext, e: &ConnEntry, proto: u8, tot_len: u16) -> Option<NextHop> {
    let mut slot = core::mem::MaybeUninit::uninit();
    let p: &mut FibParams = crate::mem::zeroed64(&mut slot);
    p.family = AF_INET;
    p.l4_protocol = proto;
    p.sport = e.new_src_port;
    p.dport = e.new_dst_port;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.__bindgen_anon_3.ipv4_src = e.new_src_addr;
    p.__bindgen_anon_4.ipv4_dst = e.new_dst_addr;
    // SAFETY: `ctx.ctx` is the xdp_md the kernel passed in, valid for the
    // whole run.
    p.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    // SAFETY: `p` is a parameter block on this stack, of the size passed,
    // that the helper reads and fills in; it keeps no pointer to it.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return None;
    }
    Some(NextHop {
        dmac: p.dmac,
        smac: p.smac,
        ifindex: p.ifindex,
    })
}

/// What the FIB says about an encapsulated packet toward a backend.
pub enum Outer {
    /// Next hop, preferred source address and route MTU, written into the
    /// flow's entry.
    Resolved,
    /// The packet is longer than the route's MTU, this many bytes.
    TooBig(u32),
    /// No usable next hop (no route, or no neighbour yet); the preferred
    /// source, if the FIB found one, is in the entry.
    Failed,
}

/// Looks up the next hop of a DSR flow's outer packet (`tot_len` bytes,
/// host order) toward its backend, with the source address the host
/// would pick for it, and caches both, and the route's MTU, in `e`.
#[inline(always)]
pub fn resolve_outer(ctx: &XdpContext, e: &mut DsrFlow, tot_len: u16, fib_gen: u32) -> Outer {
    let mut slot = core::mem::MaybeUninit::uninit();
    let p: &mut FibParams = crate::mem::zeroed64(&mut slot);
    p.family = AF_INET;
    p.l4_protocol = if e.gue_dport != 0 {
        PROTO_UDP
    } else {
        PROTO_IPIP
    };
    p.sport = e.gue_sport;
    p.dport = e.gue_dport;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.__bindgen_anon_4.ipv4_dst = e.backend_addr;
    // SAFETY: as in `lookup`.
    p.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    // SAFETY: as in `lookup`.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            p,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_SRC,
        )
    };
    // SAFETY: the helper filled the union's output member (`mtu_result`,
    // which it writes on success and on FRAG_NEEDED) and the source
    // address; both are plain integers.
    let (mtu, src) = unsafe { (p.__bindgen_anon_1.mtu_result, p.__bindgen_anon_3.ipv4_src) };
    if src != 0 {
        e.outer_src = src;
    }
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        return Outer::TooBig(mtu as u32);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Outer::Failed;
    }
    e.dmac = p.dmac;
    e.smac = p.smac;
    e.ifindex = p.ifindex;
    e.mtu = mtu as u32;
    e.fib_gen = fib_gen;
    Outer::Resolved
}

/// `resolve_outer` for an IPv6 DSR flow: the outer packet's next hop, the
/// source the host would pick toward the backend, and the route's MTU. The
/// flow label goes into the lookup, so a multipath route toward backends
/// picks a path by flow as it would for the packet itself.
#[inline(always)]
pub fn resolve_outer6(ctx: &XdpContext, e: &mut DsrFlow6, tot_len: u16, fib_gen: u32) -> Outer {
    let mut slot = core::mem::MaybeUninit::uninit();
    let p: &mut FibParams = crate::mem::zeroed64(&mut slot);
    p.family = AF_INET6;
    p.l4_protocol = if e.gue_dport != 0 {
        PROTO_UDP
    } else {
        PROTO_IPV6
    };
    p.sport = e.gue_sport;
    p.dport = e.gue_dport;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.__bindgen_anon_2.flowinfo = (e.flow_label & 0x000f_ffff).to_be();
    p.__bindgen_anon_4.ipv6_dst = e.backend_addr.words;
    // SAFETY: as in `lookup`.
    p.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    // SAFETY: as in `lookup`.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            p,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_SRC,
        )
    };
    // SAFETY: as in `resolve_outer`: plain integers the helper filled in.
    let (mtu, src) = unsafe { (p.__bindgen_anon_1.mtu_result, p.__bindgen_anon_3.ipv6_src) };
    if src != [0; 4] {
        e.outer_src.words = src;
    }
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        return Outer::TooBig(mtu as u32);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Outer::Failed;
    }
    e.dmac = p.dmac;
    e.smac = p.smac;
    e.ifindex = p.ifindex;
    e.mtu = mtu as u32;
    e.fib_gen = fib_gen;
    Outer::Resolved
}
