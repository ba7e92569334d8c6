//! Per-backend circuit breaker and concurrency limit, shared by all worker
//! threads: Closed → Open after consecutive failures → HalfOpen after the
//! open time (a bounded number of trial requests) → Closed on a successful
//! trial, Open again on a failed one. Lock-free: the state, the open deadline
//! and the trial count share one `AtomicU64` changed by compare-and-swap.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::clock;

/// Circuit-breaker settings of one upstream (applied per backend).
///
/// YAML: `{ failure_threshold: 5, open_ms: 10000, half_open_max_requests: 1,
/// max_concurrent_requests: 1024 }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    /// Consecutive failures that open the circuit (default 5).
    pub failure_threshold: u32,
    /// Time the circuit stays open before trials are allowed, in ms (default 10000).
    pub open_ms: u64,
    /// Trial requests allowed at once while half-open (default 1).
    pub half_open_max_requests: u32,
    /// Requests in flight to one backend beyond which new ones are rejected
    /// at once (a fast 503) instead of queueing (default 1024).
    pub max_concurrent_requests: u32,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_ms: 10_000,
            half_open_max_requests: 1,
            max_concurrent_requests: 1024,
        }
    }
}

impl CircuitBreakerConfig {
    /// Every problem as (field path, what would be valid).
    pub fn validate(&self, path: &str) -> Vec<(String, String)> {
        let mut errs = Vec::new();
        let mut at_least_one = |field: &str, v: u64, example: &str| {
            if v == 0 {
                errs.push((
                    format!("{path}.{field}"),
                    format!("must be at least 1 (e.g. {example})"),
                ));
            }
        };
        at_least_one("failure_threshold", self.failure_threshold.into(), "5");
        at_least_one("open_ms", self.open_ms, "10000");
        at_least_one(
            "half_open_max_requests",
            self.half_open_max_requests.into(),
            "1",
        );
        at_least_one(
            "max_concurrent_requests",
            self.max_concurrent_requests.into(),
            "1024",
        );
        if self.half_open_max_requests > u32::from(u16::MAX) {
            errs.push((
                format!("{path}.half_open_max_requests"),
                format!("must be at most {}", u16::MAX),
            ));
        }
        errs
    }
}

/// Breaker state, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// Why [`CircuitBreaker::try_acquire`] refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The circuit is open.
    Open,
    /// Half-open and all trial slots are taken.
    HalfOpenFull,
    /// `max_concurrent_requests` requests are already in flight.
    TooManyConcurrent,
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Open => "circuit open",
            Self::HalfOpenFull => "circuit half-open, trial slots taken",
            Self::TooManyConcurrent => "too many concurrent requests",
        })
    }
}

/// A refused request; the proxy answers 503 (with `retry-after` when set)
/// or tries another backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker rejected the request: {reason}")]
pub struct Rejected {
    pub reason: RejectReason,
    /// For `Open`: time until trials are allowed.
    pub retry_after: Option<Duration>,
}

// Layout of the state word: | until_ms: 46 | trials: 16 | state: 2 |.
// 46 bits of milliseconds cover 2,200 years after the process epoch.
const ST_CLOSED: u64 = 0;
const ST_OPEN: u64 = 1;
const ST_HALF_OPEN: u64 = 2;
const STATE_MASK: u64 = 0b11;
const TRIALS_SHIFT: u32 = 2;
const TRIALS_MASK: u64 = 0xffff;
const UNTIL_SHIFT: u32 = 18;
const UNTIL_MAX: u64 = (1 << 46) - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Word {
    state: u64,
    trials: u64,
    /// Open: the deadline. HalfOpen: the deadline of the Open period that
    /// preceded it, which identifies the half-open round, so that results
    /// of trials from an earlier round are not taken for this one.
    until_ms: u64,
}

impl Word {
    fn unpack(w: u64) -> Self {
        Self {
            state: w & STATE_MASK,
            trials: (w >> TRIALS_SHIFT) & TRIALS_MASK,
            until_ms: w >> UNTIL_SHIFT,
        }
    }

