//! One benchmark run: every path in single and repeat mode, its samples
//! and the checks that each path took the branch it is named after.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, Result, ensure};
use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions},
};
use router::datapath::{Datapath, ServiceSpec, XDP_PASS_OBJ};
use router_common::{FILTER_DSR_ONLY, addr_filter_bucket, reasons};
use router_testkit::{
    kernel_ns::{EnteredNs, TEST_NEIGHBOURS, TEST_NEIGHBOURS6},
    packet::{Mac, Packet, TCP_ACK, TCP_SYN},
    packet6::Packet6,
    test_run::xdp_md,
};

use super::paths::{
    SingleResult, SynCase, VIP6, check_reasons, client_frames, dsr_service, dsr6_entries,
    dsr6_service, least_loaded_service, load_datapath, load_datapath_with, nat6_entries,
    nat6_service, reason_vec, repeat_call, service, single_calls, syn_acks, table_entries,
    trivial_program, udp_client_frames,
};
use super::perf::Recording;
use super::{
    BACKEND_PORT, BACKEND0_MAC, BACKENDS, CLIENT_ADDR, CLIENT_MAC, EST_CLIENT_PORT, LB_ADDR,
    LB_MAC, NON_SERVICE_DST, SYN_FIRST_PORT, VIP, WARMUP_CALLS, XDP_PASS, XDP_TX,
};

pub(super) struct Bench {
    pub(super) dp: Datapath,
    pub(super) trivial: Ebpf,
    pub(super) ctx: Vec<u8>,
    /// Frames of the established flow and its reply.
    pub(super) est_ack: Vec<u8>,
    pub(super) reply_ack: Vec<u8>,
    pub(super) non_service: Vec<u8>,
    /// The same service as DSR (IPIP), holding the established flow of
    /// `est_ack` in `DSR_FLOWS`.
    pub(super) dsr: Datapath,
    /// The IPv6 twin: an IPv6 DSR service (`router_v6`, IPv6 in IPv6)
    /// holding the flow of `est_ack6` in `DSR_FLOWS6`.
    pub(super) dsr6: Datapath,
    pub(super) est_ack6: Vec<u8>,
    /// The same IPv6 service as NAT (`router_nat6`), holding the flow of
    /// `est_ack6` in `NAT6_CONNS`.
    pub(super) nat6: Datapath,
    /// The `xdp_md` of the IPv6 frames, which are 20 bytes longer.
    pub(super) ctx6: Vec<u8>,
    // Dropped last: leaves and removes the namespace.
    pub(super) _ns: EnteredNs,
}

impl Bench {
    pub(super) fn new() -> Result<Self> {
        let ns = EnteredNs::new("rtbench").context("creating the benchmark netns")?;
        let ifindex = ns
            .test_arm(
                ("bx0", "bx1"),
                "02:00:00:00:00:01",
                "198.18.0.1/24",
                &TEST_NEIGHBOURS,
            )
            .context("setting up the benchmark netns")?;
        ns.test_arm6("bx0", "2001:2::1/64", &TEST_NEIGHBOURS6)
            .context("IPv6 on the benchmark netns's arm")?;

        // The non-service frame must stop at the address pre-filter.
        let bucket = |a: Ipv4Addr| addr_filter_bucket(u32::from_ne_bytes(a.octets()));
        let ns_bucket = bucket(*NON_SERVICE_DST.ip());
        ensure!(
            ns_bucket != bucket(*VIP.ip()) && ns_bucket != bucket(LB_ADDR),
            "non-service address {} shares a pre-filter bucket with the VIP or SNAT address",
            NON_SERVICE_DST.ip()
        );

        let mut dp = load_datapath()?;
        let mut trivial = Ebpf::load(XDP_PASS_OBJ).context("loading the xdp_pass object")?;
        trivial_program(&mut trivial)?
            .load()
            .context("loading the xdp_pass program")?;

        let client = SocketAddrV4::new(CLIENT_ADDR, EST_CLIENT_PORT);
        let syn = Packet::tcp(client, VIP, TCP_SYN)
            .with_macs(LB_MAC, CLIENT_MAC)
            .build();
        let ctx = xdp_md(ifindex, syn.len());
        // Create the established flow and learn its backend and SNAT port.
        let prog = dp.program_mut().context("router program")?;
        let mut out = vec![0u8; 512];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&syn),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN (SYN of the established flow)")?;
        ensure!(
            r.return_value == XDP_TX && r.data_size_out as usize == syn.len(),
            "SYN of the established flow: verdict {} (expected XDP_TX)",
            r.return_value
        );
        let backend = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        let snat_port = u16::from_be_bytes([out[34], out[35]]);
        let backend_mac: Mac = out[0..6]
            .try_into()
            .context("destination MAC of the translated SYN")?;
        ensure!(
            BACKENDS.contains(&backend) && backend_mac[..5] == BACKEND0_MAC[..5],
            "translated SYN went to {backend} ({backend_mac:02x?}), not a benchmark backend"
        );

