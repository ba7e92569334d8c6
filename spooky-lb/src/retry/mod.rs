//! Retries, sans-IO: the policy (what may be retried, backoff), the budget
//! shared by the workers, and the per-request retry loop as a state machine
//! that the IO driver (`spooky::upstream::forward`) steps through. A
//! module of its own rather than part of [`crate::health`]: retries are
//! about one request's tries, health about backends over time.

mod budget;
mod machine;
mod policy;

pub use budget::{BUDGET_WINDOW, RetryBudget};
pub use machine::{RetryLoop, RetryLoopError, Step, TryOutcome};
pub use policy::{
    BackoffConfig, BodyState, FailureKind, RetryConfig, RetryOn, is_idempotent, retry_allowed,
};
