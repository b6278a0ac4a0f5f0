//! Test support for the router: packet crafting, namespaces, fixtures,
//! the benchmarks and the soak.
pub mod bench_control;
pub mod bench_datapath;
pub mod bench_l4;
pub mod bench_peers;
pub mod bench_report;
pub mod bench_routing;
pub mod bpffs;
pub mod daemon_proc;
pub mod fake_nvml;
pub mod kernel_ns;
pub mod loadgen;
pub mod model;
pub mod netns;
pub mod packet;
pub mod raw_sender;
pub mod replica;
pub mod soak;
pub mod synflood;
pub mod test_run;
pub mod veth_xdp;
pub mod xdp_fixture;
