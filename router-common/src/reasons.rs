//! Why a packet got its verdict: one per-CPU `REASONS` counter per reason,
//! so operators debug from counters, not logs.
//!
//! The numbers are the counters' indices, read by the daemon and exported
//! under `Reason::name`: they are ABI and never change. The `u32` constants
//! give them to the code that indexes counters.

/// A verdict's reason, or (`LruMiss`, `TcpOutOfWindow`, `Unconfirmed`,
/// `SnatPortProbed`) an event counted beside one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Destination is no service or SNAT address (includes IPv6 and non-IP).
    PassNotService = 0,
    /// Truncated headers, IHL < 5, total length inconsistent with the frame,
    /// TCP data offset < 5, an ICMP error quoting less than an IPv4 header
    /// and 8 bytes after it: dropped (the stack would drop them too).
    DropMalformed = 1,
    /// IPv4 fragment (MF set or offset ≠ 0): passed to the stack, never balanced.
    PassFragment = 2,
    /// IPv4 header with options: passed to the stack, never balanced.
    PassIpOptions = 3,
    /// New flow for a service whose backends all have weight 0: dropped.
    DropNoBackend = 4,
    /// `bpf_fib_lookup` found no route or no neighbour: the rewritten packet is
    /// passed to the stack, which resolves the neighbour.
    PassFibFailed = 5,
    /// A connection-table insert failed: the packet is dropped.
    DropConnTableFull = 6,
    /// A non-SYN TCP packet without an entry was re-hashed through Maglev.
    /// Not a verdict: counted in addition to the re-created flow's.
    LruMiss = 7,
    /// Every SNAT (address, port) probe was taken: the new flow is dropped.
    DropSnatExhausted = 8,
    /// A protocol other than TCP, UDP and ICMP to a service or SNAT
    /// address: passed.
    PassUnknownProto = 9,
    /// Packets forwarded with `XDP_TX` (same interface).
    Tx = 10,
    /// Packets forwarded with `XDP_REDIRECT` (another interface).
    Redirect = 11,
    /// Packets to a SNAT address with no reply entry: passed to the stack.
    /// (For TCP, only when the host has a socket for the packet.)
    PassNoReplyEntry = 12,
    /// TCP to a SNAT address with neither a reply entry nor a host socket: a
    /// reply of a translated flow whose entry is gone (evicted, expired).
    /// Dropped, because the host's stack would answer it with a reset and end
    /// the backend's side of a connection that was only missing its entry.
    DropNoReplyEntry = 13,
    /// A TCP RST or FIN whose sequence number lies outside the window of
    /// what its direction has sent (see `tcp_seq`): forwarded, but the flow
    /// is not marked closing and stays counted. Not a verdict: counted in
    /// addition to the packet's.
    TcpOutOfWindow = 14,
    /// A client's packet on a half-open flow that does not confirm it: the
    /// backend has not answered yet, or (TCP) it acknowledges nothing the
    /// backend sent. Forwarded; the flow stays half-open. Not a verdict.
    Unconfirmed = 15,
    /// A packet that would be forwarded arrived with a TTL of 0 or 1: the
    /// LB is a router hop and does not forward it (a routing loop ends
    /// here). Dropped; no ICMP time-exceeded is sent.
    DropTtlExpired = 16,
    /// An ICMP error (destination unreachable, time exceeded) to a VIP or
    /// SNAT address that no live entry of a tracked flow owns: no entry for
    /// the flow its quoted header names, an expired one, a forward entry
    /// whose reply key is no longer its own, a quote that is not a plain
    /// TCP or UDP header (IP options, a later fragment, ICMP, another
    /// protocol), or one addressed elsewhere than its quote's source.
    /// Passed to the stack, untranslated. (A translated error is counted
    /// `tx` or `redirect` like any forwarded packet.)
    PassIcmpUntracked = 17,
    /// ICMP that is not an error the datapath translates (echo, redirect,
    /// parameter problem, …) to a VIP or SNAT address: passed to the stack.
    PassIcmpOther = 18,
    /// A new flow's SNAT port was probed from `snat_port_range`: the
    /// client's own port was held by another live flow to that backend, or
    /// (inside the host's ephemeral range) by a host socket. The backend
    /// sees a 4-tuple of the LB's choosing, which its TIME_WAIT may still
    /// hold from an earlier flow with other TCP timestamps: the SYN is then
    /// answered with an ACK and the client retries after a second. Not a
    /// verdict: counted in addition to the packet's.
    SnatPortProbed = 19,
    /// A DSR packet that encapsulated would be longer than the route's MTU
    /// toward its backend, with DF set: the client is sent ICMP
    /// "fragmentation needed" with the MTU that fits (`XDP_TX`), and the
    /// packet itself is not forwarded.
    IcmpTooBig = 20,
    /// A DSR packet too long to encapsulate, without DF: the program
    /// cannot fragment, so it is dropped.
    DropTooBig = 21,
}

