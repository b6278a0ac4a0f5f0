//! The host the daemon runs on: what it reads (`facts`), the settings
//! it changes and restores (`settings`), what a link needs from its
//! peer (`link_kind`), the backends' managed neighbour entries
//! (`neighbours`), and whether it routes by more than the destination
//! (`route_shape`).

pub mod facts;
pub mod link_kind;
pub mod neighbours;
pub mod route_shape;
pub mod settings;
