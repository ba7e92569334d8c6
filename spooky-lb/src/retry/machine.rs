//! The retry loop of one request as a sans-IO state machine: it decides
//! which backend each try goes to, how long the try may take, whether and
//! when to try again, and what the client gets in the end. The driver
//! (`spooky::upstream::forward`) does the IO: it sends each try, sleeps
//! until the instant it is told, and feeds every try's outcome back.
//!
//! ```text
//! let mut tries = RetryLoop::new(&cfg, &budget, &method, request_timeout, now);
//! loop {
//!     match tries.next(now, &mut rng, |now, tried| choose(now, tried))? {
//!         Step::Send { backend, timeout, .. } => { let outcome = send(..); tries.record(outcome, body, now)?; }
//!         Step::Wait { until } => sleep_until(until),
//!         Step::Respond { response, .. } => return Ok(response),
//!         Step::Fail { error, .. } => return Err(error),
//!     }
//! }
//! ```

use std::time::{Duration, Instant};

use rand::Rng;

use super::{BodyState, FailureKind, RetryBudget, RetryConfig, retry_allowed};

/// What the driver does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<R, E> {
    /// Send try number `attempt` (0 for the first) to `backend`, giving up
    /// after `timeout` (the per-try timeout, cut short by the request's
    /// deadline), then [`RetryLoop::record`] its outcome.
    Send {
        backend: usize,
        attempt: u32,
        timeout: Duration,
    },
    /// Back off: call [`RetryLoop::next`] again at or after `until`.
    Wait { until: Instant },
    /// The loop is over and the client gets `response`, the latest
    /// backend response (from `backend`).
    Respond {
        backend: usize,
        response: R,
        tries: u32,
    },
    /// The loop is over without a response for the client: `error` is the
    /// last error (`None` when no try produced one, e.g. no backend was
    /// picked).
    Fail { error: Option<E>, tries: u32 },
}

/// How one try ended, as the driver saw it.
#[derive(Debug)]
pub enum TryOutcome<R, E> {
    /// Response headers with `status` arrived.
    Response { status: u16, response: R },
    /// The try failed before response headers, on the backend's side or
    /// the network's.
    Failed { failure: FailureKind, error: E },
    /// The request itself failed (the client aborted, its body is
    /// malformed or too large): no other backend would do better.
    Local(E),
    /// The picked backend's circuit breaker refused the try (another
    /// request took its last slot). It counts as a try, but is neither
    /// checked against the retry policy nor charged to the budget.
    Rejected(E),
    /// The driver has no client for the picked backend: the loop ends.
    NoClient,
}

/// Calls made out of order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RetryLoopError {
    #[error("a try is in flight: record its outcome before asking for the next step")]
    TryInFlight,
    #[error("no try is in flight: there is no outcome to record")]
    NoTryInFlight,
    #[error("the retry loop is over")]
    Finished,
}

#[derive(Debug)]
enum State {
    /// Ready to pick a backend for try `attempt`.
    Ready,
    /// A retry is due; its backoff delay is not drawn yet.
    Backoff,
    /// Backing off until `until`, then ready.
    Waiting { until: Instant },
    /// Try `attempt` went to `backend`; its outcome is due.
    InFlight { backend: usize },
    /// Over: the next [`RetryLoop::next`] returns the result.
    Done,
    /// The result was returned.
    Finished,
}

/// The tries of one request. Time is an input: [`RetryLoop::next`] and
/// [`RetryLoop::record`] take `now`, and backoff takes the caller's RNG.
#[derive(Debug)]
pub struct RetryLoop<'a, R, E> {
    cfg: &'a RetryConfig,
    budget: &'a RetryBudget,
    method: &'a http::Method,
    deadline: Instant,
    max_tries: u32,
    /// The try being prepared or in flight (0 for the first).
    attempt: u32,
    /// Backends tried so far, in order (rejected picks included), for the
    /// balancer to avoid.
    tried: Vec<usize>,
    /// The latest backend response and its backend: the client gets it if
    /// no later try produces one.
    held: Option<(usize, R)>,
    last: Option<E>,
    state: State,
}

