//! Request-rate limits of one config generation: the per-client, per-route
//! and handshake token buckets built from the config (the buckets
//! themselves and the per-client connection count are sans-IO, in
//! `spooky_lb::limits`), and the 429 they answer with.

use std::net::IpAddr;
use std::time::{Duration, Instant};

pub use spooky_lb::limits::{ConnectionSlot, ConnectionsPerClient};
use spooky_lb::limits::{PerClientBuckets, SharedBucket};

use crate::config::Config;

/// Why a request was refused with 429.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimited {
    /// `client` or `route`.
    pub scope: &'static str,
    pub retry_after: Duration,
}

/// The request-rate limits of one config generation (a reload starts them
/// afresh).
#[derive(Debug)]
pub struct RequestLimits {
    per_client: Option<PerClientBuckets>,
    /// Indexed like `Config::routes`.
    routes: Vec<Option<SharedBucket>>,
    /// New connections per second, process-wide.
    handshakes: Option<SharedBucket>,
}

impl RequestLimits {
    pub fn new(config: &Config, now: Instant) -> Self {
        Self {
            per_client: config.limits.requests_per_ip.map(PerClientBuckets::new),
            routes: config
                .routes
                .iter()
                .map(|r| r.rate_limit.map(|rate| SharedBucket::new(rate, now)))
                .collect(),
            handshakes: config
                .limits
                .handshakes
                .map(|rate| SharedBucket::new(rate, now)),
        }
    }

    /// Whether a new connection fits the handshake rate.
    pub fn check_handshake(&self, now: Instant) -> bool {
        self.handshakes
            .as_ref()
            .is_none_or(|b| b.try_take(now).is_ok())
    }

    /// The client's own limit.
    pub fn check_client(&self, ip: IpAddr, now: Instant) -> Result<(), RateLimited> {
        match &self.per_client {
            None => Ok(()),
            Some(b) => b.try_take(ip, now).map_err(|retry_after| RateLimited {
                scope: "client",
                retry_after,
            }),
        }
    }

    /// The route's limit (all clients together).
    pub fn check_route(&self, route: usize, now: Instant) -> Result<(), RateLimited> {
        match self.routes.get(route) {
            Some(Some(b)) => b.try_take(now).map_err(|retry_after| RateLimited {
                scope: "route",
                retry_after,
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Rate;

    fn rate(per_second: f64, burst: f64) -> Rate {
        Rate { per_second, burst }
    }

    #[test]
    fn route_and_client_limits_report_their_scope() {
        let t0 = Instant::now();
        let l = RequestLimits {
            per_client: Some(PerClientBuckets::new(rate(1.0, 1.0))),
            routes: vec![None, Some(SharedBucket::new(rate(2.0, 1.0), t0))],
            handshakes: Some(SharedBucket::new(rate(1.0, 2.0), t0)),
        };
        assert!(l.check_handshake(t0));
        assert!(l.check_handshake(t0));
        assert!(!l.check_handshake(t0));
        let ip: IpAddr = "198.18.0.1".parse().unwrap();
        assert!(l.check_client(ip, t0).is_ok());
        assert_eq!(l.check_client(ip, t0).unwrap_err().scope, "client");
        assert!(l.check_route(0, t0).is_ok());
        assert!(l.check_route(1, t0).is_ok());
        let e = l.check_route(1, t0).unwrap_err();
        assert_eq!(e.scope, "route");
        assert_eq!(e.retry_after, Duration::from_millis(500));
        assert!(l.check_route(7, t0).is_ok());
    }
}
