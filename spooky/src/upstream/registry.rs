//! The process-wide upstream registry: every upstream and backend of a
//! config generation, shared by the workers (health, operator control,
//! weights, circuit breakers, outlier state, counters, connection epochs),
//! carried across reloads, and the choice of the backends a request may go
//! to now.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use tracing::{info, warn};

use super::backend;
use super::error::{ForwardError, SetupError, breaker_error};
use crate::balancer::BackendStats;
use crate::config::{self, Config};
use crate::health::{
    self, BreakerState, CircuitBreaker, HealthState, OutlierPool, Rejected, Selection,
};
use crate::metrics::{BackendCounters, BackendSample};
use crate::retry::{RetryBudget, RetryConfig};
use crate::tls;

/// An operator's say over a backend, set through the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Takes traffic (when healthy).
    Enabled,
    /// No new requests; in-flight ones finish on their connections.
    Draining,
    /// No requests; the workers' connections to it are closed once idle.
    Disabled,
}

impl Control {
    /// Every state, in the order metrics list them.
    pub const ALL: [Control; 3] = [Control::Enabled, Control::Draining, Control::Disabled];

    pub fn name(self) -> &'static str {
        match self {
            Control::Enabled => "enabled",
            Control::Draining => "draining",
            Control::Disabled => "disabled",
        }
    }

    fn code(self) -> u8 {
        match self {
            Control::Enabled => 0,
            Control::Draining => 1,
            Control::Disabled => 2,
        }
    }

    fn from_code(v: u8) -> Self {
        match v {
            1 => Control::Draining,
            2 => Control::Disabled,
            _ => Control::Enabled,
        }
    }
}

/// What a backend keeps across config reloads while it stays (same
/// upstream, id and address): health, operator control, weight override
/// and the connection epoch.
#[derive(Debug)]
pub struct BackendState {
    /// Published by the active health checker (a `HealthState` code).
    health: AtomicU8,
    /// Whether an active check has classified the backend yet.
    probed: AtomicBool,
    /// Bumped when the workers must drop their connections to this backend
    /// and start afresh (see [`SharedBackend::renew_connections`]).
    epoch: AtomicU64,
    /// A [`Control`] code.
    control: AtomicU8,
    /// The weight the balancers use (the config's, or the admin API's).
    weight: AtomicU32,
}

impl BackendState {
    fn new(weight: u32) -> Self {
        Self {
            health: AtomicU8::new(0),
            probed: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            control: AtomicU8::new(Control::Enabled.code()),
            weight: AtomicU32::new(weight),
        }
    }
}

/// Process-wide state of one backend, shared by every worker (atomics
/// only on the request path).
pub struct SharedBackend {
    pub cfg: config::Backend,
    /// `upstream/backend`, for logs.
    pub label: String,
    /// In-flight requests and latency EWMA, for the balancers.
    pub stats: Arc<BackendStats>,
    state: Arc<BackendState>,
    pub breaker: Option<Arc<CircuitBreaker>>,
    /// Requests, responses and failures, for metrics.
    pub counters: Arc<BackendCounters>,
}

impl SharedBackend {
    /// The last state the active checker published.
    pub fn health(&self) -> HealthState {
        match self.state.health.load(Ordering::Acquire) {
            1 => HealthState::Degraded,
            2 => HealthState::Unhealthy,
            3 => HealthState::Recovering,
            _ => HealthState::Healthy,
        }
    }

    /// Publishes an active-check state.
    pub fn set_health(&self, state: HealthState) {
        let v = match state {
            HealthState::Healthy => 0,
            HealthState::Degraded => 1,
            HealthState::Unhealthy => 2,
            HealthState::Recovering => 3,
        };
        self.state.probed.store(true, Ordering::Release);
        self.state.health.store(v, Ordering::Release);
    }

    /// The health state a (re)started checker continues from: `None` when
    /// no check has classified the backend yet.
    pub fn checked_health(&self) -> Option<HealthState> {
        self.state
            .probed
            .load(Ordering::Acquire)
            .then(|| self.health())
    }

    /// The operator's control state.
    pub fn control(&self) -> Control {
        Control::from_code(self.state.control.load(Ordering::Acquire))
    }

    /// Changes the operator's control state; disabling closes the workers'
    /// idle connections to it.
    pub fn set_control(&self, c: Control) -> Control {
        let before = Control::from_code(self.state.control.swap(c.code(), Ordering::AcqRel));
        if c == Control::Disabled && before != Control::Disabled {
            self.renew_connections();
        }
        before
    }

    /// The weight the balancers use now.
    pub fn weight(&self) -> u32 {
        self.state.weight.load(Ordering::Relaxed)
    }

    /// Sets the balancing weight (≥ 1).
    pub fn set_weight(&self, w: u32) -> u32 {
        self.state.weight.swap(w.max(1), Ordering::Relaxed)
    }

