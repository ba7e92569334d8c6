//! spooky-lb: the sans-IO core of spooky's load balancing. Backend
//! selection ([`balancer`]), backend health and resilience ([`health`]:
//! active-check state machines, outlier detection, circuit breakers, the
//! panic policy), retries ([`retry`]: policy, budget and the per-request
//! retry loop) and abuse-limit accounting ([`limits`]: token buckets,
//! connections per client). Time is passed in as `Instant` and randomness as an `Rng`
//! or a per-instance RNG, as in quinn-proto; nothing here does I/O, sleeps
//! or spawns. The spooky crate drives these from its request path and its
//! probe tasks.

pub mod balancer;
pub mod health;
pub mod limits;
pub mod retry;
