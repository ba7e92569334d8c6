//! Passive health checking (outlier detection), shared by all worker
//! threads: per-backend consecutive-failure counters and ejection deadlines
//! in atomics, ejection with exponential duration, and the pool-wide cap on
//! how many backends may be ejected at once.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::clock;

/// Outlier-detection settings of one upstream.
///
/// YAML: `{ consecutive_5xx: 5, consecutive_gateway_failures: 5,
/// base_ejection_ms: 30000, max_ejection_ms: 300000, max_ejection_percent: 50 }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Consecutive 5xx-equivalent results (5xx responses and connection-level
    /// failures) that eject a backend; 0 disables this detector (default 5).
    pub consecutive_5xx: u32,
    /// Consecutive connection-level failures (connect failure, reset,
    /// timeout) that eject a backend; 0 disables this detector (default 5).
    pub consecutive_gateway_failures: u32,
    /// Duration of a first ejection, in ms (default 30000).
    pub base_ejection_ms: u64,
    /// Cap of the doubling ejection duration, in ms (default 300000).
    pub max_ejection_ms: u64,
    /// At most this percentage of the pool is ejected at once (default 50).
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            consecutive_gateway_failures: 5,
            base_ejection_ms: 30_000,
            max_ejection_ms: 300_000,
            max_ejection_percent: 50,
        }
    }
}

impl OutlierConfig {
    /// Every problem as (field path, what would be valid).
    pub fn validate(&self, path: &str) -> Vec<(String, String)> {
        let mut errs = Vec::new();
        if self.base_ejection_ms == 0 {
            errs.push((
                format!("{path}.base_ejection_ms"),
                "must be at least 1 ms (e.g. 30000)".to_owned(),
            ));
        }
        if self.max_ejection_ms < self.base_ejection_ms {
            errs.push((
                format!("{path}.max_ejection_ms"),
                format!(
                    "must be at least base_ejection_ms ({} ms)",
                    self.base_ejection_ms
                ),
            ));
        }
        if self.max_ejection_percent > 100 {
            errs.push((
                format!("{path}.max_ejection_percent"),
                format!(
                    "{} is not a percentage; use 0 to 100",
                    self.max_ejection_percent
                ),
            ));
        }
        errs
    }
}

/// The result of one request to a backend, as far as outlier detection cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Any response that is not a 5xx (4xx are the client's fault).
    Success,
    /// A 5xx response from the backend.
    Status5xx,
    /// The connection could not be established (refused, TLS failure, …).
    ConnectFailure,
    /// The connection or stream was reset before a complete response.
    Reset,
    /// No response within the per-try timeout.
    Timeout,
}

/// Which detector ejected the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EjectReason {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
}

/// Reported by [`OutlierPool::record`] when it ejects a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    pub backend: usize,
    pub reason: EjectReason,
    pub duration: Duration,
    pub until: Instant,
    /// The ejection multiplier after decay, including this ejection:
    /// `duration = base × 2^(times_ejected − 1)`, capped.
    pub times_ejected: u32,
}

/// Per-backend outlier state. Everything is an atomic: `is_ejected` is a
/// single relaxed load, `record(Success)` a load (plus a store only when a
/// failure streak has to be reset).
#[derive(Debug, Default)]
pub struct OutlierState {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Ejection deadline in ms since [`clock::epoch`]; 0 = never ejected.
    /// Ejection ends by time alone, with no event to miss.
    ejected_until_ms: AtomicU64,
    times_ejected: AtomicU32,
}

impl OutlierState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Lock-free hot-path check.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.is_ejected_ms(clock::to_ms(now))
    }

    fn is_ejected_ms(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Acquire) > now_ms
    }

    /// End of the current or last ejection.
    pub fn ejected_until(&self) -> Option<Instant> {
        match self.ejected_until_ms.load(Ordering::Acquire) {
            0 => None,
            ms => Some(clock::from_ms(ms)),
        }
    }

    /// The ejection multiplier as of the last ejection (before decay).
    pub fn times_ejected(&self) -> u32 {
        self.times_ejected.load(Ordering::Relaxed)
    }

    fn reset_counters(&self) {
        // Loads first: on the success path this avoids dirtying a cache
        // line shared with other workers when there is nothing to reset.
        if self.consecutive_5xx.load(Ordering::Relaxed) != 0 {
            self.consecutive_5xx.store(0, Ordering::Relaxed);
        }
        if self.consecutive_gateway.load(Ordering::Relaxed) != 0 {
            self.consecutive_gateway.store(0, Ordering::Relaxed);
        }
    }
}

