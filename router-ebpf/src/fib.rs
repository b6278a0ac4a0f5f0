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
    v6::{DsrFlow6, NatEntry6, PROTO_IPV6},
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

/// What the FIB says about an encapsulated packet toward a backend, or
/// a translated IPv6 NAT packet toward either end (`resolve6`).
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

/// A DSR flow entry of either family, as the outer lookup reads and fills
/// it: the lookup and its result are the same for both.
pub trait Tunnelled {
    /// The GUE ports, network order; (0, 0) for IP in IP.
    fn gue_ports(&self) -> (u16, u16);
    /// Family, protocol number of IP in IP, flow info, and the backend's
    /// address, into the lookup's parameters.
    fn address(&self, p: &mut FibParams);
    /// The preferred source the lookup found, if any.
    fn take_source(&mut self, p: &FibParams);
    fn take_hop(&mut self, p: &FibParams, mtu: u32, fib_gen: u32);
}

impl Tunnelled for DsrFlow {
    #[inline(always)]
    fn gue_ports(&self) -> (u16, u16) {
        (self.gue_sport, self.gue_dport)
    }

    #[inline(always)]
    fn address(&self, p: &mut FibParams) {
        p.family = AF_INET;
        p.l4_protocol = PROTO_IPIP;
        p.__bindgen_anon_4.ipv4_dst = self.backend_addr;
    }

    #[inline(always)]
    fn take_source(&mut self, p: &FibParams) {
        // SAFETY: a plain integer the helper filled in (or left zero).
        let src = unsafe { p.__bindgen_anon_3.ipv4_src };
        if src != 0 {
            self.outer_src = src;
        }
    }

    #[inline(always)]
    fn take_hop(&mut self, p: &FibParams, mtu: u32, fib_gen: u32) {
        self.dmac = p.dmac;
        self.smac = p.smac;
        self.ifindex = p.ifindex;
        self.mtu = mtu;
        self.fib_gen = fib_gen;
    }
}

impl Tunnelled for DsrFlow6 {
    #[inline(always)]
    fn gue_ports(&self) -> (u16, u16) {
        (self.gue_sport, self.gue_dport)
    }

    /// The flow label goes into the lookup too, so a multipath route
    /// toward backends picks a path by flow as it would for the packet
    /// itself.
    #[inline(always)]
    fn address(&self, p: &mut FibParams) {
        p.family = AF_INET6;
        p.l4_protocol = PROTO_IPV6;
        p.__bindgen_anon_2.flowinfo = (self.flow_label & 0x000f_ffff).to_be();
        p.__bindgen_anon_4.ipv6_dst = self.backend_addr.words;
    }

    #[inline(always)]
    fn take_source(&mut self, p: &FibParams) {
        // SAFETY: plain integers the helper filled in (or left zero).
        let src = unsafe { p.__bindgen_anon_3.ipv6_src };
        if src != [0; 4] {
            self.outer_src.words = src;
        }
    }

    #[inline(always)]
    fn take_hop(&mut self, p: &FibParams, mtu: u32, fib_gen: u32) {
        self.dmac = p.dmac;
        self.smac = p.smac;
        self.ifindex = p.ifindex;
        self.mtu = mtu;
        self.fib_gen = fib_gen;
    }
}

/// Looks up the next hop of a DSR flow's outer packet (`tot_len` bytes,
/// host order) toward its backend, with the source address the host
/// would pick for it, and caches both, and the route's MTU, in `e`.
#[inline(always)]
pub fn resolve_outer<E: Tunnelled>(
    ctx: &XdpContext,
    e: &mut E,
    tot_len: u16,
    fib_gen: u32,
) -> Outer {
    let mut slot = core::mem::MaybeUninit::uninit();
    let p: &mut FibParams = crate::mem::zeroed64(&mut slot);
    e.address(p);
    let (sport, dport) = e.gue_ports();
    if dport != 0 {
        p.l4_protocol = PROTO_UDP;
    }
    p.sport = sport;
    p.dport = dport;
    p.__bindgen_anon_1.tot_len = tot_len;
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
    // which it writes on success and on FRAG_NEEDED); a plain integer.
    let mtu = unsafe { p.__bindgen_anon_1.mtu_result } as u32;
    e.take_source(p);
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        return Outer::TooBig(mtu);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Outer::Failed;
    }
    e.take_hop(p, mtu, fib_gen);
    Outer::Resolved
}

/// Looks up the next hop of an IPv6 NAT packet translated per `e` (`len`
/// bytes, the IPv6 datagram, host order; `proto` its transport) and
/// caches it in `e`. Each flow direction looks its own up: IPv6 NAT keeps
/// no per-backend cache.
#[inline(always)]
pub fn resolve6(ctx: &XdpContext, e: &mut NatEntry6, proto: u8, len: u16, fib_gen: u32) -> Outer {
    let mut slot = core::mem::MaybeUninit::uninit();
    let p: &mut FibParams = crate::mem::zeroed64(&mut slot);
    p.family = AF_INET6;
    p.l4_protocol = proto;
    p.sport = e.new_src_port;
    p.dport = e.new_dst_port;
    p.__bindgen_anon_1.tot_len = len;
    p.__bindgen_anon_3.ipv6_src = e.new_src.words;
    p.__bindgen_anon_4.ipv6_dst = e.new_dst.words;
    // SAFETY: as in `lookup`.
    p.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    // SAFETY: as in `lookup`.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        // SAFETY: as in `resolve_outer`.
        return Outer::TooBig(unsafe { p.__bindgen_anon_1.mtu_result } as u32);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Outer::Failed;
    }
    e.dmac = p.dmac;
    e.smac = p.smac;
    e.ifindex = p.ifindex;
    e.fib_gen = fib_gen;
    Outer::Resolved
}
