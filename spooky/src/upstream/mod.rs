//! Upstreams: the per-worker connection pools that carry requests to
//! backends, and the errors they report. One module per backend protocol;
//! each exposes a `send(request) -> response` with streaming bodies.
//! [`probe`] runs the active health checks over those same clients.

pub mod backend;
pub mod h3;
pub mod probe;
pub mod tcp;

use std::time::Duration;

use http::StatusCode;

/// Why a request could not be carried to (or answered by) a backend.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The backend's address did not resolve.
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
    /// Connection establishment failed (refused, TLS, handshake).
    #[error("connect to {backend} failed: {reason}")]
    Connect { backend: String, reason: String },
    /// Connection establishment did not finish in time.
    #[error("connect to {backend} timed out after {after:?}")]
    ConnectTimeout { backend: String, after: Duration },
    /// Recent connection attempts failed; this one was not tried.
    #[error("{backend} is in connect backoff for another {remaining:?}")]
    Backoff {
        backend: String,
        remaining: Duration,
    },
    /// The backend refused the request before processing it (GOAWAY,
    /// H3_REQUEST_REJECTED): safe to retry anywhere.
    #[error("{backend} refused the request before processing it: {reason}")]
    Refused { backend: String, reason: String },
    /// The stream or connection failed before response headers.
    #[error("{backend} reset the request before responding: {reason}")]
    Reset { backend: String, reason: String },
    /// The backend's response is not valid HTTP in a way the HTTP library
    /// accepts but a proxy must not forward (e.g. an HTTP/1.1 response
    /// framed by both `content-length` and `transfer-encoding`).
    #[error("{backend} sent an invalid response: {reason}")]
    InvalidResponse { backend: String, reason: String },
    /// No response headers within the request timeout.
    #[error("{backend} sent no response headers within {after:?}")]
    Timeout { backend: String, after: Duration },
    /// The request body exceeded `limits.max_body_bytes`.
    #[error("request body exceeds the {limit}-byte limit")]
    BodyTooLarge { limit: u64 },
    /// The client's request body framing is invalid (HTTP/1.1 chunked
    /// encoding): the client's error, not the backend's.
    #[error("malformed request body: {reason}")]
    MalformedBody { reason: String },
    /// The downstream client went away while the request was in flight.
    #[error("client aborted the request: {0}")]
    ClientAborted(String),
}

impl UpstreamError {
    /// The status the client gets for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::ConnectTimeout { .. } | UpstreamError::Timeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            UpstreamError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            UpstreamError::MalformedBody { .. } => StatusCode::BAD_REQUEST,
            UpstreamError::Resolve { .. }
            | UpstreamError::Connect { .. }
            | UpstreamError::Backoff { .. }
            | UpstreamError::Refused { .. }
            | UpstreamError::Reset { .. }
            | UpstreamError::InvalidResponse { .. }
            | UpstreamError::ClientAborted(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// Whether the request certainly did not reach the backend's
    /// application (a retry cannot duplicate it).
    pub fn not_processed(&self) -> bool {
        matches!(
            self,
            UpstreamError::Resolve { .. }
                | UpstreamError::Connect { .. }
                | UpstreamError::ConnectTimeout { .. }
                | UpstreamError::Backoff { .. }
                | UpstreamError::Refused { .. }
        )
    }

    /// Whether establishing the connection failed (outlier detection
    /// counts these as gateway failures).
    pub fn is_connect_failure(&self) -> bool {
        matches!(
            self,
            UpstreamError::Resolve { .. }
                | UpstreamError::Connect { .. }
                | UpstreamError::ConnectTimeout { .. }
                | UpstreamError::Backoff { .. }
        )
    }
}

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http::{HeaderName, HeaderValue, Request, Response};
use tracing::{debug, info, warn};

use crate::balancer::{self, BackendStats, BackendView, Balance, RequestInfo};
use crate::body::{self, Guarded, ProxyBody, ReplayStatus, Replayable};
use crate::config::{self, Config};
use crate::health::{
    self, BreakerState, CircuitBreaker, Ejection, HealthState, Outcome, OutlierPool, Rejected,
    Selection,
};
use crate::retry::{BodyState, FailureKind, RetryBudget, RetryConfig, RetryLoop, Step, TryOutcome};
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
    pub counters: Arc<crate::metrics::BackendCounters>,
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

