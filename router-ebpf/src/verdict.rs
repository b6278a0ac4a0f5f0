//! A packet's verdict: the reason it is counted under and the XDP action
//! it gets. The program decides one verdict per packet and `router` counts
//! it, so no path can return an action without its counter.

use aya_ebpf::{bindings::xdp_action, helpers::generated::bpf_redirect};
use router_common::reasons::Reason;

/// The XDP action that goes with a reason.
pub trait Action {
    fn action(self) -> u32;
}

impl Action for Reason {
    #[inline(always)]
    fn action(self) -> u32 {
        match self {
            Reason::PassNotService
            | Reason::PassFragment
            | Reason::PassIpOptions
            | Reason::PassFibFailed
            | Reason::PassUnknownProto
            | Reason::PassNoReplyEntry
            | Reason::PassIcmpUntracked
            | Reason::PassIcmpOther => xdp_action::XDP_PASS,
            Reason::DropMalformed
            | Reason::DropNoBackend
            | Reason::DropConnTableFull
            | Reason::DropSnatExhausted
            | Reason::DropNoReplyEntry
            | Reason::DropTtlExpired
            | Reason::DropTooBig => xdp_action::XDP_DROP,
            Reason::Tx | Reason::IcmpTooBig => xdp_action::XDP_TX,
            // A redirect's action is what bpf_redirect returns, and only
            // `Verdict::redirect` calls it; without the call the kernel has
            // no target. The events are counted beside a verdict, never as
            // one. Either here is a bug, which XDP_ABORTED makes visible in
            // the xdp_exception tracepoint instead of sending the packet
            // astray.
            Reason::Redirect
            | Reason::LruMiss
            | Reason::TcpOutOfWindow
            | Reason::Unconfirmed
            | Reason::SnatPortProbed => xdp_action::XDP_ABORTED,
        }
    }
}

#[derive(Clone, Copy)]
pub struct Verdict {
    reason: Reason,
    action: u32,
}

impl Verdict {
    /// Out through interface `ifindex`. bpf_redirect only records the
    /// target; its return value is the action that makes the kernel send
    /// the packet there (XDP_REDIRECT, or XDP_ABORTED if it refused the
    /// flags), so that value is the verdict's action.
    #[inline(always)]
    pub fn redirect(ifindex: u32) -> Self {
        // SAFETY: the helper takes plain integers and touches only this
        // CPU's redirect state.
        let action = unsafe { bpf_redirect(ifindex, 0) } as u32;
        Verdict {
            reason: Reason::Redirect,
            action,
        }
    }

    #[inline(always)]
    pub fn reason(self) -> Reason {
        self.reason
    }

    #[inline(always)]
    pub fn action(self) -> u32 {
        self.action
    }
}

impl From<Reason> for Verdict {
    #[inline(always)]
    fn from(reason: Reason) -> Self {
        Verdict {
            reason,
            action: reason.action(),
        }
    }
}
