//! Backend selection, sans-IO: the [`Balance`] trait, the shared per-backend
//! live statistics ([`BackendStats`], atomics only), one module per
//! algorithm, their YAML configuration ([`BalancingConfig`]) and the
//! [`build`] factory.
//!
//! Threading model: every worker thread owns one `Box<dyn Balance>` per
//! upstream, so per-instance state (cursors, smooth-WRR weights, RNGs,
//! caches) needs no synchronisation; the only state shared across workers
//! is [`BackendStats`], read and written with atomics. Nothing on the
//! selection path takes a lock. Membership or config changes arrive as a
//! new snapshot, for which the worker builds new balancers.
//!
//! Contract of [`Balance::pick`], common to all algorithms:
//! * only backends with `eligible == true` are returned; `None` only when
//!   no backend is eligible;
//! * `exclude` lists backends this request already tried. They are avoided
//!   while any other eligible backend exists; when every eligible backend
//!   is excluded, the pick is made among them instead of failing (a retry
//!   on the same backend beats an error, and the retry budget bounds it;
//!   Envoy's `previous_hosts` predicate gives up the same way after its
//!   host-selection attempts);
//! * a weight of 0 is treated as 1 (configs reject it: [`validate_weight`]).

pub mod config;
pub mod consistent_hash;
mod hash;
pub mod least_connections;
pub mod p2c_ewma;
pub mod random;
pub mod round_robin;
pub mod stats;
pub mod sticky_cookie;
pub mod weighted_round_robin;

use std::net::IpAddr;
use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::SmallRng;

pub use config::{BalancingConfig, HashKey, StickyCookieConfig, build, validate, validate_weight};
pub use consistent_hash::ConsistentHash;
pub use least_connections::LeastConnections;
pub use p2c_ewma::P2cEwma;
pub use random::Random;
pub use round_robin::RoundRobin;
pub use stats::{BackendStats, DEFAULT_EWMA_DECAY, InFlightGuard, OwnedInFlightGuard};
pub use sticky_cookie::StickyCookie;
pub use weighted_round_robin::WeightedRoundRobin;

/// One backend as the balancer sees it for one pick.
#[derive(Debug, Clone, Copy)]
pub struct BackendView<'a> {
    /// Stable backend id (from the config); hashed by consistent hashing and
    /// sticky cookies, so it must not change across reloads.
    pub id: &'a str,
    /// Relative weight, ≥ 1.
    pub weight: u32,
    pub stats: &'a BackendStats,
    /// Healthy (routable), not ejected and the circuit breaker allows it;
    /// in panic mode the proxy sets it for every backend.
    pub eligible: bool,
}

