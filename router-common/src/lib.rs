//! Definitions shared by the XDP program and the userspace daemon.
//!
//! Every map key and value lives in `maps` exactly once. Each is
//! `#[repr(C)]` with explicit padding and no `bool`, enum or `Option`
//! fields, so any bit pattern the kernel hands back is a valid value (a
//! requirement of `aya::Pod`). The pure functions here (flow hash, checksum
//! arithmetic, bucket hashes) are used by the kernel program and by the
//! userspace reference model alike, so both compute byte-identical results.
//!
//! The modules hold one kind of thing each; the crate root re-exports the
//! ones that predate the split, so users name them without a module path.
#![no_std]

pub mod csum;
pub mod dsr;
pub mod flags;
pub mod flow_hash;
pub mod hashing;
pub mod latency;
pub mod limits;
pub mod maps;
pub mod pools;
pub mod reasons;
pub mod selection;
pub mod tcp_seq;
pub mod v6;

pub use flags::*;
pub use hashing::*;
pub use latency::*;
pub use limits::*;
pub use maps::*;
