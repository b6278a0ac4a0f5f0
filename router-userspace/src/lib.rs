//! The router daemon and CLI as a library.
//!
//! - `datapath`: the only writer of BPF maps (load, pin, adopt, tables).
//! - `control_loop` and `policy`: from telemetry, health and the datapath's
//!   measurements to weights; `telemetry` and `health` gather the inputs.
//! - `daemon`: owns the datapath and the control loop, drives both.
//! - `api`: the control API's wire types and the views built from them;
//!   `server`: the control and `/metrics` servers, which see only a narrow
//!   handle; `cli`: how the CLI renders and `router top`.
//! - `config`, `maglev`, `host` (facts and the settings the daemon makes),
//!   `agent` (the GPU-host telemetry agent).

pub mod agent;
pub mod api;
pub mod bgp;
pub mod cli;
pub mod config;
pub mod control_loop;
pub mod daemon;
pub mod datapath;
pub mod decap;
pub mod discovery;
pub mod fib_watch;
pub mod health;
pub mod host;
pub mod maglev;
pub mod netlink;
pub mod policy;
pub mod pools;
pub mod server;
pub mod state_file;
pub mod telemetry;
pub mod tls;