        let est_ack = Packet::tcp(client, VIP, TCP_ACK)
            .with_macs(LB_MAC, CLIENT_MAC)
            .build();
        let reply_ack = Packet::tcp(
            SocketAddrV4::new(backend, BACKEND_PORT),
            SocketAddrV4::new(LB_ADDR, snat_port),
            TCP_ACK,
        )
        .with_macs(LB_MAC, backend_mac)
        .build();
        // The backend answers and the client acknowledges: the flow is
        // confirmed, so the established and reply rows measure CONNS hits.
        let syn_ack = Packet::tcp(
            SocketAddrV4::new(backend, BACKEND_PORT),
            SocketAddrV4::new(LB_ADDR, snat_port),
            TCP_SYN | TCP_ACK,
        )
        .with_macs(LB_MAC, backend_mac)
        .build();
        let prog = dp.program_mut().context("router program")?;
        single_calls(prog, &[syn_ack, est_ack.clone()], &ctx, XDP_TX, "handshake")?;
        ensure!(
            table_entries(&mut dp, "CONNS")? == 2,
            "the established flow's handshake did not confirm it"
        );
        let non_service = Packet::tcp(client, NON_SERVICE_DST, TCP_SYN)
            .with_macs(LB_MAC, CLIENT_MAC)
            .build();
        ensure!(
            est_ack.len() == syn.len()
                && reply_ack.len() == syn.len()
                && non_service.len() == syn.len(),
            "benchmark frames differ in length"
        );
        // The DSR flow: its SYN creates the entry the timed ACKs hit.
        let mut dsr = load_datapath_with(&dsr_service(), 0, 0)?;
        // The state the row claims: the VIP's bucket is DSR's alone, so
        // `router` hands the packet over on the filter bit.
        let filter: aya::maps::Array<_, u32> = aya::maps::Array::try_from(
            dsr.ebpf_mut()
                .map("ADDR_FILTER")
                .context("the DSR datapath's ADDR_FILTER")?,
        )?;
        ensure!(
            filter.get(&bucket(*VIP.ip()), 0)? & FILTER_DSR_ONLY != 0,
            "the DSR VIP's pre-filter bucket is not marked DSR-only"
        );
        let prog = dsr.program_mut().context("router program (DSR)")?;
        single_calls(prog, std::slice::from_ref(&syn), &ctx, XDP_TX, "DSR SYN")?;
        ensure!(
            table_entries(&mut dsr, "DSR_FLOWS")? == 1,
            "the DSR flow's SYN left no DSR_FLOWS entry"
        );
        // The IPv6 DSR flow, made the same way on a datapath of its own.
        let client6 = std::net::SocketAddrV6::new("2001:2::2".parse()?, EST_CLIENT_PORT, 0, 0);
        let vip6 = std::net::SocketAddrV6::new(VIP6, VIP.port(), 0, 0);
        let syn6 = Packet6::tcp(client6, vip6, TCP_SYN)
            .with_macs(LB_MAC, CLIENT_MAC)
            .build();
        let est_ack6 = Packet6::tcp(client6, vip6, TCP_ACK)
            .with_macs(LB_MAC, CLIENT_MAC)
            .build();
        let ctx6 = xdp_md(ifindex, syn6.len());
        ensure!(est_ack6.len() == syn6.len(), "IPv6 frames differ in length");
        let mut dsr6 = load_datapath_with(&dsr6_service(), 0, 0)?;
        let prog = dsr6.program_mut().context("router program (IPv6 DSR)")?;
        single_calls(
            prog,
            std::slice::from_ref(&syn6),
            &ctx6,
            XDP_TX,
            "IPv6 DSR SYN",
        )?;
        ensure!(
            dsr6_entries(&mut dsr6)? == 1,
            "the IPv6 DSR flow's SYN left no DSR_FLOWS6 entry"
        );
        let mut nat6 = load_datapath_with(&nat6_service(), 0, 0)?;
        let prog = nat6.program_mut().context("router program (IPv6 NAT)")?;
        single_calls(prog, &[syn6], &ctx6, XDP_TX, "IPv6 NAT SYN")?;
        ensure!(
            nat6_entries(&mut nat6)? == 2,
            "the IPv6 NAT flow's SYN left not both NAT6_CONNS entries"
        );
        Ok(Self {
            dp,
            trivial,
            ctx,
            est_ack,
            reply_ack,
            non_service,
            dsr,
            dsr6,
            est_ack6,
            nat6,
            ctx6,
            _ns: ns,
        })
    }

    /// Single-mode calls of one unchanged frame on the shared router datapath,
    /// checked against the reason counters.
    pub(super) fn router_single(
        &mut self,
        frame: &[u8],
        calls: u32,
        expect: u32,
        reason: u32,
        what: &str,
        perf: Option<&mut Recording>,
    ) -> Result<SingleResult> {
        let warm = vec![frame.to_vec(); WARMUP_CALLS as usize];
        let timed = vec![frame.to_vec(); calls as usize];
        let before = reason_vec(&self.dp)?;
        let prog = self.dp.program_mut().context("router program")?;
        single_calls(prog, &warm, &self.ctx, expect, what)?;
        let r = profiled(perf, || single_calls(prog, &timed, &self.ctx, expect, what))?;
        let after = reason_vec(&self.dp)?;
        check_reasons(
            &before,
            &after,
            reason,
            u64::from(WARMUP_CALLS + calls),
            what,
        )?;
        Ok(r)
    }

    /// The established flow's ACK on the DSR datapath: a `DSR_FLOWS` hit
    /// with a cached next hop, the tail call and the outer header.
    pub(super) fn dsr_single(&mut self, calls: u32) -> Result<SingleResult> {
        let warm = vec![self.est_ack.clone(); WARMUP_CALLS as usize];
        let timed = vec![self.est_ack.clone(); calls as usize];
        let before = reason_vec(&self.dsr)?;
        let prog = self.dsr.program_mut().context("router program (DSR)")?;
        single_calls(prog, &warm, &self.ctx, XDP_TX, "DSR established single")?;
        let r = single_calls(prog, &timed, &self.ctx, XDP_TX, "DSR established single")?;
        let after = reason_vec(&self.dsr)?;
        check_reasons(
            &before,
            &after,
            reasons::TX,
            u64::from(WARMUP_CALLS + calls),
            "DSR established single",
        )?;
        ensure!(
            table_entries(&mut self.dsr, "DSR_FLOWS")? == 1,
            "DSR established single: the flow's entry was replaced or another added"
        );
        Ok(r)
    }

    /// The IPv6 flow's ACK on the IPv6 DSR datapath (`nat` false): the
    /// tail call on the EtherType, the IPv6 parse, a `DSR_FLOWS6` hit with
    /// a cached next hop, and the 40-byte outer header. On the IPv6 NAT
    /// datapath (`nat`): `router_v6`'s parse, its `DSR_FLOWS6` miss and
    /// `SERVICES6` hit, the tail call to `router_nat6`, its parse, a
    /// `NAT6_CONNS` hit with a cached next hop, and the rewrite.
    pub(super) fn v6_single(&mut self, nat: bool, calls: u32) -> Result<SingleResult> {
        let (what, dp, entries, count): (_, _, fn(&mut Datapath) -> Result<u64>, _) = if nat {
            (
                "IPv6 NAT established single",
                &mut self.nat6,
                nat6_entries,
                2,
            )
        } else {
            (
                "IPv6 DSR established single",
                &mut self.dsr6,
                dsr6_entries,
                1,
            )
        };
        let warm = vec![self.est_ack6.clone(); WARMUP_CALLS as usize];
        let timed = vec![self.est_ack6.clone(); calls as usize];
        let before = reason_vec(dp)?;
        let prog = dp
            .program_mut()
            .with_context(|| format!("router program ({what})"))?;
        single_calls(prog, &warm, &self.ctx6, XDP_TX, what)?;
        let r = single_calls(prog, &timed, &self.ctx6, XDP_TX, what)?;
        let after = reason_vec(dp)?;
        check_reasons(
            &before,
            &after,
            reasons::TX,
            u64::from(WARMUP_CALLS + calls),
            what,
        )?;
        ensure!(
            entries(dp)? == count,
            "{what}: the flow's entries were replaced or another added"
        );
        Ok(r)
    }

    pub(super) fn trivial_single(&mut self, calls: u32) -> Result<SingleResult> {
        let warm = vec![self.non_service.clone(); WARMUP_CALLS as usize];
        let timed = vec![self.non_service.clone(); calls as usize];
        let prog = trivial_program(&mut self.trivial)?;
        single_calls(prog, &warm, &self.ctx, XDP_PASS, "xdp_pass single")?;
        single_calls(prog, &timed, &self.ctx, XDP_PASS, "xdp_pass single")
    }

    pub(super) fn trivial_repeat(&mut self, repeat: u32) -> Result<SingleResult> {
        let prog = trivial_program(&mut self.trivial)?;
        repeat_call(
            prog,
            &self.non_service,
            &self.ctx,
            repeat,
            XDP_PASS,
            "xdp_pass repeat",
        )
    }

    pub(super) fn non_service_repeat(&mut self, repeat: u32) -> Result<SingleResult> {
        let before = reason_vec(&self.dp)?;
        let prog = self.dp.program_mut().context("router program")?;
        let r = repeat_call(
            prog,
            &self.non_service,
            &self.ctx,
            repeat,
            XDP_PASS,
            "non-service repeat",
        )?;
        let after = reason_vec(&self.dp)?;
        check_reasons(
            &before,
            &after,
            reasons::PASS_NOT_SERVICE,
            u64::from(repeat),
            "non-service repeat",
        )?;
        Ok(r)
    }

    /// SYN path: a freshly loaded datapath, every call a new client port.
    pub(super) fn syn_single(
        &mut self,
        calls: u32,
        case: &SynCase,
        perf: Option<&mut Recording>,
    ) -> Result<SingleResult> {
        let total = WARMUP_CALLS + calls;
        ensure!(
            u32::from(SYN_FIRST_PORT) + total <= u32::from(u16::MAX),
            "too many SYN calls per run ({total}) for distinct client ports"
        );
        let frames = client_frames(total, TCP_SYN);
        let (warm, timed) = frames.split_at(WARMUP_CALLS as usize);
        let spec = if case.least_loaded {
            least_loaded_service(case.backends)
        } else {
            service()
        };
        let mut dp = load_datapath_with(&spec, case.scan_limit, total)?;
        let before = reason_vec(&dp)?;
        let prog = dp.program_mut().context("router program")?;
        single_calls(prog, warm, &self.ctx, XDP_TX, "SYN single")?;
        let r = profiled(perf, || {
            single_calls(prog, timed, &self.ctx, XDP_TX, "SYN single")
        })?;
        let after = reason_vec(&dp)?;
        check_reasons(&before, &after, reasons::TX, u64::from(total), "SYN single")?;
        let st = dp.status().context("datapath status")?;
        let new_conns: u64 = st.services.iter().map(|s| s.counters.new_conns).sum();
        ensure!(
            new_conns == u64::from(total),
            "SYN single: {new_conns} new connections for {total} SYNs"
        );
        // The state claimed: every flow still in the half-open table, none
        // evicted by a later SYN of the same run.
        let held = table_entries(&mut dp, "HALF_OPEN")?;
        ensure!(
            held == 2 * u64::from(total),
            "{}: the half-open table holds {held} entries for {total} SYNs: it evicted",
            case.path
        );
        if case.least_loaded {
            // Least-loaded spreads the flows: no backend more than one
            // flow above another with equal weights when scanned.
            let counts: Vec<u64> = st.services[0]
                .backends
                .iter()
                .map(|b| b.in_flight)
                .collect();
            let (lo, hi) = (
                counts.iter().min().copied().unwrap_or(0),
                counts.iter().max().copied().unwrap_or(0),
            );
            ensure!(
                counts.iter().sum::<u64>() == u64::from(total)
                    && (case.scan_limit == 0 || hi - lo <= 1),
                "{}: in-flight spread {lo}..{hi} over {counts:?}",
                case.path
            );
        }
        Ok(r)
    }
}

