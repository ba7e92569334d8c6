//! Backend health and resilience, sans-IO (time is passed in as `Instant`,
//! randomness as an `Rng`): active-check state machines, passive outlier
//! detection, circuit breakers and the panic / all-down policy (retries are
//! in [`crate::retry`]). spooky's probe tasks (`spooky::upstream::probe`)
//! and request path drive these; nothing here does I/O.
//!
//! How the pieces combine into `BackendView::eligible` for the balancer:
//! [`panic::routable_set`] over `healthy = health.is_routable() &&
//! !outliers.is_ejected(i, now)` decides between Normal (the healthy
//! backends), Panic (all backends) and a 503; then, in either mode,
//! `eligible = candidate && breaker.allows(now)`. Breakers stay out of the
//! panic computation: a backend at its concurrency limit is busy, not
//! unhealthy, and an open breaker would refuse the request in panic mode
//! anyway.

pub mod active;
pub mod breaker;
pub mod clock;
pub mod outlier;
pub mod panic;

pub use active::{ActiveHealthConfig, HealthMachine, HealthState, StatusRange, Transition};
pub use breaker::{
    BreakerPermit, BreakerState, CircuitBreaker, CircuitBreakerConfig, ConcurrencySlot,
    RejectReason, Rejected,
};
pub use outlier::{EjectReason, Ejection, Outcome, OutlierConfig, OutlierPool, OutlierState};
pub use panic::{AllDownConfig, PanicConfig, Selection, routable_set};
