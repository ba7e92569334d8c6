//! Active health checking, sans-IO: the probe configuration and the per-backend
//! state machine (Healthy → Degraded → Unhealthy → Recovering → Healthy) with
//! rise/fall thresholds, jittered probe scheduling and exponential backoff of
//! probes while a backend is unhealthy. The task that sends real probes over
//! the backend's protocol drives this machine.

use std::fmt;
use std::time::{Duration, Instant};

use rand::Rng;
use serde::Deserialize;

/// Active health-check settings of one upstream (or one backend).
///
/// YAML: `{ path: /health, interval_ms: 5000, timeout_ms: 2000,
/// expected_status: "200-399", healthy_threshold: 2, unhealthy_threshold: 3,
/// jitter_percent: 10, max_backoff_ms: 60000 }`. The original spooky key
/// `interval` (milliseconds) is accepted as an alias of `interval_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActiveHealthConfig {
    /// Request path of the probe (default `/health`).
    pub path: String,
    /// Probe interval in ms while the backend is routable (default 5000).
    #[serde(alias = "interval")]
    pub interval_ms: u64,
    /// Probe timeout in ms; a timeout counts as a failure (default 2000).
    pub timeout_ms: u64,
    /// Response statuses that count as success (default `200-399`).
    pub expected_status: StatusRange,
    /// Consecutive successes needed to become Healthy again ("rise", default 2).
    pub healthy_threshold: u32,
    /// Consecutive failures that make a backend Unhealthy ("fall", default 3).
    pub unhealthy_threshold: u32,
    /// Each delay is spread uniformly over ±this percent so that the probes of
    /// many backends and many spooky instances do not align (default 10).
    pub jitter_percent: u32,
    /// Cap of the exponential probe backoff while Unhealthy, in ms (default 60000).
    pub max_backoff_ms: u64,
}

impl Default for ActiveHealthConfig {
    fn default() -> Self {
        Self {
            path: "/health".to_owned(),
            interval_ms: 5000,
            timeout_ms: 2000,
            expected_status: StatusRange { lo: 200, hi: 399 },
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            jitter_percent: 10,
            max_backoff_ms: 60_000,
        }
    }
}

impl ActiveHealthConfig {
    /// Does a probe response with this status count as a success?
    pub fn is_success(&self, status: u16) -> bool {
        self.expected_status.contains(status)
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Every problem as (field path, what would be valid); `path` is the
    /// config path of this block, e.g. `upstreams.api.health_check`.
    pub fn validate(&self, path: &str) -> Vec<(String, String)> {
        let mut errs = Vec::new();
        let mut err = |field: &str, msg: String| errs.push((format!("{path}.{field}"), msg));
        if !self.path.starts_with('/') || self.path.chars().any(|c| c.is_ascii_whitespace()) {
            err(
                "path",
                format!(
                    "`{}` is not a request path; use an absolute path without spaces such as `/health`",
                    self.path
                ),
            );
        }
        if self.interval_ms == 0 {
            err(
                "interval_ms",
                "must be at least 1 ms (e.g. 5000)".to_owned(),
            );
        }
        if self.timeout_ms == 0 {
            err("timeout_ms", "must be at least 1 ms (e.g. 2000)".to_owned());
        } else if self.interval_ms > 0 && self.timeout_ms > self.interval_ms {
            err(
                "timeout_ms",
                format!(
                    "{} ms exceeds interval_ms ({} ms), so probes would overlap; use at most {} ms",
                    self.timeout_ms, self.interval_ms, self.interval_ms
                ),
            );
        }
        let StatusRange { lo, hi } = self.expected_status;
        if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
            err(
                "expected_status",
                format!(
                    "`{lo}-{hi}` is not a status range; use `LO-HI` with 100 <= LO <= HI <= 599, e.g. `200-399`"
                ),
            );
        }
        if self.healthy_threshold == 0 {
            err(
                "healthy_threshold",
                "must be at least 1 (e.g. 2)".to_owned(),
            );
        }
        if self.unhealthy_threshold == 0 {
            err(
                "unhealthy_threshold",
                "must be at least 1 (e.g. 3)".to_owned(),
            );
        }
        if self.jitter_percent > 100 {
            err(
                "jitter_percent",
                format!("{} is not a percentage; use 0 to 100", self.jitter_percent),
            );
        }
        if self.max_backoff_ms < self.interval_ms {
            err(
                "max_backoff_ms",
                format!("must be at least interval_ms ({} ms)", self.interval_ms),
            );
        }
        errs
    }
}

/// An inclusive range of HTTP status codes. Deserialises from `"200-399"`,
/// `"204"` or `204`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange {
    pub lo: u16,
    pub hi: u16,
}

impl StatusRange {
    pub fn contains(&self, status: u16) -> bool {
        (self.lo..=self.hi).contains(&status)
    }
}

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

