//! The retry budget: a lock-free, Finagle-style token account shared by
//! every worker of an upstream, so that retries cannot multiply load during
//! an outage. Time is an input (`now: Instant`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::RetryConfig;
use crate::health::clock;

/// Window over which the budget counts requests and retries.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
const SLOTS: usize = 10; // one per second of the window

// Slot layout: | second: 24 | deposits: 22 | withdrawals: 18 |. The second
// wraps every 194 days, which only matters for comparing slots within the
// window. Counts saturate (4 M requests/s, 262 k retries/s per upstream).
const SEC_BITS: u32 = 24;
const DEP_BITS: u32 = 22;
const WD_BITS: u32 = 18;
const SEC_MASK: u64 = (1 << SEC_BITS) - 1;
const DEP_MAX: u64 = (1 << DEP_BITS) - 1;
const WD_MAX: u64 = (1 << WD_BITS) - 1;

fn unpack(w: u64) -> (u64, u64, u64) {
    (
        w >> (DEP_BITS + WD_BITS),
        (w >> WD_BITS) & DEP_MAX,
        w & WD_MAX,
    )
}

fn pack(sec: u64, dep: u64, wd: u64) -> u64 {
    ((sec & SEC_MASK) << (DEP_BITS + WD_BITS)) | (dep.min(DEP_MAX) << WD_BITS) | wd.min(WD_MAX)
}

/// Finagle-style retry budget shared by the workers of one upstream
/// (`Arc<RetryBudget>`): every request deposits, every retry withdraws, and
/// a retry is allowed while
/// `retries + 1 ≤ min_retries_per_s × 10 + requests × budget_percent / 100`
/// over the last 10 s.
///
/// The window is ten one-second slots, each one `AtomicU64` (second stamp,
/// request count, retry count) updated by compare-and-swap, so counts are
/// exact. Approximations, by design: the window slides by whole seconds
/// (it spans 9 to 10 s), and the check and the withdrawal are two steps,
/// so concurrent retries can overdraw by at most one per racing thread.
#[derive(Debug)]
pub struct RetryBudget {
    percent: u64,
    reserve: u64,
    slots: [AtomicU64; SLOTS],
}

impl RetryBudget {
    pub fn new(cfg: &RetryConfig) -> Self {
        Self {
            percent: u64::from(cfg.budget_percent),
            reserve: u64::from(cfg.min_retries_per_s) * BUDGET_WINDOW.as_secs(),
            slots: Default::default(),
        }
    }

    fn second(now: Instant) -> u64 {
        clock::to_ms(now) / 1000
    }

    /// Add `f` to the slot of second `sec`, restarting it if it holds an
    /// older second. `f` returns None to leave the slot unchanged.
    fn bump(&self, sec: u64, f: impl Fn(u64, u64) -> Option<(u64, u64)>) -> bool {
        let slot = &self.slots[(sec % SLOTS as u64) as usize];
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let (s, dep, wd) = unpack(cur);
            let (dep, wd) = if s == sec & SEC_MASK {
                (dep, wd)
            } else {
                (0, 0)
            };
            let Some((dep, wd)) = f(dep, wd) else {
                return false;
            };
            match slot.compare_exchange_weak(
                cur,
                pack(sec, dep, wd),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Requests and retries counted in the window ending at `now`.
    pub fn window_counts(&self, now: Instant) -> (u64, u64) {
        let sec = Self::second(now) & SEC_MASK;
        let (mut deps, mut wds) = (0, 0);
        for slot in &self.slots {
            let (s, dep, wd) = unpack(slot.load(Ordering::Relaxed));
            let age = sec.wrapping_sub(s) & SEC_MASK;
            if age < SLOTS as u64 {
                deps += dep;
                wds += wd;
            }
        }
        (deps, wds)
    }

    /// Count one request (its first try).
    pub fn deposit(&self, now: Instant) {
        self.bump(Self::second(now), |d, w| Some((d + 1, w)));
    }

    /// Ask for one retry; true = allowed and counted.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let (deps, wds) = self.window_counts(now);
        // (wds + 1) ≤ reserve + deps × percent / 100, in integers.
        if (wds + 1) * 100 > self.reserve * 100 + deps * self.percent {
            return false;
        }
        self.bump(Self::second(now), |d, w| (w < WD_MAX).then_some((d, w + 1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_percent_plus_reserve() {
        let c = RetryConfig::default();
        let b = RetryBudget::new(&c);
        let t = Instant::now();
        // Reserve: 10/s × 10 s = 100 retries with no traffic.
        let granted = (0..1000).filter(|_| b.try_withdraw(t)).count();
        assert_eq!(granted, 100);
        // 1000 requests buy 200 more.
        for _ in 0..1000 {
            b.deposit(t);
        }
        let granted = (0..1000).filter(|_| b.try_withdraw(t)).count();
        assert_eq!(granted, 200);
        // Everything expires with the window.
        let later = t + BUDGET_WINDOW + Duration::from_secs(1);
        assert_eq!(b.window_counts(later), (0, 0));
        assert!(b.try_withdraw(later));
    }

    #[test]
    fn budget_limits_retry_ratio_in_steady_state() {
        let c = RetryConfig {
            min_retries_per_s: 0,
            ..RetryConfig::default()
        };
        let b = RetryBudget::new(&c);
        let t0 = Instant::now();
        let (mut reqs, mut retries) = (0u64, 0u64);
        // 60 s of 1000 req/s where every request wants a retry.
        for ms in 0..60_000u64 {
            let t = t0 + Duration::from_millis(ms);
            b.deposit(t);
            reqs += 1;
            if b.try_withdraw(t) {
                retries += 1;
            }
        }
        let ratio = retries as f64 / reqs as f64;
        assert!((0.19..=0.201).contains(&ratio), "retry ratio {ratio}");
    }

    #[test]
    fn budget_is_shared_across_threads() {
        let c = RetryConfig {
            min_retries_per_s: 0,
            ..RetryConfig::default()
        };
        let b = std::sync::Arc::new(RetryBudget::new(&c));
        let t = Instant::now();
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let b = std::sync::Arc::clone(&b);
                std::thread::spawn(move || {
                    for _ in 0..5000 {
                        b.deposit(t);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(b.window_counts(t), (20_000, 0));
    }
}
