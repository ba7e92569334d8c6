//! Waiting on state instead of sleeping: poll a condition (a log line, a
//! `/metrics` value, an admin API answer) until it holds or a deadline
//! passes, and fail with what was awaited and the last state seen.
//!
//! A condition returns `Ok(value)` once it holds, or `Err(state)`, a short
//! description of what it saw, for the failure message.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

/// How often conditions are re-checked.
pub const POLL: Duration = Duration::from_millis(20);

/// Polls `check` until it returns `Ok`, for at most `timeout`; `Err` with
/// the last state otherwise. Blocks the thread (for the benches and sync
/// tests; async tests use [`wait_until_async`]).
pub fn poll_until<T>(
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(state) if Instant::now() >= deadline => return Err(state),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// [`poll_until`], failing the test with `what` and the last state.
pub fn wait_until<T>(what: &str, timeout: Duration, check: impl FnMut() -> Result<T, String>) -> T {
    poll_until(timeout, check)
        .unwrap_or_else(|state| panic!("{what}: not within {timeout:?}; last seen: {state}"))
}

/// [`wait_until`] for async tests: sleeps on the runtime between checks,
/// so tasks the condition waits for keep running.
pub async fn wait_until_async<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    wait_until_with(what, timeout, || std::future::ready(check())).await
}

/// [`wait_until_async`] with an async condition (e.g. a request).
pub async fn wait_until_with<T, F: Future<Output = Result<T, String>>>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(state) if Instant::now() >= deadline => {
                panic!("{what}: not within {timeout:?}; last seen: {state}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// A condition on one `/metrics` value (admin listener on `port`), for the
/// waits above; `Ok` carries the whole scrape it held in.
pub fn metric_holds(
    port: u16,
    token: Option<&str>,
    key: &str,
    pred: impl Fn(f64) -> bool,
) -> Result<HashMap<String, f64>, String> {
    let m = super::scrape_with(port, token);
    let v = super::metric(&m, key);
    if pred(v) {
        Ok(m)
    } else {
        Err(format!("{key} = {v}"))
    }
}

/// A condition on captured output: at least `n` lines containing every one
/// of `needles`; `Ok` carries all such lines.
pub fn lines_with(out: &super::Output, needles: &[&str], n: usize) -> Result<Vec<String>, String> {
    let lines = out.matching(needles);
    if lines.len() >= n {
        Ok(lines)
    } else {
        Err(format!(
            "{} of {n} lines with {needles:?}; output:\n{}",
            lines.len(),
            out.lines().join("\n")
        ))
    }
}
