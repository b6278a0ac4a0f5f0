//! Pools of a service: the share table that splits unmatched clients, and
//! share changes made at run time.

pub mod shares;

pub use shares::{ShareError, set_share, share_table};

/// A pool change that cannot be made; nothing changes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("no service named {0:?}")]
    NoService(String),
    #[error("service {0:?} has no pools")]
    NoPools(String),
    #[error("service {service:?} has no pool named {pool:?} (its pools: {known})")]
    NoPool {
        service: String,
        pool: String,
        known: String,
    },
    #[error(transparent)]
    Share(#[from] ShareError),
}