    /// Tells every worker to replace its pool for this backend before its
    /// next request there: idle connections close, busy ones finish their
    /// requests and close, and the connect backoff starts over.
    ///
    /// Called when the backend is found dead (ejected, unhealthy) and when
    /// it comes back. A SIGKILLed or crashed backend never closes its QUIC
    /// connections, and a restarted one cannot reset them (its stateless
    /// reset key is new): without this, workers would keep sending into
    /// the silent connections until their idle timeout (30 s and more),
    /// long after the backend is back.
    pub fn renew_connections(&self) {
        self.state.epoch.fetch_add(1, Ordering::AcqRel);
    }

    pub(super) fn epoch(&self) -> u64 {
        self.state.epoch.load(Ordering::Acquire)
    }

    /// Whether `self` (from a newer config) is the same backend as `old`:
    /// same upstream, id and address. It then inherits `old`'s state.
    pub(super) fn same_as(&self, old: &SharedBackend) -> bool {
        self.label == old.label && self.cfg.addr == old.cfg.addr
    }
}

/// Process-wide state of one upstream.
pub struct SharedUpstream {
    pub cfg: config::Upstream,
    pub backends: Vec<Arc<SharedBackend>>,
    pub outliers: Option<OutlierPool>,
    pub retry: RetryConfig,
    pub retry_budget: RetryBudget,
    transport: backend::Transport,
    /// In panic mode (for logging the transitions only).
    panicking: AtomicBool,
}

impl SharedUpstream {
    /// The backends a request may go to now: the healthy ones (active
    /// checks, not ejected; all of them in panic mode) whose circuit
    /// breaker admits a request. `Err` is the 503 to answer when there are
    /// none.
    pub(super) fn candidates(&self, now: Instant) -> Result<Vec<bool>, ForwardError> {
        let mut eligible: Vec<bool> = self
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                b.control() == Control::Enabled
                    && b.health().is_routable()
                    && !self.outliers.as_ref().is_some_and(|o| o.is_ejected(i, now))
            })
            .collect();
        let healthy = eligible.iter().filter(|h| **h).count();
        match health::routable_set(eligible.iter().copied(), &self.cfg.panic) {
            Selection::Normal => self.note_panic(false, healthy),
            Selection::Panic => {
                self.note_panic(true, healthy);
                // Panic overrides health, not the operator.
                for (e, b) in eligible.iter_mut().zip(&self.backends) {
                    *e = b.control() == Control::Enabled;
                }
            }
            Selection::NoneAvailable { retry_after } => {
                self.note_panic(false, healthy);
                return Err(ForwardError {
                    tries: 0,
                    status: http::StatusCode::SERVICE_UNAVAILABLE,
                    detail: format!("no healthy backend in upstream `{}`", self.cfg.name),
                    retry_after: Some(retry_after.as_secs().max(1)),
                    backend: None,
                });
            }
        }
        // Breakers apply in panic mode too.
        let mut refused: Option<(&str, Rejected)> = None;
        for (e, b) in eligible.iter_mut().zip(&self.backends) {
            if let (true, Some(br)) = (*e, &b.breaker)
                && let Err(r) = br.check(now)
            {
                refused.get_or_insert((b.cfg.id.as_str(), r));
                *e = false;
            }
        }
        if eligible.contains(&true) {
            return Ok(eligible);
        }
        Err(match refused {
            Some((id, r)) => breaker_error(id, &r),
            None => ForwardError {
                tries: 0,
                status: http::StatusCode::SERVICE_UNAVAILABLE,
                detail: format!("no available backend in upstream `{}`", self.cfg.name),
                retry_after: Some(self.cfg.panic.all_down.retry_after_s.max(1)),
                backend: None,
            },
        })
    }

    /// Logs entering and leaving panic mode (once per transition, not per
    /// request).
    fn note_panic(&self, on: bool, healthy: usize) {
        if self.panicking.load(Ordering::Relaxed) == on
            || self.panicking.swap(on, Ordering::Relaxed) == on
        {
            return;
        }
        let backends = self.backends.len();
        if on {
            warn!(
                upstream = %self.cfg.name,
                healthy,
                backends,
                threshold_percent = self.cfg.panic.threshold_percent,
                "panic mode: too few healthy backends, balancing across all"
            );
        } else {
            info!(upstream = %self.cfg.name, healthy, backends, "panic mode over");
        }
    }

    /// A client for backend `i`: a worker's pool (`counted`: its
    /// connections show in the backend's pool gauge) or the health
    /// prober's.
    pub fn backend_client(
        &self,
        i: usize,
        label: String,
        quic_endpoint: &quinn::Endpoint,
        max_header_bytes: u64,
        counted: bool,
    ) -> Option<backend::BackendClient> {
        let b = self.backends.get(i)?;
        Some(backend::BackendClient::new(
            label,
            &self.cfg,
            &b.cfg,
            &self.transport,
            quic_endpoint,
            max_header_bytes,
            counted.then(|| b.counters.pool_connections.clone()),
        ))
    }
}

