//! Test support for the router: packet crafting, namespaces, fixtures,
//! and the benchmarks.
pub mod bench_control;
pub mod bench_datapath;
pub mod daemon_proc;
pub mod fake_nvml;
pub mod kernel_ns;
pub mod netns;
pub mod packet;
pub mod raw_sender;
pub mod replica;
pub mod synflood;
pub mod veth_xdp;