impl Bench {
    /// The first ACK of a new flow, which promotes it from the half-open
    /// table into CONNS: a freshly loaded datapath, one SYN per client port
    /// and the backend's SYN-ACK (untimed), then each flow's ACK timed.
    pub(super) fn first_ack_single(
        &mut self,
        calls: u32,
        perf: Option<&mut Recording>,
    ) -> Result<SingleResult> {
        let total = WARMUP_CALLS + calls;
        ensure!(
            u32::from(SYN_FIRST_PORT) + total <= u32::from(u16::MAX),
            "too many first-ACK calls per run ({total}) for distinct client ports"
        );
        let (syns, acks) = (client_frames(total, TCP_SYN), client_frames(total, TCP_ACK));
        let mut dp = load_datapath_with(&service(), 0, total)?;
        let before = reason_vec(&dp)?;
        let prog = dp.program_mut().context("router program")?;
        single_calls(prog, &syns, &self.ctx, XDP_TX, "first ACK: its SYN")?;
        // The backend's answer, which the ACK must acknowledge to confirm.
        let syn_acks = syn_acks(&mut dp)?;
        ensure!(
            syn_acks.len() == total as usize,
            "first ACK: {} half-open flows for {total} SYNs",
            syn_acks.len()
        );
        let prog = dp.program_mut().context("router program")?;
        single_calls(prog, &syn_acks, &self.ctx, XDP_TX, "first ACK: its SYN-ACK")?;
        let (warm, timed) = acks.split_at(WARMUP_CALLS as usize);
        single_calls(prog, warm, &self.ctx, XDP_TX, "first ACK single")?;
        let r = profiled(perf, || {
            single_calls(prog, timed, &self.ctx, XDP_TX, "first ACK single")
        })?;
        let after = reason_vec(&dp)?;
        check_reasons(
            &before,
            &after,
            reasons::TX,
            3 * u64::from(total),
            "first ACK single",
        )?;
        // The state claimed: every flow promoted, both directions in CONNS,
        // nothing left half-open and nothing evicted.
        let (conns, half_open) = (
            table_entries(&mut dp, "CONNS")?,
            table_entries(&mut dp, "HALF_OPEN")?,
        );
        ensure!(
            conns == 2 * u64::from(total) && half_open == 0,
            "first ACK single: CONNS holds {conns} and HALF_OPEN {half_open} entries \
             for {total} promoted flows"
        );
        Ok(r)
    }
}

