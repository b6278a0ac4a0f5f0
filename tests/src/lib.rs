//! Test support for the router: packet crafting, namespaces, fixtures.
pub mod daemon_proc;
pub mod kernel_ns;
pub mod netns;
pub mod packet;
pub mod veth_xdp;
