//! `random`: weight-proportional random selection. Stateless apart from its
//! RNG, so it needs no warm-up and never synchronises workers.

use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::SmallRng;

use super::{BackendView, Balance, Candidates, RequestInfo, new_rng, weighted_random};

#[derive(Debug)]
pub struct Random {
    rng: SmallRng,
}

impl Default for Random {
    fn default() -> Self {
        Self::new()
    }
}

impl Random {
    pub fn new() -> Self {
        Self { rng: new_rng() }
    }

    pub fn with_seed(seed: u64) -> Self {
        Self {
            rng: SmallRng::seed_from_u64(seed),
        }
    }
}

impl Balance for Random {
    fn pick(
        &mut self,
        backends: &[BackendView<'_>],
        _req: &RequestInfo<'_>,
        exclude: &[usize],
        _now: Instant,
    ) -> Option<usize> {
        let c = Candidates::new(backends, exclude)?;
        weighted_random(&mut self.rng, backends, &c)
    }

    fn name(&self) -> &'static str {
        "random"
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
            Box::new(Random::with_seed(seed))
        });
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        /// Over 100k picks each backend's share is within 2 % (absolute) of
        /// weight / total weight. (The binomial σ is ≤ 0.16 % at 100k, so
        /// 2 % is > 12σ: no flakes.)
        #[test]
        fn weighted_shares(weights in proptest::collection::vec(1u32..=100, 1..8), seed in any::<u64>()) {
            let s = stats(weights.len());
            let v = views(&s, &weights);
            let got = shares(&mut Random::with_seed(seed), &v, 100_000);
            let err = max_abs_err(&got, &expected(&weights));
            eprintln!("random: weights {weights:?} max |observed-expected| = {:.4} %", err * 100.0);
            prop_assert!(err <= 0.02);
        }
    }
}