/// The outlier state of every backend of one pool (index = backend index in
/// the pool), shared by all workers (`Arc<OutlierPool>`).
///
/// **Max-ejection rule.** At most `max_ejected()` backends are ejected at
/// once: ⌊n × max_ejection_percent / 100⌋, but at least 1 when n ≥ 2 and the
/// percentage is non-zero (as Envoy does, so small pools can still shed a
/// bad backend). Because ⌊n·p/100⌋ < n for p < 100, a pool of two or more
/// backends is never fully ejected unless the percentage is 100.
///
/// The decision to eject is serialised by a try-flag taken only on the
/// ejection path (rare): the thread that gets it counts the currently
/// ejected backends, ejects or refuses, and releases it. A thread that finds
/// the flag taken does not wait; it skips this time, and the backend's
/// failure counter, still at or above the threshold, triggers another
/// attempt on its next failure. The count is therefore exact; the only
/// approximation is that concurrent callers may pass slightly different
/// `now`s, which shifts an expiring ejection by that skew (microseconds).
#[derive(Debug)]
pub struct OutlierPool {
    cfg: OutlierConfig,
    hosts: Box<[OutlierState]>,
    deciding: AtomicBool,
}

impl OutlierPool {
    pub fn new(cfg: &OutlierConfig, backends: usize) -> Self {
        Self {
            cfg: cfg.clone(),
            hosts: (0..backends).map(|_| OutlierState::new()).collect(),
            deciding: AtomicBool::new(false),
        }
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    pub fn host(&self, backend: usize) -> Option<&OutlierState> {
        self.hosts.get(backend)
    }

    /// Lock-free; an unknown index is reported as not ejected.
    pub fn is_ejected(&self, backend: usize, now: Instant) -> bool {
        self.hosts.get(backend).is_some_and(|h| h.is_ejected(now))
    }

    /// Backends ejected at `now` (a scan of atomics; for metrics and the
    /// ejection decision).
    pub fn ejected_count(&self, now: Instant) -> usize {
        let now_ms = clock::to_ms(now);
        self.hosts
            .iter()
            .filter(|h| h.is_ejected_ms(now_ms))
            .count()
    }

    /// How many backends may be ejected at once (see the type docs).
    pub fn max_ejected(&self) -> usize {
        let n = self.hosts.len();
        let pct = self.cfg.max_ejection_percent.min(100) as usize;
        if pct == 0 {
            return 0;
        }
        let cap = n * pct / 100;
        if n >= 2 { cap.max(1) } else { cap }
    }

    /// Account one request outcome of `backend`. Returns the ejection when
    /// this outcome completed a failure streak and the pool cap allowed it.
    /// Outcomes of requests that finish while the backend is ejected are
    /// ignored: they were sent before the ejection and say nothing new.
    pub fn record(&self, backend: usize, outcome: Outcome, now: Instant) -> Option<Ejection> {
        let host = self.hosts.get(backend)?;
        let now_ms = clock::to_ms(now);
        if host.is_ejected_ms(now_ms) {
            return None;
        }
        let (n5xx, ngw) = match outcome {
            Outcome::Success => {
                host.reset_counters();
                return None;
            }
            Outcome::Status5xx => {
                let n = host
                    .consecutive_5xx
                    .fetch_add(1, Ordering::Relaxed)
                    .saturating_add(1);
                // A 5xx response proves the connection works: it ends a
                // streak of connection-level failures.
                if host.consecutive_gateway.load(Ordering::Relaxed) != 0 {
                    host.consecutive_gateway.store(0, Ordering::Relaxed);
                }
                (n, 0)
            }
            // The client sees these as 502/503/504, so they count for both
            // detectors (as Envoy maps local-origin errors when it does not
            // split them).
            Outcome::ConnectFailure | Outcome::Reset | Outcome::Timeout => (
                host.consecutive_5xx
                    .fetch_add(1, Ordering::Relaxed)
                    .saturating_add(1),
                host.consecutive_gateway
                    .fetch_add(1, Ordering::Relaxed)
                    .saturating_add(1),
            ),
        };
        let reached = |count: u32, threshold: u32| threshold > 0 && count >= threshold;
        let reason = if reached(ngw, self.cfg.consecutive_gateway_failures) {
            EjectReason::ConsecutiveGatewayFailure
        } else if reached(n5xx, self.cfg.consecutive_5xx) {
            EjectReason::Consecutive5xx
        } else {
            return None;
        };
        self.try_eject(backend, host, reason, now, now_ms)
    }

    fn try_eject(
        &self,
        backend: usize,
        host: &OutlierState,
        reason: EjectReason,
        now: Instant,
        now_ms: u64,
    ) -> Option<Ejection> {
        if self
            .deciding
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return None;
        }
        let result = self.decide(backend, host, reason, now, now_ms);
        self.deciding.store(false, Ordering::Release);
        result
    }