impl std::str::FromStr for StatusRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a status range; use e.g. \"200-399\" or \"204\"");
        let parse = |p: &str| p.trim().parse::<u16>().map_err(|_| bad());
        match s.split_once('-') {
            Some((lo, hi)) => Ok(Self {
                lo: parse(lo)?,
                hi: parse(hi)?,
            }),
            None => {
                let v = parse(s)?;
                Ok(Self { lo: v, hi: v })
            }
        }
    }
}

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Code(u16),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Code(c) => Ok(Self { lo: c, hi: c }),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Health of one backend as seen by active probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HealthState {
    /// Passing probes.
    Healthy,
    /// Failed at least one probe, fewer than the fall threshold in a row.
    /// Still routable: a single lost probe must not drain a backend.
    Degraded,
    /// Failed `unhealthy_threshold` probes in a row. Not routable; probed
    /// with exponential backoff.
    Unhealthy,
    /// Unhealthy, then passed at least one probe, fewer than the rise
    /// threshold in a row. Not routable yet.
    Recovering,
}

impl HealthState {
    /// Whether the balancer may send traffic. Healthy and Degraded are
    /// routable, Unhealthy and Recovering are not: these are exactly Envoy's
    /// rise/fall semantics (a host keeps its healthy status until `fall`
    /// consecutive failures and regains it only after `rise` successes).
    pub fn is_routable(self) -> bool {
        matches!(self, Self::Healthy | Self::Degraded)
    }
}

/// A state change reported by [`HealthMachine::on_probe`], for logs and
/// metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: HealthState,
    pub to: HealthState,
    pub at: Instant,
}

/// The active-health state machine of one backend. Owned by the probe task
/// of that backend (no sharing needed); the task publishes `is_routable()`
/// to the workers, e.g. through an `AtomicBool` or a config snapshot.
///
/// Initial state: **Healthy, but the first probe decides on its own**. A
/// backend that was never probed is routable (a restart or config reload of
/// spooky must not drop all traffic while the first probes are in flight;
/// passive outlier detection and retries cover a dead backend meanwhile),
/// and its first probe result is final: a failure makes it Unhealthy at
/// once instead of after `unhealthy_threshold` intervals. This mirrors
/// Envoy's rule that a never-checked host needs a single check to be
/// classified, while keeping spooky serving from the first instant.
#[derive(Debug, Clone)]
pub struct HealthMachine {
    cfg: ActiveHealthConfig,
    state: HealthState,
    since: Option<Instant>,
    probed: bool,
    /// Consecutive failures (Healthy/Degraded) or failed probes since
    /// entering Unhealthy (drives the backoff).
    failures: u32,
    /// Consecutive successes while Recovering.
    successes: u32,
}

impl HealthMachine {
    pub fn new(cfg: &ActiveHealthConfig) -> Self {
        Self {
            probed: false,
            ..Self::with_state(cfg, HealthState::Healthy)
        }
    }

    /// Start in a given state (e.g. Unhealthy for hosts that must pass a
    /// probe before getting traffic). A machine started this way is treated
    /// as already probed: normal thresholds apply from the first probe.
    pub fn with_state(cfg: &ActiveHealthConfig, state: HealthState) -> Self {
        Self {
            cfg: cfg.clone(),
            state,
            since: None,
            probed: true,
            failures: 0,
            successes: 0,
        }
    }

    pub fn state(&self) -> HealthState {
        self.state
    }

    pub fn is_routable(&self) -> bool {
        self.state.is_routable()
    }

    /// When the current state was entered (None: initial state, not entered
    /// through a transition).
    pub fn since(&self) -> Option<Instant> {
        self.since
    }

    /// Feed one probe result (`ok` = response within the timeout with an
    /// expected status). Returns the transition if the state changed.
    pub fn on_probe(&mut self, ok: bool, now: Instant) -> Option<Transition> {
        use HealthState::*;
        let rise = self.cfg.healthy_threshold.max(1);
        let fall = self.cfg.unhealthy_threshold.max(1);
        let first = !self.probed;
        self.probed = true;
        let next = match (self.state, ok) {
            (Healthy | Degraded, true) => {
                self.failures = 0;
                Healthy
            }
            (Healthy | Degraded, false) => {
                self.failures += 1;
                if first || self.failures >= fall {
                    // The backoff counts failed probes after this one.
                    self.failures = 0;
                    Unhealthy
                } else {
                    Degraded
                }
            }
            (Unhealthy | Recovering, true) => {
                self.successes += 1;
                if self.successes >= rise {
                    self.successes = 0;
                    self.failures = 0;
                    Healthy
                } else {
                    Recovering
                }
            }
            (Unhealthy, false) => {
                self.failures = self.failures.saturating_add(1);
                Unhealthy
            }
            (Recovering, false) => {
                self.successes = 0;
                // Start the backoff afresh: the backend did answer recently.
                self.failures = 0;
                Unhealthy
            }
        };
        if next == Unhealthy {
            self.successes = 0;
        }
        if next == self.state {
            return None;
        }
        let t = Transition {
            from: self.state,
            to: next,
            at: now,
        };
        self.state = next;
        self.since = Some(now);
        Some(t)
    }

