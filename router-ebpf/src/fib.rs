//! Next-hop resolution with `bpf_fib_lookup`, cached in the connection entry
//! so an established packet needs no FIB lookup while `FIB_GEN` is unchanged.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams},
    helpers::generated::bpf_fib_lookup,
    programs::XdpContext,
};
use router_common::ConnEntry;

const AF_INET: u8 = 2;

pub struct NextHop {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub ifindex: u32,
}

/// Looks up the next hop for a packet after translation to `e`'s tuple.
#[inline(always)]
pub fn lookup(ctx: &XdpContext, e: &ConnEntry, proto: u8, tot_len: u16) -> Option<NextHop> {
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
