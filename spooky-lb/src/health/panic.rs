//! The all-down policy: Envoy's panic mode (balance across every backend,
//! ignoring health, when too few are healthy) or a 503 with `retry-after`.

use std::time::Duration;

use serde::Deserialize;

/// YAML: `{ threshold_percent: 50, all_down: { retry_after_s: 5 } }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PanicConfig {
    /// Panic when fewer than this percentage of the pool's backends are
    /// eligible; 0 disables panic mode (default 50, Envoy's default: when
    /// half the pool looks down, the health signal is more likely wrong, or
    /// the survivors would be overloaded anyway, than half the fleet dead).
    pub threshold_percent: u32,
    /// What to answer when nothing can be routed.
    pub all_down: AllDownConfig,
}

impl Default for PanicConfig {
    fn default() -> Self {
        Self {
            threshold_percent: 50,
            all_down: AllDownConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AllDownConfig {
    /// `retry-after` of the 503 sent when no backend is available (default 5).
    pub retry_after_s: u64,
}

impl Default for AllDownConfig {
    fn default() -> Self {
        Self { retry_after_s: 5 }
    }
}

impl PanicConfig {
    /// Every problem as (field path, what would be valid).
    pub fn validate(&self, path: &str) -> Vec<(String, String)> {
        let mut errs = Vec::new();
        if self.threshold_percent > 100 {
            errs.push((
                format!("{path}.threshold_percent"),
                format!(
                    "{} is not a percentage; use 0 (panic mode off) to 100",
                    self.threshold_percent
                ),
            ));
        }
        if self.all_down.retry_after_s > 86_400 {
            errs.push((
                format!("{path}.all_down.retry_after_s"),
                "must be at most 86400 (one day)".to_owned(),
            ));
        }
        errs
    }
}

/// Which backends the balancer should consider for this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Balance across the eligible backends only.
    Normal,
    /// Panic: balance across all backends, ignoring health and ejection
    /// (the proxy passes every `BackendView` with `eligible: true`; the
    /// circuit breaker's `try_acquire` still applies per request).
    Panic,
    /// Nothing to route to: answer 503 with this `retry-after`.
    NoneAvailable { retry_after: Duration },
}

/// Decide from the eligibility flags of a pool's backends (Envoy
/// semantics): panic when `eligible × 100 < n × threshold_percent` (so with
/// the default 50 %, 1 of 2 healthy is still Normal); with panic mode off
/// (`threshold_percent: 0`) an all-ineligible pool gives `NoneAvailable`.
/// An empty pool is always `NoneAvailable`.
pub fn routable_set<I>(eligible_flags: I, cfg: &PanicConfig) -> Selection
where
    I: IntoIterator<Item = bool>,
{
    let (mut total, mut eligible) = (0u64, 0u64);
    for ok in eligible_flags {
        total += 1;
        eligible += u64::from(ok);
    }
    let none = Selection::NoneAvailable {
        retry_after: Duration::from_secs(cfg.all_down.retry_after_s),
    };
    if total == 0 {
        return none;
    }
    let threshold = u64::from(cfg.threshold_percent.min(100));
    if threshold > 0 && eligible * 100 < total * threshold {
        return Selection::Panic;
    }
    if eligible == 0 {
        none
    } else {
        Selection::Normal
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sel(flags: &[bool], threshold: u32) -> Selection {
        let cfg = PanicConfig {
            threshold_percent: threshold,
            ..PanicConfig::default()
        };
        routable_set(flags.iter().copied(), &cfg)
    }

    #[test]
    fn envoy_semantics() {
        let none = Selection::NoneAvailable {
            retry_after: Duration::from_secs(5),
        };
        assert_eq!(sel(&[true, false], 50), Selection::Normal);
        assert_eq!(sel(&[true, false, false], 50), Selection::Panic);
        assert_eq!(sel(&[false, false], 50), Selection::Panic);
        assert_eq!(sel(&[false, false], 0), none);
        assert_eq!(sel(&[true, false, false], 0), Selection::Normal);
        assert_eq!(sel(&[], 50), none);
        assert_eq!(sel(&[true, true, true, false], 100), Selection::Panic);
    }

    #[test]
    fn yaml() {
        let c: PanicConfig =
            serde_yaml::from_str("{ threshold_percent: 0, all_down: { retry_after_s: 10 } }")
                .unwrap();
        assert_eq!(c.all_down.retry_after_s, 10);
        assert!(serde_yaml::from_str::<PanicConfig>("{ threshold: 3 }").is_err());
        assert_eq!(
            PanicConfig {
                threshold_percent: 101,
                ..c
            }
            .validate("p")[0]
                .0,
            "p.threshold_percent"
        );
    }

    proptest! {
        #[test]
        fn never_routes_nowhere(flags in proptest::collection::vec(any::<bool>(), 0..50), threshold in 0u32..=100) {
            let s = sel(&flags, threshold);
            let any = flags.iter().any(|f| *f);
            match s {
                Selection::Normal => prop_assert!(any),
                Selection::Panic => prop_assert!(threshold > 0 && !flags.is_empty()),
                Selection::NoneAvailable { .. } => prop_assert!(flags.is_empty() || (!any && threshold == 0)),
            }
        }
    }
}
