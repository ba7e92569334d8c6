//! Live per-backend statistics shared by all worker threads without locks:
//! requests in flight and a peak-EWMA of latency that decays with time
//! (Finagle's / linkerd's `PeakEwma`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::health::clock;

/// Default time constant of the latency EWMA (Finagle and linkerd use 10 s).
pub const DEFAULT_EWMA_DECAY: Duration = Duration::from_secs(10);

/// Statistics of one backend, shared by every worker (`Arc<BackendStats>`).
///
/// Latency estimate ("peak EWMA"): a sample above the current estimate
/// replaces it at once (react to a slowdown immediately); a lower sample is
/// blended in with weight `1 − e^(−Δt/τ)`, Δt being the time since the last
/// sample (recover gradually); and reading it at `now` applies the decay
/// `e^(−Δt/τ)` toward zero, so an idle backend that was slow is eventually
/// tried again rather than starved forever. Finagle applies that read-time
/// decay by storing a zero sample on every read; here reads do not write,
/// which keeps them a pair of loads.
///
/// Concurrency: the estimate is an `f64` in an `AtomicU64` updated by
/// compare-and-swap, the sample time a separate atomic advanced with
/// `fetch_max`. Two samples racing may both blend against the same sample
/// time, decaying slightly more than a serial order would: a negligible
/// error for a load-balancing signal, and no lock.
#[derive(Debug)]
pub struct BackendStats {
    in_flight: AtomicU32,
    /// f64 bits of the estimate, in ns.
    ewma_bits: AtomicU64,
    /// Time of the last sample, ns since `clock::epoch()`; 0 = no sample yet.
    stamp_ns: AtomicU64,
    decay_ns: f64,
}

impl Default for BackendStats {
    fn default() -> Self {
        Self::new()
    }
}

impl BackendStats {
    pub fn new() -> Self {
        Self::with_decay(DEFAULT_EWMA_DECAY)
    }

    /// With a given EWMA time constant (`p2c_ewma.decay_ms`; see
    /// `BalancingConfig::ewma_decay`).
    pub fn with_decay(decay: Duration) -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            ewma_bits: AtomicU64::new(0f64.to_bits()),
            stamp_ns: AtomicU64::new(0),
            // At least 1 ms, so the exponent stays finite.
            decay_ns: decay.as_nanos().max(1_000_000) as f64,
        }
    }

    /// Count a request in flight until the guard is dropped.
    pub fn start_request(&self) -> InFlightGuard<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightGuard { stats: self }
    }

    /// Like [`start_request`](Self::start_request), for guards that must
    /// outlive the borrow (e.g. moved into a streaming response body).
    pub fn start_request_owned(self: &Arc<Self>) -> OwnedInFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        OwnedInFlightGuard {
            stats: Arc::clone(self),
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether any latency was recorded.
    pub fn has_samples(&self) -> bool {
        self.stamp_ns.load(Ordering::Relaxed) != 0
    }

    /// Record one latency sample (time to response headers) taken at `now`.
    pub fn record_latency(&self, rtt: Duration, now: Instant) {
        let rtt_ns = rtt.as_nanos() as f64;
        let now_ns = clock::to_ns(now).max(1);
        let mut cur_bits = self.ewma_bits.load(Ordering::Relaxed);
        loop {
            let cur = f64::from_bits(cur_bits);
            let stamp = self.stamp_ns.load(Ordering::Relaxed);
            let next = if stamp == 0 || rtt_ns > cur {
                rtt_ns
            } else {
                let w = (-(now_ns.saturating_sub(stamp) as f64) / self.decay_ns).exp();
                cur * w + rtt_ns * (1.0 - w)
            };
            match self.ewma_bits.compare_exchange_weak(
                cur_bits,
                next.to_bits(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => cur_bits = actual,
            }
        }
        self.stamp_ns.fetch_max(now_ns, Ordering::Relaxed);
    }

    /// The latency estimate in ns as of `now` (0.0 before any sample).
    pub fn ewma_ns(&self, now: Instant) -> f64 {
        let stamp = self.stamp_ns.load(Ordering::Relaxed);
        if stamp == 0 {
            return 0.0;
        }
        let cur = f64::from_bits(self.ewma_bits.load(Ordering::Relaxed));
        let elapsed = clock::to_ns(now).saturating_sub(stamp) as f64;
        cur * (-elapsed / self.decay_ns).exp()
    }
}

/// Decrements the backend's in-flight count when dropped.
#[must_use = "the request is counted in flight only while the guard lives"]
#[derive(Debug)]
pub struct InFlightGuard<'a> {
    stats: &'a BackendStats,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// [`InFlightGuard`] holding an `Arc` instead of a borrow.
#[must_use = "the request is counted in flight only while the guard lives"]
#[derive(Debug)]
pub struct OwnedInFlightGuard {
    stats: Arc<BackendStats>,
}

impl Drop for OwnedInFlightGuard {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn in_flight_guards() {
        let s = Arc::new(BackendStats::new());
        let a = s.start_request();
        let b = s.start_request_owned();
        assert_eq!(s.in_flight(), 2);
        drop(a);
        drop(b);
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn peak_then_decay() {
        let s = BackendStats::new();
        let t = Instant::now();
        assert_eq!(s.ewma_ns(t), 0.0);
        s.record_latency(ms(10), t);
        assert_eq!(s.ewma_ns(t), 10e6);
        // A peak is taken at once.
        s.record_latency(ms(100), t + ms(1));
        assert!((s.ewma_ns(t + ms(1)) - 100e6).abs() < 1.0);
        // A lower sample one τ later blends with weight 1 − 1/e.
        let t2 = t + ms(1) + DEFAULT_EWMA_DECAY;
        s.record_latency(ms(10), t2);
        let expect = 100e6 / std::f64::consts::E + 10e6 * (1.0 - 1.0 / std::f64::consts::E);
        assert!((s.ewma_ns(t2) - expect).abs() < 1e3, "{}", s.ewma_ns(t2));
        // Idle: decays toward zero, by 1/e per τ.
        let idle = s.ewma_ns(t2 + DEFAULT_EWMA_DECAY);
        assert!((idle - expect / std::f64::consts::E).abs() < 1e3);
        // Reads are side-effect free.
        assert!((s.ewma_ns(t2) - expect).abs() < 1e3);
    }

    #[test]
    fn concurrent_updates_stay_in_range() {
        let s = Arc::new(BackendStats::new());
        let t = Instant::now();
        let hs: Vec<_> = (0..4u64)
            .map(|k| {
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        let _g = s.start_request();
                        s.record_latency(ms(5 + (i + k) % 10), t + Duration::from_micros(i));
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let e = s.ewma_ns(t);
        assert!((5e6..=14e6).contains(&e), "{e}");
        assert_eq!(s.in_flight(), 0);
    }
}
