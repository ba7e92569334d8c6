//! Retries, sans-IO: the policy (what may be retried, backoff) and the
//! budget shared by the workers. A module of its own rather than part of [`crate::health`]: retries are
//! about one request's tries, health about backends over time.

mod budget;
mod policy;

pub use budget::{BUDGET_WINDOW, RetryBudget};
pub use policy::{
    BackoffConfig, BodyState, FailureKind, RetryConfig, RetryOn, is_idempotent, retry_allowed,
};
