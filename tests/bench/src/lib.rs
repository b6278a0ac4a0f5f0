//! The router's benchmarks (`bench`), soak (`soak`), SYN-flood scenario and
//! load generator, and the demos (`demo`, `gpu_demo`); built on
//! router-testkit. Each suite writes its results under `bench/` (or
//! `target/bench-quick/` with `--quick`); nothing here asserts speed.
pub mod canary;
pub mod control;
pub mod datapath;
pub mod failover;
pub mod l4;
pub mod loadgen;
pub mod netstat;
pub mod peers;
pub mod report;
pub mod routing;
pub mod soak;
pub mod synflood;