/// What the balancer may look at in the request.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    pub client_ip: IpAddr,
    /// The request path (without the query, by convention).
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// A load-balancing algorithm instance, owned by one worker for one
/// upstream.
pub trait Balance: Send {
    /// Index into `backends` of the backend to use, following the contract
    /// in the module docs. `now` is the caller's clock (the request's
    /// timestamp); latency-aware algorithms decay their statistics to it,
    /// so none of them reads the system clock.
    fn pick(
        &mut self,
        backends: &[BackendView<'_>],
        req: &RequestInfo<'_>,
        exclude: &[usize],
        now: Instant,
    ) -> Option<usize>;

    /// The `Set-Cookie` value to add to the response that `backends[served]`
    /// produced, for algorithms that pin clients with a cookie (sticky
    /// sessions); `None` otherwise or when the client's cookie already names
    /// that backend. Stateless, so it may be called for any request at any
    /// time after its pick, with the index of the backend that actually
    /// answered (after retries, that may not be the first pick).
    fn set_cookie(
        &self,
        _backends: &[BackendView<'_>],
        _served: usize,
        _req: &RequestInfo<'_>,
    ) -> Option<http::HeaderValue> {
        None
    }

    /// Algorithm name, for logs and metrics.
    fn name(&self) -> &'static str;
}

/// Effective weight: 0 would be rejected by config validation; treat it as
/// 1 rather than divide by zero or starve a backend silently.
#[inline]
pub(crate) fn weight_of(b: &BackendView<'_>) -> u64 {
    u64::from(b.weight.max(1))
}

/// Which backends a pick may choose from, per the exclusion contract.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidates<'e> {
    exclude: &'e [usize],
    /// false when every eligible backend is excluded: then exclusion is
    /// waived.
    strict: bool,
}

impl<'e> Candidates<'e> {
    /// None when no backend is eligible.
    pub(crate) fn new(backends: &[BackendView<'_>], exclude: &'e [usize]) -> Option<Self> {
        let mut any_eligible = false;
        for (i, b) in backends.iter().enumerate() {
            if b.eligible {
                if !exclude.contains(&i) {
                    return Some(Self {
                        exclude,
                        strict: true,
                    });
                }
                any_eligible = true;
            }
        }
        any_eligible.then_some(Self {
            exclude,
            strict: false,
        })
    }

    #[inline]
    pub(crate) fn allows(&self, i: usize, b: &BackendView<'_>) -> bool {
        b.eligible && !(self.strict && self.exclude.contains(&i))
    }
}

/// A weight-proportional random pick among the candidates (random
/// algorithm, and the fallback of key-based algorithms).
pub(crate) fn weighted_random(
    rng: &mut SmallRng,
    backends: &[BackendView<'_>],
    c: &Candidates<'_>,
) -> Option<usize> {
    use rand::Rng;
    let total: u64 = backends
        .iter()
        .enumerate()
        .filter(|(i, b)| c.allows(*i, b))
        .map(|(_, b)| weight_of(b))
        .sum();
    if total == 0 {
        return None;
    }
    let mut r = rng.random_range(0..total);
    for (i, b) in backends.iter().enumerate() {
        if c.allows(i, b) {
            let w = weight_of(b);
            if r < w {
                return Some(i);
            }
            r -= w;
        }
    }
    None
}

/// A fresh per-instance RNG; SmallRng is fast and not shared, and picks
/// need no cryptographic quality.
pub(crate) fn new_rng() -> SmallRng {
    SmallRng::from_rng(&mut rand::rng())
}

#[cfg(test)]
pub(crate) mod testutil {
    pub use std::time::Instant;

    use super::*;

    pub fn stats(n: usize) -> Vec<BackendStats> {
        (0..n).map(|_| BackendStats::new()).collect()
    }

    pub const IDS: [&str; 32] = [
        "b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "b9", "b10", "b11", "b12", "b13",
        "b14", "b15", "b16", "b17", "b18", "b19", "b20", "b21", "b22", "b23", "b24", "b25", "b26",
        "b27", "b28", "b29", "b30", "b31",
    ];

    pub fn views<'a>(stats: &'a [BackendStats], weights: &[u32]) -> Vec<BackendView<'a>> {
        stats
            .iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (s, w))| BackendView {
                id: IDS[i],
                weight: *w,
                stats: s,
                eligible: true,
            })
            .collect()
    }

    pub fn req(headers: &http::HeaderMap) -> RequestInfo<'_> {
        RequestInfo {
            client_ip: IpAddr::from([192, 0, 2, 1]),
            path: "/",
            headers,
        }
    }

    /// Share of each backend over `picks` picks; `complete` decides whether
    /// picks are immediately completed (in-flight stays 0).
    pub fn shares(b: &mut dyn Balance, views: &[BackendView<'_>], picks: usize) -> Vec<f64> {
        let h = http::HeaderMap::new();
        let r = req(&h);
        let mut counts = vec![0usize; views.len()];
        for _ in 0..picks {
            if let Some(i) = b.pick(views, &r, &[], Instant::now()) {
                counts[i] += 1;
            }
        }
        counts.iter().map(|c| *c as f64 / picks as f64).collect()
    }

    pub fn expected(weights: &[u32]) -> Vec<f64> {
        let total: u32 = weights.iter().sum();
        weights
            .iter()
            .map(|w| f64::from(*w) / f64::from(total))
            .collect()
    }

    pub fn max_abs_err(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    /// Exclusion and eligibility contract, checked for any algorithm.
    pub fn check_contract(mut make: impl FnMut() -> Box<dyn Balance>) {
        let s = stats(4);
        let mut v = views(&s, &[1, 2, 3, 4]);
        let h = http::HeaderMap::new();
        let r = req(&h);
        let mut b = make();
        // Only eligible backends.
        v[0].eligible = false;
        v[2].eligible = false;
        for _ in 0..200 {
            let i = b.pick(&v, &r, &[], Instant::now()).unwrap();
            assert!(i == 1 || i == 3, "{} picked ineligible {i}", b.name());
        }
        // Exclusion honoured while another eligible backend exists.
        for _ in 0..200 {
            assert_eq!(
                b.pick(&v, &r, &[1], Instant::now()),
                Some(3),
                "{}",
                b.name()
            );
            assert_eq!(
                b.pick(&v, &r, &[3, 0], Instant::now()),
                Some(1),
                "{}",
                b.name()
            );
        }
        // All eligible excluded: pick among them rather than fail.
        for _ in 0..200 {
            let i = b.pick(&v, &r, &[1, 3], Instant::now()).unwrap();
            assert!(i == 1 || i == 3, "{}", b.name());
        }
        // None eligible.
        for x in &mut v {
            x.eligible = false;
        }
        assert_eq!(b.pick(&v, &r, &[], Instant::now()), None, "{}", b.name());
        assert_eq!(make().pick(&[], &r, &[], Instant::now()), None);
    }
}
