//! Downstream listeners of one worker: HTTP/3 over QUIC ([`h3`]) and
//! HTTP/2 + HTTP/1.1 over TLS on TCP ([`tcp`], with `alt-svc` pointing
//! browsers at HTTP/3), plus the optional plain-HTTP redirect. Each turns
//! its protocol into `http::Request<ProxyBody>` for the proxy.

pub mod h3;
mod lifetime;
pub mod tcp;

use std::sync::atomic::{AtomicUsize, Ordering};

pub use h3::{log_listening, serve_connection, server_transport};

/// Counts open downstream connections and requests of one worker, so that
/// a drain knows when it is done.
#[derive(Debug, Default)]
pub struct Activity {
    pub connections: AtomicUsize,
    pub requests: AtomicUsize,
    /// QUIC handshakes in progress (for Retry and the half-open cap).
    pub handshakes: AtomicUsize,
}

/// Holds one count in an [`Activity`] counter while alive.
pub(crate) struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    pub(crate) fn new(c: &'a AtomicUsize) -> Self {
        c.fetch_add(1, Ordering::AcqRel);
        Self(c)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Holds one unit of a Prometheus gauge while alive.
pub(crate) struct GaugeGuard<'a>(&'a prometheus::IntGauge);

impl<'a> GaugeGuard<'a> {
    pub(crate) fn new(g: &'a prometheus::IntGauge) -> Self {
        g.inc();
        Self(g)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
