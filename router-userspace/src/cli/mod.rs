//! The CLI's screens: plain-text tables (`render`) and `router top`.

pub mod render;
pub mod top;
