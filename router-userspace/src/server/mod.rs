//! The daemon's servers: the control API on its Unix socket and `/metrics`
//! over TCP, both within [`bounded`]'s limits. Neither sees the daemon's
//! state: control gets a narrow handle, metrics a published snapshot.

pub mod bounded;
pub mod control;
pub mod metrics;
mod pool_metrics;
pub mod tls_listener;
