//! `consistent_hash`: weighted rendezvous (highest-random-weight) hashing of
//! a request key — client IP, a header, a cookie or the path — so that a key
//! keeps its backend while the pool changes around it.
//!
//! Why rendezvous rather than Maglev: pools behind one spooky upstream are
//! small (tens of backends), where HRW's O(n) per pick costs well under a
//! microsecond, and in exchange it needs no lookup table, so health and
//! ejection changes (which happen per worker, between any two picks) need
//! no table rebuild; its disruption is the theoretical minimum (when a
//! backend leaves, exactly its keys move and no other key does; Maglev
//! moves a few more); weights are exact (score = w / −ln(u), Schindelhauer
//! & Schomaker), and a retry's "next backend" is simply the key's
//! second-highest score, itself consistent. Maglev's O(1) lookup only pays
//! off for pools of hundreds of backends.
//!
//! A request without the key (no such header or cookie) falls back to a
//! weight-proportional random pick: spreading such requests is better than
//! pinning them all to the backend of the empty key.

use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::SmallRng;

use super::hash::{combine, find_cookie, hash_bytes, unit_open};
use super::{
    BackendView, Balance, Candidates, HashKey, RequestInfo, new_rng, weight_of, weighted_random,
};

/// Where the key comes from, pre-parsed.
#[derive(Debug, Clone)]
enum KeySource {
    ClientIp,
    Header(http::HeaderName),
    Cookie(String),
    Path,
    /// Invalid header name (config validation rejects it): every request
    /// lacks the key.
    Never,
}

#[derive(Debug)]
pub struct ConsistentHash {
    source: KeySource,
    rng: SmallRng,
}

impl ConsistentHash {
    pub fn new(key: &HashKey) -> Self {
        Self::with_rng(key, new_rng())
    }

    /// Seed of the fallback RNG only; the key → backend mapping is fixed.
    pub fn with_seed(key: &HashKey, seed: u64) -> Self {
        Self::with_rng(key, SmallRng::seed_from_u64(seed))
    }

    fn with_rng(key: &HashKey, rng: SmallRng) -> Self {
        let source = match key {
            HashKey::ClientIp => KeySource::ClientIp,
            HashKey::Path => KeySource::Path,
            HashKey::Cookie { name } => KeySource::Cookie(name.clone()),
            HashKey::Header { name } => match http::HeaderName::from_bytes(name.as_bytes()) {
                Ok(h) => KeySource::Header(h),
                Err(_) => {
                    tracing::warn!(header = %name, "consistent_hash: invalid header name, hashing falls back to random");
                    KeySource::Never
                }
            },
        };
        Self { source, rng }
    }

    /// The key hash of a request, None when the request has no key.
    fn key_hash(&self, req: &RequestInfo<'_>) -> Option<u64> {
        match &self.source {
            KeySource::ClientIp => Some(match req.client_ip.to_canonical() {
                std::net::IpAddr::V4(a) => hash_bytes(&a.octets()),
                std::net::IpAddr::V6(a) => hash_bytes(&a.octets()),
            }),
            KeySource::Header(name) => req
                .headers
                .get(name)
                .map(|v| v.as_bytes())
                .filter(|v| !v.is_empty())
                .map(hash_bytes),
            KeySource::Cookie(name) => find_cookie(req.headers, name)
                .filter(|v| !v.is_empty())
                .map(|v| hash_bytes(v.as_bytes())),
            KeySource::Path => Some(hash_bytes(req.path.as_bytes())),
            KeySource::Never => None,
        }
    }
}

/// The backend with the highest weighted rendezvous score for `key`.
pub(crate) fn rendezvous(
    key: u64,
    backends: &[BackendView<'_>],
    c: &Candidates<'_>,
) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, b) in backends.iter().enumerate() {
        if !c.allows(i, b) {
            continue;
        }
        let u = unit_open(combine(key, hash_bytes(b.id.as_bytes())));
        // w / −ln(u): the winner is backend i with probability w_i / Σw,
        // independently for each key.
        let score = weight_of(b) as f64 / -u.ln();
        if best.is_none_or(|(_, s)| score > s) {
            best = Some((i, score));
        }
    }
    best.map(|(i, _)| i)
}

