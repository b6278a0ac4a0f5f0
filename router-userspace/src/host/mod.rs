//! The host the daemon runs on: what it reads (`facts`) and the settings
//! it changes and restores (`settings`), and what a link needs from its
//! peer (`link_kind`).

pub mod facts;
pub mod link_kind;
pub mod neighbours;
pub mod settings;