    fn epoch(&self) -> u64 {
        self.state.epoch.load(Ordering::Acquire)
    }

    /// Whether `self` (from a newer config) is the same backend as `old`:
    /// same upstream, id and address. It then inherits `old`'s state.
    fn same_as(&self, old: &SharedBackend) -> bool {
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
    fn candidates(&self, now: Instant) -> Result<Vec<bool>, ForwardError> {
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

/// The 503 for a request every candidate's circuit breaker refused.
fn breaker_error(id: &str, r: &Rejected) -> ForwardError {
    let retry_after = r
        .retry_after
        .map_or(1, |d| d.as_millis().div_ceil(1000) as u64)
        .max(1);
    ForwardError {
        tries: 0,
        status: http::StatusCode::SERVICE_UNAVAILABLE,
        detail: format!("backend {id}: {r}"),
        retry_after: Some(retry_after),
        backend: Some(id.to_owned()),
    }
}

/// Every upstream, shared by the workers.
pub struct SharedUpstreams {
    pub upstreams: Vec<Arc<SharedUpstream>>,
}

/// Errors building upstream state.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("upstreams.{upstream}.tls: {source}")]
    Tls {
        upstream: String,
        source: tls::TlsError,
    },
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
                            counters: Arc::new(crate::metrics::BackendCounters::new(
                                &u.name, &b.id,
                            )),
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

/// Whether connections to `old`'s backends can carry `new`'s requests:
/// protocol, TLS and pool settings are the same.
fn same_connections(old: &config::Upstream, new: &config::Upstream) -> bool {
    old.protocol == new.protocol
        && old.tls_enabled == new.tls_enabled
        && old.sni == new.sni
        && old.client_auth == new.client_auth
        && format!("{:?}", old.verification) == format!("{:?}", new.verification)
        && format!("{:?}", old.pool) == format!("{:?}", new.pool)
        && old.timeouts.connect == new.timeouts.connect
        && old.timeouts.idle == new.timeouts.idle
}

/// One worker's client for one backend, replaced when the backend's
/// connection epoch moves (see [`SharedBackend::renew_connections`]).
struct WorkerPool {
    label: String,
    endpoint: quinn::Endpoint,
    max_header_bytes: u64,
    /// (epoch it was built at, client).
    current: Mutex<(u64, Arc<backend::BackendClient>)>,
}

impl WorkerPool {
    /// The client to use for a request to backend `bi` of `up`; a fresh one
    /// when the epoch moved. The old one is dropped: its idle connections
    /// close now, busy ones once their requests end.
    fn client(&self, up: &SharedUpstream, bi: usize) -> Option<Arc<backend::BackendClient>> {
        let epoch = up.backends.get(bi)?.epoch();
        let mut cur = self.current.lock().ok()?;
        if cur.0 != epoch {
            let fresh = up.backend_client(
                bi,
                self.label.clone(),
                &self.endpoint,
                self.max_header_bytes,
                true,
            )?;
            debug!(backend = %self.label, "replacing the backend's connections");
            *cur = (epoch, Arc::new(fresh));
        }
        Some(cur.1.clone())
    }

    fn get(&self) -> Option<Arc<backend::BackendClient>> {
        self.current.lock().ok().map(|c| c.1.clone())
    }
}

/// One worker's view of an upstream: its own balancer and pools.
struct WorkerUpstream {
    shared: Arc<SharedUpstream>,
    balancer: Mutex<Box<dyn Balance>>,
    /// Shared with the previous generation's view across a reload, so
    /// that in-flight requests and new ones use the same connections.
    pools: Vec<Arc<WorkerPool>>,
}

/// One worker's upstreams, indexed like `Config::upstreams`.
pub struct WorkerUpstreams {
    ups: Vec<WorkerUpstream>,
}

/// A response from a backend.
pub struct Forwarded {
    pub response: Response<ProxyBody>,
    /// Backend id that answered.
    pub backend: String,
    /// Headers the balancer wants on the response (sticky cookie).
    pub extra_headers: Vec<(HeaderName, HeaderValue)>,
    /// `via` version token of the backend hop (`3`, `2`, `1.1`).
    pub via_version: &'static str,
    /// Tries made (1 without retries).
    pub tries: u32,
}

/// Why no backend response could be returned.
#[derive(Debug)]
pub struct ForwardError {
    pub status: http::StatusCode,
    pub detail: String,
    /// Seconds for `retry-after` (503 when nothing is available).
    pub retry_after: Option<u64>,
    /// The backend of the last try, if any.
    pub backend: Option<String>,
    /// Tries made (0 when none could be).
    pub tries: u32,
}

impl WorkerUpstreams {
    /// Builds this worker's balancers and pools over the shared state.
    pub fn new(shared: &SharedUpstreams, client: quinn::Endpoint, config: &Config) -> Self {
        Self::build(shared, client, config, None)
    }

    /// This worker's view of a reloaded config: pools of backends that
    /// stay, with unchanged connection settings, are carried over with
    /// their open connections.
    pub fn reload(
        &self,
        shared: &SharedUpstreams,
        client: quinn::Endpoint,
        config: &Config,
    ) -> Self {
        Self::build(shared, client, config, Some(self))
    }

    fn build(
        shared: &SharedUpstreams,
        client: quinn::Endpoint,
        config: &Config,
        previous: Option<&WorkerUpstreams>,
    ) -> Self {
        let max_header_bytes = config.limits.max_request_header_bytes;
        let ups = shared
            .upstreams
            .iter()
            .map(|u| {
                let old = previous
                    .and_then(|p| p.ups.iter().find(|o| o.shared.cfg.name == u.cfg.name))
                    .filter(|o| same_connections(&o.shared.cfg, &u.cfg));
                WorkerUpstream {
                    balancer: Mutex::new(balancer::build(&u.cfg.balancing)),
                    pools: u
                        .backends
                        .iter()
                        .enumerate()
                        .filter_map(|(i, b)| {
                            let kept = old.and_then(|o| {
                                o.shared
                                    .backends
                                    .iter()
                                    .position(|ob| b.same_as(ob))
                                    .and_then(|oi| o.pools.get(oi))
                            });
                            if let Some(pool) = kept {
                                return Some(pool.clone());
                            }
                            let c = u.backend_client(
                                i,
                                b.label.clone(),
                                &client,
                                max_header_bytes,
                                true,
                            )?;
                            Some(Arc::new(WorkerPool {
                                label: b.label.clone(),
                                endpoint: client.clone(),
                                max_header_bytes,
                                current: Mutex::new((b.epoch(), Arc::new(c))),
                            }))
                        })
                        .collect(),
                    shared: u.clone(),
                }
            })
            .collect();
        Self { ups }
    }

    /// Closes idle backend connections.
    pub fn reap(&self, now: tokio::time::Instant) {
        for u in &self.ups {
            for p in u.pools.iter().filter_map(|p| p.get()) {
                p.reap(now);
            }
        }
    }

    /// Closes every backend connection.
    pub fn close_all(&self) {
        for u in &self.ups {
            for p in u.pools.iter().filter_map(|p| p.get()) {
                p.close_all();
            }
        }
    }

    /// Sends `req` to a backend of upstream `idx`: picks one with the
    /// balancer among eligible backends, retries on another backend when
    /// the retry policy and budget allow, and records every outcome for
    /// outlier detection, circuit breaking and the balancers.
    ///
    /// When retries run out, the client gets the last backend response if
    /// any try produced one (a 503 from a backend says more than spooky's
    /// own 502), else the last error.
    pub async fn forward(
        &self,
        idx: usize,
        req: Request<ProxyBody>,
        client_ip: std::net::IpAddr,
    ) -> Result<Forwarded, ForwardError> {
        let Some(up) = self.ups.get(idx) else {
            return Err(ForwardError {
                tries: 0,
                status: http::StatusCode::INTERNAL_SERVER_ERROR,
                detail: "route names an unknown upstream".into(),
                retry_after: None,
                backend: None,
            });
        };
        let shared = &up.shared;
        let retry = &shared.retry;
        let (parts, body) = req.into_parts();
        let info = RequestInfo {
            client_ip,
            path: parts.uri.path(),
            headers: &parts.headers,
        };
        let replay = Replayable::new(body, retry.buffer_body_limit);
        let mut tries = RetryLoop::new(
            retry,
            &shared.retry_budget,
            &parts.method,
            shared.cfg.timeouts.request,
            Instant::now(),
        );
        // The balancer's view of the last choice, for the sticky cookie.
        let mut views: Vec<BackendView<'_>> = Vec::with_capacity(shared.backends.len());
        let mut now = Instant::now();
        let end = loop {
            let step = tries.next(now, &mut rand::rng(), |now, tried| {
                choose(up, &info, &mut views, now, tried)
            });
            match step {
                Ok(Step::Wait { until }) => {
                    tokio::time::sleep_until(until.into()).await;
                    // The timer fired: the wait is over even where the
                    // runtime's clock is not the system's (paused in tests).
                    now = Instant::now().max(until);
                }
                Ok(Step::Send {
                    backend,
                    attempt,
                    timeout,
                }) => {
                    let (outcome, at) =
                        try_backend(up, backend, attempt, timeout, now, &parts, &replay).await;
                    let status = match &outcome {
                        TryOutcome::Response { status, .. } => Some(*status),
                        _ => None,
                    };
                    let granted = tries.record(outcome, body_state(&replay), at);
                    if let (Ok(true), Some(status), Some(b)) =
                        (granted, status, shared.backends.get(backend))
                    {
                        debug!(backend = %b.label, status, "retrying on another backend");
                    }
                    now = Instant::now();
                }
                Ok(end @ (Step::Respond { .. } | Step::Fail { .. })) => break Ok(end),
                Err(e) => break Err(e),
            }
        };
        let tries = match &end {
            Ok(Step::Respond { tries, .. } | Step::Fail { tries, .. }) => *tries,
            _ => tries.tried().len() as u32,
        };
        if tries > 1 {
            crate::metrics::LIVE
                .retries
                .with_label_values(&[&shared.cfg.name])
                .inc_by(u64::from(tries - 1));
        }
        match end {
            Ok(Step::Respond {
                backend, response, ..
            }) => {
                let mut fwd = deliver(up, &views, response, backend, &info);
                fwd.tries = tries;
                Ok(fwd)
            }
            Ok(Step::Fail { error, .. }) => Err(error.map_or(
                ForwardError {
                    tries,
                    status: http::StatusCode::BAD_GATEWAY,
                    detail: "no backend answered".into(),
                    retry_after: None,
                    backend: None,
                },
                |e| ForwardError { tries, ..e },
            )),
            // The loop above steps the machine in order; reaching this is
            // a bug, reported rather than panicked on.
            Ok(Step::Wait { .. } | Step::Send { .. }) | Err(_) => Err(ForwardError {
                tries,
                status: http::StatusCode::INTERNAL_SERVER_ERROR,
                detail: match end {
                    Err(e) => format!("retry loop: {e}"),
                    Ok(_) => "retry loop stopped mid-request".into(),
                },
                retry_after: None,
                backend: None,
            }),
        }
    }
}

/// The backend for the next try: the balancer's pick among the backends
/// eligible at `now` (filling `views`, which the sticky cookie needs
/// later), avoiding those `tried`. `Err` is the 503 when none is eligible.
fn choose<'a>(
    up: &'a WorkerUpstream,
    info: &RequestInfo<'_>,
    views: &mut Vec<BackendView<'a>>,
    now: Instant,
    tried: &[usize],
) -> Result<Option<usize>, ForwardError> {
    let shared = &up.shared;
    let eligible = shared.candidates(now)?;
    views.clear();
    views.extend(
        shared
            .backends
            .iter()
            .zip(&eligible)
            .map(|(b, &eligible)| BackendView {
                id: &b.cfg.id,
                weight: b.weight(),
                stats: &b.stats,
                eligible,
            }),
    );
    Ok(match up.balancer.lock() {
        Ok(mut bal) => bal.pick(views, info, tried, now),
        Err(_) => None,
    })
}

/// How far the request body has gone, for the retry policy.
fn body_state(replay: &Replayable) -> BodyState {
    match replay.status() {
        ReplayStatus::Replayable => BodyState::FullyBuffered,
        ReplayStatus::Overflowed => BodyState::Streaming,
    }
}

/// One try on backend `bi`, picked at `now`: takes a circuit-breaker
/// permit, sends within `timeout`, and records the result for the
/// counters, outlier detection, the breaker and the balancers. Returns
/// the outcome for the retry loop and the instant to record it at (the
/// response's arrival; a fresh one after an error, so that the budget is
/// charged after the bookkeeping, as it always was).
async fn try_backend(
    up: &WorkerUpstream,
    bi: usize,
    attempt: u32,
    try_timeout: Duration,
    now: Instant,
    parts: &http::request::Parts,
    replay: &Replayable,
) -> (TryOutcome<Response<ProxyBody>, ForwardError>, Instant) {
    let shared = &up.shared;
    let (Some(backend), Some(client)) = (
        shared.backends.get(bi),
        up.pools.get(bi).and_then(|p| p.client(shared, bi)),
    ) else {
        return (TryOutcome::NoClient, now);
    };
    let permit = match &backend.breaker {
        None => None,
        Some(br) => match br.try_acquire(now) {
            Ok(p) => {
                if p.is_trial() {
                    info!(backend = %backend.label, "circuit breaker half-open: sending a trial request");
                }
                Some((p, br))
            }
            Err(rejected) => {
                // Lost a race with another request for the last
                // slot; another backend may take it.
                debug!(backend = %backend.label, reason = %rejected, "circuit breaker rejected the request");
                let error = breaker_error(&backend.cfg.id, &rejected);
                return (TryOutcome::Rejected(error), now);
            }
        },
    };

    let in_flight = backend.stats.start_request_owned();
    backend.counters.requests.fetch_add(1, Ordering::Relaxed);
    if attempt > 0 {
        backend.counters.retries.fetch_add(1, Ordering::Relaxed);
    }
    let head = Request::from_parts(parts.clone(), replay.reader());
    // The per-try timeout covers the whole try, waiting for a
    // connection included (the pool bounds only the exchange).
    let result = match tokio::time::timeout(try_timeout, client.send(head, try_timeout)).await {
        Ok(r) => r.map_err(|(e, _unsent)| e),
        Err(_) => Err(UpstreamError::Timeout {
            backend: backend.label.clone(),
            after: try_timeout,
        }),
    };
    drop(client);
    let done = Instant::now();
    let error = match result {
        Ok(resp) => {
            let status = resp.status().as_u16();
            backend.counters.response(status);
            backend.stats.record_latency(done - now, done);
            backend.counters.latency.observe((done - now).as_secs_f64());
            let ok = status < 500;
            if let Some(o) = &shared.outliers {
                let outcome = if ok {
                    Outcome::Success
                } else {
                    Outcome::Status5xx
                };
                if let Some(ej) = o.record(bi, outcome, done) {
                    ejected(backend, &ej);
                }
            }
            // The result counts now; the concurrency slot lasts as
            // long as the response body.
            let slot = permit.map(|(p, br)| {
                let trial = p.is_trial();
                let (state, slot) = p.record_and_hold(ok, done, br);
                breaker_changed(backend, state, trial, status.to_string());
                slot
            });
            let (rparts, rbody) = resp.into_parts();
            let guard: Box<dyn Send> = Box::new((in_flight, slot));
            let response = Response::from_parts(rparts, body::boxed(Guarded::new(rbody, guard)));
            return (TryOutcome::Response { status, response }, done);
        }
        Err(err) => err,
    };
    drop(in_flight);
    // A try failed before any response.
    let failure = match &error {
        e if e.is_connect_failure() => FailureKind::ConnectFailure,
        UpstreamError::Refused { .. } => FailureKind::Refused,
        UpstreamError::Timeout { .. } => FailureKind::Timeout,
        _ => FailureKind::ResetBeforeHeaders,
    };
    let local = matches!(
        error,
        UpstreamError::ClientAborted(_)
            | UpstreamError::BodyTooLarge { .. }
            | UpstreamError::MalformedBody { .. }
    );
    if !local {
        let c = &backend.counters;
        match failure {
            FailureKind::ConnectFailure | FailureKind::Refused => &c.connect_failures,
            FailureKind::Timeout => &c.timeouts,
            _ => &c.resets,
        }
        .fetch_add(1, Ordering::Relaxed);
        let outcome = match failure {
            FailureKind::ConnectFailure | FailureKind::Refused => Outcome::ConnectFailure,
            FailureKind::Timeout => Outcome::Timeout,
            _ => Outcome::Reset,
        };
        if let Some(o) = &shared.outliers
            && let Some(ej) = o.record(bi, outcome, done)
        {
            ejected(backend, &ej);
        }
        if let Some((p, _)) = permit {
            let trial = p.is_trial();
            let state = p.record(false, done);
            breaker_changed(backend, state, trial, short_detail(&error));
        }
    }
    debug!(backend = %backend.label, error = %error, attempt, "try failed");
    let forward_error = ForwardError {
        tries: 0,
        status: error.status(),
        detail: short_detail(&error),
        retry_after: None,
        backend: Some(backend.cfg.id.clone()),
    };
    let outcome = if local {
        // The client's request itself failed: no retry, and an
        // earlier backend response is moot.
        TryOutcome::Local(forward_error)
    } else {
        TryOutcome::Failed {
            failure,
            error: forward_error,
        }
    };
    (outcome, Instant::now())
}

/// The response of backend `bi`, with the balancer's cookie (sticky
/// sessions need only the served backend's id from `views`).
fn deliver(
    up: &WorkerUpstream,
    views: &[BackendView<'_>],
    response: Response<ProxyBody>,
    bi: usize,
    info: &RequestInfo<'_>,
) -> Forwarded {
    let shared = &up.shared;
    let cookie = match up.balancer.lock() {
        Ok(bal) => bal.set_cookie(views, bi, info),
        Err(_) => None,
    };
    Forwarded {
        response,
        via_version: match shared.cfg.protocol {
            config::UpstreamProtocol::Http3 => "3",
            config::UpstreamProtocol::Http2 => "2",
            config::UpstreamProtocol::Http1 => "1.1",
        },
        backend: shared
            .backends
            .get(bi)
            .map(|b| b.cfg.id.clone())
            .unwrap_or_default(),
        extra_headers: cookie
            .map(|c| (http::header::SET_COOKIE, c))
            .into_iter()
            .collect(),
        tries: 1,
    }
}

/// Logs an outlier ejection and renews the workers' connections to the
/// backend (a silent connection to a dead backend must not outlive it).
fn ejected(backend: &SharedBackend, ej: &Ejection) {
    warn!(
        backend = %backend.label,
        reason = ?ej.reason,
        ejection_ms = ej.duration.as_millis() as u64,
        times_ejected = ej.times_ejected,
        "backend ejected (outlier detection)"
    );
    backend.renew_connections();
}

/// Logs a circuit-breaker transition caused by a request's result.
fn breaker_changed(
    backend: &SharedBackend,
    state: Option<BreakerState>,
    trial: bool,
    result: String,
) {
    match state {
        Some(BreakerState::Open) if trial => {
            warn!(backend = %backend.label, %result, "circuit breaker re-opened: the trial request failed")
        }
        Some(BreakerState::Open) => {
            warn!(backend = %backend.label, %result, "circuit breaker opened: requests are refused until a trial succeeds")
        }
        Some(BreakerState::Closed) => {
            info!(backend = %backend.label, "circuit breaker closed: the trial request succeeded")
        }
        _ => {}
    }
}

/// What the client is told: the kind of failure, not internal addresses.
fn short_detail(e: &UpstreamError) -> String {
    match e {
        UpstreamError::Resolve { .. } => "backend address does not resolve".into(),
        UpstreamError::Connect { .. } => "cannot connect to the backend".into(),
        UpstreamError::ConnectTimeout { .. } => "backend connect timed out".into(),
        UpstreamError::Backoff { .. } => "backend unreachable (reconnecting)".into(),
        UpstreamError::Refused { .. } => "backend refused the request".into(),
        UpstreamError::Reset { .. } => "backend reset the request".into(),
        UpstreamError::InvalidResponse { .. } => "backend sent an invalid response".into(),
        UpstreamError::Timeout { after, .. } => {
            format!("backend sent no response within {} ms", after.as_millis())
        }
        UpstreamError::BodyTooLarge { limit } => format!("request body exceeds {limit} bytes"),
        UpstreamError::MalformedBody { .. } => "malformed request body".into(),
        UpstreamError::ClientAborted(_) => "client aborted the request".into(),
    }
}

impl SharedUpstreams {
    /// Starts the active health checks (see [`probe`]).
    pub fn start_health_checks(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        probe::start(self)
    }
}