impl Balance for ConsistentHash {
    fn pick(
        &mut self,
        backends: &[BackendView<'_>],
        req: &RequestInfo<'_>,
        exclude: &[usize],
        _now: Instant,
    ) -> Option<usize> {
        let c = Candidates::new(backends, exclude)?;
        match self.key_hash(req) {
            Some(key) => rendezvous(key, backends, &c),
            None => weighted_random(&mut self.rng, backends, &c),
        }
    }

    fn name(&self) -> &'static str {
        "consistent_hash"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::testutil::*;
    use http::{HeaderMap, HeaderValue};
    use proptest::prelude::*;
    use std::net::IpAddr;

    #[test]
    fn contract() {
        check_contract(|| Box::new(ConsistentHash::new(&HashKey::ClientIp)));
        check_contract(|| {
            Box::new(ConsistentHash::new(&HashKey::Header {
                name: "x-user".into(),
            }))
        });
    }

    fn owner(key: u64, v: &[BackendView<'_>]) -> usize {
        let c = Candidates::new(v, &[]).unwrap();
        rendezvous(key, v, &c).unwrap()
    }

    #[test]
    fn key_sources() {
        let s = stats(16);
        let v = views(&s, &[1; 16]);
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("alice"));
        h.insert(
            http::header::COOKIE,
            HeaderValue::from_static("sid=s-123; other=1"),
        );
        let r = RequestInfo {
            client_ip: IpAddr::from([198, 18, 0, 7]),
            path: "/a/b",
            headers: &h,
        };
        let cases = [
            (HashKey::ClientIp, hash_bytes(&[198, 18, 0, 7])),
            (
                HashKey::Header {
                    name: "X-User".into(),
                },
                hash_bytes(b"alice"),
            ),
            (HashKey::Cookie { name: "sid".into() }, hash_bytes(b"s-123")),
            (HashKey::Path, hash_bytes(b"/a/b")),
        ];
        for (key, hash) in cases {
            let mut b = ConsistentHash::with_seed(&key, 1);
            for _ in 0..20 {
                assert_eq!(
                    b.pick(&v, &r, &[], Instant::now()),
                    Some(owner(hash, &v)),
                    "{key:?}"
                );
            }
        }
        // IPv4-mapped IPv6 hashes as the IPv4 address.
        let mapped = RequestInfo {
            client_ip: "::ffff:198.18.0.7".parse().unwrap(),
            ..r
        };
        let mut b = ConsistentHash::with_seed(&HashKey::ClientIp, 1);
        assert_eq!(
            b.pick(&v, &mapped, &[], Instant::now()),
            b.pick(&v, &r, &[], Instant::now())
        );
    }

    #[test]
    fn missing_key_falls_back_to_random() {
        let s = stats(8);
        let v = views(&s, &[1; 8]);
        let h = HeaderMap::new();
        let mut b = ConsistentHash::with_seed(&HashKey::Cookie { name: "sid".into() }, 1);
        let mut seen = [false; 8];
        for _ in 0..500 {
            seen[b.pick(&v, &req(&h), &[], Instant::now()).unwrap()] = true;
        }
        assert!(seen.iter().all(|x| *x));
    }

    #[test]
    fn retry_goes_to_the_keys_second_choice() {
        let s = stats(5);
        let v = views(&s, &[1; 5]);
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("bob"));
        let mut b = ConsistentHash::with_seed(
            &HashKey::Header {
                name: "x-user".into(),
            },
            1,
        );
        let first = b.pick(&v, &req(&h), &[], Instant::now()).unwrap();
        let second = b.pick(&v, &req(&h), &[first], Instant::now()).unwrap();
        assert_ne!(first, second);
        // The same as if the first backend had left the pool.
        let mut v2 = v.clone();
        v2[first].eligible = false;
        assert_eq!(b.pick(&v2, &req(&h), &[], Instant::now()), Some(second));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// One of N backends leaves: keys on the other backends do not move
        /// (exactly 0), and the moved fraction (= the leaver's share) is at
        /// most 1/N + 2 % over 10k keys (σ ≤ 0.5 %).
        #[test]
        fn minimal_disruption(n in 2usize..=20, leaver in 0usize..20, salt in any::<u64>()) {
            let leaver = leaver % n;
            let s = stats(n);
            let v = views(&s, &vec![1; n]);
            let mut v2 = v.clone();
            v2[leaver].eligible = false;
            let mut moved = 0usize;
            for k in 0..10_000u64 {
                let key = hash_bytes(&(k ^ salt).to_le_bytes());
                let (a, b) = (owner(key, &v), owner(key, &v2));
                if a != leaver {
                    prop_assert_eq!(a, b, "a key on a remaining backend moved");
                } else {
                    moved += 1;
                }
            }
            let frac = moved as f64 / 10_000.0;
            eprintln!("consistent_hash: n={n} moved {:.4} % of keys, 1/n = {:.4} %, excess {:+.4} %", frac * 100.0, 100.0 / n as f64, (frac - 1.0 / n as f64) * 100.0);
            prop_assert!(frac <= 1.0 / n as f64 + 0.02, "moved {} with n={}", frac, n);
        }

        /// Keys spread in proportion to weight: within 2 % absolute over 20k
        /// keys.
        #[test]
        fn weighted_spread(weights in proptest::collection::vec(1u32..=10, 2..10), salt in any::<u64>()) {
            let s = stats(weights.len());
            let v = views(&s, &weights);
            let mut counts = vec![0usize; weights.len()];
            for k in 0..20_000u64 {
                counts[owner(hash_bytes(&(k.wrapping_mul(31) ^ salt).to_le_bytes()), &v)] += 1;
            }
            let got: Vec<f64> = counts.iter().map(|c| *c as f64 / 20_000.0).collect();
            let err = max_abs_err(&got, &expected(&weights));
            eprintln!("consistent_hash: weights {weights:?} max |observed-expected| = {:.4} %", err * 100.0);
            prop_assert!(err <= 0.02);
        }
    }
}
