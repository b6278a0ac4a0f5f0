//! A trivial XDP_PASS program. Benchmarks measure against it, and test
//! topologies attach it to veth peers: a veth only accepts XDP_TX or
//! XDP_REDIRECT frames when its peer runs NAPI, which an XDP program enables.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// SAFETY: the loader reads the license from the `license` section, which
// holds nothing else, and no other symbol has this name.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
