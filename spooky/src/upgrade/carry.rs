//! What an upgrade carries over of the backends' state: the operator's
//! admin overrides (drain, disable, weight) and the last active health
//! check, so that the new process neither sends traffic to a backend an
//! operator drained nor re-learns which backends are down.

use serde::{Deserialize, Serialize};

use crate::health::HealthState;
use crate::upstream::{Control, SharedUpstreams};

/// One backend's carried state, matched in the new config by upstream,
/// id and address (a backend whose address changed starts afresh).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendCarry {
    pub upstream: String,
    pub id: String,
    pub addr: String,
    /// `enabled`, `draining` or `disabled`.
    pub control: String,
    /// A weight set through the admin API (`None`: the config's).
    pub weight: Option<u32>,
    /// The last active-check verdict, when one was made.
    pub health: Option<String>,
}

fn health_name(h: HealthState) -> &'static str {
    match h {
        HealthState::Healthy => "healthy",
        HealthState::Degraded => "degraded",
        HealthState::Unhealthy => "unhealthy",
        HealthState::Recovering => "recovering",
    }
}

fn health_from(name: &str) -> Option<HealthState> {
    [
        HealthState::Healthy,
        HealthState::Degraded,
        HealthState::Unhealthy,
        HealthState::Recovering,
    ]
    .into_iter()
    .find(|h| health_name(*h) == name)
}

/// The state worth carrying: every backend with an override or a check.
pub fn snapshot(upstreams: &SharedUpstreams) -> Vec<BackendCarry> {
    let mut out = Vec::new();
    for u in &upstreams.upstreams {
        for b in &u.backends {
            let weight = (b.weight() != b.cfg.weight).then(|| b.weight());
            let control = b.control();
            let health = b.checked_health();
            if control == Control::Enabled && weight.is_none() && health.is_none() {
                continue;
            }
            out.push(BackendCarry {
                upstream: u.cfg.name.clone(),
                id: b.cfg.id.clone(),
                addr: b.cfg.addr.to_string(),
                control: control.name().to_owned(),
                weight,
                health: health.map(|h| health_name(h).to_owned()),
            });
        }
    }
    out
}

/// Applies carried state to the new process's backends; returns how many
/// matched.
pub fn apply(upstreams: &SharedUpstreams, carried: &[BackendCarry]) -> usize {
    let mut matched = 0;
    for c in carried {
        let Some(b) = upstreams.backend(&c.upstream, &c.id) else {
            continue;
        };
        if b.cfg.addr.to_string() != c.addr {
            continue;
        }
        if let Some(control) = Control::ALL.into_iter().find(|k| k.name() == c.control) {
            b.set_control(control);
        }
        if let Some(w) = c.weight {
            b.set_weight(w);
        }
        if let Some(h) = c.health.as_deref().and_then(health_from) {
            b.set_health(h);
        }
        matched += 1;
    }
    matched
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const CONFIG: &str = "state_dir: state
listen: { address: 127.0.0.1, port: 9443, workers: 2 }
steering: { mode: reuseport }
upstreams:
  api:
    tls: { insecure_skip_verify: true }
    backends:
      - { id: a, address: \"127.0.0.1:9001\" }
      - { id: b, address: \"127.0.0.1:9002\", weight: 3 }
      - { id: c, address: \"127.0.0.1:9003\" }
";

    fn upstreams(text: &str, dir: &std::path::Path) -> SharedUpstreams {
        let cfg = Arc::new(crate::config::parse(text, "test", dir).unwrap());
        SharedUpstreams::new(&cfg).unwrap()
    }

    #[test]
    fn overrides_and_health_reach_the_same_backends_of_the_new_process() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let old = upstreams(CONFIG, dir.path());
        old.backend("api", "a")
            .unwrap()
            .set_control(Control::Draining);
        old.backend("api", "a")
            .unwrap()
            .set_health(HealthState::Unhealthy);
        old.backend("api", "b").unwrap().set_weight(7);
        old.backend("api", "c")
            .unwrap()
            .set_control(Control::Disabled);
        let carried = snapshot(&old);
        assert_eq!(carried.len(), 3, "{carried:?}");
        // The new config moves c to another port: c starts afresh.
        let new = upstreams(&CONFIG.replace("9003", "9013"), dir.path());
        assert_eq!(apply(&new, &carried), 2);
        let a = new.backend("api", "a").unwrap();
        assert_eq!(a.control(), Control::Draining);
        assert_eq!(a.checked_health(), Some(HealthState::Unhealthy));
        assert_eq!(new.backend("api", "b").unwrap().weight(), 7);
        assert_eq!(new.backend("api", "c").unwrap().control(), Control::Enabled);
        // A backend in its configured state carries nothing.
        let fresh = upstreams(CONFIG, dir.path());
        assert!(snapshot(&fresh).is_empty());
    }

    #[test]
    fn health_names_round_trip() {
        for h in [
            HealthState::Healthy,
            HealthState::Degraded,
            HealthState::Unhealthy,
            HealthState::Recovering,
        ] {
            assert_eq!(health_from(health_name(h)), Some(h));
        }
        assert_eq!(health_from("sick"), None);
    }
}
