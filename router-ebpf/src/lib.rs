#![no_std]
// This crate's programs are its binaries; the library target exists only so
// router-userspace can name this crate as a build-dependency (aya-build).
