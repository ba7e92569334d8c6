//! Abuse-limit accounting, sans-IO: token buckets (one, shared, or one per
//! client, bounded) and open connections per client. Every decision takes
//! the time from the caller; nothing sleeps. Maps are sharded and bounded,
//! so a flood of distinct addresses costs a fixed amount of memory. spooky
//! builds its request limits (`spooky::limits`) from these.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A validated token-bucket rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

/// Shards of the per-IP maps: enough that workers rarely contend.
const SHARDS: usize = 16;
/// Client IPs tracked per shard (65 536 in all).
const MAX_PER_SHARD: usize = 4096;

/// A token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: Rate,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: Rate, now: Instant) -> Self {
        Self {
            rate,
            tokens: rate.burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate.per_second).min(self.rate.burst);
        self.last = now;
    }

    /// Takes a token, or says how long until one is available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let missing = 1.0 - self.tokens;
        Err(Duration::from_secs_f64(missing / self.rate.per_second))
    }

    /// Whether the bucket is full (it then says nothing a fresh one
    /// would not, and can be forgotten).
    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.rate.burst
    }
}

/// A bucket shared by every worker.
#[derive(Debug)]
pub struct SharedBucket(Mutex<TokenBucket>);

impl SharedBucket {
    pub fn new(rate: Rate, now: Instant) -> Self {
        Self(Mutex::new(TokenBucket::new(rate, now)))
    }

    pub fn try_take(&self, now: Instant) -> Result<(), Duration> {
        match self.0.lock() {
            Ok(mut b) => b.try_take(now),
            // A poisoned bucket cannot panic again; fail open.
            Err(_) => Ok(()),
        }
    }
}

/// The key a client is limited by: its IPv4 address, or the /64 prefix of
/// its IPv6 address (one subscriber usually holds a whole /64, and could
/// otherwise rotate through it to escape the limit).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

fn shard_of(ip: &IpAddr) -> usize {
    let mut fx = FxLike(0);
    ip.hash(&mut fx);
    (fx.0 as usize) % SHARDS
}

/// A tiny deterministic hasher for shard selection (not for the maps
/// themselves, which keep std's DoS-resistant hasher).
struct FxLike(u64);

impl Hasher for FxLike {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
}

/// Token buckets per client, bounded.
#[derive(Debug)]
pub struct PerClientBuckets {
    rate: Rate,
    shards: Vec<Mutex<HashMap<IpAddr, TokenBucket>>>,
}

impl PerClientBuckets {
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Takes a token from `ip`'s bucket.
    pub fn try_take(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = client_key(ip);
        let Some(shard) = self.shards.get(shard_of(&key)) else {
            return Ok(());
        };
        let Ok(mut map) = shard.lock() else {
            return Ok(());
        };
        if map.len() >= MAX_PER_SHARD && !map.contains_key(&key) {
            // Full buckets carry no information: drop them first. If every
            // tracked client is mid-burst, forget one at random (the map's
            // iteration order is randomised per process).
            map.retain(|_, b| !b.is_full(now));
            if map.len() >= MAX_PER_SHARD
                && let Some(victim) = map.keys().next().copied()
            {
                map.remove(&victim);
            }
        }
        map.entry(key)
            .or_insert_with(|| TokenBucket::new(self.rate, now))
            .try_take(now)
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |m| m.len()))
            .sum()
    }
}

/// Open connections per client, process-wide. Counting always happens;
/// the limit (0 = none) can change on reload.
#[derive(Debug)]
pub struct ConnectionsPerClient {
    max: AtomicU32,
    shards: Vec<Mutex<HashMap<IpAddr, u32>>>,
}

/// One counted connection; the count drops with it.
#[derive(Debug)]
pub struct ConnectionSlot {
    owner: Arc<ConnectionsPerClient>,
    key: IpAddr,
}

impl ConnectionsPerClient {
    pub fn new(max: Option<u32>) -> Arc<Self> {
        Arc::new(Self {
            max: AtomicU32::new(max.unwrap_or(0)),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        })
    }

    /// Applies a reloaded limit (existing connections stay).
    pub fn set_max(&self, max: Option<u32>) {
        self.max.store(max.unwrap_or(0), Ordering::Relaxed);
    }

