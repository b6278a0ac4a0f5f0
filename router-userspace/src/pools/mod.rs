//! Pools of a service: the share table that splits unmatched clients, and
//! share changes made at run time.

pub mod shares;

pub use shares::{ShareError, set_share, share_table};
