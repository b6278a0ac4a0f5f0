//! Validation: from the raw shapes to the model, every refusal located at
//! its key and line (see `locate`). One file per part of the config.

mod bgp;
mod daemon;
mod policy;
mod pools;
mod services;
mod telemetry;
mod values;

pub(super) use bgp::validate_bgp;
pub(super) use daemon::validate_daemon;
pub(super) use policy::validate_policy;
pub(super) use services::{check_table_size, validate_services};
pub use values::ValueError;

use super::*;
use telemetry::{validate_health, validate_telemetry};
use values::*;