impl Bench {
    /// The first datagram of a new UDP flow: a freshly loaded datapath
    /// serving the benchmark service over UDP, every call a new client
    /// port. Like the SYN, it opens both directions in the half-open table.
    pub(super) fn udp_first_single(&mut self, calls: u32) -> Result<SingleResult> {
        let total = WARMUP_CALLS + calls;
        ensure!(
            u32::from(SYN_FIRST_PORT) + total <= u32::from(u16::MAX),
            "too many UDP calls per run ({total}) for distinct client ports"
        );
        let frames = udp_client_frames(total);
        ensure!(
            frames.iter().all(|f| f.len() == self.est_ack.len()),
            "UDP benchmark frames differ in length from the TCP ones"
        );
        let (warm, timed) = frames.split_at(WARMUP_CALLS as usize);
        let spec = ServiceSpec {
            proto: router_common::PROTO_UDP,
            ..service()
        };
        let mut dp = load_datapath_with(&spec, 0, total)?;
        let before = reason_vec(&dp)?;
        let prog = dp.program_mut().context("router program")?;
        single_calls(prog, warm, &self.ctx, XDP_TX, "UDP first single")?;
        let r = single_calls(prog, timed, &self.ctx, XDP_TX, "UDP first single")?;
        let after = reason_vec(&dp)?;
        check_reasons(
            &before,
            &after,
            reasons::TX,
            u64::from(total),
            "UDP first single",
        )?;
        let st = dp.status().context("datapath status")?;
        let new_conns: u64 = st.services.iter().map(|s| s.counters.new_conns).sum();
        ensure!(
            new_conns == u64::from(total),
            "UDP first single: {new_conns} new flows for {total} datagrams"
        );
        let held = table_entries(&mut dp, "HALF_OPEN")?;
        ensure!(
            held == 2 * u64::from(total),
            "UDP first single: the half-open table holds {held} entries for {total} flows: it evicted"
        );
        Ok(r)
    }
}

/// The timed calls, with `perf` (the profiling pass) sampling them and
/// nothing around them.
fn profiled(
    perf: Option<&mut Recording>,
    calls: impl FnOnce() -> Result<SingleResult>,
) -> Result<SingleResult> {
    let Some(perf) = perf else {
        return calls();
    };
    perf.enable()?;
    let r = calls()?;
    perf.disable()?;
    Ok(r)
}