    fn decide(
        &self,
        backend: usize,
        host: &OutlierState,
        reason: EjectReason,
        now: Instant,
        now_ms: u64,
    ) -> Option<Ejection> {
        if host.is_ejected_ms(now_ms) {
            return None;
        }
        let ejected = self
            .hosts
            .iter()
            .filter(|h| h.is_ejected_ms(now_ms))
            .count();
        host.reset_counters();
        if ejected >= self.max_ejected() {
            // Refused: the streak starts over, so a pool at its cap is not
            // rescanned on every further failure.
            tracing::debug!(
                backend,
                ejected,
                "outlier ejection refused: pool at max_ejection_percent"
            );
            return None;
        }
        let base = self.cfg.base_ejection_ms.max(1);
        let max = self.cfg.max_ejection_ms.max(base);
        // Decay of the multiplier: one step per base_ejection_ms spent
        // un-ejected since the last ejection ended (Envoy decrements once
        // per detection interval while the host is not ejected); computed
        // lazily here, so no timer is needed.
        let last_until = host.ejected_until_ms.load(Ordering::Acquire);
        let mut times = host.times_ejected.load(Ordering::Relaxed);
        if last_until != 0 {
            let quiet_steps = now_ms.saturating_sub(last_until) / base;
            times = times.saturating_sub(u32::try_from(quiet_steps).unwrap_or(u32::MAX));
        }
        times = times.saturating_add(1);
        let factor = 1u64.checked_shl(times - 1).unwrap_or(u64::MAX);
        let duration_ms = base.saturating_mul(factor).min(max);
        host.times_ejected.store(times, Ordering::Relaxed);
        host.ejected_until_ms
            .store(now_ms.saturating_add(duration_ms), Ordering::Release);
        let duration = Duration::from_millis(duration_ms);
        Some(Ejection {
            backend,
            reason,
            duration,
            until: now + duration,
            times_ejected: times,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn yaml_defaults_and_validation() {
        let c: OutlierConfig = serde_yaml::from_str("{ consecutive_5xx: 3 }").unwrap();
        assert_eq!(
            c,
            OutlierConfig {
                consecutive_5xx: 3,
                ..OutlierConfig::default()
            }
        );
        assert!(c.validate("x").is_empty());
        assert!(serde_yaml::from_str::<OutlierConfig>("{ consecutive_500: 3 }").is_err());
        let bad = OutlierConfig {
            base_ejection_ms: 0,
            max_ejection_percent: 101,
            ..OutlierConfig::default()
        };
        let fields: Vec<String> = bad
            .validate("upstreams.api.outlier")
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(
            fields,
            [
                "upstreams.api.outlier.base_ejection_ms",
                "upstreams.api.outlier.max_ejection_percent"
            ]
        );
    }

    #[test]
    fn consecutive_5xx_ejects_for_base_then_returns() {
        let pool = OutlierPool::new(&OutlierConfig::default(), 4);
        let t = Instant::now();
        for _ in 0..4 {
            assert_eq!(pool.record(1, Outcome::Status5xx, t), None);
        }
        let e = pool.record(1, Outcome::Status5xx, t).unwrap();
        assert_eq!(
            (e.backend, e.reason, e.duration, e.times_ejected),
            (1, EjectReason::Consecutive5xx, s(30), 1)
        );
        assert!(pool.is_ejected(1, t + s(29)));
        assert!(!pool.is_ejected(1, t + s(30)));
        assert!(!pool.is_ejected(0, t));
        assert_eq!(pool.ejected_count(t), 1);
        // Outcomes during the ejection are ignored.
        for _ in 0..10 {
            assert_eq!(pool.record(1, Outcome::Status5xx, t + s(1)), None);
        }
    }

    #[test]
    fn success_resets_streak_and_gateway_failures_count() {
        let pool = OutlierPool::new(&OutlierConfig::default(), 4);
        let t = Instant::now();
        for _ in 0..4 {
            pool.record(0, Outcome::Status5xx, t);
        }
        pool.record(0, Outcome::Success, t);
        for _ in 0..4 {
            assert_eq!(pool.record(0, Outcome::Status5xx, t), None);
        }
        // Mixed connection-level failures form one gateway streak.
        let mut out = None;
        for o in [
            Outcome::ConnectFailure,
            Outcome::Reset,
            Outcome::Timeout,
            Outcome::Reset,
            Outcome::ConnectFailure,
        ] {
            out = pool.record(2, o, t);
        }
        assert_eq!(
            out.map(|e| e.reason),
            Some(EjectReason::ConsecutiveGatewayFailure)
        );
    }

    #[test]
    fn repeat_ejections_double_cap_and_decay() {
        let cfg = OutlierConfig {
            consecutive_5xx: 1,
            ..OutlierConfig::default()
        };
        let pool = OutlierPool::new(&cfg, 4);
        let mut t = Instant::now();
        let mut durations = vec![];
        for _ in 0..6 {
            let e = pool.record(0, Outcome::Status5xx, t).unwrap();
            durations.push(e.duration.as_secs());
            t = e.until; // fails again right after coming back
        }
        assert_eq!(durations, [30, 60, 120, 240, 300, 300]);
        // After a long quiet period the multiplier decays back to 1:
        // one step per base_ejection_ms (30 s) un-ejected.
        let e = pool.record(0, Outcome::Status5xx, t + s(30 * 10)).unwrap();
        assert_eq!((e.times_ejected, e.duration), (1, s(30)));
        // Partial decay: 2 quiet periods take 2 steps off.
        let e2 = pool.record(0, Outcome::Status5xx, e.until).unwrap();
        let e3 = pool.record(0, Outcome::Status5xx, e2.until).unwrap();
        assert_eq!(e3.times_ejected, 3);
        let e4 = pool
            .record(0, Outcome::Status5xx, e3.until + s(60))
            .unwrap();
        assert_eq!((e4.times_ejected, e4.duration), (2, s(60)));
    }

    #[test]
    fn max_ejected_rule() {
        let t = Instant::now();
        let m = |n: usize, pct: u32| {
            OutlierPool::new(
                &OutlierConfig {
                    max_ejection_percent: pct,
                    ..OutlierConfig::default()
                },
                n,
            )
            .max_ejected()
        };
        assert_eq!(m(1, 50), 0);
        assert_eq!(m(1, 100), 1);
        assert_eq!(m(2, 50), 1);
        assert_eq!(m(2, 10), 1);
        assert_eq!(m(3, 99), 2);
        assert_eq!(m(10, 50), 5);
        assert_eq!(m(10, 0), 0);
        assert_eq!(m(3, 100), 3);

        let cfg = OutlierConfig {
            consecutive_5xx: 1,
            ..OutlierConfig::default()
        };
        let pool = OutlierPool::new(&cfg, 2);
        assert!(pool.record(0, Outcome::Status5xx, t).is_some());
        assert!(
            pool.record(1, Outcome::Status5xx, t).is_none(),
            "would eject the whole pool"
        );
        // Once the first comes back the second may go.
        assert!(pool.record(1, Outcome::Status5xx, t + s(31)).is_some());
    }

    #[test]
    fn concurrent_failures_never_eject_whole_pool() {
        let cfg = OutlierConfig {
            consecutive_5xx: 1,
            consecutive_gateway_failures: 1,
            max_ejection_percent: 99,
            ..OutlierConfig::default()
        };
        for _ in 0..20 {
            let pool = Arc::new(OutlierPool::new(&cfg, 3));
            let t = Instant::now();
            let handles: Vec<_> = (0..4)
                .map(|k| {
                    let pool = Arc::clone(&pool);
                    std::thread::spawn(move || {
                        for i in 0..300 {
                            pool.record((i + k) % 3, Outcome::Reset, t);
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            assert_eq!(pool.ejected_count(t), 2);
        }
    }

    proptest! {
        /// Whatever the outcome sequence and timing, the number of ejected
        /// backends never exceeds max_ejected(), which is < n for pools of
        /// two or more when the percentage is below 100.
        #[test]
        fn cap_is_never_exceeded(
            n in 1usize..8,
            pct in 0u32..=100,
            steps in proptest::collection::vec((0usize..8, 0u8..5, 0u64..20_000), 1..300),
        ) {
            let cfg = OutlierConfig { consecutive_5xx: 2, consecutive_gateway_failures: 2, max_ejection_percent: pct, ..OutlierConfig::default() };
            let pool = OutlierPool::new(&cfg, n);
            if n >= 2 && pct < 100 { prop_assert!(pool.max_ejected() < n); }
            let mut t = Instant::now();
            for (b, o, dt) in steps {
                t += Duration::from_millis(dt);
                let outcome = [Outcome::Success, Outcome::Status5xx, Outcome::ConnectFailure, Outcome::Reset, Outcome::Timeout][o as usize];
                if let Some(e) = pool.record(b % n, outcome, t) {
                    prop_assert!(e.duration >= s(30) && e.duration <= s(300));
                    prop_assert!(pool.is_ejected(b % n, t));
                }
                prop_assert!(pool.ejected_count(t) <= pool.max_ejected());
            }
        }
    }
}