    fn pack(self) -> u64 {
        (self.until_ms.min(UNTIL_MAX) << UNTIL_SHIFT)
            | ((self.trials & TRIALS_MASK) << TRIALS_SHIFT)
            | self.state
    }

    fn open(until_ms: u64) -> Self {
        Self {
            state: ST_OPEN,
            trials: 0,
            until_ms: until_ms.min(UNTIL_MAX),
        }
    }
}

/// The breaker of one backend, shared by all workers.
///
/// Hot path when closed: `try_acquire` is one load and one `fetch_add` (the
/// concurrency count), a successful `record` one load, the drop one
/// `fetch_sub`. Transitions are compare-and-swap loops on one word, so
/// every transition happens exactly once however many threads race.
#[derive(Debug)]
pub struct CircuitBreaker {
    cfg: CircuitBreakerConfig,
    word: AtomicU64,
    consecutive_failures: AtomicU32,
    in_flight: AtomicU32,
}

impl CircuitBreaker {
    pub fn new(cfg: &CircuitBreakerConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            word: AtomicU64::new(ST_CLOSED),
            consecutive_failures: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
        }
    }

    /// Current state (Open turns into HalfOpen by time alone).
    pub fn state(&self, now: Instant) -> BreakerState {
        let w = Word::unpack(self.word.load(Ordering::Acquire));
        match w.state {
            ST_CLOSED => BreakerState::Closed,
            ST_OPEN if clock::to_ms(now) < w.until_ms => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }

    /// Requests currently holding a permit.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Would `try_acquire` succeed now? Side-effect free; use it to mark the
    /// backend ineligible for the balancer (`BackendView::eligible`).
    pub fn allows(&self, now: Instant) -> bool {
        self.check(now).is_ok()
    }

    /// [`allows`](Self::allows) with the reason of a refusal (for the 503
    /// the client gets when every candidate's breaker refuses).
    pub fn check(&self, now: Instant) -> Result<(), Rejected> {
        let now_ms = clock::to_ms(now);
        let w = Word::unpack(self.word.load(Ordering::Acquire));
        if w.state == ST_OPEN && now_ms < w.until_ms {
            return Err(Rejected {
                reason: RejectReason::Open,
                retry_after: Some(Duration::from_millis(w.until_ms - now_ms)),
            });
        }
        if self.in_flight.load(Ordering::Relaxed) >= self.cfg.max_concurrent_requests {
            return Err(Rejected {
                reason: RejectReason::TooManyConcurrent,
                retry_after: None,
            });
        }
        if w.state == ST_HALF_OPEN && w.trials >= u64::from(self.max_trials()) {
            return Err(Rejected {
                reason: RejectReason::HalfOpenFull,
                retry_after: None,
            });
        }
        Ok(())
    }

    fn max_trials(&self) -> u32 {
        self.cfg
            .half_open_max_requests
            .clamp(1, u32::from(u16::MAX))
    }

    /// Ask to send one request to this backend.
    pub fn try_acquire(&self, now: Instant) -> Result<BreakerPermit<'_>, Rejected> {
        let now_ms = clock::to_ms(now);
        let w = Word::unpack(self.word.load(Ordering::Acquire));
        if w.state == ST_OPEN && now_ms < w.until_ms {
            return Err(Rejected {
                reason: RejectReason::Open,
                retry_after: Some(Duration::from_millis(w.until_ms - now_ms)),
            });
        }
        let prev = self.in_flight.fetch_add(1, Ordering::Relaxed);
        if prev >= self.cfg.max_concurrent_requests {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(Rejected {
                reason: RejectReason::TooManyConcurrent,
                retry_after: None,
            });
        }
        // From here on the permit owns the concurrency slot (released on drop).
        let mut permit = BreakerPermit {
            breaker: self,
            trial_round: None,
            slot_moved: false,
        };
        if w.state == ST_CLOSED {
            return Ok(permit);
        }
        match self.acquire_trial(now_ms) {
            Ok(round) => {
                permit.trial_round = round;
                Ok(permit)
            }
            Err(rejected) => Err(rejected),
        }
    }

    /// Outside Closed: take a trial slot. `Ok(None)` when the breaker closed
    /// meanwhile (an ordinary permit).
    fn acquire_trial(&self, now_ms: u64) -> Result<Option<u64>, Rejected> {
        let max_trials = u64::from(self.max_trials());
        let mut cur = self.word.load(Ordering::Acquire);
        loop {
            let w = Word::unpack(cur);
            let next = match w.state {
                ST_CLOSED => return Ok(None),
                ST_OPEN if now_ms < w.until_ms => {
                    return Err(Rejected {
                        reason: RejectReason::Open,
                        retry_after: Some(Duration::from_millis(w.until_ms - now_ms)),
                    });
                }
                ST_OPEN => Word {
                    state: ST_HALF_OPEN,
                    trials: 1,
                    until_ms: w.until_ms,
                },
                _ if w.trials >= max_trials => {
                    return Err(Rejected {
                        reason: RejectReason::HalfOpenFull,
                        retry_after: None,
                    });
                }
                _ => Word {
                    trials: w.trials + 1,
                    ..w
                },
            };
            match self.word.compare_exchange_weak(
                cur,
                next.pack(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    if w.state == ST_OPEN {
                        // The proxy logs the transition with the backend's name.
                        tracing::trace!("circuit breaker half-open");
                    }
                    return Ok(Some(w.until_ms));
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// CAS `f(word)` until it applies or `f` declines. Returns the state
    /// written, if any.
    fn update(&self, f: impl Fn(Word) -> Option<Word>) -> Option<Word> {
        let mut cur = self.word.load(Ordering::Acquire);
        loop {
            let next = f(Word::unpack(cur))?;
            match self.word.compare_exchange_weak(
                cur,
                next.pack(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(next),
                Err(actual) => cur = actual,
            }
        }
    }

    fn on_result(
        &self,
        trial_round: Option<u64>,
        success: bool,
        now: Instant,
    ) -> Option<BreakerState> {
        let now_ms = clock::to_ms(now);
        match (trial_round, success) {
            (None, true) => {
                if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                    self.consecutive_failures.store(0, Ordering::Relaxed);
                }
                None
            }
            (None, false) => {
                let n = self
                    .consecutive_failures
                    .fetch_add(1, Ordering::Relaxed)
                    .saturating_add(1);
                if n < self.cfg.failure_threshold.max(1) {
                    return None;
                }
                // Only a closed breaker opens on ordinary results: results
                // of requests admitted before it opened say nothing new.
                let open_until = now_ms.saturating_add(self.cfg.open_ms);
                self.update(|w| (w.state == ST_CLOSED).then(|| Word::open(open_until)))?;
                self.consecutive_failures.store(0, Ordering::Relaxed);
                tracing::trace!(failures = n, "circuit breaker opened");
                Some(BreakerState::Open)
            }
            (Some(round), true) => {
                self.update(|w| {
                    (w.state == ST_HALF_OPEN && w.until_ms == round)
                        .then_some(Word::unpack(ST_CLOSED))
                })?;
                self.consecutive_failures.store(0, Ordering::Relaxed);
                tracing::trace!("circuit breaker closed after a successful trial");
                Some(BreakerState::Closed)
            }
            (Some(round), false) => {
                let open_until = now_ms.saturating_add(self.cfg.open_ms);
                self.update(|w| {
                    (w.state == ST_HALF_OPEN && w.until_ms == round).then(|| Word::open(open_until))
                })?;
                tracing::trace!("circuit breaker re-opened after a failed trial");
                Some(BreakerState::Open)
            }
        }
    }

    fn release_trial(&self, round: u64) {
        let _ = self.update(|w| {
            (w.state == ST_HALF_OPEN && w.until_ms == round && w.trials > 0).then(|| Word {
                trials: w.trials - 1,
                ..w
            })
        });
    }
}

/// Permission to send one request. Hold it for the request's lifetime.
///
/// `record(success, now)` reports the result. Dropping a permit without
/// `record` (client went away, request cancelled, result unknowable)
/// counts as **neither** success nor failure: it releases the concurrency
/// slot and, for a trial, the trial slot so another trial can run.
#[must_use = "dropping a permit without record() reports nothing"]
#[derive(Debug)]
pub struct BreakerPermit<'a> {
    breaker: &'a CircuitBreaker,
    /// Some(round) for a half-open trial.
    trial_round: Option<u64>,
    /// The concurrency slot moved to a [`ConcurrencySlot`]: Drop leaves it.
    slot_moved: bool,
}

/// A `max_concurrent_requests` slot that outlives the permit's result:
/// the result is known at the response headers, but the request is in
/// flight until its response body ends. Released on drop.
#[derive(Debug)]
pub struct ConcurrencySlot(Option<Arc<CircuitBreaker>>);

impl Drop for ConcurrencySlot {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            b.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl BreakerPermit<'_> {
    /// Whether this permit is a half-open trial.
    pub fn is_trial(&self) -> bool {
        self.trial_round.is_some()
    }

    /// Report the result. What counts as failure is the caller's policy
    /// (typically connect failure, reset, timeout and 5xx). Returns the new
    /// state when this result changed it.
    pub fn record(mut self, success: bool, now: Instant) -> Option<BreakerState> {
        // Taken so that Drop does not release the trial slot of a round this
        // result has just ended.
        let round = self.trial_round.take();
        self.breaker.on_result(round, success, now)
    }
}

impl BreakerPermit<'_> {
    /// [`record`](Self::record), keeping the concurrency slot until the
    /// returned [`ConcurrencySlot`] drops (tie it to the response body).
    /// `breaker` must be the breaker this permit came from; any other
    /// breaker gets the slot released at once instead.
    pub fn record_and_hold(
        mut self,
        success: bool,
        now: Instant,
        breaker: &Arc<CircuitBreaker>,
    ) -> (Option<BreakerState>, ConcurrencySlot) {
        let same = std::ptr::eq(Arc::as_ptr(breaker), self.breaker);
        self.slot_moved = same;
        let round = self.trial_round.take();
        let state = self.breaker.on_result(round, success, now);
        (state, ConcurrencySlot(same.then(|| breaker.clone())))
    }
}

impl Drop for BreakerPermit<'_> {
    fn drop(&mut self) {
        if let Some(round) = self.trial_round {
            self.breaker.release_trial(round);
        }
        if !self.slot_moved {
            self.breaker.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn yaml_and_validation() {
        let c: CircuitBreakerConfig = serde_yaml::from_str("{ open_ms: 500 }").unwrap();
        assert_eq!(
            c,
            CircuitBreakerConfig {
                open_ms: 500,
                ..CircuitBreakerConfig::default()
            }
        );
        assert!(serde_yaml::from_str::<CircuitBreakerConfig>("{ open: 500 }").is_err());
        let bad = CircuitBreakerConfig {
            failure_threshold: 0,
            max_concurrent_requests: 0,
            ..c
        };
        let fields: Vec<String> = bad.validate("b").into_iter().map(|e| e.0).collect();
        assert_eq!(fields, ["b.failure_threshold", "b.max_concurrent_requests"]);
    }

    #[test]
    fn word_round_trips() {
        let w = Word {
            state: ST_HALF_OPEN,
            trials: 7,
            until_ms: 123_456_789,
        };
        assert_eq!(Word::unpack(w.pack()), w);
    }

    #[test]
    fn check_reports_why_and_slots_can_outlive_the_result() {
        let b = Arc::new(CircuitBreaker::new(&CircuitBreakerConfig {
            failure_threshold: 1,
            open_ms: 1000,
            max_concurrent_requests: 1,
            ..CircuitBreakerConfig::default()
        }));
        let t = Instant::now();
        assert_eq!(b.check(t), Ok(()));
        // The result is recorded, the slot is kept until the body ends.
        let (state, slot) = b.try_acquire(t).unwrap().record_and_hold(true, t, &b);
        assert_eq!(state, None);
        assert_eq!(b.in_flight(), 1);
        assert_eq!(
            b.check(t).unwrap_err().reason,
            RejectReason::TooManyConcurrent
        );
        assert!(!b.allows(t));
        drop(slot);
        assert_eq!(b.in_flight(), 0);
        // A permit held against another breaker releases its own slot.
        let other = Arc::new(CircuitBreaker::new(&CircuitBreakerConfig::default()));
        let (_, slot) = b.try_acquire(t).unwrap().record_and_hold(false, t, &other);
        assert_eq!((b.in_flight(), other.in_flight()), (0, 0));
        drop(slot);
        assert_eq!((b.in_flight(), other.in_flight()), (0, 0));
        // That failure opened it: Open wins over the other reasons.
        let r = b.check(t + ms(400)).unwrap_err();
        assert_eq!(
            (r.reason, r.retry_after),
            (RejectReason::Open, Some(ms(600)))
        );
        // Half-open: the trial holds its slot and the trial count.
        let t1 = t + ms(1000);
        let trial = b.try_acquire(t1).unwrap();
        assert!(trial.is_trial());
        assert!(b.check(t1).is_err());
        let (state, slot) = trial.record_and_hold(true, t1, &b);
        assert_eq!(state, Some(BreakerState::Closed));
        assert!(b.check(t1).is_err(), "the slot is still held");
        drop(slot);
        assert_eq!(b.check(t1), Ok(()));
    }

    #[test]
    fn lifecycle() {
        let b = CircuitBreaker::new(&CircuitBreakerConfig::default());
        let t = Instant::now();
        assert_eq!(b.state(t), BreakerState::Closed);
        for i in 0..5 {
            let p = b.try_acquire(t).unwrap();
            let changed = p.record(false, t);
            assert_eq!(changed, (i == 4).then_some(BreakerState::Open));
        }
        assert_eq!(b.state(t), BreakerState::Open);
        assert!(!b.allows(t));
        let r = b.try_acquire(t + ms(2000)).unwrap_err();
        assert_eq!(
            (r.reason, r.retry_after),
            (RejectReason::Open, Some(ms(8000)))
        );

        // After open_ms: half-open, one trial at a time.
        let t1 = t + ms(10_000);
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        assert!(b.allows(t1));
        let trial = b.try_acquire(t1).unwrap();
        assert!(trial.is_trial());
        assert!(!b.allows(t1));
        assert_eq!(
            b.try_acquire(t1).unwrap_err().reason,
            RejectReason::HalfOpenFull
        );
        // A failed trial re-opens for another open_ms.
        assert_eq!(trial.record(false, t1), Some(BreakerState::Open));
        assert_eq!(b.state(t1 + ms(9_999)), BreakerState::Open);
        let t2 = t1 + ms(10_000);
        // A trial dropped without a result frees its slot.
        drop(b.try_acquire(t2).unwrap());
        assert_eq!(b.state(t2), BreakerState::HalfOpen);
        let trial = b.try_acquire(t2).unwrap();
        assert_eq!(trial.record(true, t2), Some(BreakerState::Closed));
        assert_eq!(b.state(t2), BreakerState::Closed);
        assert_eq!(b.in_flight(), 0);
        // Closed again: it takes a full streak to re-open.
        for _ in 0..4 {
            assert_eq!(b.try_acquire(t2).unwrap().record(false, t2), None);
        }
        assert_eq!(b.try_acquire(t2).unwrap().record(true, t2), None);
        assert_eq!(b.try_acquire(t2).unwrap().record(false, t2), None);
    }

    #[test]
    fn stale_results_do_not_flip_state() {
        let cfg = CircuitBreakerConfig {
            failure_threshold: 1,
            half_open_max_requests: 2,
            ..CircuitBreakerConfig::default()
        };
        let b = CircuitBreaker::new(&cfg);
        let t = Instant::now();
        let old = b.try_acquire(t).unwrap();
        b.try_acquire(t).unwrap().record(false, t);
        assert_eq!(b.state(t), BreakerState::Open);
        // A success of a request admitted while closed does not close it.
        assert_eq!(old.record(true, t), None);
        assert_eq!(b.state(t), BreakerState::Open);
        // Two trials in a round; the first fails and re-opens; the second's
        // success belongs to the finished round and is ignored.
        let t1 = t + ms(10_000);
        let a = b.try_acquire(t1).unwrap();
        let c = b.try_acquire(t1).unwrap();
        assert_eq!(
            b.try_acquire(t1).unwrap_err().reason,
            RejectReason::HalfOpenFull
        );
        assert_eq!(a.record(false, t1), Some(BreakerState::Open));
        assert_eq!(c.record(true, t1), None);
        assert_eq!(b.state(t1), BreakerState::Open);
    }

    #[test]
    fn concurrency_limit_is_fast_and_exact() {
        let cfg = CircuitBreakerConfig {
            max_concurrent_requests: 3,
            ..CircuitBreakerConfig::default()
        };
        let b = CircuitBreaker::new(&cfg);
        let t = Instant::now();
        let held: Vec<_> = (0..3).map(|_| b.try_acquire(t).unwrap()).collect();
        assert!(!b.allows(t));
        assert_eq!(
            b.try_acquire(t).unwrap_err().reason,
            RejectReason::TooManyConcurrent
        );
        assert_eq!(b.in_flight(), 3);
        drop(held);
        assert_eq!(b.in_flight(), 0);
        assert!(b.try_acquire(t).is_ok());
    }

    #[test]
    fn threads_race_for_one_trial() {
        let cfg = CircuitBreakerConfig {
            failure_threshold: 1,
            ..CircuitBreakerConfig::default()
        };
        let b = Arc::new(CircuitBreaker::new(&cfg));
        let t = Instant::now();
        b.try_acquire(t).unwrap().record(false, t);
        let t1 = t + ms(10_000);
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (b, barrier) = (Arc::clone(&b), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    barrier.wait();
                    let p = b.try_acquire(t1);
                    barrier.wait(); // hold permits until everyone tried
                    usize::from(p.is_ok())
                })
            })
            .collect();
        let granted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(granted, 1);
        assert_eq!(b.in_flight(), 0);
    }

    proptest! {
        /// Random interleavings of acquire/record/drop: the concurrency
        /// count returns to 0, trials never exceed the limit, and an Open
        /// breaker never grants a permit.
        #[test]
        fn invariants(ops in proptest::collection::vec((0u8..4, 0u64..3000), 1..200), max_trials in 1u32..4) {
            let cfg = CircuitBreakerConfig { failure_threshold: 2, open_ms: 1000, half_open_max_requests: max_trials, max_concurrent_requests: 8 };
            let b = CircuitBreaker::new(&cfg);
            let mut t = Instant::now();
            let mut held = Vec::new();
            for (op, dt) in ops {
                t += Duration::from_millis(dt);
                match op {
                    0 | 1 => {
                        let st = b.state(t);
                        match b.try_acquire(t) {
                            Ok(p) => {
                                prop_assert_ne!(st, BreakerState::Open);
                                held.push(p);
                            }
                            Err(r) => prop_assert!(st != BreakerState::Closed || r.reason == RejectReason::TooManyConcurrent),
                        }
                    }
                    2 => if let Some(p) = held.pop() { p.record(dt % 2 == 0, t); },
                    _ => { held.pop(); }
                }
                // Trials of the current half-open round never exceed the limit
                // (trials of an earlier round may still be in flight).
                let w = Word::unpack(b.word.load(Ordering::Acquire));
                if w.state == ST_HALF_OPEN {
                    let trials = held.iter().filter(|p| p.trial_round == Some(w.until_ms)).count() as u64;
                    prop_assert_eq!(trials, w.trials);
                    prop_assert!(trials <= u64::from(max_trials));
                }
                prop_assert_eq!(b.in_flight() as usize, held.len());
            }
            held.clear();
            prop_assert_eq!(b.in_flight(), 0);
        }
    }
}
