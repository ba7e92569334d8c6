//! `weighted_round_robin`: nginx's smooth weighted round-robin. On each
//! pick every candidate's current weight grows by its weight, the largest
//! current weight wins and is lowered by the total. Weights {5, 1, 1} give
//! `a a b a c a a` rather than `a a a a a b c`: the heaviest backend gets
//! its share spread out, never in a burst.

use std::time::Instant;

use rand::Rng;

use super::{BackendView, Balance, Candidates, RequestInfo, new_rng, weight_of};

/// Per-worker smooth-WRR state.
///
/// Properties (all eligible, no exclusions, weights fixed): the sequence is
/// periodic with period W = Σ weights; every window of W consecutive picks
/// (sliding, not only aligned) contains backend i exactly w_i times, so no
/// backend is picked more than w_i times in a row; and after any k picks,
/// backend i was picked within ±1 of k·w_i/W times (the naive "w_i in a
/// row" order violates that bound).
///
/// Ineligible or excluded backends sit out a pick with their current weight
/// unchanged (as in nginx). The state is reset when the number of backends
/// changes; a new snapshot normally comes with a new balancer anyway.
#[derive(Debug)]
pub struct WeightedRoundRobin {
    current: Vec<i64>,
    /// Picks to skip when the state is (re)initialised, so that workers do
    /// not run the same sequence in lockstep.
    skip: u64,
}

impl Default for WeightedRoundRobin {
    fn default() -> Self {
        Self::new()
    }
}

impl WeightedRoundRobin {
    pub fn new() -> Self {
        Self {
            current: Vec::new(),
            skip: new_rng().random_range(0..1024),
        }
    }

    /// Start at the beginning of the sequence (tests, deterministic set-ups).
    pub fn unshifted() -> Self {
        Self {
            current: Vec::new(),
            skip: 0,
        }
    }

    fn step(&mut self, backends: &[BackendView<'_>], c: &Candidates<'_>) -> Option<usize> {
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        for (i, b) in backends.iter().enumerate() {
            if !c.allows(i, b) {
                continue;
            }
            let w = i64::try_from(weight_of(b)).unwrap_or(i64::MAX);
            self.current[i] += w;
            total += w;
            if best.is_none_or(|j| self.current[i] > self.current[j]) {
                best = Some(i);
            }
        }
        let j = best?;
        self.current[j] -= total;
        Some(j)
    }
}

impl Balance for WeightedRoundRobin {
    fn pick(
        &mut self,
        backends: &[BackendView<'_>],
        _req: &RequestInfo<'_>,
        exclude: &[usize],
        _now: Instant,
    ) -> Option<usize> {
        let c = Candidates::new(backends, exclude)?;
        if self.current.len() != backends.len() {
            self.current = vec![0; backends.len()];
            let total: u64 = backends.iter().map(weight_of).sum();
            // Bounded so that a huge total weight cannot stall a pick.
            let skip = self.skip % total.clamp(1, 1 << 16);
            let all = Candidates {
                exclude: &[],
                strict: true,
            };
            for _ in 0..skip {
                self.step(backends, &all);
            }
        }
        self.step(backends, &c)
    }

    fn name(&self) -> &'static str {
        "weighted_round_robin"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::testutil::*;
    use proptest::prelude::*;

    #[test]
    fn contract() {
        check_contract(|| Box::new(WeightedRoundRobin::new()));
    }

    #[test]
    fn nginx_sequence() {
        let s = stats(3);
        let v = views(&s, &[5, 1, 1]);
        let h = http::HeaderMap::new();
        let r = req(&h);
        let mut b = WeightedRoundRobin::unshifted();
        let seq: String = (0..14)
            .map(|_| ["a", "b", "c"][b.pick(&v, &r, &[], Instant::now()).unwrap()])
            .collect();
        assert_eq!(seq, "aabacaaaabacaa");
    }

    fn picks(weights: &[u32], n: usize, shifted: bool) -> Vec<usize> {
        let s = stats(weights.len());
        let v = views(&s, weights);
        let h = http::HeaderMap::new();
        let r = req(&h);
        let mut b = if shifted {
            WeightedRoundRobin::new()
        } else {
            WeightedRoundRobin::unshifted()
        };
        (0..n)
            .map(|_| b.pick(&v, &r, &[], Instant::now()).unwrap_or(usize::MAX))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Every sliding window of W = Σw consecutive picks holds backend i
        /// exactly w_i times, and every prefix of k picks holds it
        /// ⌊k·w_i/W⌋ or ⌈k·w_i/W⌉ times (deviation < 1).
        #[test]
        fn no_bursts(weights in proptest::collection::vec(1u32..=20, 1..8), shifted in any::<bool>()) {
            let total: u32 = weights.iter().sum();
            let w = total as usize;
            let seq = picks(&weights, 3 * w, shifted);
            let mut counts = vec![0u32; weights.len()];
            for (k, &i) in seq.iter().enumerate() {
                counts[i] += 1;
                if k >= w {
                    counts[seq[k - w]] -= 1;
                }
                if k + 1 >= w {
                    prop_assert_eq!(&counts, &weights);
                }
            }
            if !shifted {
                let mut c = vec![0f64; weights.len()];
                for (k, &i) in seq.iter().enumerate() {
                    c[i] += 1.0;
                    for (j, wj) in weights.iter().enumerate() {
                        let ideal = (k + 1) as f64 * f64::from(*wj) / f64::from(total);
                        prop_assert!((c[j] - ideal).abs() < 1.0, "prefix {} backend {} count {} ideal {}", k + 1, j, c[j], ideal);
                    }
                }
            }
        }

        /// Shares over 100k picks within 1 % absolute (by the window
        /// property the error is in fact below W/100k).
        #[test]
        fn weighted_shares(weights in proptest::collection::vec(1u32..=100, 1..8)) {
            let s = stats(weights.len());
            let v = views(&s, &weights);
            let got = shares(&mut WeightedRoundRobin::new(), &v, 100_000);
            let err = max_abs_err(&got, &expected(&weights));
            eprintln!("weighted_round_robin: weights {weights:?} max |observed-expected| = {:.4} %", err * 100.0);
            prop_assert!(err <= 0.01);
        }
    }
}