/// Every upstream, shared by the workers.
pub struct SharedUpstreams {
    pub upstreams: Vec<Arc<SharedUpstream>>,
}

impl SharedUpstreams {
    /// Builds the shared state (TLS client configs included) for `config`.
    pub fn new(config: &Arc<Config>) -> Result<Self, SetupError> {
        Self::build(config, None)
    }

    /// Builds the state for a reloaded `config`. Backends that stay (same
    /// upstream, id and address) keep their health, operator control,
    /// weight override, counters, balancer statistics and circuit breaker
    /// (when its settings did not change); a weight changed in the file
    /// replaces an override.
    pub fn reload(config: &Arc<Config>, previous: &SharedUpstreams) -> Result<Self, SetupError> {
        Self::build(config, Some(previous))
    }

    fn build(config: &Arc<Config>, previous: Option<&SharedUpstreams>) -> Result<Self, SetupError> {
        let mut upstreams = Vec::new();
        for u in &config.upstreams {
            if matches!(u.verification, tls::Verification::InsecureSkipVerify) {
                warn!(upstream = %u.name, "TLS verification of backends is DISABLED (insecure_skip_verify)");
            }
            let transport =
                backend::Transport::for_upstream(u).map_err(|source| SetupError::Tls {
                    upstream: u.name.clone(),
                    source,
                })?;
            let old_up = previous.and_then(|p| p.upstreams.iter().find(|o| o.cfg.name == u.name));
            let backends = u
                .backends
                .iter()
                .map(|b| {
                    let label = format!("{}/{}", u.name, b.id);
                    let old = old_up.and_then(|o| {
                        o.backends
                            .iter()
                            .find(|ob| ob.label == label && ob.cfg.addr == b.addr)
                    });
                    let fresh_breaker = || {
                        u.circuit_breaker
                            .as_ref()
                            .map(|c| Arc::new(CircuitBreaker::new(c)))
                    };
                    match (old, old_up) {
                        (Some(ob), Some(ou)) => {
                            if ob.cfg.weight != b.weight {
                                ob.state.weight.store(b.weight, Ordering::Relaxed);
                            }
                            let same_breaker = format!("{:?}", ou.cfg.circuit_breaker)
                                == format!("{:?}", u.circuit_breaker);
                            Arc::new(SharedBackend {
                                cfg: b.clone(),
                                label,
                                stats: ob.stats.clone(),
                                state: ob.state.clone(),
                                breaker: if same_breaker {
                                    ob.breaker.clone()
                                } else {
                                    fresh_breaker()
                                },
                                counters: ob.counters.clone(),
                            })
                        }
                        _ => Arc::new(SharedBackend {
                            cfg: b.clone(),
                            counters: Arc::new(BackendCounters::new(&u.name, &b.id)),
                            label,
                            stats: Arc::new(BackendStats::with_decay(u.balancing.ewma_decay())),
                            state: Arc::new(BackendState::new(b.weight)),
                            breaker: fresh_breaker(),
                        }),
                    }
                })
                .collect::<Vec<_>>();
            let retry = u.retries.clone().unwrap_or_default();
            upstreams.push(Arc::new(SharedUpstream {
                outliers: u
                    .outlier
                    .as_ref()
                    .map(|o| OutlierPool::new(o, backends.len())),
                retry_budget: RetryBudget::new(&retry),
                retry,
                backends,
                transport,
                panicking: AtomicBool::new(false),
                cfg: u.clone(),
            }));
        }
        Ok(Self { upstreams })
    }

    /// The backend `id` of upstream `upstream`.
    pub fn backend(&self, upstream: &str, id: &str) -> Option<&Arc<SharedBackend>> {
        self.upstreams
            .iter()
            .find(|u| u.cfg.name == upstream)?
            .backends
            .iter()
            .find(|b| b.cfg.id == id)
    }
}

impl SharedUpstreams {
    /// Every backend's state at `now`, for a metrics scrape.
    pub fn samples(&self, now: Instant) -> Vec<BackendSample<'_>> {
        self.upstreams
            .iter()
            .flat_map(|up| {
                up.backends.iter().enumerate().map(move |(bi, b)| {
                    let control = b.control();
                    BackendSample {
                        upstream: &up.cfg.name,
                        backend: &b.cfg.id,
                        counters: &b.counters,
                        in_flight: b.stats.in_flight(),
                        health: b.health(),
                        ejected: up.outliers.as_ref().is_some_and(|p| p.is_ejected(bi, now)),
                        times_ejected: up
                            .outliers
                            .as_ref()
                            .and_then(|p| p.host(bi))
                            .map_or(0, |h| h.times_ejected()),
                        breaker: b
                            .breaker
                            .as_ref()
                            .map_or(BreakerState::Closed, |br| br.state(now)),
                        control: Control::ALL.map(|c| (c.name(), c == control)),
                        weight: b.weight(),
                    }
                })
            })
            .collect()
    }
}
