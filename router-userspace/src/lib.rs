//! The router daemon and CLI as a library: config, Maglev, the datapath
//! (the only writer of BPF maps), and the control socket.

pub mod config;
pub mod datapath;
pub mod maglev;
