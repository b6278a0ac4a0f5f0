pub mod config;
pub mod maglev;
