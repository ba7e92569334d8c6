//! Backend health: the sans-IO state machines live in `spooky_lb::health`
//! (re-exported here so that `spooky::health::*` paths keep working); this
//! module adds the I/O half, the active-health probe tasks.

pub use spooky_lb::health::*;

pub mod probe;