impl<'a, R, E> RetryLoop<'a, R, E> {
    /// A request that arrived at `started`, with `request_timeout` for all
    /// its tries and backoffs. Counts the request in `budget`.
    pub fn new(
        cfg: &'a RetryConfig,
        budget: &'a RetryBudget,
        method: &'a http::Method,
        request_timeout: Duration,
        started: Instant,
    ) -> Self {
        budget.deposit(started);
        Self {
            cfg,
            budget,
            method,
            deadline: started + request_timeout,
            max_tries: cfg.attempts.saturating_add(1),
            attempt: 0,
            tried: Vec::new(),
            held: None,
            last: None,
            state: State::Ready,
        }
    }

    /// Backends tried so far, in order.
    pub fn tried(&self) -> &[usize] {
        &self.tried
    }

    /// The next step at `now`. When a backend is to be chosen, `pick` is
    /// called with `now` and the backends tried so far: `Ok(Some(i))`
    /// sends to backend `i`, `Ok(None)` (no backend left) ends the loop,
    /// and `Err(e)` (nothing is available) ends it with `e` as the last
    /// error.
    pub fn next<G, P>(
        &mut self,
        now: Instant,
        rng: &mut G,
        pick: P,
    ) -> Result<Step<R, E>, RetryLoopError>
    where
        G: Rng + ?Sized,
        P: FnOnce(Instant, &[usize]) -> Result<Option<usize>, E>,
    {
        loop {
            match self.state {
                State::InFlight { .. } => return Err(RetryLoopError::TryInFlight),
                State::Finished => return Err(RetryLoopError::Finished),
                State::Done => return Ok(self.finish()),
                State::Waiting { until } if now < until => return Ok(Step::Wait { until }),
                State::Waiting { .. } => self.state = State::Ready,
                State::Backoff => {
                    let delay = self.cfg.backoff(self.attempt, rng);
                    // Sleeping into the deadline only to time out is
                    // pointless: the client gets what we have now.
                    let until = now + delay;
                    if until >= self.deadline {
                        self.state = State::Done;
                        continue;
                    }
                    self.state = State::Waiting { until };
                    return Ok(Step::Wait { until });
                }
                State::Ready => return Ok(self.send(now, pick)),
            }
        }
    }

    fn send<P>(&mut self, now: Instant, pick: P) -> Step<R, E>
    where
        P: FnOnce(Instant, &[usize]) -> Result<Option<usize>, E>,
    {
        let backend = match pick(now, &self.tried) {
            Ok(Some(b)) => b,
            Ok(None) => return self.finish(),
            Err(e) => {
                self.last = Some(e);
                return self.finish();
            }
        };
        self.tried.push(backend);
        self.state = State::InFlight { backend };
        // The per-try timeout never outlives the request's deadline.
        let end = self
            .cfg
            .per_try_timeout()
            .map_or(self.deadline, |t| (now + t).min(self.deadline));
        Step::Send {
            backend,
            attempt: self.attempt,
            timeout: end.saturating_duration_since(now),
        }
    }

    /// Records how the try in flight ended, at `now` (the retry budget is
    /// charged then); `body` is how far the request body has gone (whether
    /// it can still be replayed). `Ok(true)` when a retry was granted by
    /// the attempts left, the policy and the budget; it may still not
    /// happen, if its backoff would reach the deadline or no backend is
    /// left.
    pub fn record(
        &mut self,
        outcome: TryOutcome<R, E>,
        body: BodyState,
        now: Instant,
    ) -> Result<bool, RetryLoopError> {
        let State::InFlight { backend } = self.state else {
            return Err(match self.state {
                State::Done | State::Finished => RetryLoopError::Finished,
                _ => RetryLoopError::NoTryInFlight,
            });
        };
        let more = self.attempt + 1 < self.max_tries;
        let retry = match outcome {
            TryOutcome::Response { status, response } => {
                let retry = more && self.may_retry(FailureKind::Status(status), body, now);
                self.held = Some((backend, response));
                retry
            }
            TryOutcome::Failed { failure, error } => {
                self.last = Some(error);
                more && self.may_retry(failure, body, now)
            }
            TryOutcome::Local(error) => {
                // The request itself is broken: an earlier backend
                // response answers a request that no longer stands.
                self.last = Some(error);
                self.held = None;
                false
            }
            TryOutcome::Rejected(error) => {
                self.last = Some(error);
                more
            }
            TryOutcome::NoClient => false,
        };
        if retry {
            self.attempt += 1;
            self.state = State::Backoff;
        } else {
            self.state = State::Done;
        }
        Ok(retry)
    }