    /// Counts a new connection from `ip`, or refuses it (`None`) when the
    /// client already has the maximum open.
    pub fn try_open(self: &Arc<Self>, ip: IpAddr) -> Option<ConnectionSlot> {
        let key = client_key(ip);
        let max = self.max.load(Ordering::Relaxed);
        let shard = self.shards.get(shard_of(&key))?;
        let mut map = shard.lock().ok()?;
        let n = map.entry(key).or_insert(0);
        if max != 0 && *n >= max {
            if *n == 0 {
                map.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(ConnectionSlot {
            owner: self.clone(),
            key,
        })
    }

    /// Open connections of `ip`'s client key.
    pub fn open(&self, ip: IpAddr) -> u32 {
        let key = client_key(ip);
        self.shards
            .get(shard_of(&key))
            .and_then(|s| s.lock().ok().and_then(|m| m.get(&key).copied()))
            .unwrap_or(0)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some(shard) = self.owner.shards.get(shard_of(&self.key))
            && let Ok(mut map) = shard.lock()
            && let Some(n) = map.get_mut(&self.key)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: f64, burst: f64) -> Rate {
        Rate { per_second, burst }
    }

    #[test]
    fn bucket_allows_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(rate(10.0, 3.0), t0);
        for _ in 0..3 {
            assert!(b.try_take(t0).is_ok());
        }
        let wait = b.try_take(t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        // 10/s: one token per 100 ms.
        assert!(b.try_take(t0 + Duration::from_millis(99)).is_err());
        assert!(b.try_take(t0 + Duration::from_millis(101)).is_ok());
        // Never more than the burst, however long it rested.
        let later = t0 + Duration::from_secs(60);
        let taken = (0..10).filter(|_| b.try_take(later).is_ok()).count();
        assert_eq!(taken, 3);
    }

    #[test]
    fn sustained_rate_matches_configuration() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(rate(50.0, 5.0), t0);
        // Offer 1000 requests/s for 10 s: 5 + 50 × 10 get through.
        let ok = (0..10_000)
            .filter(|i| b.try_take(t0 + Duration::from_millis(*i)).is_ok())
            .count();
        assert!((504..=506).contains(&ok), "{ok}");
    }

    #[test]
    fn clients_have_separate_buckets_and_ipv6_is_per_64() {
        let t0 = Instant::now();
        let b = PerClientBuckets::new(rate(1.0, 1.0));
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let c: IpAddr = "198.18.0.2".parse().unwrap();
        assert!(b.try_take(a, t0).is_ok());
        assert!(b.try_take(a, t0).is_err());
        assert!(b.try_take(c, t0).is_ok());
        let mapped: IpAddr = "::ffff:198.18.0.1".parse().unwrap();
        assert!(
            b.try_take(mapped, t0).is_err(),
            "v4-mapped is the same client"
        );
        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let v6c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(b.try_take(v6a, t0).is_ok());
        assert!(b.try_take(v6b, t0).is_err(), "same /64");
        assert!(b.try_take(v6c, t0).is_ok());
    }

    #[test]
    fn client_map_is_bounded() {
        let t0 = Instant::now();
        let b = PerClientBuckets::new(rate(1.0, 2.0));
        for i in 0..200_000u32 {
            let ip = IpAddr::from(i.wrapping_mul(2_654_435_761).to_be_bytes());
            let _ = b.try_take(ip, t0);
        }
        assert!(b.tracked() <= SHARDS * MAX_PER_SHARD, "{}", b.tracked());
    }

    #[test]
    fn connection_slots_count_and_release() {
        let c = ConnectionsPerClient::new(Some(2));
        let ip: IpAddr = "198.18.0.7".parse().unwrap();
        let s1 = c.try_open(ip).unwrap();
        let s2 = c.try_open(ip).unwrap();
        assert!(c.try_open(ip).is_none());
        assert_eq!(c.open(ip), 2);
        drop(s1);
        let s3 = c.try_open(ip).unwrap();
        c.set_max(None);
        let extra: Vec<_> = (0..10).map(|_| c.try_open(ip).unwrap()).collect();
        assert_eq!(c.open(ip), 12);
        drop((s2, s3, extra));
        assert_eq!(c.open(ip), 0);
        assert!(c.shards.iter().all(|s| s.lock().unwrap().is_empty()));
    }
}
