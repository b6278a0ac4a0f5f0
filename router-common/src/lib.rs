//! Definitions shared by the XDP program and the userspace daemon.
//!
//! Every map key and value lives here exactly once. Each is `#[repr(C)]` with
//! explicit padding and no `bool`, enum or `Option` fields, so any bit pattern
//! the kernel hands back is a valid value (a requirement of `aya::Pod`).
//! The pure functions here (flow hash, checksum arithmetic) are used by the
//! kernel program and by the userspace reference model alike, so both compute
//! byte-identical results.
#![no_std]

pub mod csum;
pub mod flow_hash;
pub mod maps;
pub mod reasons;
pub mod selection;

pub use maps::*;
