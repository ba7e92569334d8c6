//! `round_robin`: each eligible backend in turn, ignoring weights (use
//! `weighted_round_robin` for weights). The cursor is per worker and starts
//! at a random position, so that workers (and spooky instances) started
//! together do not all hit backend 0 first.

use std::time::Instant;

use rand::Rng;

use super::{BackendView, Balance, Candidates, RequestInfo, new_rng};

#[derive(Debug)]
pub struct RoundRobin {
    next: usize,
}

impl Default for RoundRobin {
    fn default() -> Self {
        Self::new()
    }
}

impl RoundRobin {
    pub fn new() -> Self {
        Self {
            next: new_rng().random_range(0..1024),
        }
    }

    /// Start at a given position (tests, deterministic set-ups).
    pub fn starting_at(next: usize) -> Self {
        Self { next }
    }
}

impl Balance for RoundRobin {
    fn pick(
        &mut self,
        backends: &[BackendView<'_>],
        _req: &RequestInfo<'_>,
        exclude: &[usize],
        _now: Instant,
    ) -> Option<usize> {
        let c = Candidates::new(backends, exclude)?;
        let n = backends.len();
        let start = self.next % n;
        let i = (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| c.allows(i, &backends[i]))?;
        self.next = i + 1;
        Some(i)
    }

    fn name(&self) -> &'static str {
        "round_robin"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::testutil::*;

    #[test]
    fn contract() {
        check_contract(|| Box::new(RoundRobin::new()));
    }

    #[test]
    fn cycles_over_eligible_in_order() {
        let s = stats(4);
        let mut v = views(&s, &[1, 5, 1, 1]);
        v[2].eligible = false;
        let h = http::HeaderMap::new();
        let r = req(&h);
        let mut b = RoundRobin::starting_at(0);
        let seq: Vec<usize> = (0..7)
            .map(|_| b.pick(&v, &r, &[], Instant::now()).unwrap())
            .collect();
        assert_eq!(seq, [0, 1, 3, 0, 1, 3, 0]);
        // A retry skips the tried backend and the cycle continues after it.
        assert_eq!(b.pick(&v, &r, &[1], Instant::now()), Some(3));
        assert_eq!(b.pick(&v, &r, &[], Instant::now()), Some(0));
    }

    #[test]
    fn equal_shares() {
        let s = stats(3);
        let v = views(&s, &[1, 2, 3]);
        let got = shares(&mut RoundRobin::new(), &v, 99_999);
        assert!(max_abs_err(&got, &[1.0 / 3.0; 3]) < 1e-4);
    }
}
