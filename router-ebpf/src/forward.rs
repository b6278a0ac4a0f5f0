//! Sending a tracked packet on: the NAT rewrite per its connection entry,
//! the next hop (cached in the entry), and the traffic counters.

use aya_ebpf::programs::XdpContext;
use router_common::{ConnEntry, reasons::Reason};

use crate::{
    classify::Packet,
    conn::Origin,
    fib,
    maps::FIB_GEN,
    nat::{self, Hop},
    stats,
    verdict::Verdict,
};

/// Translates a packet per its connection entry `e` and sends it to the
/// next hop. `e` points into a table (`Origin::Tracked`) or at the fresh
/// copy of a new flow's entry (`Origin::NewFlow`), whose resolved next hop
/// is then cached by the next packet's lookup.
#[inline(always)]
pub fn packet(
    ctx: &XdpContext,
    e: &mut ConnEntry,
    pkt: &Packet,
    origin: Origin,
) -> Result<Verdict, ()> {
    let fib_gen = match FIB_GEN.get(0) {
        Some(g) => *g,
        None => 0,
    };
    if (fib_gen == 0 || e.fib_gen != fib_gen)
        && !fib::resolve(ctx, e, pkt.l4.proto, pkt.ip.tot_len, fib_gen)
    {
        // Hand the translated packet to the stack, which resolves the
        // neighbour; later packets of the flow then take the fast path.
        // It is still this flow's traffic (often its SYN): count it.
        nat::rewrite_l3_l4(ctx, e, pkt.l4.proto, Hop::Stack)?;
        count_traffic(ctx, e, origin);
        return Ok(Reason::PassFibFailed.into());
    }
    nat::rewrite_l3_l4(ctx, e, pkt.l4.proto, Hop::Program)?;
    nat::rewrite_macs(ctx, &e.dmac, &e.smac)?;
    count_traffic(ctx, e, origin);
    // SAFETY: `ctx.ctx` is the xdp_md the kernel passed in, valid for the
    // whole run; the verifier checks this read of one of its fields.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    if e.ifindex == ingress {
        return Ok(Reason::Tx.into());
    }
    Ok(Verdict::redirect(e.ifindex))
}

/// Sends a packet about flow direction `e` that is already translated (an
/// ICMP error, see `icmp`) to the entry's next hop, as `packet` does, the
/// hop looked up for the flow's protocol `proto` and the packet's total
/// length `tot_len`, and the TTL taken one from when the program sends it
/// (the stack takes its own). Apart from `packet`, not sharing its body: passing
/// the two values into a shared body kept them live across the helper
/// calls and cost the packet path a few spilled registers.
#[inline(always)]
pub fn translated(
    ctx: &XdpContext,
    e: &mut ConnEntry,
    (proto, tot_len): (u8, u16),
) -> Result<Verdict, ()> {
    let fib_gen = match FIB_GEN.get(0) {
        Some(g) => *g,
        None => 0,
    };
    if (fib_gen == 0 || e.fib_gen != fib_gen) && !fib::resolve(ctx, e, proto, tot_len, fib_gen) {
        count_traffic(ctx, e, Origin::Tracked);
        return Ok(Reason::PassFibFailed.into());
    }
    nat::take_ttl(ctx)?;
    nat::rewrite_macs(ctx, &e.dmac, &e.smac)?;
    count_traffic(ctx, e, Origin::Tracked);
    // SAFETY: as in `packet`.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    if e.ifindex == ingress {
        return Ok(Reason::Tx.into());
    }
    Ok(Verdict::redirect(e.ifindex))
}

#[inline(always)]
fn count_traffic(ctx: &XdpContext, e: &ConnEntry, origin: Origin) {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    stats::traffic(e, bytes, origin);
}
