//! One packet through the loaded program with BPF_PROG_TEST_RUN, as the
//! fixtures, the differential test and the datapath benchmark run it.

use aya::programs::{TestRun, TestRunOptions};
use router::datapath::Datapath;

/// Room for a program that grows the frame (DSR's outer headers, an ICMP
/// error built in front of its quote).
const OUT_SLACK: usize = 256;

/// The `xdp_md` context of a frame of `len` bytes arriving on `ifindex`.
pub fn xdp_md(ifindex: u32, len: usize) -> Vec<u8> {
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
    let mut v = Vec::with_capacity(24);
    for x in [0u32, len as u32, 0, ifindex, 0, 0] {
        v.extend_from_slice(&x.to_ne_bytes());
    }
    v
}

/// Runs `input` through the program as if it arrived on `ifindex`; the
/// verdict and the frame as the program left it.
pub fn run_packet(dp: &mut Datapath, input: &[u8], ifindex: u32) -> anyhow::Result<(u32, Vec<u8>)> {
    run_program(dp.program_mut()?, input, ifindex)
}

/// `run_packet` for any loaded XDP program (the decap program, say).
pub fn run_program(
    program: &mut aya::programs::Xdp,
    input: &[u8],
    ifindex: u32,
) -> anyhow::Result<(u32, Vec<u8>)> {
    let ctx = xdp_md(ifindex, input.len());
    let mut out = vec![0u8; input.len() + OUT_SLACK];
    let r = program.test_run(TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        ..TestRunOptions::default()
    })?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}
