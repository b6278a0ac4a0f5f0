//! The packet's one clock read. Idle timeouts need only the coarse clock,
//! which is cheap and ticks once per jiffy; latency stamps need the fine
//! one. A packet reads at most one of them: the fine one when it is known
//! before the first read that the packet stamps or measures (a SYN, or an
//! entry still awaiting a measurement), and that reading then serves the
//! timeouts too.
//!
//! Both clocks are CLOCK_MONOTONIC, the coarse one up to a jiffy behind, so
//! an entry stamped from the fine clock looks up to a jiffy younger to a
//! later coarse read: every age is a saturating difference (see
//! `conn::expired`), never a wrapped one.

use aya_ebpf::helpers::generated::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};

pub struct Clock {
    ns: u64,
    read: bool,
    fine: bool,
}

impl Clock {
    #[inline(always)]
    pub const fn unread() -> Self {
        Self {
            ns: 0,
            read: false,
            fine: false,
        }
    }

    /// Nanoseconds since boot. The packet's first call reads the fine
    /// clock if `fine` (the packet will want `us` too), else the coarse one;
    /// later calls return that reading.
    #[inline(always)]
    pub fn ns(&mut self, fine: bool) -> u64 {
        if !self.read {
            // SAFETY: the helpers take no arguments and only read a clock.
            self.ns = unsafe {
                if fine {
                    bpf_ktime_get_ns()
                } else {
                    bpf_ktime_get_coarse_ns()
                }
            };
            self.read = true;
            self.fine = fine;
        }
        self.ns
    }

    /// Microseconds of the fine clock, wrapping at 2^32 (latency stamps
    /// subtract with wrapping). Reads it only if this packet has not yet.
    #[inline(always)]
    pub fn us(&mut self) -> u32 {
        if !self.fine {
            // SAFETY: as in `ns`.
            self.ns = unsafe { bpf_ktime_get_ns() };
            self.read = true;
            self.fine = true;
        }
        (self.ns / 1000) as u32
    }
}
