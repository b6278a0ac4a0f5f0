//! Test support for the router: packet crafting, namespaces, fixtures.
pub mod bench_datapath;
pub mod kernel_ns;
pub mod netns;
pub mod packet;