impl Reason {
    /// Every reason, in counter order.
    pub const ALL: [Reason; COUNT as usize] = [
        Reason::PassNotService,
        Reason::DropMalformed,
        Reason::PassFragment,
        Reason::PassIpOptions,
        Reason::DropNoBackend,
        Reason::PassFibFailed,
        Reason::DropConnTableFull,
        Reason::LruMiss,
        Reason::DropSnatExhausted,
        Reason::PassUnknownProto,
        Reason::Tx,
        Reason::Redirect,
        Reason::PassNoReplyEntry,
        Reason::DropNoReplyEntry,
        Reason::TcpOutOfWindow,
        Reason::Unconfirmed,
        Reason::DropTtlExpired,
        Reason::PassIcmpUntracked,
        Reason::PassIcmpOther,
        Reason::SnatPortProbed,
        Reason::IcmpTooBig,
        Reason::DropTooBig,
    ];

    /// The counter's name as exported by `router status` and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotService => "pass_not_service",
            Reason::DropMalformed => "drop_malformed",
            Reason::PassFragment => "pass_fragment",
            Reason::PassIpOptions => "pass_ip_options",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::PassFibFailed => "pass_fib_failed",
            Reason::DropConnTableFull => "drop_conn_table_full",
            Reason::LruMiss => "lru_miss",
            Reason::DropSnatExhausted => "drop_snat_exhausted",
            Reason::PassUnknownProto => "pass_unknown_proto",
            Reason::Tx => "tx",
            Reason::Redirect => "redirect",
            Reason::PassNoReplyEntry => "pass_no_reply_entry",
            Reason::DropNoReplyEntry => "drop_no_reply_entry",
            Reason::TcpOutOfWindow => "tcp_out_of_window",
            Reason::Unconfirmed => "unconfirmed",
            Reason::DropTtlExpired => "drop_ttl_expired",
            Reason::PassIcmpUntracked => "pass_icmp_untracked",
            Reason::PassIcmpOther => "pass_icmp_other",
            Reason::SnatPortProbed => "snat_port_probed",
            Reason::IcmpTooBig => "icmp_too_big",
            Reason::DropTooBig => "drop_too_big",
        }
    }
}

pub const PASS_NOT_SERVICE: u32 = Reason::PassNotService as u32;
pub const DROP_MALFORMED: u32 = Reason::DropMalformed as u32;
pub const PASS_FRAGMENT: u32 = Reason::PassFragment as u32;
pub const PASS_IP_OPTIONS: u32 = Reason::PassIpOptions as u32;
pub const DROP_NO_BACKEND: u32 = Reason::DropNoBackend as u32;
pub const PASS_FIB_FAILED: u32 = Reason::PassFibFailed as u32;
pub const DROP_CONN_TABLE_FULL: u32 = Reason::DropConnTableFull as u32;
pub const LRU_MISS: u32 = Reason::LruMiss as u32;
pub const DROP_SNAT_EXHAUSTED: u32 = Reason::DropSnatExhausted as u32;
pub const PASS_UNKNOWN_PROTO: u32 = Reason::PassUnknownProto as u32;
pub const TX: u32 = Reason::Tx as u32;
pub const REDIRECT: u32 = Reason::Redirect as u32;
pub const PASS_NO_REPLY_ENTRY: u32 = Reason::PassNoReplyEntry as u32;
pub const DROP_NO_REPLY_ENTRY: u32 = Reason::DropNoReplyEntry as u32;
pub const TCP_OUT_OF_WINDOW: u32 = Reason::TcpOutOfWindow as u32;
pub const UNCONFIRMED: u32 = Reason::Unconfirmed as u32;
pub const DROP_TTL_EXPIRED: u32 = Reason::DropTtlExpired as u32;
pub const PASS_ICMP_UNTRACKED: u32 = Reason::PassIcmpUntracked as u32;
pub const PASS_ICMP_OTHER: u32 = Reason::PassIcmpOther as u32;
pub const SNAT_PORT_PROBED: u32 = Reason::SnatPortProbed as u32;
pub const ICMP_TOO_BIG: u32 = Reason::IcmpTooBig as u32;
pub const DROP_TOO_BIG: u32 = Reason::DropTooBig as u32;

/// Number of reasons: the size of `REASONS`.
pub const COUNT: u32 = 22;

/// `Reason::name` of every counter, indexed by reason.
pub const NAMES: [&str; COUNT as usize] = {
    let mut names = [""; COUNT as usize];
    let mut i = 0;
    while i < names.len() {
        names[i] = Reason::ALL[i].name();
        i += 1;
    }
    names
};

// `ALL` is what indexes `NAMES`: each reason must sit at its own number.
const _: () = {
    let mut i = 0;
    while i < Reason::ALL.len() {
        assert!(Reason::ALL[i] as usize == i);
        i += 1;
    }
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_exported_ones() {
        // The counters' names are an interface (metrics, `router status`).
        assert_eq!(
            NAMES,
            [
                "pass_not_service",
                "drop_malformed",
                "pass_fragment",
                "pass_ip_options",
                "drop_no_backend",
                "pass_fib_failed",
                "drop_conn_table_full",
                "lru_miss",
                "drop_snat_exhausted",
                "pass_unknown_proto",
                "tx",
                "redirect",
                "pass_no_reply_entry",
                "drop_no_reply_entry",
                "tcp_out_of_window",
                "unconfirmed",
                "drop_ttl_expired",
                "pass_icmp_untracked",
                "pass_icmp_other",
                "snat_port_probed",
                "icmp_too_big",
                "drop_too_big",
            ]
        );
    }
}
