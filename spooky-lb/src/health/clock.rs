//! A process-wide monotonic epoch, so that instants can live in plain
//! `AtomicU64`s (milliseconds or nanoseconds since the epoch) and be read and
//! written from every worker thread without locks.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How far before the first use the epoch is placed. `Instant`s taken before
/// the first call (tests, start-up code that stamps early) then still map to
/// distinct, positive offsets instead of all saturating to zero.
const EPOCH_SLACK: Duration = Duration::from_secs(3600);

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// The process epoch. Fixed at the first call; call it once at start-up to
/// pin it early (cheap afterwards: one atomic load).
pub fn epoch() -> Instant {
    *EPOCH.get_or_init(|| {
        let now = Instant::now();
        now.checked_sub(EPOCH_SLACK).unwrap_or(now)
    })
}

/// Milliseconds from the epoch to `t`, saturating at 0 for earlier instants.
pub fn to_ms(t: Instant) -> u64 {
    let ms = t.saturating_duration_since(epoch()).as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// Nanoseconds from the epoch to `t` (saturating; u64 nanoseconds cover 584
/// years).
pub fn to_ns(t: Instant) -> u64 {
    let ns = t.saturating_duration_since(epoch()).as_nanos();
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// The instant `ms` milliseconds after the epoch.
pub fn from_ms(ms: u64) -> Instant {
    let e = epoch();
    e.checked_add(Duration::from_millis(ms)).unwrap_or(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_is_monotonic() {
        let a = Instant::now();
        let b = a + Duration::from_millis(1500);
        assert_eq!(to_ms(b) - to_ms(a), 1500);
        assert!(to_ns(b) > to_ns(a));
        let back = from_ms(to_ms(b));
        assert!(back <= b && b.duration_since(back) < Duration::from_millis(1));
    }
}