    /// Delay before the next probe. While Unhealthy the interval doubles per
    /// failed probe after the one that made the backend Unhealthy
    /// (interval, 2×, 4×, …) up to `max_backoff_ms`; then ±`jitter_percent`
    /// is applied (so a capped delay may exceed the cap by the jitter, which
    /// keeps even backed-off probes from aligning). Recovering probes at the
    /// plain interval, to confirm a comeback quickly.
    pub fn next_probe_delay<R: Rng + ?Sized>(&self, rng: &mut R) -> Duration {
        let interval = self.cfg.interval_ms.max(1);
        let base = if self.state == HealthState::Unhealthy {
            let shift = self.failures.min(32);
            interval
                .saturating_mul(1u64 << shift)
                .min(self.cfg.max_backoff_ms.max(interval))
        } else {
            interval
        };
        Duration::from_millis(jittered(base, self.cfg.jitter_percent, rng))
    }

    /// Delay before the very first probe: uniform in `[0, interval)`, so
    /// that backends added together (start-up, reload) are not probed in
    /// lockstep.
    pub fn first_probe_delay<R: Rng + ?Sized>(&self, rng: &mut R) -> Duration {
        let interval = self.cfg.interval_ms.max(1);
        Duration::from_millis(rng.random_range(0..interval))
    }
}

