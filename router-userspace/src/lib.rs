//! The router daemon and CLI as a library: config, Maglev, the datapath
//! (the only writer of BPF maps), the control socket and the daemon loop.

pub mod agent;
pub mod bounded;
pub mod config;
pub mod control;
pub mod controller;
pub mod daemon;
pub mod datapath;
pub mod fib_watch;
pub mod health;
pub mod host;
pub mod host_settings;
pub mod maglev;
pub mod metrics;
pub mod policy;
pub mod status_view;
pub mod telemetry;
pub mod top;
pub mod views;
