//! Test support for the router: packet crafting, namespaces, fixtures.
pub mod kernel_ns;
pub mod netns;
pub mod packet;
