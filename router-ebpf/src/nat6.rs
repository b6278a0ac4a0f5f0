//! IPv6 NAT, in the `router_nat6` program (being built).

use aya_ebpf::programs::XdpContext;
use router_common::reasons::Reason;

use crate::verdict::Verdict;

/// The verdict for an IPv6 NAT packet.
#[inline(always)]
pub fn run(_ctx: &XdpContext) -> Result<Verdict, ()> {
    Ok(Reason::PassNotService.into())
}
