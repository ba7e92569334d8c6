//! The gauge of open connections per backend: each live connection of a
//! protocol client ([`super::h3`], [`super::tcp`]) holds one
//! [`OpenConnection`]. Its own module so that the clients and
//! [`super::backend`], which builds them, need not import each other.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counts one open backend connection in its backend's gauge while alive
/// (`spooky_backend_pool_connections`).
#[derive(Debug)]
pub struct OpenConnection(Arc<AtomicU64>);

impl OpenConnection {
    pub fn new(gauge: &Arc<AtomicU64>) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
