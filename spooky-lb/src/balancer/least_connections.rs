//! `least_connections`: the backend with the fewest requests in flight per
//! unit of weight (`in_flight / weight`, compared exactly by
//! cross-multiplication). Ties are broken at random in proportion to weight,
//! so that when requests complete faster than they arrive (every in-flight
//! count 0) traffic still follows the weights instead of going uniform.

use std::time::Instant;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{BackendView, Balance, Candidates, RequestInfo, new_rng, weight_of};

#[derive(Debug)]
pub struct LeastConnections {
    rng: SmallRng,
}

impl Default for LeastConnections {
    fn default() -> Self {
        Self::new()
    }
}

impl LeastConnections {
    pub fn new() -> Self {
        Self { rng: new_rng() }
    }

    pub fn with_seed(seed: u64) -> Self {
        Self {
            rng: SmallRng::seed_from_u64(seed),
        }
    }
}

impl Balance for LeastConnections {
    fn pick(
        &mut self,
        backends: &[BackendView<'_>],
        _req: &RequestInfo<'_>,
        exclude: &[usize],
        _now: Instant,
    ) -> Option<usize> {
        let c = Candidates::new(backends, exclude)?;
        // (index, in-flight, weight) of the best so far, and the total
        // weight of the backends tied with it (weighted reservoir sampling).
        let mut best: Option<(usize, u64, u64)> = None;
        let mut tied_weight = 0u64;
        for (i, b) in backends.iter().enumerate() {
            if !c.allows(i, b) {
                continue;
            }
            let (f, w) = (u64::from(b.stats.in_flight()), weight_of(b));
            match best {
                None => {
                    best = Some((i, f, w));
                    tied_weight = w;
                }
                Some((_, bf, bw)) => match (f * bw).cmp(&(bf * w)) {
                    std::cmp::Ordering::Less => {
                        best = Some((i, f, w));
                        tied_weight = w;
                    }
                    std::cmp::Ordering::Equal => {
                        tied_weight += w;
                        if self.rng.random_range(0..tied_weight) < w {
                            best = Some((i, f, w));
                        }
                    }
                    std::cmp::Ordering::Greater => {}
                },
            }
        }
        best.map(|(i, _, _)| i)
    }

    fn name(&self) -> &'static str {
        "least_connections"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::testutil::*;
    use proptest::prelude::*;

    #[test]
    fn contract() {
        let mut seed = 0;
        check_contract(|| {
            seed += 1;
            Box::new(LeastConnections::with_seed(seed))
        });
    }

    #[test]
    fn favours_fewer_in_flight_per_weight() {
        let s = stats(3);
        let v = views(&s, &[1, 1, 2]);
        let h = http::HeaderMap::new();
        let r = req(&h);
        let mut b = LeastConnections::with_seed(1);
        let _g0: Vec<_> = (0..3).map(|_| s[0].start_request()).collect();
        let _g1: Vec<_> = (0..1).map(|_| s[1].start_request()).collect();
        let _g2: Vec<_> = (0..4).map(|_| s[2].start_request()).collect();
        // Costs 3/1, 1/1, 4/2: backend 1.
        for _ in 0..100 {
            assert_eq!(b.pick(&v, &r, &[], Instant::now()), Some(1));
        }
        // Excluding it: 4/2 < 3/1.
        assert_eq!(b.pick(&v, &r, &[1], Instant::now()), Some(2));
    }

    #[test]
    fn holding_picks_spreads_like_weights() {
        // Picks that stay in flight fill backends in proportion to weight.
        let s = stats(3);
        let v = views(&s, &[1, 2, 3]);
        let h = http::HeaderMap::new();
        let r = req(&h);
        let mut b = LeastConnections::with_seed(3);
        let guards: Vec<_> = (0..600)
            .map(|_| s[b.pick(&v, &r, &[], Instant::now()).unwrap()].start_request())
            .collect();
        let f: Vec<u32> = s.iter().map(|x| x.in_flight()).collect();
        assert_eq!(f, [100, 200, 300]);
        drop(guards);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        /// With instant completion (in-flight always 0) shares follow the
        /// weights within 2 % absolute over 100k picks.
        #[test]
        fn weighted_shares_with_instant_completion(weights in proptest::collection::vec(1u32..=100, 1..8), seed in any::<u64>()) {
            let s = stats(weights.len());
            let v = views(&s, &weights);
            let got = shares(&mut LeastConnections::with_seed(seed), &v, 100_000);
            let err = max_abs_err(&got, &expected(&weights));
            eprintln!("least_connections: weights {weights:?} max |observed-expected| = {:.4} %", err * 100.0);
            prop_assert!(err <= 0.02);
        }

        /// Never picks a backend whose in-flight/weight exceeds another
        /// allowed backend's.
        #[test]
        fn picks_a_minimum(loads in proptest::collection::vec((0u32..20, 1u32..10), 1..10), seed in any::<u64>()) {
            let s = stats(loads.len());
            let weights: Vec<u32> = loads.iter().map(|l| l.1).collect();
            let v = views(&s, &weights);
            let _g: Vec<_> = loads.iter().enumerate().flat_map(|(i, (f, _))| (0..*f).map(move |_| i)).map(|i| s[i].start_request()).collect();
            let h = http::HeaderMap::new();
            let i = LeastConnections::with_seed(seed).pick(&v, &req(&h), &[], Instant::now()).unwrap();
            let cost = |j: usize| f64::from(loads[j].0) / f64::from(loads[j].1);
            prop_assert!((0..loads.len()).all(|j| cost(i) <= cost(j)));
        }
    }
}
