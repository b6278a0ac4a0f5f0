//! The host the daemon runs on: what it reads (`facts`) and the settings
//! it changes and restores (`settings`).

pub mod facts;
pub mod settings;