/// `base` ms spread uniformly over ±`percent`, never below 1 ms.
fn jittered<R: Rng + ?Sized>(base: u64, percent: u32, rng: &mut R) -> u64 {
    let spread = base.saturating_mul(u64::from(percent.min(100))) / 100;
    if spread == 0 {
        return base.max(1);
    }
    let lo = base - spread;
    let hi = base.saturating_add(spread);
    rng.random_range(lo..=hi).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use HealthState::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn cfg() -> ActiveHealthConfig {
        ActiveHealthConfig::default()
    }

    #[test]
    fn defaults_and_yaml_alias() {
        let c: ActiveHealthConfig =
            serde_yaml::from_str("{ path: /health, interval: 7000 }").unwrap();
        assert_eq!(c.interval_ms, 7000);
        assert_eq!(c.timeout_ms, 2000);
        assert_eq!(c.expected_status, StatusRange { lo: 200, hi: 399 });
        assert_eq!((c.healthy_threshold, c.unhealthy_threshold), (2, 3));
        assert_eq!((c.jitter_percent, c.max_backoff_ms), (10, 60_000));
        assert!(c.validate("backends[0].health_check").is_empty());

        let c: ActiveHealthConfig =
            serde_yaml::from_str("{ interval_ms: 1000, timeout_ms: 500, expected_status: 204 }")
                .unwrap();
        assert_eq!(c.expected_status, StatusRange { lo: 204, hi: 204 });
        let c: ActiveHealthConfig =
            serde_yaml::from_str("{ expected_status: \"200-299\" }").unwrap();
        assert!(c.is_success(204) && !c.is_success(301));

        assert!(serde_yaml::from_str::<ActiveHealthConfig>("{ intervall: 5 }").is_err());
        assert!(
            serde_yaml::from_str::<ActiveHealthConfig>("{ expected_status: \"2xx\" }").is_err()
        );
    }

    #[test]
    fn validation_names_fields() {
        let c = ActiveHealthConfig {
            path: "health".into(),
            interval_ms: 1000,
            timeout_ms: 3000,
            expected_status: StatusRange { lo: 400, hi: 200 },
            healthy_threshold: 0,
            unhealthy_threshold: 0,
            jitter_percent: 150,
            max_backoff_ms: 10,
        };
        let errs = c.validate("upstreams.api.health_check");
        let fields: Vec<&str> = errs.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "upstreams.api.health_check.path",
                "upstreams.api.health_check.timeout_ms",
                "upstreams.api.health_check.expected_status",
                "upstreams.api.health_check.healthy_threshold",
                "upstreams.api.health_check.unhealthy_threshold",
                "upstreams.api.health_check.jitter_percent",
                "upstreams.api.health_check.max_backoff_ms",
            ]
        );
    }

    #[test]
    fn full_cycle() {
        let t = Instant::now();
        let mut m = HealthMachine::new(&cfg());
        assert!(m.is_routable());
        // First probe passes: stays Healthy.
        assert_eq!(m.on_probe(true, t), None);
        // Healthy -> Degraded -> Healthy on a success.
        assert_eq!(m.on_probe(false, t).map(|x| x.to), Some(Degraded));
        assert!(m.is_routable());
        assert_eq!(m.on_probe(true, t).map(|x| x.to), Some(Healthy));
        // Three failures in a row: Degraded, Degraded, Unhealthy.
        assert_eq!(m.on_probe(false, t).map(|x| x.to), Some(Degraded));
        assert_eq!(m.on_probe(false, t), None);
        let tr = m.on_probe(false, t).unwrap();
        assert_eq!((tr.from, tr.to), (Degraded, Unhealthy));
        assert!(!m.is_routable());
        // Recovering, then a failure sends it back to Unhealthy.
        assert_eq!(m.on_probe(true, t).map(|x| x.to), Some(Recovering));
        assert!(!m.is_routable());
        assert_eq!(m.on_probe(false, t).map(|x| x.to), Some(Unhealthy));
        // Two successes: Recovering, Healthy.
        assert_eq!(m.on_probe(true, t).map(|x| x.to), Some(Recovering));
        assert_eq!(m.on_probe(true, t).map(|x| x.to), Some(Healthy));
        assert_eq!(m.since(), Some(t));
    }

    #[test]
    fn first_probe_decides() {
        let t = Instant::now();
        let mut m = HealthMachine::new(&cfg());
        assert_eq!(m.on_probe(false, t).map(|x| x.to), Some(Unhealthy));
        let mut m = HealthMachine::with_state(&cfg(), Unhealthy);
        assert_eq!(m.on_probe(true, t).map(|x| x.to), Some(Recovering));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let c = ActiveHealthConfig {
            jitter_percent: 0,
            ..cfg()
        };
        let mut rng = SmallRng::seed_from_u64(1);
        let t = Instant::now();
        let mut m = HealthMachine::with_state(&c, Healthy);
        let ms = |m: &HealthMachine, rng: &mut SmallRng| m.next_probe_delay(rng).as_millis() as u64;
        assert_eq!(ms(&m, &mut rng), 5000);
        for _ in 0..3 {
            m.on_probe(false, t);
        }
        assert_eq!(m.state(), Unhealthy);
        let mut seen = vec![ms(&m, &mut rng)];
        for _ in 0..6 {
            m.on_probe(false, t);
            seen.push(ms(&m, &mut rng));
        }
        assert_eq!(seen, [5000, 10_000, 20_000, 40_000, 60_000, 60_000, 60_000]);
        m.on_probe(true, t);
        assert_eq!(m.state(), Recovering);
        assert_eq!(ms(&m, &mut rng), 5000);
        // A failure while recovering restarts the backoff at the interval.
        m.on_probe(false, t);
        assert_eq!(ms(&m, &mut rng), 5000);
    }

    #[test]
    fn jitter_stays_in_band_and_spreads() {
        let m = HealthMachine::new(&cfg());
        let mut rng = SmallRng::seed_from_u64(7);
        let ds: Vec<u128> = (0..1000)
            .map(|_| m.next_probe_delay(&mut rng).as_millis())
            .collect();
        assert!(ds.iter().all(|d| (4500..=5500).contains(d)));
        assert!(ds.iter().min() < Some(&4600) && ds.iter().max() > Some(&5400));
        let first: Vec<u128> = (0..1000)
            .map(|_| m.first_probe_delay(&mut rng).as_millis())
            .collect();
        assert!(first.iter().all(|d| *d < 5000));
    }

    proptest! {
        /// For any probe sequence: routable iff the state is Healthy/Degraded,
        /// Unhealthy is reached only by `fall` consecutive failures (or the
        /// first probe), and Healthy is regained only after `rise`
        /// consecutive successes.
        #[test]
        fn thresholds_hold(rise in 1u32..5, fall in 1u32..5, probes in proptest::collection::vec(any::<bool>(), 1..200)) {
            let c = ActiveHealthConfig { healthy_threshold: rise, unhealthy_threshold: fall, ..cfg() };
            let t = Instant::now();
            let mut m = HealthMachine::new(&c);
            let mut run_ok = 0u32;
            let mut run_fail = 0u32;
            for (i, ok) in probes.into_iter().enumerate() {
                let before = m.state();
                if ok { run_ok += 1; run_fail = 0 } else { run_fail += 1; run_ok = 0 }
                let tr = m.on_probe(ok, t);
                let after = m.state();
                prop_assert_eq!(tr.is_some(), before != after);
                prop_assert_eq!(m.is_routable(), matches!(after, Healthy | Degraded));
                if after == Unhealthy && before.is_routable() {
                    prop_assert!(i == 0 || run_fail >= fall);
                }
                if after == Healthy && !before.is_routable() {
                    prop_assert!(run_ok >= rise);
                }
                if !ok { prop_assert_ne!(after, Healthy); }
                if ok { prop_assert!(matches!(after, Healthy | Recovering)); }
            }
        }
    }
}