    /// The policy first, the budget last: a retry the policy forbids must
    /// not spend the budget.
    fn may_retry(&self, failure: FailureKind, body: BodyState, now: Instant) -> bool {
        retry_allowed(self.method, body, failure, self.cfg) && self.budget.try_withdraw(now)
    }

    fn finish(&mut self) -> Step<R, E> {
        self.state = State::Finished;
        let tries = self.tried.len() as u32;
        match self.held.take() {
            Some((backend, response)) => Step::Respond {
                backend,
                response,
                tries,
            },
            None => Step::Fail {
                error: self.last.take(),
                tries,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::{BackoffConfig, RetryOn};
    use http::Method;
    use rand::RngCore;

    /// An RNG that always draws the top of the range: backoff is then its
    /// cap, `min(max_ms, base_ms × 2^(attempt−1))`, and rows can name it.
    struct Top;

    impl RngCore for Top {
        fn next_u32(&mut self) -> u32 {
            u32::MAX
        }
        fn next_u64(&mut self) -> u64 {
            u64::MAX
        }
        fn fill_bytes(&mut self, dst: &mut [u8]) {
            dst.fill(0xff);
        }
    }

    #[test]
    fn top_rng_draws_the_backoff_cap() {
        let c = RetryConfig::default();
        let caps: Vec<u128> = (1..=5)
            .map(|a| c.backoff(a, &mut Top).as_millis())
            .collect();
        assert_eq!(caps, [25, 50, 100, 200, 250]);
    }

    /// What the test driver does, at a time in ms after the request
    /// started.
    #[derive(Debug)]
    enum Ev {
        /// `next(t)`; the step it must return.
        Next(u64, Want),
        /// `record(outcome, body, t)`.
        Record(u64, Out, BodyState),
    }

    #[derive(Debug, PartialEq)]
    enum Want {
        /// backend, attempt, timeout in ms.
        Send(usize, u32, u64),
        /// until, in ms.
        Wait(u64),
        /// backend, response, tries.
        Respond(usize, &'static str, u32),
        /// last error, tries.
        Fail(Option<&'static str>, u32),
    }

    #[derive(Debug)]
    enum Out {
        Status(u16, &'static str),
        Failed(FailureKind, &'static str),
        Local(&'static str),
        Rejected(&'static str),
        NoClient,
    }

    /// The backend chooser: the first eligible backend not tried yet (the
    /// first eligible one when all were), or `refuse` on the pick with
    /// that index (0 for the first pick), as the candidate filter does
    /// when nothing is available.
    struct Picker {
        eligible: &'static [usize],
        refuse: Option<usize>,
    }

    struct Row {
        name: &'static str,
        cfg: RetryConfig,
        method: Method,
        timeout_ms: u64,
        backends: Picker,
        script: Vec<Ev>,
        /// (ms, retries the budget counts in the window ending then).
        withdrawn: (u64, u64),
    }

    fn cfg(f: impl FnOnce(&mut RetryConfig)) -> RetryConfig {
        let mut c = RetryConfig::default();
        f(&mut c);
        c
    }

    fn any() -> Picker {
        Picker {
            eligible: &[0, 1, 2],
            refuse: None,
        }
    }

    const IDLE: BodyState = BodyState::NotStarted;
    use FailureKind::{ConnectFailure, Refused, ResetBeforeHeaders, Timeout};

    fn rows() -> Vec<Row> {
        use Ev::{Next, Record};
        use Out::*;
        use Want::*;
        vec![
            Row {
                name: "a response on the first try is delivered",
                cfg: cfg(|_| {}),
                method: Method::GET,
                timeout_ms: 5000,
                backends: any(),
                script: vec![
                    Next(0, Send(0, 0, 5000)),
                    Record(40, Status(200, "ok"), IDLE),
                    Next(40, Respond(0, "ok", 1)),
                ],
                withdrawn: (40, 0),
            },
            Row {
                name: "per-try timeout, cut short by the deadline",
                cfg: cfg(|c| c.per_try_timeout_ms = Some(1000)),
                method: Method::GET,
                timeout_ms: 2500,
                backends: any(),
                script: vec![
                    Next(0, Send(0, 0, 1000)),
                    Record(1000, Failed(Timeout, "t0"), IDLE),
                    Next(1000, Wait(1025)),
                    Next(1025, Send(1, 1, 1000)),
                    Record(2025, Failed(Timeout, "t1"), IDLE),
                    Next(2025, Wait(2075)),
                    // 2075 + 1000 is past the deadline at 2500.
                    Next(2075, Send(2, 2, 425)),
                    Record(2500, Failed(Timeout, "t2"), IDLE),
                    Next(2500, Fail(Some("t2"), 3)),
                ],
                withdrawn: (2500, 2),
            },
            Row {
                name: "without a per-try timeout a try may use the rest of the deadline",
                cfg: cfg(|_| {}),
                method: Method::GET,
                timeout_ms: 1000,
                backends: any(),
                script: vec![
                    Next(10, Send(0, 0, 990)),
                    Record(300, Failed(ConnectFailure, "refused"), IDLE),
                    Next(310, Wait(335)),
                    Next(340, Send(1, 1, 660)),
                    Record(400, Status(204, "second"), IDLE),
                    Next(400, Respond(1, "second", 2)),
                ],
                withdrawn: (400, 1),
            },
            Row {
                name: "asked early, a backoff keeps waiting and picks nothing",
                cfg: cfg(|_| {}),
                method: Method::GET,
                timeout_ms: 5000,
                backends: Picker {
                    eligible: &[0, 1],
                    // A pick during the wait would fail the request.
                    refuse: Some(1),
                },
                script: vec![
                    Next(0, Send(0, 0, 5000)),
                    Record(10, Failed(ResetBeforeHeaders, "reset"), IDLE),
                    Next(10, Wait(35)),
                    Next(20, Wait(35)),
                    Next(34, Wait(35)),
                    Next(35, Fail(Some("none available"), 1)),
                ],
                withdrawn: (35, 1),
            },
            Row {
                name: "backoff grows exponentially up to max_ms, a new backend each try",
                cfg: cfg(|c| {
                    c.attempts = 4;
                    c.backoff = BackoffConfig {
                        base_ms: 10,
                        max_ms: 30,
                    };
                }),
                method: Method::GET,
                timeout_ms: 5000,
                backends: Picker {
                    eligible: &[2, 0, 1],
                    refuse: None,
                },
                script: vec![
                    Next(0, Send(2, 0, 5000)),
                    Record(0, Failed(Refused, "e0"), IDLE),
                    Next(0, Wait(10)),
                    Next(10, Send(0, 1, 4990)),
                    Record(10, Failed(Refused, "e1"), IDLE),
                    Next(10, Wait(30)),
                    Next(30, Send(1, 2, 4970)),
                    Record(30, Failed(Refused, "e2"), IDLE),
                    Next(30, Wait(60)),
                    // All tried: the picker starts over.
                    Next(60, Send(2, 3, 4940)),
                    Record(60, Failed(Refused, "e3"), IDLE),
                    Next(60, Wait(90)),
                    Next(90, Send(2, 4, 4910)),
                    Record(90, Failed(Refused, "e4"), IDLE),
                    Next(90, Fail(Some("e4"), 5)),
                ],
                withdrawn: (90, 4),
            },
            Row {
                name: "backoff reaching the deadline ends the loop",
                cfg: cfg(|_| {}),
                method: Method::GET,
                timeout_ms: 100,
                backends: any(),
                script: vec![
                    Next(0, Send(0, 0, 100)),
                    Record(74, Failed(ConnectFailure, "e0"), IDLE),
                    Next(74, Wait(99)),
                    Next(99, Send(1, 1, 1)),
                    Record(99, Failed(ConnectFailure, "e1"), IDLE),
                    // 99 + 50 ≥ 100.
                    Next(99, Fail(Some("e1"), 2)),
                ],
                withdrawn: (99, 2),
            },
            Row {
                name: "backoff ending exactly at the deadline ends the loop",
                cfg: cfg(|_| {}),
                method: Method::GET,
                timeout_ms: 100,
                backends: any(),
                script: vec![
                    Next(0, Send(0, 0, 100)),
                    Record(75, Status(503, "busy"), IDLE),
                    Next(75, Respond(0, "busy", 1)),
                ],
                // The retry was granted (and counted) before the backoff
                // ran into the deadline.
                withdrawn: (75, 1),
            },
            Row {
                name: "a retried 503 is held and delivered when the retry fails",
                cfg: cfg(|c| c.attempts = 1),
                method: Method::GET,
                timeout_ms: 5000,
                backends: any(),
                script: vec![
                    Next(0, Send(0, 0, 5000)),
                    Record(5, Status(503, "busy"), IDLE),
                    Next(5, Wait(30)),
                    Next(30, Send(1, 1, 4970)),
                    Record(31, Failed(ConnectFailure, "down"), IDLE),
                    Next(31, Respond(0, "busy", 2)),
                ],
                withdrawn: (31, 1),
            },
            Row {
                name: "a later response replaces the held one",
                cfg: cfg(|c| c.attempts = 1),
                method: Method::GET,
                timeout_ms: 5000,
                backends: any(),
                script: vec![
                    Next(0, Send(0, 0, 5000)),
                    Record(5, Status(503, "busy"), IDLE),
                    Next(5, Wait(30)),
                    Next(30, Send(1, 1, 4970)),
                    Record(31, Status(502, "bad"), IDLE),
                    Next(31, Respond(1, "bad", 2)),
                ],
                withdrawn: (31, 1),
            },
            Row {
                name: "a status not in retry_on is delivered at once",
                cfg: cfg(|_| {}),
                method: Method::GET,
                timeout_ms: 5000,
                backends: any(),
                script: vec![
                    Next(0, Send(0, 0, 5000)),
                    Record(5, Status(500, "oops"), IDLE),
                    Next(5, Respond(0, "oops", 1)),
                ],
                withdrawn: (5, 0),
            },
            Row {
                name: "a failure not in retry_on is not retried",
                cfg: cfg(|c| c.retry_on = vec![RetryOn::ConnectFailure]),
                method: Method::GET,
                timeout_ms: 5000,
                backends: any(),
                script: vec![
                    Next(0, Send(0, 0, 5000)),
                    Record(5, Failed(ResetBeforeHeaders, "reset"), IDLE),
                    Next(5, Fail(Some("reset"), 1)),
                ],
                withdrawn: (5, 0),
            },
            Row {
                name: "POST is retried only when the backend never saw it",
                cfg: cfg(|c| c.attempts = 3),
                method: Method::POST,
                timeout_ms: 5000,
                backends: any(),
                script: vec![
                    Next(0, Send(0, 0, 5000)),
                    Record(5, Failed(ConnectFailure, "down"), BodyState::FullyBuffered),
                    Next(5, Wait(30)),
                    Next(30, Send(1, 1, 4970)),
                    Record(40, Failed(Refused, "goaway"), BodyState::FullyBuffered),
                    Next(40, Wait(90)),
                    Next(90, Send(2, 2, 4910)),
                    Record(95, Failed(ResetBeforeHeaders, "reset"), IDLE),
                    Next(95, Fail(Some("reset"), 3)),
                ],
                withdrawn: (95, 2),
            },
            Row {
                name: "POST answered 503 is not retried",
                cfg: cfg(|_| {}),
                method: Method::POST,
                timeout_ms: 5000,
                backends: any(),
                script: vec![
                    Next(0, Send(0, 0, 5000)),
                    Record(5, Status(503, "busy"), IDLE),
                    Next(5, Respond(0, "busy", 1)),
                ],
                withdrawn: (5, 0),
            },
            Row {
                name: "a streamed body cannot be replayed",
                cfg: cfg(|_| {}),
                method: Method::PUT,
                timeout_ms: 5000,
                backends: any(),
                script: vec![
                    Next(0, Send(0, 0, 5000)),
                    Record(5, Failed(ConnectFailure, "down"), BodyState::Streaming),
                    Next(5, Fail(Some("down"), 1)),
                ],
                withdrawn: (5, 0),
            },
            Row {
                name: "attempts: 0 disables retries",
                cfg: cfg(|c| c.attempts = 0),
                method: Method::GET,
                timeout_ms: 5000,
                backends: any(),
                script: vec![
                    Next(0, Send(0, 0, 5000)),
                    Record(5, Failed(ConnectFailure, "down"), IDLE),
                    Next(5, Fail(Some("down"), 1)),
                ],
                withdrawn: (5, 0),
            },
            Row {
                name: "attempts bound the tries",
                cfg: cfg(|c| c.attempts = 1),
                method: Method::GET,
                timeout_ms: 5000,
                backends: any(),
                script: vec![
                    Next(0, Send(0, 0, 5000)),
                    Record(5, Failed(ConnectFailure, "e0"), IDLE),
                    Next(5, Wait(30)),
                    Next(30, Send(1, 1, 4970)),
                    Record(35, Failed(ConnectFailure, "e1"), IDLE),
                    Next(35, Fail(Some("e1"), 2)),
                ],
                withdrawn: (35, 1),
            },
            Row {
                name: "a local error stops retrying and drops the held response",
                cfg: cfg(|_| {}),
                method: Method::GET,
                timeout_ms: 5000,
                backends: any(),
                script: vec![
                    Next(0, Send(0, 0, 5000)),
                    Record(5, Status(503, "busy"), IDLE),
                    Next(5, Wait(30)),
                    Next(30, Send(1, 1, 4970)),
                    Record(35, Local("client aborted"), IDLE),
                    Next(35, Fail(Some("client aborted"), 2)),
                ],
                withdrawn: (35, 1),
            },
            Row {
                name: "an empty budget forbids a retry the policy allows",
                cfg: cfg(|c| {
                    c.min_retries_per_s = 0;
                    c.budget_percent = 0;
                }),
                method: Method::GET,
                timeout_ms: 5000,
                backends: any(),
                script: vec![
                    Next(0, Send(0, 0, 5000)),
                    Record(5, Failed(ConnectFailure, "down"), IDLE),
                    Next(5, Fail(Some("down"), 1)),
                ],
                withdrawn: (5, 0),
            },
            Row {
                name: "the budget runs out mid-request",
                cfg: cfg(|c| {
                    // This request's deposit buys exactly one retry.
                    c.min_retries_per_s = 0;
                    c.budget_percent = 100;
                }),
                method: Method::GET,
                timeout_ms: 5000,
                backends: any(),
                script: vec![
                    Next(0, Send(0, 0, 5000)),
                    Record(5, Status(503, "busy"), IDLE),
                    Next(5, Wait(30)),
                    Next(30, Send(1, 1, 4970)),
                    Record(35, Status(503, "busy too"), IDLE),
                    Next(35, Respond(1, "busy too", 2)),
                ],
                withdrawn: (35, 1),
            },
            Row {
                name: "the withdrawal is stamped with the outcome's time",
                cfg: cfg(|_| {}),
                method: Method::GET,
                timeout_ms: 30_000,
                backends: any(),
                script: vec![
                    Next(0, Send(0, 0, 30_000)),
                    Record(12_000, Failed(Timeout, "slow"), IDLE),
                    Next(12_000, Wait(12_025)),
                    Next(12_025, Send(1, 1, 17_975)),
                    Record(12_030, Status(200, "ok"), IDLE),
                    Next(12_030, Respond(1, "ok", 2)),
                ],
                // Counted in second 12, out of the request's own window.
                withdrawn: (12_000, 1),
            },
            Row {
                name: "a breaker rejection counts as a try, skips policy and budget",
                cfg: cfg(|c| {
                    c.attempts = 2;
                    c.min_retries_per_s = 0;
                    c.budget_percent = 0;
                }),
                method: Method::POST,
                timeout_ms: 5000,
                backends: any(),
                script: vec![
                    Next(0, Send(0, 0, 5000)),
                    Record(0, Rejected("b0 open"), BodyState::Streaming),
                    Next(0, Wait(25)),
                    Next(25, Send(1, 1, 4975)),
                    Record(25, Rejected("b1 open"), IDLE),
                    Next(25, Wait(75)),
                    Next(75, Send(2, 2, 4925)),
                    Record(75, Rejected("b2 open"), IDLE),
                    // Out of attempts.
                    Next(75, Fail(Some("b2 open"), 3)),
                ],
                withdrawn: (75, 0),
            },
            Row {
                name: "a rejection after a held response keeps it",
                cfg: cfg(|c| c.attempts = 1),
                method: Method::GET,
                timeout_ms: 5000,
                backends: any(),
                script: vec![
                    Next(0, Send(0, 0, 5000)),
                    Record(5, Status(503, "busy"), IDLE),
                    Next(5, Wait(30)),
                    Next(30, Send(1, 1, 4970)),
                    Record(30, Rejected("b1 open"), IDLE),
                    Next(30, Respond(0, "busy", 2)),
                ],
                withdrawn: (30, 1),
            },
            Row {
                name: "no backend to pick: nothing tried, no error",
                cfg: cfg(|_| {}),
                method: Method::GET,
                timeout_ms: 5000,
                backends: Picker {
                    eligible: &[],
                    refuse: None,
                },
                script: vec![Next(0, Fail(None, 0))],
                withdrawn: (0, 0),
            },
            Row {
                name: "nothing available: the chooser's error",
                cfg: cfg(|_| {}),
                method: Method::GET,
                timeout_ms: 5000,
                backends: Picker {
                    eligible: &[0],
                    refuse: Some(0),
                },
                script: vec![Next(0, Fail(Some("none available"), 0))],
                withdrawn: (0, 0),
            },
            Row {
                name: "nothing available on a retry: the held response",
                cfg: cfg(|_| {}),
                method: Method::GET,
                timeout_ms: 5000,
                backends: Picker {
                    eligible: &[0],
                    refuse: Some(1),
                },
                script: vec![
                    Next(0, Send(0, 0, 5000)),
                    Record(5, Status(503, "busy"), IDLE),
                    Next(5, Wait(30)),
                    Next(30, Respond(0, "busy", 1)),
                ],
                withdrawn: (30, 1),
            },
            Row {
                name: "no client for the pick ends the loop; the pick counts",
                cfg: cfg(|_| {}),
                method: Method::GET,
                timeout_ms: 5000,
                backends: any(),
                script: vec![
                    Next(0, Send(0, 0, 5000)),
                    Record(0, NoClient, IDLE),
                    Next(0, Fail(None, 1)),
                ],
                withdrawn: (0, 0),
            },
            Row {
                name: "no client on a retry: the last error",
                cfg: cfg(|_| {}),
                method: Method::GET,
                timeout_ms: 5000,
                backends: any(),
                script: vec![
                    Next(0, Send(0, 0, 5000)),
                    Record(5, Failed(ResetBeforeHeaders, "reset"), IDLE),
                    Next(5, Wait(30)),
                    Next(30, Send(1, 1, 4970)),
                    Record(30, NoClient, IDLE),
                    Next(30, Fail(Some("reset"), 2)),
                ],
                withdrawn: (30, 1),
            },
        ]
    }

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn run(row: Row) {
        let name = row.name;
        let budget = RetryBudget::new(&row.cfg);
        let t0 = Instant::now();
        let mut tries: RetryLoop<'_, &str, &str> = RetryLoop::new(
            &row.cfg,
            &budget,
            &row.method,
            Duration::from_millis(row.timeout_ms),
            t0,
        );
        let mut picks = 0usize;
        // A Wait or Send right after a record needs a granted retry.
        let retry_follows: Vec<bool> = (0..row.script.len())
            .map(|i| {
                matches!(
                    row.script.get(i + 1),
                    Some(Ev::Next(_, Want::Wait(_) | Want::Send(..)))
                )
            })
            .collect();
        for (i, ev) in row.script.into_iter().enumerate() {
            match ev {
                Ev::Next(at, want) => {
                    let now = ms(t0, at);
                    let p = &row.backends;
                    let step = tries
                        .next(now, &mut Top, |when, tried| {
                            assert_eq!(when, now, "{name}: the chooser gets `now`");
                            let n = picks;
                            picks += 1;
                            if p.refuse == Some(n) {
                                return Err("none available");
                            }
                            let fresh = p.eligible.iter().find(|b| !tried.contains(b));
                            Ok(fresh.or(p.eligible.first()).copied())
                        })
                        .unwrap_or_else(|e| panic!("{name}: step {i}: {e}"));
                    let got = match step {
                        Step::Send {
                            backend,
                            attempt,
                            timeout,
                        } => Want::Send(backend, attempt, timeout.as_millis() as u64),
                        Step::Wait { until } => {
                            Want::Wait(until.duration_since(t0).as_millis() as u64)
                        }
                        Step::Respond {
                            backend,
                            response,
                            tries,
                        } => Want::Respond(backend, response, tries),
                        Step::Fail { error, tries } => Want::Fail(error, tries),
                    };
                    assert_eq!(got, want, "{name}: step {i}");
                }
                Ev::Record(at, out, body) => {
                    let outcome = match out {
                        Out::Status(status, response) => TryOutcome::Response { status, response },
                        Out::Failed(failure, error) => TryOutcome::Failed { failure, error },
                        Out::Local(e) => TryOutcome::Local(e),
                        Out::Rejected(e) => TryOutcome::Rejected(e),
                        Out::NoClient => TryOutcome::NoClient,
                    };
                    let granted = tries
                        .record(outcome, body, ms(t0, at))
                        .unwrap_or_else(|e| panic!("{name}: step {i}: {e}"));
                    if retry_follows[i] {
                        assert!(granted, "{name}: step {i}: the retry was not granted");
                    }
                }
            }
        }
        let (at, want) = row.withdrawn;
        assert_eq!(
            budget.window_counts(ms(t0, at)).1,
            want,
            "{name}: retries counted by the budget"
        );
    }

    #[test]
    fn retry_loop_table() {
        for row in rows() {
            run(row);
        }
    }

    #[test]
    fn calls_out_of_order_are_errors() {
        let cfg = RetryConfig::default();
        let budget = RetryBudget::new(&cfg);
        let t0 = Instant::now();
        let mut tries: RetryLoop<'_, (), ()> =
            RetryLoop::new(&cfg, &budget, &Method::GET, Duration::from_secs(1), t0);
        assert_eq!(
            tries.record(TryOutcome::NoClient, IDLE, t0),
            Err(RetryLoopError::NoTryInFlight)
        );
        let step = tries.next(t0, &mut Top, |_, _| Ok(Some(3)));
        assert!(
            matches!(step, Ok(Step::Send { backend: 3, .. })),
            "{step:?}"
        );
        assert_eq!(
            tries.next(t0, &mut Top, |_, _| Ok(Some(3))).err(),
            Some(RetryLoopError::TryInFlight)
        );
        assert_eq!(tries.tried(), [3]);
        assert_eq!(tries.record(TryOutcome::NoClient, IDLE, t0), Ok(false));
        assert!(matches!(
            tries.next(t0, &mut Top, |_, _| Ok(None)),
            Ok(Step::Fail {
                error: None,
                tries: 1
            })
        ));
        assert_eq!(
            tries.next(t0, &mut Top, |_, _| Ok(None)).err(),
            Some(RetryLoopError::Finished)
        );
        assert_eq!(
            tries.record(TryOutcome::NoClient, IDLE, t0),
            Err(RetryLoopError::Finished)
        );
        // The request was counted once, at its start.
        assert_eq!(budget.window_counts(t0), (1, 0));
    }
}
