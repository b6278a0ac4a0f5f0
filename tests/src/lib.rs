//! Test support for the router: packet crafting, namespaces, fixtures,
//! the benchmarks and the soak.
pub mod bench_control;
pub mod bench_datapath;
pub mod bpffs;
pub mod daemon_proc;
pub mod fake_nvml;
pub mod kernel_ns;
pub mod netns;
pub mod packet;
pub mod replica;
pub mod soak;
pub mod veth_xdp;
